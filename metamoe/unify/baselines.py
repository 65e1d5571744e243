"""The methods the harness compares, named exactly as the paper's table (docs/design.md, "The method").

Each method is a :class:`MethodSpec`: which proxies the clients select (``dpp``, ``top_relevance``,
``random``: names from :data:`metamoe.selection.methods.SELECTION_METHODS`), whether the experts are trained
with them (proxy alignment), how the server combines the experts (``moe``: the routed LoRA-expert MoE of
:func:`~metamoe.unify.server.build_unified_model`; ``soup``: averaged LoRAs; ``ensemble``: BTM prediction
averaging), whether the router is context-aware, and on what data the router is trained (the union of the
clients' proxies, or, for the oracle only, the clients' PRIVATE data).

The names of this module: :data:`METHODS` (the compared methods, :class:`MethodSpec` objects) and
:data:`METHOD_NAMES` (their names); the proxy-selection algorithms are ``SELECTION_METHODS``.

=================  ==========  =======  ========  =======  ================  =========================
name               proxies     aligned  combine   context  router trained on  notes
=================  ==========  =======  ========  =======  ================  =========================
``metamoe``        DPP         yes      moe       yes      proxies            the method
``flexolmo``       top-k rel.  yes      moe       no       proxies            router from prototypes
``random_proxy``   random      yes      moe       yes      proxies
``model_soup``     DPP         yes      soup      --       --                 no router
``btm``            DPP         yes      ensemble  --       --                 E forward passes
``btx_oracle``     DPP         yes      moe       yes      PRIVATE data       breaks privacy: upper bound
``no_alignment``   DPP         no       moe       yes      proxies            ablation
``no_context``     DPP         yes      moe       no       proxies            ablation
=================  ==========  =======  ========  =======  ================  =========================

Methods that agree on (proxies, aligned) share the same experts: :func:`expert_set_key`.
FlexOlmo's router is initialised from the prototypes like every MoE here and, like the others, then
trained on its own (top-relevance) proxies, so that the comparison isolates the proxy choice and the
context; ``no_alignment`` experts never saw a proxy, but the server still trains their router on the DPP
proxies the clients selected.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, Optional, Sequence, Tuple

from ..models.registry import SeedModel
from .package import ExpertPackage

__all__ = ["METHODS", "METHOD_NAMES", "MethodSpec", "build_method", "expert_set_key", "method_spec"]

PRIVACY_NOTE = (
    "BREAKS PRIVACY: the router is trained on the clients' private data; "
    "an upper bound, not a deployable method"
)


@dataclass(frozen=True)
class MethodSpec:
    """One compared method (see the module table)."""

    name: str
    selection: str  # "dpp", "top_relevance", "random": the proxies the clients pick (manifests record them)
    aligned: bool  # experts trained on private data + proxies (False: private data only)
    combine: str  # "moe", "soup", "ensemble"
    context_routing: bool
    router_data: Optional[str]  # "proxies", "private", or None (no router)
    breaks_privacy: bool
    description: str

    def to_dict(self) -> Dict[str, Any]:
        d = dict(self.__dict__)
        d["privacy"] = PRIVACY_NOTE if self.breaks_privacy else "private data never leaves the clients"
        return d


METHODS: Tuple[MethodSpec, ...] = (
    MethodSpec(
        "metamoe",
        "dpp",
        True,
        "moe",
        True,
        "proxies",
        False,
        "DPP proxies, proxy-aligned experts, context-aware router trained on the proxies",
    ),
    MethodSpec(
        "flexolmo",
        "top_relevance",
        True,
        "moe",
        False,
        "proxies",
        False,
        "proxies by relevance only (top-k), router initialised from prototypes, token routing",
    ),
    MethodSpec(
        "random_proxy",
        "random",
        True,
        "moe",
        True,
        "proxies",
        False,
        "random public samples as proxies, otherwise as metamoe",
    ),
    MethodSpec(
        "model_soup",
        "dpp",
        True,
        "soup",
        False,
        None,
        False,
        "the experts' LoRA updates averaged into one adapter, no routing",
    ),
    MethodSpec(
        "btm",
        "dpp",
        True,
        "ensemble",
        False,
        None,
        False,
        "ensemble of the experts (each with its own head), predictions averaged",
    ),
    MethodSpec(
        "btx_oracle",
        "dpp",
        True,
        "moe",
        True,
        "private",
        True,
        "router trained on the clients' private data (upper bound)",
    ),
    MethodSpec(
        "no_alignment",
        "dpp",
        False,
        "moe",
        True,
        "proxies",
        False,
        "ablation: experts trained on private data only (no proxies), router as metamoe",
    ),
    MethodSpec(
        "no_context",
        "dpp",
        True,
        "moe",
        False,
        "proxies",
        False,
        "ablation: metamoe with a token-only router (no context)",
    ),
)
METHOD_NAMES: Tuple[str, ...] = tuple(m.name for m in METHODS)


def method_spec(name: str) -> MethodSpec:
    """The :class:`MethodSpec` called ``name``; ValueError listing the known names otherwise."""
    for m in METHODS:
        if m.name == name:
            return m
    raise ValueError(f"unknown method {name!r}; known: {', '.join(METHOD_NAMES)}")


def check_methods(methods: Any) -> Tuple[str, ...]:
    """Validate a list of method names (unique, known); returns them as a tuple in the given order."""
    if isinstance(methods, str) or not isinstance(methods, Sequence):
        raise TypeError(f"methods must be a list of method names, got {type(methods).__name__}")
    if not methods:
        raise ValueError("methods is empty")
    for m in methods:
        if not isinstance(m, str):
            raise TypeError(f"methods must hold strings, got {type(m).__name__}")
        method_spec(m)
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods has duplicates: {list(methods)}")
    return tuple(methods)


def expert_set_key(spec: MethodSpec) -> str:
    """Which client-side expert set a method uses: methods with the same key share experts."""
    return spec.selection if spec.aligned else f"{spec.selection}_unaligned"


def build_method(
    spec: MethodSpec, seed_model: SeedModel, packages: Sequence[ExpertPackage], **unify_options: Any
):
    """The server-side model of a method, before any router training.

    Returns a :class:`~metamoe.unify.server.UnifiedModel` (``moe``, ``soup``) or an
    :class:`~metamoe.unify.evaluate.ExpertEnsemble` (``ensemble``); ``unify_options`` go to
    :func:`~metamoe.unify.build_unified_model` (``top_k``, ``router_init_scale``, ``router=RouterConfig(...)``,
    ...); the method decides context routing, in the RouterConfig too.
    """
    from .evaluate import ExpertEnsemble
    from .unified_model import build_soup_model, build_unified_model

    if not isinstance(spec, MethodSpec):
        raise TypeError(f"spec must be a MethodSpec, got {type(spec).__name__}")
    if spec.combine == "moe":
        router = unify_options.pop("router", None)
        if router is None:
            return build_unified_model(seed_model, packages, context_routing=spec.context_routing, **unify_options)
        router = replace(router, context_routing=spec.context_routing)
        return build_unified_model(seed_model, packages, router=router, **unify_options)
    if spec.combine == "soup":
        return build_soup_model(seed_model, packages)
    return ExpertEnsemble(seed_model, packages)
