"""Routing metadata of a dropless top-k MoE: the (token, slot) pairs grouped by expert, built on the device.

The T * k (token, slot) pairs are numbered row-major (pair ``p = t * k + j`` for token ``t``, slot ``j``).
:func:`moe_routing` sorts them by expert (stable, so within an expert by pair id, hence by token) and
returns the permutation, its inverse, the tokens per expert and their prefix sums. Everything is made by
device ops with static output shapes (a stable sort, a scatter and a ``searchsorted``): no ``.item()``,
no ``.tolist()``, no host synchronisation, so it is safe inside CUDA graphs and ``torch.compile``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["MoERouting", "moe_routing", "check_topk_ids"]


class MoERouting(NamedTuple):
    """Expert-sorted order of the T * k (token, slot) pairs (all int64, all on the ids' device).

    Attributes:
        sorted_pairs: (T*k,) int64. Pair ids ``t * k + j`` sorted by expert; stable, so within one expert
            in increasing pair id (= increasing token). Token of sorted row i: ``sorted_pairs[i] // k``.
        inverse: (T*k,) int64. Inverse permutation: ``sorted_pairs[inverse[p]] == p``; the row of pair p in
            expert-sorted order.
        counts: (E,) int64. Pairs routed to each expert (0 for an expert with no tokens).
        offsets: (E+1,) int64. ``offsets[0] = 0``, ``offsets[e+1] - offsets[e] = counts[e]``,
            ``offsets[E] = T*k``; expert e owns sorted rows ``offsets[e] : offsets[e+1]``.
    """

    sorted_pairs: torch.Tensor
    inverse: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor


def _is_compiling() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except AttributeError:  # pragma: no cover - very old torch
        return False


def check_topk_ids(topk_ids, num_experts, *, name: str = "topk_ids") -> int:
    """Validate ``topk_ids`` (T, k) integer against ``num_experts``; returns ``num_experts`` as an int.

    Shape, dtype and ``1 <= k <= num_experts`` are checked on the host from metadata. The values
    (``0 <= id < num_experts``) are checked with a ValueError on CPU tensors; on a GPU a host check would
    synchronise, so an asynchronous device assert (``torch._assert_async``) is queued instead.
    Inside ``torch.compile`` tracing the value check is skipped.
    """
    if isinstance(num_experts, bool) or not isinstance(num_experts, int):
        try:
            import numpy as np

            if isinstance(num_experts, np.integer):
                num_experts = int(num_experts)
        except ImportError:  # pragma: no cover
            pass
    if isinstance(num_experts, bool) or not isinstance(num_experts, int):
        raise TypeError(f"num_experts must be an int, got {type(num_experts).__name__}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if not isinstance(topk_ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(topk_ids).__name__}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype.is_complex or topk_ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int32 or int64), got {topk_ids.dtype}")
    if topk_ids.dim() != 2:
        raise ValueError(f"{name} must have shape (T, k), got {tuple(topk_ids.shape)}")
    k = topk_ids.shape[1]
    if k < 1:
        raise ValueError(f"top_k (= {name}.shape[1]) must be >= 1, got {k}")
    if k > num_experts:
        raise ValueError(f"top_k (= {name}.shape[1] = {k}) must be <= num_experts = {num_experts}")
    if topk_ids.numel() and not _is_compiling():
        if topk_ids.device.type == "cpu":
            lo, hi = int(topk_ids.min()), int(topk_ids.max())
            if lo < 0 or hi >= num_experts:
                raise ValueError(
                    f"{name} values must lie in [0, num_experts={num_experts}), found values in [{lo}, {hi}]"
                )
        else:
            torch._assert_async(((topk_ids >= 0) & (topk_ids < num_experts)).all(),
                                f"{name} values must lie in [0, num_experts={num_experts})")
    return num_experts


def moe_routing(topk_ids: torch.Tensor, num_experts: int) -> MoERouting:
    """Group the (token, slot) pairs of a top-k routing by expert, on the device, without host sync.

    Args:
        topk_ids: (T, k) int32 or int64, the experts chosen for each token (values in [0, num_experts)).
            T may be 0.
        num_experts: E >= k.

    Returns:
        :class:`MoERouting` ``(sorted_pairs, inverse, counts, offsets)``: (T*k,), (T*k,), (E,), (E+1,), all
        int64 on ``topk_ids.device``.

    Raises:
        TypeError / ValueError naming ``topk_ids`` or ``num_experts`` for a wrong dtype, rank, top_k < 1,
        top_k > num_experts, or (CPU tensors) an id out of range. On a GPU an out-of-range id triggers an
        asynchronous device-side assert instead (a host check would synchronise).
    """
    E = check_topk_ids(topk_ids, num_experts)
    flat = topk_ids.reshape(-1).to(torch.int64)
    n = flat.numel()
    dev = flat.device
    sorted_experts, sorted_pairs = torch.sort(flat, stable=True)
    arange = torch.arange(n, dtype=torch.int64, device=dev)
    inverse = torch.empty_like(sorted_pairs).scatter_(0, sorted_pairs, arange)
    # offsets[e] = number of pairs routed to experts < e (sorted_experts is non-decreasing)
    bounds = torch.arange(E + 1, dtype=torch.int64, device=dev)
    offsets = torch.searchsorted(sorted_experts, bounds, right=False)
    counts = offsets[1:] - offsets[:-1]
    return MoERouting(sorted_pairs, inverse, counts, offsets)
