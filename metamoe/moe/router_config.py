"""The router's options, one frozen dataclass: what :class:`MoELayer` and :class:`LoRAMoELayer` route with.

Both layers take ``router=RouterConfig(...)`` or the same options as keyword arguments (``router_order``,
``renormalize``, ``aux_loss_coef``, ``z_loss_coef``, ``context_routing``, ``context_lambda_init``), which just
build a RouterConfig; either way the layer keeps it as ``layer.router_config``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from ..ops.router_topk import ORDERS
from ..utils.checks import check_choice, check_float, check_int

__all__ = [
    "DEFAULT_AUX_LOSS_COEF",
    "DEFAULT_CONTEXT_LAMBDA",
    "DEFAULT_Z_LOSS_COEF",
    "ROUTER_ORDERS",
    "RouterConfig",
    "router_config_from",
]

ROUTER_ORDERS = ORDERS  # router_topk's orders: one list
DEFAULT_AUX_LOSS_COEF = 1e-2  # Switch Transformer's alpha
DEFAULT_Z_LOSS_COEF = 1e-3  # ST-MoE's router z-loss coefficient
DEFAULT_CONTEXT_LAMBDA = 0.5  # sigmoid(0): the middle of [0, 1], where the gradient of lambda is largest

# layer keyword argument -> RouterConfig field (the layers say router_order for the field order)
_LAYER_KWARGS = {
    "router_order": "order",
    "renormalize": "renormalize",
    "aux_loss_coef": "aux_loss_coef",
    "z_loss_coef": "z_loss_coef",
    "context_routing": "context_routing",
    "context_lambda_init": "context_lambda_init",
}


@dataclass(frozen=True)
class RouterConfig:
    """How a MoE layer routes its tokens and weighs its router losses. Frozen; validated when built.

    Attributes:
        top_k: experts per token, >= 1 (and <= the layer's number of experts, which the layer checks).
            None: not set here; the layer's own ``top_k`` argument gives it.
        order: ``"softmax_then_topk"`` (softmax over all E experts, then the top k: Mixtral, Qwen-MoE, OLMoE)
            or ``"topk_then_softmax"`` (top k of the logits, then softmax over those k); as
            :func:`metamoe.ops.router_topk`'s ``order``. The layers' keyword argument is ``router_order``.
        renormalize: with ``"softmax_then_topk"``, divide the k selected probabilities by their sum (then the
            routing weights of a token sum to 1); no effect with ``"topk_then_softmax"``.
        aux_loss_coef: >= 0, weight of the Switch load-balancing loss (``aux_loss``) in ``router_loss``.
        z_loss_coef: >= 0, weight of the ST-MoE z-loss (``z_loss``) in ``router_loss``.
        context_routing: route on ``(1 - lambda) * token + lambda * context`` (MetaMoE's context-aware
            routing; ``forward(x, context=...)``) with a learnable lambda = sigmoid(raw) in [0, 1]; False routes
            on the tokens alone.
        context_lambda_init: the initial lambda, strictly inside (0, 1) (used with ``context_routing``).
    """

    top_k: Optional[int] = None
    order: str = "softmax_then_topk"
    renormalize: bool = True
    aux_loss_coef: float = DEFAULT_AUX_LOSS_COEF
    z_loss_coef: float = DEFAULT_Z_LOSS_COEF
    context_routing: bool = False
    context_lambda_init: float = DEFAULT_CONTEXT_LAMBDA

    def __post_init__(self):
        def set_(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if self.top_k is not None:
            set_("top_k", check_int(self.top_k, "RouterConfig.top_k", 1))
        set_("order", check_choice(self.order, "RouterConfig.order (the layers' router_order)", ROUTER_ORDERS))
        for name in ("renormalize", "context_routing"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"RouterConfig.{name} must be a bool, got {type(value).__name__} {value!r}")
        set_("aux_loss_coef", check_float(self.aux_loss_coef, "RouterConfig.aux_loss_coef"))
        set_("z_loss_coef", check_float(self.z_loss_coef, "RouterConfig.z_loss_coef"))
        lam = check_float(self.context_lambda_init, "RouterConfig.context_lambda_init")
        if not 0.0 < lam < 1.0:
            raise ValueError(
                f"RouterConfig.context_lambda_init must lie strictly inside (0, 1) (lambda = sigmoid(raw)), got {lam}"
            )
        set_("context_lambda_init", lam)

    def replace(self, **changes: Any) -> "RouterConfig":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


def router_config_from(router: Optional[RouterConfig], top_k: Optional[int] = None, **layer_kwargs: Any
                       ) -> RouterConfig:
    """The RouterConfig a layer routes with, from its ``router=`` and ``top_k`` arguments and its router keyword
    arguments (``router_order``, ``renormalize``, ...; None = not given).

    Either ``router`` or the keyword arguments carry the options, not both (TypeError naming them). ``top_k``
    may come from either the layer's argument or ``router.top_k``; both given must agree (ValueError); one of
    them is required (TypeError).
    """
    unknown = sorted(set(layer_kwargs) - set(_LAYER_KWARGS))
    if unknown:
        raise TypeError(f"unknown router options {unknown}; known: {sorted(_LAYER_KWARGS)}")
    given = {_LAYER_KWARGS[k]: v for k, v in layer_kwargs.items() if v is not None}
    if router is None:
        cfg = RouterConfig(top_k=top_k, **given)
    else:
        if not isinstance(router, RouterConfig):
            raise TypeError(f"router must be a RouterConfig, got {type(router).__name__}")
        if given:
            names = sorted(k for k, v in layer_kwargs.items() if v is not None)
            raise TypeError(
                f"router options given twice: router=RouterConfig(...) and the keyword arguments {names}; "
                "put them in the RouterConfig"
            )
        cfg = router
        if top_k is not None:
            top_k = check_int(top_k, "top_k", 1)
            if cfg.top_k is not None and cfg.top_k != top_k:
                raise ValueError(
                    f"top_k={top_k} but router=RouterConfig(top_k={cfg.top_k}); give one or make them agree"
                )
            cfg = cfg.replace(top_k=top_k)
    if cfg.top_k is None:
        raise TypeError("top_k is required: pass the layer's top_k argument or router=RouterConfig(top_k=...)")
    return cfg
