"""Router auxiliary losses of a top-k MoE, from the router statistics (no host synchronisation).

Both take the statistics that :func:`metamoe.ops.router_topk` computes in the same pass as the routing
(``return_stats=True``): tokens per expert, mean router probability per expert, per-token logsumexp.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["load_balancing_loss", "z_loss"]


def load_balancing_loss(counts: Tensor, prob_mean: Tensor) -> Tensor:
    """Switch-Transformer load-balancing loss ``E * sum_e f_e * P_e``, a 0-d tensor.

    Args:
        counts: (E,) integer tensor, (token, slot) pairs routed to each expert (sums to T * top_k).
            Not differentiated.
        prob_mean: (E,) float tensor, mean over the T tokens of the full softmax router probability of
            expert e (``P_e``). Gradients flow through it.

    Returns:
        0-d tensor in ``prob_mean``'s dtype. ``f_e = counts_e / (T * k)`` is the fraction of routed pairs,
        so the loss is 1 for perfectly uniform routing whatever k (transformers'
        ``load_balancing_loss_func`` uses ``counts_e / T`` and equals k times this value). 0 for T = 0.
    """
    E = counts.shape[0]
    total = counts.sum().clamp_min(1)  # T * k, kept on the device (no .item()); 1 when T = 0
    frac = counts.to(prob_mean.dtype) / total.to(prob_mean.dtype)
    return (frac * prob_mean).sum() * E


def z_loss(lse: Tensor) -> Tensor:
    """ST-MoE router z-loss ``mean_t logsumexp(logits_t) ** 2``, a 0-d tensor (0 for T = 0).

    Args:
        lse: (T,) float tensor, logsumexp of each token's router logits. Gradients flow through it.
    """
    return lse.square().sum() / max(lse.shape[0], 1)
