"""Low-rank deltas of LoRA experts: ``out[p] = B[e_p] A[e_p] inp[row(p)]`` for every routed (token, slot) pair.

The experts of :class:`metamoe.moe.LoRAMoELayer` are one frozen FFN plus a rank-r LoRA each; this op is the
LoRA part of one projection. The P = T * k pairs are numbered row-major (pair ``p = t * k + j``), ``e_p`` is
the expert of pair p, and ``row(p)`` is its token ``p // k`` when the input has one row per token
(``per_token=True``: the first projections, whose input ``x_t`` the k pairs of a token share) or ``p`` itself
(``per_token=False``: the last projection, whose input is each pair's hidden activation).

Op ``lora_delta`` (backend registry). Its two implementations are both plain PyTorch (autograd), so they go by
names of their own, chosen by the ``lora_impl`` argument (never by ``METAMOE_BACKEND``):

- ``grouped``: the pairs sorted by expert (:func:`metamoe.ops.moe_routing`) and two grouped GEMMs
  (torch's ``grouped_mm``): ``P (in + out) r`` multiply-adds, no per-expert copy of any weight. It runs where
  :func:`metamoe.backends.grouped_mm_reasons` finds nothing against it (float32/bfloat16/float16 on the CPU,
  bfloat16 on CUDA of compute capability >= 8.0, every inner size a multiple of 16 bytes; bfloat16/float16
  under ``torch.compile``).
- ``dense`` (:func:`lora_delta_ref`, the reference): one GEMM against all E experts' A (``P E r in``), a mask
  that keeps each pair's own expert block, one GEMM against all B (``P E r out``). E times the useful work, but
  any dtype, device and size; cheap while E * r stays well below the FFN width.

``lora_impl="auto"`` takes ``grouped`` where it can run and ``dense`` elsewhere. The choice depends only on the
device, dtype, sizes and whether ``torch.compile`` traces the call, never on routed values, so neither path
synchronises with the host; an explicit ``lora_impl`` that cannot run raises
:class:`~metamoe.backends.BackendNotSupportedError` naming the reasons.
"""

from __future__ import annotations

import functools
from typing import Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends import CallSpec, availability, define_op
from ..backends.tensors import dtype_name
from .moe_routing import MoERouting, moe_routing

__all__ = ["LORA_IMPLS", "lora_delta", "lora_delta_grouped", "lora_delta_op", "lora_delta_ref", "select_lora_impl"]

LORA_IMPLS = ("auto", "grouped", "dense")

_TORCH_DEVICES = ("cpu", "cuda", "mps", "xpu", "hpu", "meta")

lora_delta_op = define_op(
    "lora_delta",
    names=LORA_IMPLS[1:],
    arg="lora_impl",
    doc="LoRA experts' low-rank deltas B[e] A[e] x of every routed pair: grouped GEMMs or one dense GEMM pair.",
)


# --------------------------------------------------------------------------- implementations


def lora_delta_ref(inp: Tensor, lora_A: Tensor, lora_B: Tensor, expert_ids: Tensor, top_k: int, *,
                   per_token: bool, routing: Optional[MoERouting] = None) -> Tensor:
    """Dense deltas (the reference; any dtype, device and size): ``(P, out)`` in pair order.

    ``inp`` (T, in) with ``per_token`` else (P, in); ``lora_A`` (E, r, in); ``lora_B`` (E, out, r);
    ``expert_ids`` (P,) int64; ``routing`` is not used (accepted for the op's common signature).
    """
    E, r, fan_in = lora_A.shape
    fan_out = lora_B.shape[1]
    P = expert_ids.shape[0]
    z = inp @ lora_A.reshape(E * r, fan_in).t()  # (T or P, E*r)
    if per_token:
        z = z.repeat_interleave(top_k, dim=0)  # (P, E*r)
    mask = F.one_hot(expert_ids, E).to(z.dtype)  # (P, E)
    z = (z.view(P, E, r) * mask.unsqueeze(-1)).reshape(P, E * r)
    return z @ lora_B.transpose(1, 2).reshape(E * r, fan_out)  # (P, out)


def lora_delta_grouped(inp: Tensor, lora_A: Tensor, lora_B: Tensor, expert_ids: Tensor, top_k: int, *,
                       per_token: bool, routing: Optional[MoERouting] = None) -> Tensor:
    """Grouped deltas: the pairs in expert order, two grouped GEMMs, back to pair order: ``(P, out)``.

    ``routing``: :func:`moe_routing` of ``expert_ids.view(-1, top_k)`` (computed when None; pass it to share it
    between projections). Zero pairs take the dense path, which handles the empty shapes.
    """
    P = expert_ids.shape[0]
    if P == 0:
        return lora_delta_ref(inp, lora_A, lora_B, expert_ids, top_k, per_token=per_token)
    if routing is None:
        routing = moe_routing(expert_ids.view(-1, top_k), lora_A.shape[0])
    rows = routing.sorted_pairs // top_k if per_token else routing.sorted_pairs
    xs = inp.index_select(0, rows)  # (P, in) in expert order
    offs = routing.offsets[1:].to(torch.int32)
    z = availability.grouped_mm(xs, lora_A.transpose(1, 2), offs)  # (P, r)
    out = availability.grouped_mm(z, lora_B.transpose(1, 2), offs)  # (P, out)
    return out.index_select(0, routing.inverse)  # back to pair order


def _grouped_check(spec: CallSpec):
    return availability.grouped_mm_reasons(spec["device"], spec.dtype, spec["sizes"], compiling=spec["compiling"])


lora_delta_op.register("grouped", devices=("cpu", "cuda"), dtypes=("float32", "bfloat16", "float16"),
                       check=_grouped_check, doc="expert-sorted pairs, two torch grouped_mm GEMMs")(lora_delta_grouped)
lora_delta_op.register("dense", devices=_TORCH_DEVICES, dtypes=("float32", "float16", "bfloat16", "float64"),
                       doc="one GEMM against every expert's A, a mask, one against every B")(lora_delta_ref)


# --------------------------------------------------------------------------- selection and public API


def select_lora_impl(x: Tensor, sizes: Mapping[str, int], lora_impl: Optional[str] = "auto") -> str:
    """``"grouped"`` or ``"dense"``: what ``lora_impl`` (``"auto"``/None, ``"grouped"``, ``"dense"``) resolves to
    for operands like ``x`` whose inner sizes are ``sizes`` (``{name: n}``, named in the reasons).

    Raises :class:`~metamoe.backends.BackendNotSupportedError` (a ValueError) naming every reason when an
    explicit ``lora_impl`` cannot run, ValueError / TypeError for a name that is none of :data:`LORA_IMPLS`.
    """
    compiling = bool(torch.compiler.is_compiling())
    return _select(str(x.device), dtype_name(x), tuple(sizes.items()), compiling, lora_impl)


@torch.compiler.assume_constant_result
def _select(device: str, dtype: str, sizes: Tuple[Tuple[str, int], ...], compiling: bool,
            lora_impl: Optional[str]) -> str:
    # Under torch.compile this runs once at trace time (a constant of the graph), as router_topk's selection.
    return _select_cached(device, dtype, sizes, compiling, lora_impl)


@functools.lru_cache(maxsize=1024)
def _select_cached(device: str, dtype: str, sizes: Tuple[Tuple[str, int], ...], compiling: bool,
                   lora_impl: Optional[str]) -> str:
    spec = CallSpec(device=torch.device(device).type, dtype=dtype,
                    extra={"device": device, "sizes": dict(sizes), "compiling": compiling})
    return lora_delta_op.select(spec, lora_impl).backend


def lora_delta(inp: Tensor, lora_A: Tensor, lora_B: Tensor, expert_ids: Tensor, top_k: int, *,
               per_token: bool = True, routing: Optional[MoERouting] = None,
               lora_impl: Optional[str] = "auto") -> Tensor:
    """``B[e_p] A[e_p] inp[row(p)]`` for every routed pair p, in pair order (module docstring).

    Args:
        inp: (T, in) with ``per_token`` (row of pair p: ``p // top_k``), else (P, in) (row p).
        lora_A: (E, r, in); lora_B: (E, out, r); same dtype and device as ``inp``.
        expert_ids: (P,) = (T * top_k,) int64, the expert of each pair, in [0, E).
        top_k: pairs per token.
        routing: optional :func:`moe_routing` of ``expert_ids.view(-1, top_k)`` (the grouped path's order).
        lora_impl: ``"auto"`` (default), ``"grouped"`` or ``"dense"``.

    Returns:
        (P, out) in the dtype of ``inp``; differentiable with respect to ``inp``, ``lora_A`` and ``lora_B``.
    """
    sizes = {"in": lora_A.shape[2], "out": lora_B.shape[1], "rank": lora_A.shape[1]}
    impl = lora_delta_op.impls[select_lora_impl(inp, sizes, lora_impl)]
    return impl.fn(inp, lora_A, lora_B, expert_ids, top_k, per_token=per_token, routing=routing)
