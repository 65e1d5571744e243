"""The unified model: the seed with every FFN turned into a mixture of the packages' LoRA experts.

* :func:`build_unified_model` copies the seed and turns every FFN into a
  :class:`metamoe.moe.LoRAMoELayer` over the frozen base FFN with one LoRA expert per package, all routing
  with one :class:`~metamoe.moe.RouterConfig` (``UnifiedModel.router_config``): top-k routing (default
  ``min(2, E)``), router rows initialised from the packages' prototypes and, by default, context-aware
  routing with the two-pass context: a first pass of the base model with the experts off gives
  each sample, for every FFN layer, the mean of that layer's FFN inputs over the sample's tokens; in the
  second pass the router of that layer sees ``(1 - lambda) * token + lambda * context``.
* :func:`build_soup_model`: the Model Soup baseline, one adapter averaging the experts' LoRA updates.

Both are trained (routers, lambda, optionally LoRAs and head) by :func:`~metamoe.unify.train_router`.

**The head.** Over the unified label space (:func:`~metamoe.unify.server.unified_label_space`), one linear
layer over the pooled features: the rows of client c's private classes are copied from package c's head (the
only head that was ever trained on those classes), the rows of the public classes are the mean of every
package's public rows (every client trained those on its proxies). The head stays frozen unless
``train_router(train_head=True)``: the proxies carry public labels only, so training it on them would push
the private rows down. A causal LM keeps the seed's own LM head (the label space is the vocabulary, the
same for every client).

**Router initialisation.** Row e of layer l's router is package e's prototype of layer l (the mean FFN input
over its training data, Eq. 7 of the paper). Because the prototypes of all clients share a large common
component (the seed's own mean activation) and a softmax ignores what all rows share, the rows are by
default centred (the mean prototype over the experts subtracted) and L2-normalised, then scaled by
``router_init_scale`` (an inverse temperature); ``center_prototypes=False`` uses the raw prototypes.

Supported seed families: timm ViTs (``fc1``/``fc2``) and transformers gated decoders (``gate/up/down_proj``).
BERT's FFN is split across two modules around a residual + LayerNorm and is refused with a clear error.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..models.lora import has_lora
from ..models.registry import SeedModel
from ..moe.router_config import RouterConfig, router_config_from
from .package import ExpertPackage, PackageError, check_package_set
from .server import LabelSpace, unified_label_space

__all__ = ["UnifiedModel", "build_soup_model", "build_unified_model"]


class _MoEFFN(nn.Module):
    """Stands where a seed FFN module stood: the MoE layer plus the two-pass context plumbing."""

    def __init__(self, moe: nn.Module, index: int):
        super().__init__()
        self.moe = moe
        self.index = index
        self.mode = "moe"  # "moe" or "base" (first pass, experts off)
        self.context: Optional[torch.Tensor] = None  # (B, D) for the current forward
        self.record: Optional[Callable[[int, torch.Tensor], None]] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "base":
            if self.record is not None:
                self.record(self.index, x)
            return self.moe.base_ffn(x)
        ctx = self.context if self.moe.context_routing else None
        return self.moe(x, context=ctx)


class UnifiedModel(nn.Module):
    """The seed model with every FFN turned into a LoRA-expert MoE, and the unified head.

    Attributes:
        seed: a :class:`SeedModel` (a private copy of the seed) whose FFN modules are ``_MoEFFN`` wrappers.
        moe_layers: the :class:`~metamoe.moe.LoRAMoELayer` of every FFN layer, in depth order.
        label_space: :class:`LabelSpace` of the head.
        expert_names: one name per expert (the package folder names).
        context_routing: whether the routers read the two-pass context.
        router_config: the :class:`~metamoe.moe.RouterConfig` every MoE layer routes with (one object).

    Inputs are what the seed's :meth:`SeedModel.prepare` takes (images (n, C, H, W) / (n, H, W), token ids).
    """

    def __init__(
        self,
        seed: SeedModel,
        wrappers: List[_MoEFFN],
        label_space: LabelSpace,
        expert_names: Sequence[str],
        context_routing: bool,
        routed_head: bool = False,
    ):
        super().__init__()
        self.seed = seed
        self._wrappers = wrappers  # also reachable through self.seed (registered there)
        self.label_space = label_space
        self.expert_names = list(expert_names)
        self.context_routing = context_routing
        self.routed_head = bool(routed_head) and label_space.kind == "classes" and len(label_space.private_slices) > 1

    @property
    def moe_layers(self) -> List[nn.Module]:
        return [w.moe for w in self._wrappers]

    @property
    def router_config(self) -> RouterConfig:
        """The :class:`~metamoe.moe.RouterConfig` of the MoE layers (:func:`build_unified_model` gives every
        layer the same one)."""
        return self._wrappers[0].moe.router_config

    @property
    def num_experts(self) -> int:
        return self._wrappers[0].moe.num_experts

    def prepare(self, data: Any) -> Dict[str, torch.Tensor]:
        return self.seed.prepare(data)

    @torch.no_grad()
    def compute_context(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """First pass, experts off: (L, B, D) mean FFN input of every layer over each sample's valid tokens.

        ``batch`` from :meth:`prepare`. The result is in the model's dtype; it does not depend on the
        routers or the LoRAs (only on the frozen base), so it can be cached per sample.
        """
        mask = self.seed.token_mask(batch)
        out: List[Optional[torch.Tensor]] = [None] * len(self._wrappers)

        def record(i: int, x: torch.Tensor) -> None:
            if mask is None:
                out[i] = x.mean(dim=-2)
            else:
                m = mask.to(x.dtype).unsqueeze(-1)
                out[i] = (x * m).sum(-2) / m.sum(-2).clamp_min(1)

        for w in self._wrappers:
            w.mode, w.record = "base", record
        try:
            self.seed(batch)
        finally:
            for w in self._wrappers:
                w.mode, w.record = "moe", None
        return torch.stack(out)  # type: ignore[arg-type]

    def _set_context(self, context: Optional[torch.Tensor]) -> None:
        for i, w in enumerate(self._wrappers):
            w.context = None if context is None else context[i]

    def forward(self, batch: Dict[str, torch.Tensor], context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits over the unified label space: (B, C) (classification) or (B, L, V) (causal LM).

        Args:
            batch: from :meth:`prepare`.
            context: (L, B, D) from :meth:`compute_context` (e.g. cached); computed here when None and the
                routers are context-aware; ignored otherwise.
        """
        if self.context_routing and context is None:
            context = self.compute_context(batch)
        self._set_context(context if self.context_routing else None)
        try:
            logits = self.seed(batch)
        finally:
            self._set_context(None)
        if self.routed_head:
            logits = self._route_head(batch, logits)
        return logits

    def expert_weights(self, batch: Dict[str, torch.Tensor], layer: int = -1) -> torch.Tensor:
        """(B, E) float32 (float64 for a float64 model): each sample's mean router probability per expert in
        MoE layer ``layer`` (default the last) of the latest forward (softmax over all experts, before top-k;
        padding tokens excluded). Differentiable when the forward was."""
        moe = self._wrappers[layer].moe
        if moe.router_logits is None:
            raise RuntimeError("expert_weights is available after a forward pass")
        logits = moe.router_logits
        probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        mask = self.seed.token_mask(batch)
        B = next(iter(batch.values())).shape[0]  # every tensor of a prepared batch leads with the batch dim
        probs = probs.reshape(B, -1, probs.shape[-1])
        if mask is None:
            return probs.mean(1)
        m = mask.to(probs.dtype).unsqueeze(-1)
        return (probs * m).sum(1) / m.sum(1).clamp_min(1)

    def _route_head(self, batch: Dict[str, torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
        # Routed head: client c's private classes belong to expert c, so their logits get log(g_c), the
        # sample's mean routing probability to expert c; the softmax over the unified space then weighs each
        # client's classes by how strongly the sample is routed to that client's expert. Public classes
        # (shared by every expert) are left as they are.
        g = self.expert_weights(batch).to(logits.dtype)
        log_g = torch.log(g.clamp_min(torch.finfo(logits.dtype).tiny))
        offset = torch.zeros_like(logits)
        for c, (s, e) in enumerate(self.label_space.private_slices):
            offset[:, s:e] = log_g[:, c : c + 1]
        return logits + offset

    def features(
        self, batch: Dict[str, torch.Tensor], context: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The pooled representation the head reads, (B, feature_dim), with the experts on."""
        if self.context_routing and context is None:
            context = self.compute_context(batch)
        self._set_context(context if self.context_routing else None)
        try:
            return self.seed.features(batch)
        finally:
            self._set_context(None)

    def router_loss(self) -> torch.Tensor:
        """Sum over the layers of ``aux_loss_coef * aux_loss + z_loss_coef * z_loss`` of the last forward."""
        losses = [m.router_loss for m in self.moe_layers]
        if any(v is None for v in losses):
            raise RuntimeError("router_loss is available after a forward pass")
        return torch.stack([v.to(torch.float32) for v in losses]).sum()

    def _eval_forwards(self, x: Any, batch_size: int):
        """Yield (row slice, prepared batch, logits) over ``x`` in batches, in eval mode without gradients
        (the previous train/eval mode is restored afterwards)."""
        n = SeedModel.num_samples(x)
        prev = self.training
        self.eval()
        try:
            with torch.no_grad():
                for s in range(0, n, batch_size):
                    sl = slice(s, min(n, s + batch_size))
                    b = self.prepare(SeedModel.take(x, sl))
                    yield sl, b, self(b)
        finally:
            self.train(prev)

    def predict_proba(self, x: Any, batch_size: int = 256) -> np.ndarray:
        """Class probabilities (n, C) float64 over the unified label space, in eval mode (classification)."""
        if self.label_space.kind != "classes":
            raise ValueError("predict_proba is for classification models")
        out = np.empty((SeedModel.num_samples(x), self.label_space.num_classes), dtype=np.float64)
        for sl, _, logits in self._eval_forwards(x, batch_size):
            out[sl] = torch.softmax(logits.double(), -1).cpu().numpy()
        return out

    def routing_stats(self, x: Any, batch_size: int = 256) -> Tuple[np.ndarray, np.ndarray]:
        """One pass over ``x``: (:meth:`routing_fractions`, :meth:`routing_weights`)."""
        counts = torch.zeros(len(self._wrappers), self.num_experts, dtype=torch.float64)
        weights = np.empty((SeedModel.num_samples(x), self.num_experts), dtype=np.float64)
        for sl, b, _ in self._eval_forwards(x, batch_size):
            for i, m in enumerate(self.moe_layers):
                idx = m.router_logits.topk(m.top_k, dim=-1).indices
                counts[i] += torch.bincount(idx.reshape(-1).cpu(), minlength=self.num_experts).double()
            weights[sl] = self.expert_weights(b).double().cpu().numpy()
        return (counts / counts.sum(1, keepdim=True).clamp_min(1)).numpy(), weights

    def routing_weights(self, x: Any, batch_size: int = 256) -> np.ndarray:
        """(n, E) float64: each sample's :meth:`expert_weights` (mean routing probability per expert in the
        last MoE layer), in eval mode."""
        return self.routing_stats(x, batch_size)[1]

    def routing_fractions(self, x: Any, batch_size: int = 256) -> np.ndarray:
        """(L, E) float64: fraction of the (token, slot) pairs of ``x`` each layer sends to each expert."""
        return self.routing_stats(x, batch_size)[0]


def _check_supported(seed_model: SeedModel) -> None:
    if seed_model.adapter_name not in ("timm_vit_mlp", "hf_gated_mlp"):
        raise ValueError(
            f"the server unifies timm ViT (fc1/fc2) and transformers gated (gate/up/down_proj) FFNs; "
            f"{seed_model.name} uses the {seed_model.adapter_name!r} adapter, whose FFN is not one module"
        )


def _replace_ffns(net: SeedModel, layers, build: Callable[[int, nn.Module], nn.Module]) -> List[_MoEFFN]:
    wrappers = []
    for layer in layers:
        parent_path, _, attr = layer.input_path.rpartition(".")
        parent = net.net.get_submodule(parent_path)
        w = _MoEFFN(build(layer.index, getattr(parent, attr)), layer.index)
        setattr(parent, attr, w)
        wrappers.append(w)
    return wrappers


def _install_head(model: SeedModel, packages: Sequence[ExpertPackage], space: LabelSpace) -> None:
    if space.kind != "classes":
        return
    head = model.replace_head(space.num_classes, seed=0)
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"the unified head must be an nn.Linear, {model.name}'s head is {type(head).__name__}"
        )
    W = torch.zeros_like(head.weight, dtype=torch.float64)
    b = torch.zeros(space.num_classes, dtype=torch.float64)
    for p, (s, e) in zip(packages, space.private_slices):
        if p.head_state is None:
            raise PackageError(
                p.path, "has no classification head; the unified head is built from the packages' heads"
            )
        hw, hb = p.head_state["weight"].double(), p.head_state["bias"].double()
        n_priv = e - s
        if hw.shape[0] != n_priv + (space.public_slice[1] - space.public_slice[0]):
            raise PackageError(p.path, f"head has {hw.shape[0]} rows, its label space {n_priv} + public")
        W[s:e], b[s:e] = hw[:n_priv], hb[:n_priv]
        W[space.public_slice[0] : space.public_slice[1]] += hw[n_priv:] / len(packages)
        b[space.public_slice[0] : space.public_slice[1]] += hb[n_priv:] / len(packages)
    with torch.no_grad():
        head.weight.copy_(W.to(head.weight.dtype))
        head.bias.copy_(b.to(head.bias.dtype))
    for prm in head.parameters():
        prm.requires_grad_(False)


def _router_prototypes(packages: Sequence[ExpertPackage], layer: int, center: bool) -> torch.Tensor:
    P = torch.stack([p.prototypes[layer].double() for p in packages])  # (E, D)
    if center and len(packages) > 1:
        C = P - P.mean(0, keepdim=True)
        if bool((torch.linalg.vector_norm(C, dim=1) > 1e-12 * P.abs().max()).all()):
            return C
    return P


def _unified_router_config(
    router: Optional[RouterConfig], E: int, top_k: Any, context_routing: Optional[bool], **kwargs: Any
) -> RouterConfig:
    """The one RouterConfig of :func:`build_unified_model`: ``router`` or its keyword arguments (None: not
    given; context routing on by default there), top-k ``min(2, E)`` unless given, checked against ``E``."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E):
        raise ValueError(f"top_k must be an int in [1, {E}] (the number of experts), got {top_k!r}")
    if router is None and context_routing is None:
        context_routing = True
    if top_k is None and (router is None or getattr(router, "top_k", None) is None):
        top_k = min(2, E)
    rc = router_config_from(router, top_k, context_routing=context_routing, **kwargs)
    if rc.top_k > E:
        raise ValueError(f"top_k must be an int in [1, {E}] (the number of experts), got {rc.top_k!r}")
    return rc


def build_unified_model(
    seed_model: SeedModel,
    packages: Sequence[ExpertPackage],
    *,
    router: Optional[RouterConfig] = None,
    top_k: Optional[int] = None,
    context_routing: Optional[bool] = None,
    context_lambda_init: Optional[float] = None,
    routed_head: bool = True,
    router_init: str = "prototypes",
    router_init_scale: float = 4.0,
    center_prototypes: bool = True,
    aux_loss_coef: Optional[float] = None,
    z_loss_coef: Optional[float] = None,
    lora_impl: str = "auto",
    validate: bool = True,
) -> UnifiedModel:
    """Stack the packages' LoRA experts into one MoE over a copy of the seed (the seed is not modified).

    Args:
        seed_model: the shared plain seed (a :class:`SeedModel` without LoRA).
        packages: loaded packages (:func:`validate_packages`), one expert each, in expert order.
        router: the :class:`~metamoe.moe.RouterConfig` every layer routes with (order, renormalize, loss
            weights, context routing), kept as ``model.router_config``; its ``top_k`` None means
            ``min(2, E)``. Either ``router`` or the router keyword arguments below (which just build one; None:
            not given), not both (TypeError); ``top_k`` may come with either and must then agree.
        top_k: experts per token; default ``min(2, E)``.
        context_routing: two-pass context-aware routing (module docstring); False routes on tokens alone.
            Default True (a ``RouterConfig``'s own default is False: say ``context_routing=True`` in it).
        context_lambda_init: initial lambda in (0, 1); default 0.5.
        routed_head: (classification, two or more experts) add ``log g_c`` to the logits of client c's private
            classes, where ``g_c`` is the sample's mean routing probability to expert c in the last MoE layer
            (:meth:`UnifiedModel.expert_weights`). Without it every client's private head rows score every
            sample, also samples routed to other experts, whose features those rows were never trained on.
            Not part of the paper's description; False gives the plain concatenated head.
        router_init: ``"prototypes"`` (rows from the packages' prototypes) or ``"zeros"`` (uniform routing).
        router_init_scale: > 0, norm of each router row after initialisation (inverse temperature).
        center_prototypes: subtract the mean prototype over the experts before normalising (module docstring).
        aux_loss_coef, z_loss_coef: weights of the load-balancing and z losses in
            :meth:`UnifiedModel.router_loss`; default ``RouterConfig``'s (1e-2 and 1e-3).
        lora_impl: ``"auto"``, ``"grouped"`` or ``"dense"`` (:class:`~metamoe.moe.LoRAMoELayer`).
        validate: run :func:`~metamoe.unify.package.check_package_set` against ``seed_model`` first.

    Returns:
        A :class:`UnifiedModel` in eval mode whose only trainable parameters are the routers and, with
        context routing, each layer's lambda logit.
    """
    from ..moe import LoRAMoELayer

    if not isinstance(seed_model, SeedModel):
        raise TypeError(f"seed_model must be a SeedModel, got {type(seed_model).__name__}")
    if has_lora(seed_model):
        raise ValueError("seed_model has LoRA adapters; pass the plain seed model")
    _check_supported(seed_model)
    if isinstance(packages, ExpertPackage) or not isinstance(packages, Sequence) or not packages:
        raise ValueError("packages must be a non-empty list of ExpertPackage")
    if validate:
        check_package_set(list(packages), seed_model=seed_model)
    rc = _unified_router_config(
        router, len(packages), top_k, context_routing=context_routing, context_lambda_init=context_lambda_init,
        aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef,
    )
    if router_init not in ("prototypes", "zeros"):
        raise ValueError(f"router_init must be 'prototypes' or 'zeros', got {router_init!r}")
    if not (
        isinstance(router_init_scale, (int, float))
        and math.isfinite(router_init_scale)
        and router_init_scale > 0
    ):
        raise ValueError(f"router_init_scale must be a positive finite number, got {router_init_scale!r}")
    cfg = packages[0].lora_config
    space = unified_label_space(packages)
    model = copy.deepcopy(seed_model)
    for prm in model.net.parameters():
        prm.requires_grad_(False)
    _install_head(model, packages, space)
    layers = model.ffn_layers()

    def build(i: int, ffn: nn.Module) -> nn.Module:
        moe = LoRAMoELayer.from_base_ffn(
            ffn,
            [p.lora_state for p in packages],
            alpha=cfg.alpha,
            layer_index=i,
            lora_impl=lora_impl,
            router=rc,
        )
        with torch.no_grad():
            if router_init == "prototypes":
                moe.init_router_from_prototypes(
                    _router_prototypes(packages, i, center_prototypes), scale=float(router_init_scale)
                )
            else:
                moe.router.weight.zero_()
        return moe

    wrappers = _replace_ffns(model, layers, build)
    for w in wrappers:
        for name, prm in w.moe.named_parameters():
            prm.requires_grad_(name == "router.weight" or name == "context_lambda_logit")
    if not isinstance(routed_head, bool):
        raise TypeError(f"routed_head must be a bool, got {type(routed_head).__name__}")
    um = UnifiedModel(model, wrappers, space, [p.path.name for p in packages], rc.context_routing, routed_head)
    um.eval()
    return um


def build_soup_model(
    seed_model: SeedModel, packages: Sequence[ExpertPackage], *, validate: bool = True
) -> UnifiedModel:
    """Model Soup: one adapter whose update is the average of the experts' LoRA updates, exactly.

    For every projection, ``mean_e s B_e A_e = (s / E) [B_1 .. B_E] [A_1; ..; A_E]``: a single LoRA of rank
    ``E r`` with the stacked factors and scale ``s / E`` (a plain average of the A and B factors would not
    average the updates).
    Built as a one-expert :class:`UnifiedModel` (top-1, no routing decisions), with the unified head.
    """
    from ..moe import LoRAMoELayer

    if not isinstance(seed_model, SeedModel):
        raise TypeError(f"seed_model must be a SeedModel, got {type(seed_model).__name__}")
    _check_supported(seed_model)
    if isinstance(packages, ExpertPackage) or not isinstance(packages, Sequence) or not packages:
        raise ValueError("packages must be a non-empty list of ExpertPackage")
    if validate:
        check_package_set(list(packages), seed_model=seed_model)
    cfg = packages[0].lora_config
    space = unified_label_space(packages)
    model = copy.deepcopy(seed_model)
    for prm in model.net.parameters():
        prm.requires_grad_(False)
    _install_head(model, packages, space)

    def build(i: int, ffn: nn.Module) -> nn.Module:
        soup = {}
        for proj in cfg.projections:
            A = torch.cat([p.lora_state[f"layers.{i}.{proj}.lora_A"] for p in packages], 0)
            B = torch.cat([p.lora_state[f"layers.{i}.{proj}.lora_B"] for p in packages], 1)
            soup[f"layers.{i}.{proj}.lora_A"], soup[f"layers.{i}.{proj}.lora_B"] = A, B
        # rank E r and scale s / E (alpha = scale * rank): the 1/E goes into the scale, the factors stay exact
        return LoRAMoELayer.from_base_ffn(
            ffn, [soup], top_k=1, alpha=cfg.scaling * cfg.rank, layer_index=i, lora_impl="dense"
        )

    wrappers = _replace_ffns(model, model.ffn_layers(), build)
    for w in wrappers:
        for prm in w.moe.parameters():
            prm.requires_grad_(False)
    um = UnifiedModel(model, wrappers, space, ["soup"], False)
    um.eval()
    return um
