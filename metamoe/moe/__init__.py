"""Mixture-of-Experts layers: dropless top-k MoE, LoRA experts over a shared FFN, router losses.

- :class:`MoELayer`: stacked experts ``[E, ...]`` (transformers' MixtralExperts layouts), fused router.
- :class:`LoRAMoELayer`: experts = one frozen shared FFN + a rank-r LoRA per expert (MetaMoE unification).
- :class:`RouterConfig`: the router's options, shared by both (``router=RouterConfig(...)``).
- Both: context-aware routing, router init from prototypes, ``aux_loss`` / ``z_loss`` after each forward.
"""

from .layer import ACTIVATIONS, MoELayer, RoutedMoEBase, RouterOutput
from .lora_experts import LORA_IMPLS, LoRAMoELayer
from .losses import load_balancing_loss, z_loss
from .router_config import ROUTER_ORDERS, RouterConfig

__all__ = [
    "ACTIVATIONS",
    "LORA_IMPLS",
    "ROUTER_ORDERS",
    "LoRAMoELayer",
    "MoELayer",
    "RoutedMoEBase",
    "RouterConfig",
    "RouterOutput",
    "load_balancing_loss",
    "z_loss",
]
