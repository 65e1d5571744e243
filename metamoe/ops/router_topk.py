"""MoE router: softmax + top-k (+ renormalisation) with the auxiliary-loss statistics, differentiable.

Op ``router_topk`` has two implementations in the backend registry:

- ``triton`` (``kernels/router_topk.py``): one fused forward kernel (softmax in fp32, top-k, weights,
  logsumexp, partial statistics) plus a deterministic reduction of the statistics, and a fused backward
  kernel. Devices: CUDA (and the CPU through the interpreter, ``TRITON_INTERPRET=1``); fp32/bf16/fp16 logits;
  E <= 512 experts, k <= 16. It runs as the ``torch.library`` custom op ``metamoe::router_topk`` (backward:
  ``metamoe::router_topk_backward``) with fake implementations, so ``torch.compile`` traces it as one op.
- ``torch`` (:func:`router_topk_ref`): plain PyTorch, any device, any E and k, float64 too; differentiable
  through autograd. It is the reference the kernels are tested against and the fallback.

Conventions shared by both:

- Selection uses the logits (softmax is monotone), descending, **ties to the lowest expert index**; a NaN
  logit ranks as +inf (first, as in ``torch.topk``), and its row's weights and statistics are NaN.
- ``weights`` are float32 for fp32/bf16/fp16 logits (float64 for float64 logits): routing weights feed the
  weighted combine of expert outputs, where bf16 weights would add rounding for no saving; cast them to the
  activations' dtype when combining, as transformers' Mixtral does.
- ``order="softmax_then_topk"`` (Mixtral, Qwen-MoE, OLMoE): p = softmax over all E experts, weights = p at the
  top-k experts, divided by their sum when ``renormalize``. ``order="topk_then_softmax"``: weights = softmax
  over the k selected logits; these always sum to 1, so ``renormalize`` has no effect (mathematically this is
  the renormalised softmax-then-top-k, computed over the k logits directly).
- Statistics (``return_stats=True``) always refer to the full softmax over all E experts, whatever ``order``:
  they are what the Switch load-balancing loss and the ST-MoE z-loss need.
"""

from __future__ import annotations

import functools
import operator
import os
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ..backends import CallSpec, define_op
from ..backends.tensors import dtype_name

ORDERS = ("softmax_then_topk", "topk_then_softmax")

# The Triton kernel's limits (kept here too: kernels/router_topk.py imports triton, this module must not).
TRITON_MAX_EXPERTS = 512
TRITON_MAX_K = 16

_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
_TORCH_DEVICES = ("cpu", "cuda", "mps", "xpu", "hpu", "meta")

router_topk_op = define_op(
    "router_topk",
    priority=("triton", "torch"),
    doc="MoE router: softmax + top-k (+ renormalise) and the load-balancing / z-loss statistics.",
)


class RouterStats(NamedTuple):
    """Router statistics for the auxiliary losses, over the full softmax of all E experts.

    The losses themselves live in :mod:`metamoe.moe.losses` (``load_balancing_loss(counts, prob_mean)``,
    ``z_loss(lse)``); transformers' ``load_balancing_loss_func`` for one layer is
    ``E * sum(counts / T * prob_mean)``.

    Attributes:
        counts: (E,) int64, how many of the T*k (token, slot) assignments went to each expert
            (sums to T*k). Not differentiable.
        prob_sum: (E,) float32 (float64 for float64 logits), sum over the T tokens of softmax(logits)[:, e].
            Differentiable.
        prob_mean: (E,) same dtype, ``prob_sum / T`` (zeros when T = 0). Differentiable.
        lse: (T,) same dtype, logsumexp of each token's logits (the z-loss input). Differentiable.
    """

    counts: Tensor
    prob_sum: Tensor
    prob_mean: Tensor
    lse: Tensor


# --------------------------------------------------------------------------- validation


def _check_args(logits, k, renormalize, order, return_stats) -> int:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor of shape (T, E), got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (T, E): tokens x experts, got shape {tuple(logits.shape)}")
    if not logits.dtype.is_floating_point:
        raise TypeError(
            f"logits must have a floating dtype (float32, bfloat16, float16, float64), got {logits.dtype}"
        )
    E = logits.shape[1]
    if isinstance(k, bool):
        raise TypeError(f"k must be an integer, got bool {k!r}")
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(
            f"k must be an integer (number of experts per token), got {type(k).__name__} {k!r}"
        ) from None
    if not 1 <= k <= E:
        raise ValueError(f"k must satisfy 1 <= k <= E (number of experts, E={E}), got k={k}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(repr(o) for o in ORDERS)}, got {order!r}")
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize must be a bool, got {type(renormalize).__name__}")
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {type(return_stats).__name__}")
    return k


def _stats(counts: Tensor, prob_sum: Tensor, lse: Tensor) -> RouterStats:
    return RouterStats(counts, prob_sum, prob_sum / max(lse.shape[0], 1), lse)


# --------------------------------------------------------------------------- torch reference


def _topk_lowest_index(x: Tensor, k: int) -> Tensor:
    """(T, k) int64: each row's k largest, descending, ties to the lowest index, NaN ranked as +inf.

    float32: one ``torch.topk`` on a tie-free int64 key (the float's order-preserving integer image in the
    high 32 bits, ``E - 1 - column`` in the low ones), as fast as a plain top-k and exact; float64: a stable
    descending sort.
    """
    inf = float("inf")
    x = torch.nan_to_num(x, nan=inf, posinf=inf, neginf=-inf) + 0.0  # NaN ranks as +inf; -0.0 becomes +0.0
    if x.dtype != torch.float32:
        return torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :k]
    E = x.shape[1]
    bits = x.view(torch.int32).to(torch.int64)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # monotone: negative floats flip their magnitude bits
    key = (bits << 32) | (E - 1 - torch.arange(E, device=x.device, dtype=torch.int64))
    return torch.topk(key, k, dim=-1).indices


def router_topk_ref(
    logits: Tensor,
    k: int,
    *,
    renormalize: bool = True,
    order: str = "softmax_then_topk",
    return_stats: bool = False,
):
    """Pure-PyTorch router (any device, any E and k), differentiable through autograd.

    Same contract as :func:`router_topk` (see there); arithmetic in float32 (float64 for float64 logits).
    Ties go to the lowest expert index (an exact tie-free top-k key for float32, a stable sort for float64).
    It is the op's ``torch`` backend, which :func:`router_topk` reaches through the registry.
    """
    k = _check_args(logits, k, renormalize, order, return_stats)
    return _router_topk_torch(logits, k, renormalize, order, return_stats)


@router_topk_op.register("torch", devices=_TORCH_DEVICES, dtypes=_FLOAT_DTYPES)
def _router_topk_torch(logits: Tensor, k: int, renormalize: bool, order: str, return_stats: bool):
    """Pure PyTorch (router_topk_ref on checked arguments); any device, any E and k."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    T, E = x.shape
    idx = _topk_lowest_index(x.detach(), k)
    probs = torch.softmax(x, dim=-1) if (order == "softmax_then_topk" or return_stats) else None
    if order == "softmax_then_topk":
        w = probs.gather(1, idx)
        if renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
    else:
        w = torch.softmax(x.gather(1, idx), dim=-1)
    if not return_stats:
        return w, idx
    counts = torch.zeros(E, dtype=torch.int64, device=x.device)
    counts.scatter_add_(0, idx.reshape(-1), torch.ones(T * k, dtype=torch.int64, device=x.device))
    return w, idx, _stats(counts, probs.sum(dim=0), torch.logsumexp(x, dim=-1))


# --------------------------------------------------------------------------- triton, as a custom op


@torch.library.custom_op("metamoe::router_topk", mutates_args=())
def _router_topk_custom(
    logits: Tensor, k: int, normalize: bool, stats: bool
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(weights (T,k) f32, indices (T,k) i64, lse (T,) f32, prob_sum (E,|0) f32, counts (E,|0) i64)."""
    return _kernels().router_topk_triton(logits, k, normalize=normalize, stats=stats)


@_router_topk_custom.register_fake
def _router_topk_fake(logits, k, normalize, stats):
    T, E = logits.shape
    n = E if stats else 0
    return (
        logits.new_empty((T, k), dtype=torch.float32),
        logits.new_empty((T, k), dtype=torch.int64),
        logits.new_empty((T,), dtype=torch.float32),
        logits.new_empty((n,), dtype=torch.float32),
        logits.new_empty((n,), dtype=torch.int64),
    )


@torch.library.custom_op("metamoe::router_topk_backward", mutates_args=())
def _router_topk_backward_custom(
    logits: Tensor,
    lse: Tensor,
    weights: Tensor,
    indices: Tensor,
    grad_weights: Optional[Tensor],
    grad_lse: Optional[Tensor],
    grad_prob_sum: Optional[Tensor],
    normalize: bool,
) -> Tensor:
    """d logits (T, E) in the logits' dtype."""
    return _kernels().router_topk_backward_triton(
        logits, lse, weights, indices, grad_weights, grad_lse, grad_prob_sum, normalize=normalize
    )


@_router_topk_backward_custom.register_fake
def _router_topk_backward_fake(logits, lse, weights, indices, grad_weights, grad_lse, grad_prob_sum,
                               normalize):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, k, normalize, stats = inputs
    w, idx, lse, _, counts = output
    ctx.save_for_backward(logits, lse, w, idx)
    ctx.normalize = normalize
    ctx.stats = stats
    ctx.mark_non_differentiable(idx, counts)
    # unused outputs get None instead of zero tensors: the backward kernel then skips those terms (and, for
    # renormalised weights alone, never reads the logits)
    ctx.set_materialize_grads(False)


def _backward_with(launch, ctx, gw, glse, gpsum):
    logits, lse, w, idx = ctx.saved_tensors
    if not ctx.stats:
        gpsum = None  # the empty placeholder output
    if gw is None and glse is None and gpsum is None:
        return torch.zeros_like(logits), None, None, None
    return launch(logits, lse, w, idx, gw, glse, gpsum, ctx.normalize), None, None, None


def _backward(ctx, gw, _gidx, glse, gpsum, _gcounts):
    return _backward_with(torch.ops.metamoe.router_topk_backward, ctx, gw, glse, gpsum)


torch.library.register_autograd("metamoe::router_topk", _backward, setup_context=_setup_context)


def _kernels():
    from metamoe.kernels import router_topk as K

    return K


class _RouterTopkEager(torch.autograd.Function):
    """The Triton launchers under plain autograd: what eager calls run. The custom op above costs several
    microseconds of dispatch per call, more than the kernel itself at T = 16k; torch.compile traces the
    custom op instead."""

    @staticmethod
    def forward(ctx, logits, k, normalize, stats):
        out = _kernels().router_topk_triton(logits, k, normalize=normalize, stats=stats)
        _setup_context(ctx, (logits, k, normalize, stats), out)
        return out

    @staticmethod
    def backward(ctx, gw, _gidx, glse, gpsum, _gcounts):
        def launch(logits, lse, w, idx, gw, glse, gpsum, normalize):
            return _kernels().router_topk_backward_triton(logits, lse, w, idx, gw, glse, gpsum, normalize=normalize)

        return _backward_with(launch, ctx, gw, glse, gpsum)


def _triton_check(spec: CallSpec):
    reasons = []
    if spec["E"] > TRITON_MAX_EXPERTS:
        reasons.append(
            f"E={spec['E']} experts: the kernel keeps a row in registers and takes at most "
            f"{TRITON_MAX_EXPERTS}"
        )
    if spec["k"] > TRITON_MAX_K:
        reasons.append(f"k={spec['k']}, the kernel takes at most k={TRITON_MAX_K}")
    return reasons


@router_topk_op.register(
    "triton", devices=("cuda",), dtypes=("float32", "float16", "bfloat16"), check=_triton_check
)
def _router_topk_triton(logits: Tensor, k: int, renormalize: bool, order: str, return_stats: bool):
    """Fused Triton forward and backward kernels (metamoe::router_topk); E <= 512, k <= 16."""
    # top-k then softmax over the k logits is the renormalised softmax-then-top-k, which the kernel computes
    normalize = renormalize or order == "topk_then_softmax"
    stats = return_stats
    if torch.compiler.is_compiling():
        out = torch.ops.metamoe.router_topk(logits, k, normalize, stats)
    elif logits.requires_grad and torch.is_grad_enabled():
        out = _RouterTopkEager.apply(logits, k, normalize, stats)
    else:
        out = _kernels().router_topk_triton(logits, k, normalize=normalize, stats=stats)
    w, idx, lse, prob_sum, counts = out
    if not stats:
        return w, idx
    return w, idx, _stats(counts, prob_sum, lse)


# --------------------------------------------------------------------------- public API


def router_topk(
    logits: Tensor,
    k: int,
    *,
    renormalize: bool = True,
    order: str = "softmax_then_topk",
    return_stats: bool = False,
    backend: Optional[str] = None,
):
    """Route each token to its top-``k`` experts: fused softmax + top-k (+ renormalisation), differentiable.

    Args:
        logits: (T, E) router logits, float32, bfloat16, float16 (or float64: torch backend only), any
            device, any strides. T may be 0. The softmax is computed in float32 (float64 for float64).
        k: experts per token, an int with 1 <= k <= E (the Triton kernel takes E <= 512 and k <= 16;
            ``backend="auto"`` falls back to torch beyond that).
        renormalize: with ``order="softmax_then_topk"``, divide the k selected probabilities by their sum
            (Mixtral, ``norm_topk_prob=True``); False keeps the plain softmax probabilities (Qwen2-MoE's
            default). No effect with ``order="topk_then_softmax"``.
        order: ``"softmax_then_topk"`` (softmax over all E, then top-k) or ``"topk_then_softmax"`` (top-k of
            the logits, then softmax over those k).
        return_stats: also return a :class:`RouterStats` (tokens per expert, sum and mean of the full softmax
            per expert, per-token logsumexp), computed in the same pass by the Triton kernel.
        backend: ``"auto"`` (default, or ``METAMOE_BACKEND``), ``"triton"`` or ``"torch"``.

    Returns:
        ``(weights, indices)`` or, with ``return_stats``, ``(weights, indices, stats)``:
        weights (T, k) float32 (float64 for float64 logits), row j in descending logit order;
        indices (T, k) int64 in [0, E), ties to the lowest expert index.
        Gradients flow to ``logits`` from ``weights``, ``stats.prob_sum``/``prob_mean`` and ``stats.lse``.
    """
    k = _check_args(logits, k, renormalize, order, return_stats)
    E = logits.shape[1]
    chosen = _select_backend(logits.device.type, dtype_name(logits), int(E), k, backend)
    return router_topk_op.impls[chosen].fn(logits, k, renormalize, order, return_stats)


@torch.compiler.assume_constant_result
def _select_backend(device: str, dtype: str, E: int, k: int, backend: Optional[str]) -> str:
    # Under torch.compile this runs once at trace time (its result is a constant of the graph), so the
    # registry's probing (imports, environment, cached availability) never enters the traced code. Eager
    # calls reuse the choice made for the same call and environment.
    env = (os.environ.get("METAMOE_BACKEND"), os.environ.get("TRITON_INTERPRET"))
    return _select_cached(device, dtype, E, k, backend, env)


@functools.lru_cache(maxsize=1024)
def _select_cached(device: str, dtype: str, E: int, k: int, backend: Optional[str], env) -> str:
    spec = CallSpec(device=device, dtype=dtype, extra={"E": E, "k": k})
    return router_topk_op.select(spec, backend).backend
