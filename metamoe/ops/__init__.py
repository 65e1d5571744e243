"""Differentiable MoE ops, each dispatched per call through the backend registry (triton, torch; the LoRA
deltas: grouped, dense). The pure-PyTorch reference of each op is ``<op>_ref``."""

from .lora_delta import LORA_IMPLS, lora_delta, lora_delta_ref
from .moe_experts import ACTIVATIONS, moe_experts, moe_experts_ref
from .moe_routing import MoERouting, moe_routing
from .router_topk import RouterStats, router_topk, router_topk_ref

__all__ = ["ACTIVATIONS", "LORA_IMPLS", "RouterStats", "router_topk", "router_topk_ref", "MoERouting", "moe_routing",
           "moe_experts", "moe_experts_ref", "lora_delta", "lora_delta_ref"]
