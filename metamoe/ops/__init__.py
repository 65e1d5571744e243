"""Differentiable MoE ops, each dispatched per call to its fastest available backend (triton, torch)."""

from .router_topk import RouterStats, router_topk, router_topk_ref
from .moe_routing import MoERouting, moe_routing
from .moe_experts import moe_experts, moe_experts_torch

__all__ = ["RouterStats", "router_topk", "router_topk_ref", "MoERouting", "moe_routing", "moe_experts",
           "moe_experts_torch"]
