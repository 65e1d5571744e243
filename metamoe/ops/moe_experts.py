"""Grouped top-k expert computation of a dropless MoE layer: ``y[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t])``.

Op ``moe_experts`` (backend registry), implementations:

- ``triton`` (CUDA; CPU under ``TRITON_INTERPRET=1``): the grouped GEMMs of ``kernels/moe_experts.py``.
  Token rows are gathered inside the first GEMM and the weighted scatter-add happens inside the second, so
  no (T*k, d) permuted copy is written, forward or backward; no host synchronisation. Forward and backward
  are ``torch.library`` custom ops (``metamoe::moe_experts_fwd`` / ``metamoe::moe_experts_bwd``) with fake
  implementations, so ``torch.compile`` traces through them.
- ``torch`` (:func:`moe_experts_ref`, any device): sort by expert, gather, then one matmul pair per expert (a
  Python loop; it reads the per-expert counts on the host, so it synchronises), or torch's fused grouped GEMM
  where it runs (:func:`metamoe.backends.grouped_mm_reasons` with ``fused=True``: CUDA, compute capability
  9.x/10.x, bfloat16, 16-byte aligned rows): plain autograd. It is the reference the kernels are tested
  against and what runs where Triton cannot.

Weights use transformers' ``MixtralExperts`` layout, so a drop-in reuses the parameters with no copy:
``w_gate_up`` (E, 2f, d) for SwiGLU (gate = rows [0, f), up = rows [f, 2f)), (E, f, d) for GELU;
``w_down`` (E, d, f).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F_nn

from ..backends import CallSpec, availability, define_op
from ..backends.registry import BackendNotSupportedError
from ..backends.tensors import dtype_name
from .moe_routing import MoERouting, check_topk_ids, moe_routing

__all__ = ["moe_experts", "moe_experts_ref", "moe_experts_triton", "ACTIVATIONS"]

# The experts' activations, metamoe's one list of them (MoELayer takes these too): SwiGLU (gate and up rows),
# exact (erf) GELU, GELU with the tanh approximation.
ACTIVATIONS = ("swiglu", "gelu", "gelu_tanh")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

moe_experts_op = define_op(
    "moe_experts",
    priority=("triton", "torch"),
    doc="Dropless top-k MoE experts: gather + grouped GEMM + activation + grouped GEMM + weighted scatter-add.",
)

# Largest expert count the Triton tile schedule handles (it scans the E offsets in one block per program).
TRITON_MAX_EXPERTS = 1024


# --------------------------------------------------------------------------- validation


def _check_inputs(x, topk_weights, topk_ids, w_gate_up, w_down, activation, routing):
    """Validate shapes, dtypes and devices; returns (T, d, f, E, k)."""
    for name, t in (("x", x), ("topk_weights", topk_weights), ("topk_ids", topk_ids),
                    ("w_gate_up", w_gate_up), ("w_down", w_down)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")
    if x.dim() != 2:
        raise ValueError(f"x must have shape (T, d), got {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    T, d = x.shape
    if w_gate_up.dim() != 3:
        raise ValueError(f"w_gate_up must have rank 3, shape (E, 2f, d) for swiglu or (E, f, d) for gelu; "
                         f"got shape {tuple(w_gate_up.shape)}")
    if w_down.dim() != 3:
        raise ValueError(f"w_down must have rank 3, shape (E, d, f); got shape {tuple(w_down.shape)}")
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if w.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {w.dtype} but x has dtype {x.dtype}; they must match")
        if w.device != x.device:
            raise ValueError(f"{name} is on device {w.device} but x is on {x.device}; they must match")
    E = w_gate_up.shape[0]
    if w_down.shape[0] != E:
        raise ValueError(f"w_down has {w_down.shape[0]} experts but w_gate_up has {E}")
    if w_gate_up.shape[2] != d:
        raise ValueError(f"hidden size mismatch: x has d={d} but w_gate_up has shape {tuple(w_gate_up.shape)} "
                         f"(expected (E, 2f or f, {d}))")
    if w_down.shape[1] != d:
        raise ValueError(f"hidden size mismatch: x has d={d} but w_down has shape {tuple(w_down.shape)} "
                         f"(expected (E, {d}, f))")
    f = w_down.shape[2]
    want = 2 * f if activation == "swiglu" else f
    if w_gate_up.shape[1] != want:
        raise ValueError(f"ffn size mismatch: w_down has f={f}, so with activation={activation!r} w_gate_up must "
                         f"have {want} rows per expert, got shape {tuple(w_gate_up.shape)}")
    check_topk_ids(topk_ids, E)
    if topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids has {topk_ids.shape[0]} rows but x has T={T} tokens")
    if topk_ids.device != x.device:
        raise ValueError(f"topk_ids is on device {topk_ids.device} but x is on {x.device}")
    k = topk_ids.shape[1]
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights must have the shape of topk_ids {tuple(topk_ids.shape)}, "
                         f"got {tuple(topk_weights.shape)}")
    if topk_weights.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"topk_weights must be a floating tensor, got {topk_weights.dtype}")
    if topk_weights.device != x.device:
        raise ValueError(f"topk_weights is on device {topk_weights.device} but x is on {x.device}")
    if routing is not None:
        if not isinstance(routing, MoERouting):
            raise TypeError(f"routing must be a MoERouting from moe_routing(), got {type(routing).__name__}")
        if routing.sorted_pairs.shape != (T * k,) or routing.offsets.shape != (E + 1,):
            raise ValueError(f"routing does not match: sorted_pairs {tuple(routing.sorted_pairs.shape)} (expected "
                             f"({T * k},)), offsets {tuple(routing.offsets.shape)} (expected ({E + 1},))")
    return T, d, f, E, k


def _activation(a: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "swiglu":
        gate, up = a.chunk(2, dim=-1)
        return F_nn.silu(gate) * up
    if activation == "gelu":
        return F_nn.gelu(a)
    return F_nn.gelu(a, approximate="tanh")


# --------------------------------------------------------------------------- torch reference


def moe_experts_ref(x, topk_weights, topk_ids, w_gate_up, w_down, activation="swiglu",
                    routing: Optional[MoERouting] = None, grouped_mm: Optional[bool] = None) -> torch.Tensor:
    """Pure PyTorch experts (plain autograd): gather by expert, matmuls per expert, weighted index_add.

    ``grouped_mm``: None = torch's grouped GEMM where its fused kernel runs
    (:func:`metamoe.backends.grouped_mm_reasons` with ``fused=True``), else the per-expert loop (which reads
    the counts on the host: one synchronisation); True forces grouped_mm (BackendNotSupportedError naming the
    reason where it cannot run at all), False forces the loop. Matmuls run in the input dtype, the weighted
    sum over the k slots in float32. Arguments are not validated (:func:`moe_experts` does that).
    """
    T, d = x.shape
    E, _, _ = w_gate_up.shape
    f = w_down.shape[2]
    k = topk_ids.shape[1]
    if routing is None:
        routing = moe_routing(topk_ids, E)
    tok = routing.sorted_pairs // k
    ws = topk_weights.reshape(-1).index_select(0, routing.sorted_pairs)
    xs = x.index_select(0, tok)
    compiling = torch.compiler.is_compiling()
    if grouped_mm is None:
        use_gmm = not availability.grouped_mm_reasons(x.device, x.dtype, {"d": d, "f": f}, fused=True,
                                                      compiling=compiling)
    elif grouped_mm:
        reasons = availability.grouped_mm_reasons(x.device, x.dtype, {"d": d, "f": f}, compiling=compiling)
        if reasons:
            raise BackendNotSupportedError("grouped_mm=True, but torch's grouped_mm cannot run this call: "
                                           + "; ".join(reasons))
        use_gmm = True
    else:
        use_gmm = False
    if use_gmm:
        offs = routing.offsets[1:].to(torch.int32)
        a = availability.grouped_mm(xs, w_gate_up.transpose(1, 2), offs)
        out = availability.grouped_mm(_activation(a, activation), w_down.transpose(1, 2), offs)
    else:
        counts = routing.counts.tolist()  # host sync: the loop needs the sizes
        outs = []
        for e, xe in enumerate(torch.split(xs, counts)):
            # empty experts still run (0-row matmuls) so every weight gets a (zero) gradient
            a = xe @ w_gate_up[e].transpose(0, 1)
            outs.append(_activation(a, activation) @ w_down[e].transpose(0, 1))
        out = torch.cat(outs, dim=0)
    y = torch.zeros((T, d), device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    y = y.index_add(0, tok, out.to(y.dtype) * ws.to(y.dtype)[:, None])
    return y.to(x.dtype)


# --------------------------------------------------------------------------- triton (custom ops)


def _kernels():
    from ..kernels import moe_experts as K

    return K


@torch.library.custom_op("metamoe::moe_experts_fwd", mutates_args=())
def _moe_experts_fwd(x: torch.Tensor, topk_weights: torch.Tensor, sorted_pairs: torch.Tensor,
                     offsets: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, top_k: int,
                     activation: str, save_pre: bool, deterministic: bool = False
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton forward: (y (T, d) [x.dtype], pre (T*k or 0, 2f or f) [x.dtype], expert-sorted pre-activations)."""
    K = _kernels()
    T = x.shape[0]
    f = w_down.shape[2]
    tw = topk_weights.reshape(-1)
    h, pre = K.moe_gather_gemm_fwd(x, w_gate_up, sorted_pairs, offsets, top_k, f, activation, save_pre)
    y32 = K.moe_scatter_gemm(h, w_down, False, sorted_pairs, offsets, top_k, T, scale=tw,
                             deterministic=deterministic)
    return y32.to(x.dtype), pre


@_moe_experts_fwd.register_fake
def _(x, topk_weights, sorted_pairs, offsets, w_gate_up, w_down, top_k, activation, save_pre, deterministic=False):
    m = sorted_pairs.shape[0] if save_pre else 0
    return x.new_empty(x.shape), x.new_empty((m, w_gate_up.shape[1]))


@torch.library.custom_op("metamoe::moe_experts_bwd", mutates_args=())
def _moe_experts_bwd(grad_y: torch.Tensor, x: torch.Tensor, topk_weights: torch.Tensor,
                     sorted_pairs: torch.Tensor, offsets: torch.Tensor, w_gate_up: torch.Tensor,
                     w_down: torch.Tensor, pre: torch.Tensor, top_k: int, activation: str, need_x: bool,
                     need_weights: bool, need_gate_up: bool, need_down: bool, deterministic: bool = False
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward: (dx, d topk_weights, d w_gate_up, d w_down); a gradient not asked for is empty (0,)."""
    K = _kernels()
    T = x.shape[0]
    M = sorted_pairs.shape[0]
    tw = topk_weights.reshape(-1)
    da, h, dw_sorted = K.moe_gather_gemm_bwd(grad_y, w_down, sorted_pairs, offsets, tw, pre, top_k, activation)
    def empty():  # a fresh tensor each time: custom-op outputs must not alias each other
        return x.new_empty((0,))

    dx = (K.moe_scatter_gemm(da, w_gate_up, True, sorted_pairs, offsets, top_k, T, deterministic=deterministic)
          .to(x.dtype) if need_x else empty())
    if need_weights:
        dtw = torch.empty((M,), device=x.device, dtype=torch.float32).scatter_(0, sorted_pairs, dw_sorted)
        dtw = dtw.view(topk_weights.shape).to(topk_weights.dtype)
    else:
        dtw = empty()
    dgu = (K.moe_weight_grad(da, False, x, True, sorted_pairs, offsets, top_k, tuple(w_gate_up.shape),
                             w_gate_up.dtype, deterministic=deterministic) if need_gate_up else empty())
    dd = (K.moe_weight_grad(grad_y, True, h, False, sorted_pairs, offsets, top_k, tuple(w_down.shape),
                            w_down.dtype, scale=tw, deterministic=deterministic) if need_down else empty())
    return dx, dtw, dgu, dd


@_moe_experts_bwd.register_fake
def _(grad_y, x, topk_weights, sorted_pairs, offsets, w_gate_up, w_down, pre, top_k, activation, need_x,
      need_weights, need_gate_up, need_down, deterministic=False):
    def like(t, need):
        return t.new_empty(t.shape) if need else x.new_empty((0,))

    return like(x, need_x), like(topk_weights, need_weights), like(w_gate_up, need_gate_up), like(w_down, need_down)


def _setup_context(ctx, inputs, output):
    x, topk_weights, sorted_pairs, offsets, w_gate_up, w_down, top_k, activation = inputs[:8]
    det = bool(inputs[9]) if len(inputs) > 9 else False
    ctx.save_for_backward(x, topk_weights, sorted_pairs, offsets, w_gate_up, w_down, output[1])
    ctx.top_k = top_k
    ctx.activation = activation
    ctx.deterministic = det


def _backward(ctx, grad_y, grad_pre):
    x, topk_weights, sorted_pairs, offsets, w_gate_up, w_down, pre = ctx.saved_tensors
    nx, ntw, _, _, ngu, nd = ctx.needs_input_grad[:6]
    if pre.shape[0] != sorted_pairs.shape[0]:
        raise RuntimeError("moe_experts: the forward ran without saving activations (no input required grad then)")
    dx, dtw, dgu, dd = torch.ops.metamoe.moe_experts_bwd(
        grad_y, x, topk_weights, sorted_pairs, offsets, w_gate_up, w_down, pre, ctx.top_k, ctx.activation,
        bool(nx), bool(ntw), bool(ngu), bool(nd), ctx.deterministic)
    return (dx if nx else None, dtw if ntw else None, None, None, dgu if ngu else None, dd if nd else None,
            None, None, None, None)


torch.library.register_autograd("metamoe::moe_experts_fwd", _backward, setup_context=_setup_context)


def moe_experts_triton(x, topk_weights, topk_ids, w_gate_up, w_down, activation="swiglu",
                       routing: Optional[MoERouting] = None, deterministic: bool = False) -> torch.Tensor:
    """Triton grouped GEMMs (gather fused into the first, weighted scatter-add into the second); no host sync."""
    E = w_gate_up.shape[0]
    k = topk_ids.shape[1]
    if routing is None:
        routing = moe_routing(topk_ids, E)
    save = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, topk_weights, w_gate_up, w_down))
    y, _ = torch.ops.metamoe.moe_experts_fwd(x, topk_weights, routing.sorted_pairs, routing.offsets, w_gate_up,
                                             w_down, k, activation, save, bool(deterministic))
    return y


def _triton_check(spec: CallSpec):
    if spec["E"] > TRITON_MAX_EXPERTS:
        yield f"{spec['E']} experts; the Triton tile schedule takes at most {TRITON_MAX_EXPERTS}"


moe_experts_op.register("torch", devices=("cpu", "cuda"), dtypes=("float32", "float16", "bfloat16", "float64"),
                        doc="sort + per-expert matmuls (or torch's fused grouped_mm, sm90/sm100 bf16), plain autograd")(
    moe_experts_ref)
moe_experts_op.register("triton", devices=("cuda",), dtypes=("float32", "float16", "bfloat16"), check=_triton_check,
                        doc="gather/scatter-fused grouped GEMMs, forward and backward, no host sync")(
    moe_experts_triton)


# --------------------------------------------------------------------------- public API


def moe_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    activation: str = "swiglu",
    backend: Optional[str] = None,
    routing: Optional[MoERouting] = None,
    deterministic: Optional[bool] = None,
) -> torch.Tensor:
    """Dropless top-k mixture of experts: ``y[t] = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t])``.

    Each expert is ``out = act(x W_gate_up[e]^T) W_down[e]^T`` with

    - ``activation="swiglu"``: ``h = silu(x W_gate^T) * (x W_up^T)``, W_gate = ``w_gate_up[e, :f]``,
      W_up = ``w_gate_up[e, f:]`` (transformers' MixtralExperts layout);
    - ``activation="gelu"``: ``h = gelu(x W_up^T)``, exact (erf) GELU, W_up = ``w_gate_up[e]``;
    - ``activation="gelu_tanh"``: the same with the tanh approximation of GELU.

    Args:
        x: (T, d) float32, float16 or bfloat16 (float64 on the torch backend only). T may be 0.
        topk_weights: (T, k) floating (any float dtype, e.g. float32 router weights with bf16 x): the
            routing weight of each (token, slot).
        topk_ids: (T, k) int32 or int64, expert of each (token, slot), in [0, E); 1 <= k <= E.
        w_gate_up: (E, 2f, d) for swiglu, (E, f, d) for gelu / gelu_tanh; same dtype and device as x.
        w_down: (E, d, f); same dtype and device as x.
        activation: ``"swiglu"`` (default), ``"gelu"`` (exact erf) or ``"gelu_tanh"``.
        backend: ``"auto"`` (default, or ``METAMOE_BACKEND``): ``triton`` where it can run, else ``torch``.
        routing: optional precomputed :func:`moe_routing` ``(topk_ids, E)`` result, to share between calls.
        deterministic: triton backend: sum the k slots of a token in slot order (bit-identical from run to
            run, T*k*d*4 bytes of scratch) instead of with float32 atomics. Default (None):
            ``torch.are_deterministic_algorithms_enabled()``. The torch backend is as deterministic as
            torch's own kernels under that setting.

    Returns:
        y: (T, d), dtype of x. Products accumulate in float32 (float64 for float64 input on torch).
        Differentiable with respect to x, topk_weights, w_gate_up and w_down (not topk_ids).

    Raises:
        TypeError / ValueError naming the argument: non-tensor inputs, wrong ranks, hidden (d) or ffn (f)
        size mismatch between x and the weights, dtype or device mismatch, top_k < 1 or > E, ids out of range
        (CPU; a device-side assert on a GPU), unknown activation. BackendNotSupportedError when an explicit
        backend cannot run the call.

    Notes:
        The triton backend sums the k slots of a token with float32 atomics (order-nondeterministic in the
        last bits when k > 1) unless ``deterministic``, and never synchronises with the host; the torch backend's
        per-expert loop reads the per-expert counts on the host once per call (torch's fused grouped_mm does not).
    """
    T, d, f, E, k = _check_inputs(x, topk_weights, topk_ids, w_gate_up, w_down, activation, routing)
    spec = CallSpec(device=x.device.type, dtype=dtype_name(x),
                    extra={"T": T, "d": d, "f": f, "E": E, "k": k, "activation": activation})
    impl = moe_experts_op.select(spec, backend)
    if impl.backend == "triton":
        det = _kernels().deterministic_mode(deterministic)
        return impl.fn(x, topk_weights, topk_ids, w_gate_up, w_down, activation, routing, deterministic=det)
    return impl.fn(x, topk_weights, topk_ids, w_gate_up, w_down, activation, routing)
