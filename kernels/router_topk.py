"""Fused MoE router: softmax + top-k + renormalisation + auxiliary-loss statistics, forward and backward.

What it fuses (forward, one pass over the (T, E) logits): the row softmax in fp32 arithmetic (inputs fp32,
bf16 or fp16), the top-k selection (ties to the lowest expert index, like a stable descending sort), the
weights (renormalised over the k picks, or the plain softmax probabilities), the per-token logsumexp (for the
z-loss, and what the backward needs to recompute the softmax) and, when asked, per-program partial sums of
the router probabilities and of the tokens per expert. A second tiny kernel reduces the partials in a fixed
order, so the statistics are deterministic (no float atomics). The backward kernel turns d weights (and
d logsumexp, d prob-sum) into d logits, recomputing the softmax from the logits and the saved logsumexp.

Trade-offs and constants:
- One program owns BLOCK_T whole rows: BLOCK_E = next power of two >= E (<= 512; padded lanes are masked to
  -inf), so a row's softmax and top-k never leave registers. BLOCK_T * BLOCK_E is kept near 2048 elements
  (16 fp32 per thread at 4 warps) so the several row-sized temporaries do not spill (an ahead-of-time
  compile for sm_90 reports no local memory; the tests compile every kernel that way). Not yet run or
  tuned on a GPU: BLOCK_T, num_warps and the stats reduction's BLOCK_P are first guesses.
- Top-k is k rounds of (row max, lowest index attaining it, mask it out): O(k E) compares per row, which for
  k <= 16 is cheaper than a sort network and gives the lowest-index tie rule for free. Selection uses the
  logits (softmax is monotone), so probabilities that round equal in fp32 do not create spurious ties.
  NaN logits rank first (as in torch.topk); indices always stay in [0, E).
- The weights are fp32 whatever the logits' dtype: callers cast when they combine expert outputs.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import on_device

MAX_EXPERTS = 512
MAX_K = 16
_TILE_ELEMS = 2048
_MAX_BLOCK_T = 64


@triton.jit
def _max_propagate_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _router_topk_fwd_kernel(
    x_ptr, w_ptr, idx_ptr, lse_ptr, pcount_ptr, pprob_ptr,
    T, E, stride_xt, stride_xe,
    K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    NORMALIZE: tl.constexpr, STATS: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    rmask = rows < T
    cmask = cols < E
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xt + cols[None, :] * stride_xe, mask=mask, other=float("-inf"))
    x = x.to(tl.float32)

    # softmax statistics; a row of -inf (or a padding row) has m = -inf: shift by 0 so that z = 0, lse = -inf.
    # The max propagates NaN, so a row with a NaN gets NaN weights and statistics, as torch.softmax does.
    m = tl.reduce(x, 1, _max_propagate_nan)
    m = tl.where(m == float("-inf"), 0.0, m)
    ex = tl.exp(x - m[:, None])
    z = tl.where(rmask, tl.sum(ex, axis=1), 1.0)  # padding rows: keep log/division finite
    lse = m + tl.log(z)
    tl.store(lse_ptr + rows, lse, mask=rmask)

    # top-k by repeated arg-max; ties -> lowest index; NaN ranks first
    key = tl.where(x != x, float("inf"), x)
    avail = cmask[None, :] & (rows >= 0)[:, None]
    sel_e = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    sel_i = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for j in range(K):
        cand = tl.where(avail, key, float("-inf"))
        best = tl.max(cand, axis=1)
        hit = avail & (cand == best[:, None])
        bi = tl.min(tl.where(hit, cols[None, :], BLOCK_E), axis=1)
        avail = avail & (cols[None, :] != bi[:, None])
        eb = tl.exp(best - m)
        sel_i = tl.where(kcols[None, :] == j, bi[:, None], sel_i)
        sel_e = tl.where(kcols[None, :] == j, eb[:, None], sel_e)

    if NORMALIZE:
        denom = tl.where(rmask, tl.sum(sel_e, axis=1), 1.0)
    else:
        denom = z
    w = sel_e / denom[:, None]
    kmask = rmask[:, None] & (kcols[None, :] < K)
    out = rows[:, None] * K + kcols[None, :]
    tl.store(w_ptr + out, w, mask=kmask)
    tl.store(idx_ptr + out, sel_i.to(tl.int64), mask=kmask)

    if STATS:
        p = tl.where(mask, ex / z[:, None], 0.0)
        psum = tl.sum(p, axis=0)
        picked = mask & (~avail)
        cnt = tl.sum(picked.to(tl.int32), axis=0)
        prow = pid.to(tl.int64) * E
        tl.store(pprob_ptr + prow + cols, psum, mask=cmask)
        tl.store(pcount_ptr + prow + cols, cnt, mask=cmask)


@triton.jit
def _router_topk_stats_kernel(
    pcount_ptr, pprob_ptr, counts_ptr, psum_ptr, P, E,
    BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
):
    # Column sums of the (P, E) partials, always in the same order: deterministic statistics.
    cols = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    cmask = cols < E
    acc_p = tl.zeros((BLOCK_E,), dtype=tl.float32)
    acc_c = tl.zeros((BLOCK_E,), dtype=tl.int64)
    for p0 in range(0, P, BLOCK_P):
        prow = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
        msk = (prow < P)[:, None] & cmask[None, :]
        off = prow[:, None] * E + cols[None, :]
        acc_p += tl.sum(tl.load(pprob_ptr + off, mask=msk, other=0.0), axis=0)
        acc_c += tl.sum(tl.load(pcount_ptr + off, mask=msk, other=0).to(tl.int64), axis=0)
    tl.store(psum_ptr + cols, acc_p, mask=cmask)
    tl.store(counts_ptr + cols, acc_c, mask=cmask)


@triton.jit
def _router_topk_bwd_kernel(
    x_ptr, lse_ptr, w_ptr, idx_ptr, gw_ptr, glse_ptr, gpsum_ptr, dx_ptr,
    T, E, stride_xt, stride_xe, stride_dt, stride_de, stride_gwt, stride_gwk, stride_glse,
    K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_GW: tl.constexpr, HAS_GLSE: tl.constexpr, HAS_GPSUM: tl.constexpr,
    NEED_P: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    rmask = rows < T
    cmask = cols < E
    mask = rmask[:, None] & cmask[None, :]
    kmask = rmask[:, None] & (kcols[None, :] < K)
    dx = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)

    if NEED_P:  # the full softmax is needed: recompute it from the logits and the saved logsumexp
        x = tl.load(x_ptr + rows[:, None] * stride_xt + cols[None, :] * stride_xe, mask=mask, other=0.0)
        lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
        p = tl.where(mask, tl.exp(x.to(tl.float32) - lse[:, None]), 0.0)
    if HAS_GW:
        out = rows[:, None] * K + kcols[None, :]
        w = tl.load(w_ptr + out, mask=kmask, other=0.0)
        g = tl.load(gw_ptr + rows[:, None] * stride_gwt + kcols[None, :] * stride_gwk, mask=kmask, other=0.0)
        g = g.to(tl.float32)
        gw_dot = tl.sum(g * w, axis=1)
        if NORMALIZE:
            val = w * (g - gw_dot[:, None])  # d(softmax over the k picks)
        else:
            val = g * w  # d p_i / d x_i part of d p_i / d x
        for j in range(K):
            vj = tl.sum(tl.where(kcols[None, :] == j, val, 0.0), axis=1)
            ij = tl.load(idx_ptr + rows * K + j, mask=rmask, other=-1)
            dx += tl.where(cols[None, :] == ij[:, None], vj[:, None], 0.0)
        if not NORMALIZE:
            dx -= p * gw_dot[:, None]
    if HAS_GLSE:
        gl = tl.load(glse_ptr + rows * stride_glse, mask=rmask, other=0.0).to(tl.float32)
        dx += p * gl[:, None]
    if HAS_GPSUM:
        gp = tl.load(gpsum_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        gp_dot = tl.sum(p * gp[None, :], axis=1)
        dx += p * (gp[None, :] - gp_dot[:, None])
    tl.store(dx_ptr + rows[:, None] * stride_dt + cols[None, :] * stride_de,
             dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _blocks(T: int, E: int, k: int):
    block_e = max(2, triton.next_power_of_2(E))
    block_k = max(2, triton.next_power_of_2(k))
    block_t = max(1, min(_TILE_ELEMS // block_e, _MAX_BLOCK_T, triton.next_power_of_2(max(T, 1))))
    num_warps = 4 if block_t * block_e <= 2048 else 8
    return block_t, block_e, block_k, num_warps


def router_topk_triton(logits, k: int, *, normalize: bool = True, stats: bool = False):
    """Launch the fused router forward on ``logits`` (T, E) fp32/bf16/fp16, any strides, E <= 512, k <= 16.

    Returns ``(weights, indices, lse, prob_sum, counts)``: weights (T, k) float32 (renormalised over the k
    picks when ``normalize``, else the softmax probabilities), indices (T, k) int64 (descending logit, ties to
    the lowest index), lse (T,) float32 logsumexp of each row; with ``stats`` prob_sum (E,) float32 (sum over
    tokens of the full softmax) and counts (E,) int64 (tokens routed to each expert), else two empty tensors.
    The public wrapper validates the arguments; this launcher only re-checks the kernel's limits.
    """
    import torch

    if logits.dim() != 2 or not 1 <= k <= min(MAX_K, logits.shape[1]) or logits.shape[1] > MAX_EXPERTS:
        raise ValueError(f"router_topk_triton takes logits (T, E) with E <= {MAX_EXPERTS} and 1 <= k <= "
                         f"min(E, {MAX_K}); got shape {tuple(logits.shape)}, k={k}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"router_topk_triton takes float32/float16/bfloat16 logits, got {logits.dtype}")
    T, E = logits.shape
    dev = logits.device
    w = torch.empty((T, k), dtype=torch.float32, device=dev)
    idx = torch.empty((T, k), dtype=torch.int64, device=dev)
    lse = torch.empty((T,), dtype=torch.float32, device=dev)
    if stats:
        prob_sum = torch.empty((E,), dtype=torch.float32, device=dev)
        counts = torch.empty((E,), dtype=torch.int64, device=dev)
    else:
        prob_sum = torch.empty((0,), dtype=torch.float32, device=dev)
        counts = torch.empty((0,), dtype=torch.int64, device=dev)
    if T == 0:
        if stats:
            prob_sum.zero_()
            counts.zero_()
        return w, idx, lse, prob_sum, counts
    block_t, block_e, block_k, num_warps = _blocks(T, E, k)
    P = triton.cdiv(T, block_t)
    if stats:
        pprob = torch.empty((P, E), dtype=torch.float32, device=dev)
        pcount = torch.empty((P, E), dtype=torch.int32, device=dev)
    else:
        pprob = pcount = lse  # never touched (STATS=False)
    with on_device(logits):
        _router_topk_fwd_kernel[(P,)](
            logits, w, idx, lse, pcount, pprob,
            T, E, logits.stride(0), logits.stride(1),
            K=k, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=block_k,
            NORMALIZE=bool(normalize), STATS=bool(stats), num_warps=num_warps,
        )
        if stats:
            be = min(128, block_e)
            _router_topk_stats_kernel[(triton.cdiv(E, be),)](
                pcount, pprob, counts, prob_sum, P, E, BLOCK_P=32, BLOCK_E=be, num_warps=4,
            )
    return w, idx, lse, prob_sum, counts


def router_topk_backward_triton(logits, lse, weights, indices, grad_weights=None, grad_lse=None,
                                grad_prob_sum=None, *, normalize: bool = True):
    """d logits (T, E), in the logits' dtype, from the saved forward outputs and the output gradients.

    ``logits`` (T, E), ``lse`` (T,) float32, ``weights`` (T, k) float32 contiguous, ``indices`` (T, k) int64
    contiguous; ``grad_weights`` (T, k), ``grad_lse`` (T,), ``grad_prob_sum`` (E,), each optional
    (None = zero; any strides, stride 0 included).
    """
    import torch

    T, E = logits.shape
    k = weights.shape[1]
    dx = torch.empty((T, E), dtype=logits.dtype, device=logits.device)
    if T == 0:
        return dx
    block_t, block_e, block_k, num_warps = _blocks(T, E, k)
    has_gw, has_glse, has_gp = grad_weights is not None, grad_lse is not None, grad_prob_sum is not None
    gw = grad_weights if has_gw else weights
    gl = grad_lse if has_glse else lse
    gp = grad_prob_sum.contiguous() if has_gp else lse
    with on_device(logits):
        _router_topk_bwd_kernel[(triton.cdiv(T, block_t),)](
            logits, lse, weights, indices, gw, gl, gp, dx,
            T, E, logits.stride(0), logits.stride(1), dx.stride(0), dx.stride(1),
            gw.stride(0), gw.stride(1), gl.stride(0),
            K=k, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=block_k,
            NORMALIZE=bool(normalize), HAS_GW=has_gw, HAS_GLSE=has_glse, HAS_GPSUM=has_gp,
            NEED_P=(has_gw and not normalize) or has_glse or has_gp, num_warps=num_warps,
        )
    return dx
