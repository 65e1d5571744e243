"""Grouped GEMMs of a dropless top-k MoE with the gather and the weighted scatter fused in (Triton).

What it fuses (forward, expert-sorted rows i, pair p = sorted_pairs[i], token t = p // k, expert e):
  1. ``_moe_gather_gemm_fwd_kernel``: A[i] = x[t] @ W_gate_up[e]^T with x rows GATHERED through
     sorted_pairs // k inside the GEMM (no (T*k, d) permuted copy is written) and the activation fused
     in the epilogue: h[i] = silu(A_gate) * A_up (SwiGLU, gate and up accumulated side by side in one
     program so the pair is never stored apart) or gelu(A). Writes h (T*k, f) and, for training, the
     pre-activation A (T*k, 2f or f).
  2. ``_moe_scatter_gemm_kernel``: y[t] += w[p] * (h[i] @ W_down[e]^T): the routing weight is applied in
     the epilogue and rows are added into a float32 (T, d) buffer with relaxed atomics (plain stores when
     k == 1), so no (T*k, d) expert-output copy is written either. Deterministic mode (an argument, or
     ``torch.use_deterministic_algorithms(True)``): one row per (token, slot) is stored instead and the k
     slots are summed in slot order afterwards. Reused for dx (dA @ W_gate_up[e], no weight).
Backward:
  3. ``_moe_gather_gemm_bwd_kernel``: G[i] = dy[t] @ W_down[e] (gathered rows of dy), stored into dA's first
     f columns in the operand dtype. Its epilogue is a plain store: fusing the activation backward into it
     keeps G, A_gate, A_up and their products live at once, which spills registers on sm_90 at every tile
     of 64 x 128 and up.
  4. ``_moe_act_bwd_kernel`` (elementwise, memory-bound): dA = w[p] G * act'(A), h recomputed from A for the
     weight gradient, and d topk_weights[p] = <G[i], h[i]> (= <expert output, dy[t]>, so the (T*k, d)
     expert output is never stored or recomputed), one program per row block summing its columns in
     order: deterministic. Costs one extra read and write of G (T*k*f elements) over a fused epilogue.
  5. ``_moe_weight_grad_kernel``: dW[e] = sum over the expert's rows of L[i]^T R[i], with either side
     gathered (dW_down: L = w[p] dy[t], R = h; dW_gate_up: L = dA, R = x[t]). One program owns one output
     tile of one expert and loops over that expert's rows: no atomics, empty experts get zeros.

Tile -> expert schedule: built on the device inside each kernel from the (E+1,) offsets (a cumsum of
ceil(count_e / BLOCK_M) over E lanes), so nothing is read back to the host and the launch grid is a static
upper bound (ceil(T*k / BLOCK_M) + min(E, T*k) row tiles); programs past the last tile return at once.
Programs take tiles in groups of GROUP_M row tiles (``_grouped_tile``): the programs of a group read the
same weight tile, which comes from L2 after the first, instead of every row tile streaming its expert's
whole weight from HBM. Row indices and all offsets are int64 (T*k*d may pass 2^31). Every launch enters
the device of its tensors. The weight-gradient kernel does not split an expert's rows across programs
(fine for the many output tiles of real layers, slow for one huge expert with a tiny weight).
Constants: BLOCK_* are kernel parameters; on a GPU they come from ``triton.autotune`` over
``KERNEL_CONFIGS`` (moe_experts_tuning.py: Hopper-shaped tiles of 16-128 rows, 64-256 columns, 32-64 deep, 3-4 stages;
the key holds the sizes, the expert count, the activation and other code variants, the dot precision and the
token count rounded up to a power of two, so varying batch sizes do not retune every step), under the
interpreter from fixed defaults (32 x 64 x 64: few programs, which is what costs time there) so CPU tests
stay fast; every launcher's ``config=`` pins one config instead. Before anything compiles, the autotuner
prunes the configs whose shared memory (``shared_memory_estimate``: num_stages buffers of the operand tiles
in the operands' element size) cannot fit an H200 block (``SHARED_MEMORY_LIMIT``), whose float32
accumulators exceed ``ACC_REGISTERS_PER_THREAD`` values per thread (they spill), and, for float32 IEEE
dots (no TF32: torch's float32 matmul precision "highest"), tiles over ``IEEE_MAX_TILE`` elements;
``configs_for`` lists what is kept, and a pinned config over the shared memory raises ValueError. Compiled
for sm_90a (ahead of time on a CPU by benchmarks/compile_report.py, ``make compile-report``: registers,
spills and shared memory of every config in benchmarks/results/compile_report_sm90.csv), no kept bf16 or
fp16 config spills; every config loads through multi-stage cp.async and the dots use wgmma where their tile
has 64 or more rows in bf16/fp16 or TF32 (16- and 32-row tiles use mma.sync, IEEE float32 dots FMA), once
d and f are multiples of 16 (the JIT's divisibility specialisation); with ragged sizes the masked loads are
not vectorised and the loop is not pipelined. Not measured on a GPU yet: the autotune list is a starting
point, not a tuned table. Under the interpreter, bfloat16 dot operands are widened first (see ``_mma``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from metamoe.backends.availability import triton_interpret

from . import on_device
from .moe_experts_tuning import (  # noqa: F401  (re-exported: the op's configs and pruning rules)
    ACC_REGISTERS_PER_THREAD,
    ACT_GELU,
    ACT_GELU_TANH,
    ACT_SWIGLU,
    ACTIVATIONS,
    DOT_TILES,
    IEEE_MAX_TILE,
    KERNEL_CONFIGS,
    SHARED_MEMORY_LIMIT,
    acc_per_thread,
    configs_for,
    over_limit_reason,
    shared_memory_estimate,
    shared_memory_pruner,
)

# --------------------------------------------------------------------------- device helpers


@triton.jit
def _expert_of_tile(pid_m, offsets_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Expert owning row tile ``pid_m`` (E when past the last tile), the tile's first row, the expert's end row."""
    es = tl.arange(0, BLOCK_E)
    emask = es < E
    start = tl.load(offsets_ptr + es, mask=emask, other=0)
    end = tl.load(offsets_ptr + es + 1, mask=emask, other=0)
    ntiles = (end - start + BLOCK_M - 1) // BLOCK_M
    if BLOCK_E <= 64:
        # inclusive prefix sum as a masked triangular reduction: cheap at this size on a GPU, and far
        # faster than tl.cumsum under the interpreter
        tri = es[None, :] <= es[:, None]
        cum = tl.sum(tl.where(tri, ntiles[None, :], 0), axis=1)
    else:
        cum = tl.cumsum(ntiles, axis=0)
    e = tl.sum((cum <= pid_m).to(tl.int32), axis=0)
    first_tile = tl.sum(tl.where(es < e, ntiles, 0), axis=0)
    seg_start = tl.sum(tl.where(es == e, start, 0), axis=0)
    seg_end = tl.sum(tl.where(es == e, end, 0), axis=0)
    row0 = seg_start + (pid_m - first_tile) * BLOCK_M
    return e, row0, seg_end


@triton.jit
def _grouped_tile(pid, M, E, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid``, GROUP_M row tiles at a time: the GROUP_M programs in a row
    read the same weight tile (from L2 after the first), and a group walks every column tile of its rows
    before the next group starts. Row tiles are numbered over the padded upper bound of the launch grid."""
    num_pid_m = tl.cdiv(M, BLOCK_M) + tl.minimum(E, M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _mma(a, b, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b in float32. UPCAST (interpreter + bfloat16 only): the Triton interpreter multiplies the
    raw bit patterns of bfloat16 dot operands (triton-lang/triton#11584), so they are widened first; the
    products of bfloat16 values are exact in float32, so this matches a bf16 MMA with fp32 accumulation."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _gelu_fwd(a, ACT: tl.constexpr):
    if ACT == 1:
        return 0.5 * a * (1.0 + tl.erf(a * 0.7071067811865476))
    else:
        inner = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        th = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        return 0.5 * a * (1.0 + th)


@triton.jit
def _gelu_grad(a, ACT: tl.constexpr):
    if ACT == 1:
        cdf = 0.5 * (1.0 + tl.erf(a * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * a * a)
        return cdf + a * pdf
    else:
        inner = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        th = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        dinner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * a * a)
        return 0.5 * (1.0 + th) + 0.5 * a * (1.0 - th * th) * dinner


# --------------------------------------------------------------------------- kernels


@triton.jit
def _moe_gather_gemm_fwd_kernel(
    x_ptr, w_ptr, pairs_ptr, offsets_ptr, pre_ptr, h_ptr,
    M, E, F, D, M_BUCKET,
    stride_xt, stride_xd,
    stride_we, stride_wn, stride_wd,
    stride_pre, stride_h,
    TOPK: tl.constexpr, ACT: tl.constexpr, STORE_PRE: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, E, F, BLOCK_M, BLOCK_N, GROUP_M)
    e, row0, seg_end = _expert_of_tile(pid_m, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if e >= E:
        return
    rows = row0 + tl.arange(0, BLOCK_M).to(tl.int64)
    rmask = rows < seg_end
    pairs = tl.load(pairs_ptr + rows, mask=rmask, other=0)
    toks = pairs // TOPK
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < F
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + toks[:, None] * stride_xt + ks[None, :] * stride_xd
    w_base = w_ptr + e.to(tl.int64) * stride_we
    wg_ptrs = w_base + cols[None, :].to(tl.int64) * stride_wn + ks[:, None] * stride_wd
    wu_ptrs = wg_ptrs + F * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kmask = (ks + k0) < D
        a = tl.load(x_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        bmask = kmask[:, None] & cmask[None, :]
        b = tl.load(wg_ptrs, mask=bmask, other=0.0)
        acc_g = _mma(a, b, acc_g, DOT_PREC, UPCAST)
        if ACT == 0:
            bu = tl.load(wu_ptrs, mask=bmask, other=0.0)
            acc_u = _mma(a, bu, acc_u, DOT_PREC, UPCAST)
        x_ptrs += BLOCK_K * stride_xd
        wg_ptrs += BLOCK_K * stride_wd
        wu_ptrs += BLOCK_K * stride_wd
    omask = rmask[:, None] & cmask[None, :]
    pre_ptrs = pre_ptr + rows[:, None] * stride_pre + cols[None, :]
    if ACT == 0:
        if STORE_PRE:
            tl.store(pre_ptrs, acc_g.to(pre_ptr.dtype.element_ty), mask=omask)
            tl.store(pre_ptrs + F, acc_u.to(pre_ptr.dtype.element_ty), mask=omask)
        h = acc_g * tl.sigmoid(acc_g) * acc_u
    else:
        if STORE_PRE:
            tl.store(pre_ptrs, acc_g.to(pre_ptr.dtype.element_ty), mask=omask)
        h = _gelu_fwd(acc_g, ACT)
    tl.store(h_ptr + rows[:, None] * stride_h + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _moe_scatter_gemm_kernel(
    a_ptr, w_ptr, pairs_ptr, offsets_ptr, scale_ptr, out_ptr,
    M, E, N, KD, M_BUCKET,
    stride_am, stride_ak,
    stride_we, stride_wn, stride_wk,
    stride_ot,
    TOPK: tl.constexpr, HAS_SCALE: tl.constexpr, ATOMIC: tl.constexpr, BY_PAIR: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, E, N, BLOCK_M, BLOCK_N, GROUP_M)
    e, row0, seg_end = _expert_of_tile(pid_m, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if e >= E:
        return
    rows = row0 + tl.arange(0, BLOCK_M).to(tl.int64)
    rmask = rows < seg_end
    pairs = tl.load(pairs_ptr + rows, mask=rmask, other=0)
    toks = pairs // TOPK
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = w_ptr + e.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wn + ks[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KD, BLOCK_K):
        kmask = (ks + k0) < KD
        a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = _mma(a, b, acc, DOT_PREC, UPCAST)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_wk
    if HAS_SCALE:
        s = tl.load(scale_ptr + pairs, mask=rmask, other=0.0).to(tl.float32)
        acc = acc * s[:, None]
    omask = rmask[:, None] & cmask[None, :]
    if BY_PAIR:  # one output row per (token, slot): summed over the slots afterwards, in a fixed order
        o_ptrs = out_ptr + pairs[:, None] * stride_ot + cols[None, :]
    else:
        o_ptrs = out_ptr + toks[:, None] * stride_ot + cols[None, :]
    if ATOMIC:
        # relaxed: the adds only need to be atomic, nothing is ordered against them within the kernel
        tl.atomic_add(o_ptrs, acc, mask=omask, sem="relaxed")
    else:
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _moe_gather_gemm_bwd_kernel(
    dy_ptr, w_ptr, pairs_ptr, offsets_ptr, g_ptr,
    M, E, F, D, M_BUCKET,
    stride_dyt, stride_dyd,
    stride_we, stride_wd, stride_wf,
    stride_g,
    TOPK: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, E, F, BLOCK_M, BLOCK_N, GROUP_M)
    e, row0, seg_end = _expert_of_tile(pid_m, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if e >= E:
        return
    rows = row0 + tl.arange(0, BLOCK_M).to(tl.int64)
    rmask = rows < seg_end
    pairs = tl.load(pairs_ptr + rows, mask=rmask, other=0)
    toks = pairs // TOPK
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < F
    ks = tl.arange(0, BLOCK_K)
    dy_ptrs = dy_ptr + toks[:, None] * stride_dyt + ks[None, :] * stride_dyd
    b_ptrs = w_ptr + e.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wf + ks[:, None] * stride_wd
    g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kmask = (ks + k0) < D
        a = tl.load(dy_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
        g = _mma(a.to(b.dtype), b, g, DOT_PREC, UPCAST)
        dy_ptrs += BLOCK_K * stride_dyd
        b_ptrs += BLOCK_K * stride_wd
    tl.store(g_ptr + rows[:, None] * stride_g + cols[None, :], g.to(g_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _moe_act_bwd_kernel(
    da_ptr, pre_ptr, h_ptr, pairs_ptr, scale_ptr, dw_ptr,
    M, F,
    stride_da, stride_pre, stride_h,
    ACT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    # da[:, :F] holds G on entry; every element is read before the program overwrites it.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rmask = rows < M
    pairs = tl.load(pairs_ptr + rows, mask=rmask, other=0)
    s = tl.load(scale_ptr + pairs, mask=rmask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_R,), dtype=tl.float32)
    fs = tl.arange(0, BLOCK_F)
    for f0 in range(0, F, BLOCK_F):
        cols = f0 + fs
        m = rmask[:, None] & (cols < F)[None, :]
        da_ptrs = da_ptr + rows[:, None] * stride_da + cols[None, :]
        pre_ptrs = pre_ptr + rows[:, None] * stride_pre + cols[None, :]
        g = tl.load(da_ptrs, mask=m, other=0.0).to(tl.float32)
        dh = g * s[:, None]
        if ACT == 0:
            ag = tl.load(pre_ptrs, mask=m, other=0.0).to(tl.float32)
            au = tl.load(pre_ptrs + F, mask=m, other=0.0).to(tl.float32)
            sg = tl.sigmoid(ag)
            silu = ag * sg
            h = silu * au
            tl.store(da_ptrs, (dh * au * sg * (1.0 + ag * (1.0 - sg))).to(da_ptr.dtype.element_ty), mask=m)
            tl.store(da_ptrs + F, (dh * silu).to(da_ptr.dtype.element_ty), mask=m)
        else:
            a_pre = tl.load(pre_ptrs, mask=m, other=0.0).to(tl.float32)
            h = _gelu_fwd(a_pre, ACT)
            tl.store(da_ptrs, (dh * _gelu_grad(a_pre, ACT)).to(da_ptr.dtype.element_ty), mask=m)
        tl.store(h_ptr + rows[:, None] * stride_h + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=m)
        # d topk_weights[p] = <expert output, dy[t]> = <h, dy[t] @ W_down[e]> = <h, G>, summed in column order
        dw += tl.sum(g * h, axis=1)
    tl.store(dw_ptr + rows, dw, mask=rmask)


@triton.jit
def _moe_weight_grad_kernel(
    l_ptr, r_ptr, pairs_ptr, offsets_ptr, scale_ptr, out_ptr,
    E, N1, N2, M_BUCKET,
    stride_lm, stride_ln, stride_rm, stride_rn,
    stride_oe, stride_o1, stride_o2,
    TOPK: tl.constexpr, L_GATHER: tl.constexpr, L_SCALE: tl.constexpr, R_GATHER: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_N2: tl.constexpr,
):
    pid = tl.program_id(0)
    e = tl.program_id(1)
    n2_tiles = tl.cdiv(N2, BLOCK_N2)
    pid_1 = pid // n2_tiles
    pid_2 = pid % n2_tiles
    seg_start = tl.load(offsets_ptr + e)
    seg_end = tl.load(offsets_ptr + e + 1)
    if SPLIT:  # the expert's rows in tl.num_programs(2) chunks of whole row blocks, one per program
        chunk = tl.cdiv(tl.cdiv(seg_end - seg_start, tl.num_programs(2)), BLOCK_M) * BLOCK_M
        start = seg_start + tl.program_id(2) * chunk
        end = tl.minimum(seg_end, start + chunk)
    else:
        start = seg_start
        end = seg_end
    c1 = pid_1 * BLOCK_N1 + tl.arange(0, BLOCK_N1)
    c2 = pid_2 * BLOCK_N2 + tl.arange(0, BLOCK_N2)
    c1mask = c1 < N1
    c2mask = c2 < N2
    acc = tl.zeros((BLOCK_N1, BLOCK_N2), dtype=tl.float32)
    ms = tl.arange(0, BLOCK_M).to(tl.int64)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + ms
        rmask = rows < end
        pairs = tl.load(pairs_ptr + rows, mask=rmask, other=0)
        toks = pairs // TOPK
        if L_GATHER:
            lrows = toks
        else:
            lrows = rows
        if R_GATHER:
            rrows = toks
        else:
            rrows = rows
        lv = tl.load(l_ptr + lrows[:, None] * stride_lm + c1[None, :] * stride_ln,
                     mask=rmask[:, None] & c1mask[None, :], other=0.0)
        rv = tl.load(r_ptr + rrows[:, None] * stride_rm + c2[None, :] * stride_rn,
                     mask=rmask[:, None] & c2mask[None, :], other=0.0)
        if L_SCALE:
            s = tl.load(scale_ptr + pairs, mask=rmask, other=0.0).to(tl.float32)
            lv = (lv.to(tl.float32) * s[:, None]).to(rv.dtype)
        else:
            lv = lv.to(rv.dtype)
        acc = _mma(tl.trans(lv), rv, acc, DOT_PREC, UPCAST)
    o_ptrs = out_ptr + e.to(tl.int64) * stride_oe + c1[:, None].to(tl.int64) * stride_o1 + c2[None, :] * stride_o2
    if SPLIT:  # float32 partial sums of the chunks into a zeroed buffer
        tl.atomic_add(o_ptrs, acc, mask=c1mask[:, None] & c2mask[None, :] & (start < end), sem="relaxed")
    else:
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=c1mask[:, None] & c2mask[None, :])


# --------------------------------------------------------------------------- tuning

def _autotuned(kernel: str, fn, key, **kw):
    return triton.autotune(KERNEL_CONFIGS[kernel], key=key,
                           prune_configs_by={"early_config_prune": shared_memory_pruner(kernel)}, **kw)(fn)


# Autotune keys: what changes the best config. Token counts enter bucketed (M_BUCKET, a power of two), so a
# training run whose batches vary in size does not retune on every step.
_gather_fwd_tuned = _autotuned("gather_fwd", _moe_gather_gemm_fwd_kernel,
                               ["F", "D", "E", "TOPK", "ACT", "STORE_PRE", "DOT_PREC", "M_BUCKET"])
_scatter_tuned = _autotuned("scatter", _moe_scatter_gemm_kernel,
                            ["N", "KD", "E", "TOPK", "HAS_SCALE", "ATOMIC", "BY_PAIR", "DOT_PREC", "M_BUCKET"],
                            reset_to_zero=["out_ptr"])
_gather_bwd_tuned = _autotuned("gather_bwd", _moe_gather_gemm_bwd_kernel, ["F", "D", "E", "TOPK", "DOT_PREC",
                                                                          "M_BUCKET"])
_wgrad_tuned = _autotuned("weight_grad", _moe_weight_grad_kernel,
                          ["N1", "N2", "E", "TOPK", "L_GATHER", "R_GATHER", "SPLIT", "DOT_PREC", "M_BUCKET"],
                          reset_to_zero=["out_ptr"])

GROUP_M = 8
"""Row tiles per group of the grouped tile order (see ``_grouped_tile``)."""
ACT_BWD_BLOCKS = {"BLOCK_R": 16, "BLOCK_F": 128}
"""Rows and columns per step of the elementwise activation backward (memory-bound; 8 values per thread)."""
ACT_BWD_WARPS = 4


def _m_bucket(M: int) -> int:
    return max(256, triton.next_power_of_2(max(int(M), 1)))


def deterministic_mode(deterministic) -> bool:
    """The explicit argument, else ``torch.use_deterministic_algorithms``'s setting."""
    if deterministic is None:
        return torch.are_deterministic_algorithms_enabled()
    return bool(deterministic)


# Interpreter (and explicit) defaults: small tiles keep the CPU emulation fast on test shapes.
INTERPRET_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}
INTERPRET_WGRAD_BLOCKS = {"BLOCK_M": 32, "BLOCK_N1": 64, "BLOCK_N2": 64}



def _dot_prec(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and triton_interpret()


def _block_e(E: int) -> int:
    return max(2, triton.next_power_of_2(E))


def _pinned(launcher: str, kernel: str, config, a_dtype, b_dtype, activation=None) -> dict:
    """The launch keywords of a pinned ``config`` (its BLOCK_* meta, num_warps, num_stages, ...), after
    checking it sets exactly the kernel's tile sizes and passes the shared-memory pruning."""
    if not isinstance(config, triton.Config):
        raise TypeError(f"{launcher}: config must be a triton.Config or None, got {type(config).__name__}")
    want = sorted(DOT_TILES[kernel][0])
    if sorted(config.kwargs) != want:
        raise ValueError(f"{launcher}: config must set exactly {want} for kernel {kernel!r}, got "
                         f"{sorted(config.kwargs)}")
    need = shared_memory_estimate(kernel, config, a_dtype, b_dtype, activation)
    if need > SHARED_MEMORY_LIMIT:
        raise ValueError(f"{launcher}: config pruned: {over_limit_reason(kernel, config, need)}")
    return config.all_kwargs()


def _launch(tuned, plain, grid_fn, args, kwargs, pinned, interpret_blocks, grid_extra=()):
    """Launch on the device of ``args[0]``, with the ``pinned`` keywords (see ``_pinned``) when given, else
    autotuned on a GPU and with ``interpret_blocks`` under TRITON_INTERPRET."""
    with on_device(args[0]):
        if pinned is None and not triton_interpret():
            tuned[lambda meta: (grid_fn(meta), *grid_extra)](*args, **kwargs)
            return
        meta = dict(pinned if pinned is not None else interpret_blocks)
        plain[(grid_fn(meta), *grid_extra)](*args, **kwargs, **meta)


def _row_tiles(n_rows: int, E: int, block_m: int) -> int:
    # upper bound on sum_e ceil(count_e / BLOCK_M)
    return triton.cdiv(n_rows, block_m) + min(E, n_rows)


# --------------------------------------------------------------------------- launchers


def moe_gather_gemm_fwd(x, w_gate_up, sorted_pairs, offsets, top_k: int, F: int, activation: str,
                        store_pre: bool, config=None):
    """h (T*k, F) [x.dtype] and pre (T*k, 2F or F) [x.dtype; (0, .) if not store_pre], rows expert-sorted.
    ``config`` (a ``triton.Config`` of ``KERNEL_CONFIGS["gather_fwd"]``'s form) pins the launch to it; one the
    shared-memory pruning rejects raises ValueError."""
    act = ACTIVATIONS[activation]
    pinned = None if config is None else _pinned("moe_gather_gemm_fwd", "gather_fwd", config, x.dtype,
                                                 w_gate_up.dtype, act)
    M = sorted_pairs.shape[0]
    E, NGU, D = w_gate_up.shape
    h = torch.empty((M, F), device=x.device, dtype=x.dtype)
    pre = torch.empty((M if store_pre else 0, NGU), device=x.device, dtype=x.dtype)
    if M == 0 or F == 0:
        return h, pre
    pre_arg = pre if store_pre else h

    def grid(meta):
        return _row_tiles(M, E, meta["BLOCK_M"]) * triton.cdiv(F, meta["BLOCK_N"])

    args = (x, w_gate_up, sorted_pairs, offsets, pre_arg, h, M, E, F, D, _m_bucket(M),
            x.stride(0), x.stride(1), w_gate_up.stride(0), w_gate_up.stride(1), w_gate_up.stride(2),
            pre_arg.stride(0), h.stride(0))
    kwargs = dict(TOPK=top_k, ACT=act, STORE_PRE=store_pre, DOT_PREC=_dot_prec(x.dtype), UPCAST=_upcast(x.dtype),
                  BLOCK_E=_block_e(E), GROUP_M=GROUP_M)
    _launch(_gather_fwd_tuned, _moe_gather_gemm_fwd_kernel, grid, args, kwargs, pinned, INTERPRET_BLOCKS)
    return h, pre


def moe_scatter_gemm(a, w, w_transposed: bool, sorted_pairs, offsets, top_k: int, T: int, scale=None,
                     config=None, deterministic=None):
    """out (T, N) float32: out[t] = sum over the rows i of token t of scale[p] * (a[i] @ B_e), B_e = w[e]^T
    (``w_transposed=False``, w (E, N, KD)) or w[e] (``w_transposed=True``, w (E, KD, N)). ``config`` pins
    the launch (see ``moe_gather_gemm_fwd``). With ``top_k > 1`` the k rows of a token are summed with
    float32 atomics (order-dependent in the last bits), or, when ``deterministic`` (default:
    ``torch.are_deterministic_algorithms_enabled()``), written one row per (token, slot) and summed over the
    slots in slot order: bit-identical from run to run, at T*k*N*4 bytes of scratch."""
    pinned = None if config is None else _pinned("moe_scatter_gemm", "scatter", config, a.dtype, w.dtype)
    M, KD = a.shape
    E = w.shape[0]
    if w_transposed:
        N = w.shape[2]
        s_wn, s_wk = w.stride(2), w.stride(1)
    else:
        N = w.shape[1]
        s_wn, s_wk = w.stride(1), w.stride(2)
    by_pair = top_k > 1 and deterministic_mode(deterministic)
    atomic = top_k > 1 and not by_pair
    if M == 0 or N == 0 or KD == 0:
        return torch.zeros((T, N), device=a.device, dtype=torch.float32)
    if by_pair:
        out = torch.empty((M, N), device=a.device, dtype=torch.float32)
    else:
        out = (torch.zeros if atomic else torch.empty)((T, N), device=a.device, dtype=torch.float32)

    def grid(meta):
        return _row_tiles(M, E, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])

    scale_arg = scale if scale is not None else out
    args = (a, w, sorted_pairs, offsets, scale_arg, out, M, E, N, KD, _m_bucket(M), a.stride(0), a.stride(1),
            w.stride(0), s_wn, s_wk, out.stride(0))
    kwargs = dict(TOPK=top_k, HAS_SCALE=scale is not None, ATOMIC=atomic, BY_PAIR=by_pair,
                  DOT_PREC=_dot_prec(a.dtype), UPCAST=_upcast(a.dtype), BLOCK_E=_block_e(E), GROUP_M=GROUP_M)
    _launch(_scatter_tuned, _moe_scatter_gemm_kernel, grid, args, kwargs, pinned, INTERPRET_BLOCKS)
    if by_pair:
        return out.view(T, top_k, N).sum(1)
    return out


def moe_gather_gemm_bwd(dy, w_down, sorted_pairs, offsets, scale, pre, top_k: int, activation: str, config=None):
    """From dy (T, D): dA (T*k, 2F or F) [pre.dtype], h (T*k, F) [pre.dtype], dw_sorted (T*k,) float32.

    Two kernels: the gathered GEMM G = dy[t] @ W_down[e] (``config`` pins its launch, see
    ``moe_gather_gemm_fwd``), written into dA's first F columns in pre's dtype, then the elementwise
    activation backward, which reads G and pre and writes dA, h (recomputed) and d topk_weights = <h, G> (one
    program per row block, columns summed in order: deterministic, no atomics)."""
    act = ACTIVATIONS[activation]
    pinned = None if config is None else _pinned("moe_gather_gemm_bwd", "gather_bwd", config, dy.dtype,
                                                 w_down.dtype)
    M = sorted_pairs.shape[0]
    E, D, F = w_down.shape
    da = torch.empty((M, pre.shape[1]), device=dy.device, dtype=pre.dtype)
    h = torch.empty((M, F), device=dy.device, dtype=pre.dtype)
    dw = torch.empty((M,), device=dy.device, dtype=torch.float32)
    if M == 0 or F == 0:
        return da.zero_(), h.zero_(), dw.zero_()
    if D == 0:
        da[:, :F].zero_()
    else:
        def grid(meta):
            return _row_tiles(M, E, meta["BLOCK_M"]) * triton.cdiv(F, meta["BLOCK_N"])

        args = (dy, w_down, sorted_pairs, offsets, da, M, E, F, D, _m_bucket(M),
                dy.stride(0), dy.stride(1), w_down.stride(0), w_down.stride(1), w_down.stride(2), da.stride(0))
        kwargs = dict(TOPK=top_k, DOT_PREC=_dot_prec(w_down.dtype), UPCAST=_upcast(w_down.dtype),
                      BLOCK_E=_block_e(E), GROUP_M=GROUP_M)
        _launch(_gather_bwd_tuned, _moe_gather_gemm_bwd_kernel, grid, args, kwargs, pinned, INTERPRET_BLOCKS)
    with on_device(da):
        _moe_act_bwd_kernel[(triton.cdiv(M, ACT_BWD_BLOCKS["BLOCK_R"]),)](
            da, pre, h, sorted_pairs, scale, dw, M, F, da.stride(0), pre.stride(0), h.stride(0),
            ACT=act, num_warps=ACT_BWD_WARPS, **ACT_BWD_BLOCKS,
        )
    return da, h, dw


def weight_grad_split(M: int, E: int, N1: int, N2: int, deterministic: bool = False) -> int:
    """Programs that share one expert's rows in the weight gradient: enough for about ``WGRAD_PROGRAMS`` programs
    in all when the output tiles alone are too few (a small weight, e.g. one expert taking most tokens), at
    least ``WGRAD_MIN_ROWS`` rows each in the worst case of every row on one expert; 1 when ``deterministic``
    (the chunks' partial sums are added with atomics)."""
    if deterministic or M == 0:
        return 1
    tiles = triton.cdiv(N1, 128) * triton.cdiv(N2, 128) * max(E, 1)
    want = triton.cdiv(WGRAD_PROGRAMS, tiles)
    return int(max(1, min(want, M // WGRAD_MIN_ROWS)))


WGRAD_PROGRAMS = 1024
WGRAD_MIN_ROWS = 512


def moe_weight_grad(left, l_gather: bool, right, r_gather: bool, sorted_pairs, offsets, top_k: int, out_shape,
                    out_dtype, scale=None, config=None, deterministic=None, split=None):
    """out (E, N1, N2) [out_dtype]: out[e] = sum over expert e's sorted rows i of L[i]^T R[i], where L[i] is
    left[t] (gathered, optionally times scale[p]) or left[i], and likewise R[i]. ``config`` (of
    ``KERNEL_CONFIGS["weight_grad"]``'s form) pins the launch (see ``moe_gather_gemm_fwd``). When the output
    tiles are few (``weight_grad_split``), each expert's rows are split between programs whose float32
    partial sums are added atomically, unless ``deterministic`` (default:
    ``torch.are_deterministic_algorithms_enabled()``); ``split`` sets that number of programs per expert."""
    pinned = None if config is None else _pinned("moe_weight_grad", "weight_grad", config, left.dtype, right.dtype)
    E, N1, N2 = out_shape
    M = sorted_pairs.shape[0]
    if M == 0 or E == 0 or N1 == 0 or N2 == 0:
        return torch.zeros(out_shape, device=left.device, dtype=out_dtype)
    if split is None:
        split = weight_grad_split(M, E, N1, N2, deterministic_mode(deterministic))
    elif isinstance(split, bool) or not isinstance(split, int) or split < 1:
        raise ValueError(f"moe_weight_grad: split must be an int >= 1 or None, got {split!r}")
    if split > 1:
        out = torch.zeros(out_shape, device=left.device, dtype=torch.float32)
    else:
        out = torch.empty(out_shape, device=left.device, dtype=out_dtype)

    def grid(meta):
        return triton.cdiv(N1, meta["BLOCK_N1"]) * triton.cdiv(N2, meta["BLOCK_N2"])

    scale_arg = scale if scale is not None else left
    args = (left, right, sorted_pairs, offsets, scale_arg, out, E, N1, N2, _m_bucket(M),
            left.stride(0), left.stride(1), right.stride(0), right.stride(1),
            out.stride(0), out.stride(1), out.stride(2))
    kwargs = dict(TOPK=top_k, L_GATHER=l_gather, L_SCALE=scale is not None, R_GATHER=r_gather, SPLIT=split > 1,
                  DOT_PREC=_dot_prec(right.dtype), UPCAST=_upcast(right.dtype))
    _launch(_wgrad_tuned, _moe_weight_grad_kernel, grid, args, kwargs, pinned, INTERPRET_WGRAD_BLOCKS,
            grid_extra=(E, split))
    return out if split == 1 else out.to(out_dtype)
