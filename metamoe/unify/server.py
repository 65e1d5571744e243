"""Server side of the unification pipeline: validate expert packages, stack them into one MoE, train it.

DESIGN.md section 1, stage 3. Given the shared seed model and one package per client:

* :func:`validate_packages` loads every package (:func:`~metamoe.unify.package.load_expert_package`: files,
  sha256, shapes, proxy indices) and checks them against each other and the seed
  (:func:`~metamoe.unify.package.check_package_set`: same seed name and weight hash, same public pool,
  disjoint private label spaces, same LoRA layout). Any problem is a :class:`~metamoe.unify.PackageError`.
* :func:`build_unified_model` copies the seed and turns every FFN into a
  :class:`metamoe.moe.LoRAMoELayer` over the frozen base FFN with one LoRA expert per package, top-k routing
  (default ``min(2, E)``), router rows initialised from the packages' prototypes and, by default,
  context-aware routing with the two-pass context: a first pass of the base model with the experts off gives
  each sample, for every FFN layer, the mean of that layer's FFN inputs over the sample's tokens; in the
  second pass the router of that layer sees ``(1 - lambda) * token + lambda * context``.
* :func:`train_router` trains the routers (and lambda; optionally the LoRAs and the head) with the task loss
  plus every layer's load-balancing and z losses, with checkpoints (safetensors + JSON, atomic) and exact
  resume.

**The unified label space and head.** Classification packages declare ``private`` classes (their own,
disjoint between clients) and the shared ``public`` classes. The unified model predicts over the
concatenation ``private(package 0) + private(package 1) + ... + public``. Its head is one linear layer over
the pooled features: the rows of client c's private classes are copied from package c's head (the only head
that was ever trained on those classes), the rows of the public classes are the mean of every package's
public rows (every client trained those on its proxies). The head stays frozen unless ``train_head=True``:
the proxies carry public labels only, so training it on them would push the private rows down.
A causal LM keeps the seed's own LM head (the label space is the vocabulary, the same for every client).

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
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..utils.files import atomic_write, atomic_write_text, sha256_file
from ..models.lora import has_lora
from ..models.registry import SeedModel
from .package import ExpertPackage, PackageError, check_package_set, load_expert_package

PathLike = Union[str, os.PathLike]

__all__ = [
    "LabelSpace",
    "UnifiedModel",
    "build_soup_model",
    "build_unified_model",
    "proxy_owners",
    "proxy_training_set",
    "train_router",
    "unified_label_space",
    "validate_packages",
]

CHECKPOINT_STATE = "state.json"
CHECKPOINT_FORMAT = "metamoe-router-checkpoint"


# --------------------------------------------------------------------------- validation


def validate_packages(
    packages: Sequence[Union[PathLike, ExpertPackage]],
    *,
    seed_model: Optional[SeedModel] = None,
    public_pool_size: Optional[int] = None,
) -> List[ExpertPackage]:
    """Load (if given as paths) and validate a set of expert packages for unification.

    Args:
        packages: package folders or already loaded :class:`ExpertPackage` objects (a loaded package is
            re-read from its folder, so a file changed since loading is caught).
        seed_model: the shared seed; when given, every package must come from it (name and weight hash) and
            its LoRA / prototype / head shapes must fit it.
        public_pool_size: the public pool's size N; when given, every package must index a pool of size N.

    Returns:
        The loaded packages, in the given order.

    Raises:
        PackageError (a ValueError) naming the package and the problem: mixed seed models or weights,
        tampered or missing files, colliding private label spaces, zero proxies, indices out of range, ...
        TypeError / ValueError for arguments of the wrong kind or an empty list.
    """
    if isinstance(packages, (str, os.PathLike, ExpertPackage)) or not isinstance(packages, Sequence):
        raise TypeError("packages must be a list of package folders or ExpertPackage objects")
    if len(packages) == 0:
        raise ValueError("packages is empty; unification needs at least one expert package")
    if seed_model is not None and not isinstance(seed_model, SeedModel):
        raise TypeError(f"seed_model must be a SeedModel, got {type(seed_model).__name__}")
    loaded = []
    for p in packages:
        path = p.path if isinstance(p, ExpertPackage) else p
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"packages must hold paths or ExpertPackage objects, got {type(p).__name__}")
        loaded.append(load_expert_package(path, public_pool_size=public_pool_size, seed_model=seed_model))
    check_package_set(loaded, seed_model=seed_model, public_pool_size=public_pool_size)
    return loaded


# --------------------------------------------------------------------------- label space


@dataclass(frozen=True)
class LabelSpace:
    """The unified label space.

    Attributes:
        kind: ``"classes"`` or ``"vocabulary"``.
        names: class names in head order (classes: every package's private names in package order, then the
            public names); empty for a vocabulary.
        private_slices: per package, the ``(start, stop)`` rows of its private classes.
        public_slice: ``(start, stop)`` rows of the public classes.
        vocab_size: for a vocabulary.
    """

    kind: str
    names: Tuple[str, ...] = ()
    private_slices: Tuple[Tuple[int, int], ...] = ()
    public_slice: Tuple[int, int] = (0, 0)
    vocab_size: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.names) if self.kind == "classes" else self.vocab_size

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"class {name!r} is not in the unified label space") from None

    def to_dict(self) -> Dict[str, Any]:
        return {
            "kind": self.kind,
            "names": list(self.names),
            "private_slices": [list(s) for s in self.private_slices],
            "public_slice": list(self.public_slice),
            "vocab_size": self.vocab_size,
        }


def unified_label_space(packages: Sequence[ExpertPackage]) -> LabelSpace:
    """The concatenated label space of checked packages: private classes in package order, then public."""
    if not packages:
        raise ValueError("packages is empty")
    first = packages[0].label_space
    if first["kind"] == "vocabulary":
        return LabelSpace("vocabulary", vocab_size=int(first["size"]))
    names: List[str] = []
    slices = []
    for p in packages:
        start = len(names)
        names += list(p.label_space["private"])
        slices.append((start, len(names)))
    start = len(names)
    names += list(first["public"])
    if len(set(names)) != len(names):
        raise ValueError("unified label space has duplicate names (run check_package_set first)")
    return LabelSpace("classes", tuple(names), tuple(slices), (start, len(names)))


def proxy_training_set(
    packages: Sequence[ExpertPackage], public_x: Any, public_y: Any, label_space: LabelSpace
) -> Tuple[Any, Optional[np.ndarray], np.ndarray]:
    """The union of every package's proxies with their public labels, mapped into the unified label space.

    Args:
        packages: the checked packages.
        public_x: the public pool's inputs (N, ...) (array/tensor, or a mapping of them for token inputs).
        public_y: (N,) int public labels in ``[0, len(public classes))``; None for a causal LM.
        label_space: from :func:`unified_label_space`.

    Returns:
        ``(x, y, indices)``: inputs of the union (each public sample once, in order of first appearance
        over the packages), labels (n,) int64 in the unified space (None for a causal LM), and the pool
        indices (n,) int64.
    """
    n_pool = SeedModel.num_samples(public_x)
    order: Dict[int, None] = {}
    for p in packages:
        if p.public_pool_size != n_pool:
            raise PackageError(
                p.path, f"indexes a public pool of {p.public_pool_size}, public_x has {n_pool}"
            )
        for i in p.proxy_indices.tolist():
            order.setdefault(int(i), None)
    idx = np.fromiter(order, dtype=np.int64, count=len(order))
    if len(idx) == 0:
        raise ValueError("the packages declare zero proxies in total")
    x = SeedModel.take(public_x, idx)
    if label_space.kind != "classes":
        return x, None, idx
    if public_y is None:
        raise ValueError("public_y is required for a classification label space")
    y = np.asarray(public_y.cpu() if isinstance(public_y, torch.Tensor) else public_y)
    if y.shape != (n_pool,) or y.dtype.kind not in "iu":
        raise ValueError(f"public_y must be (N={n_pool},) integers, got {y.shape} {y.dtype}")
    n_pub = label_space.public_slice[1] - label_space.public_slice[0]
    yy = y[idx].astype(np.int64)
    if len(yy) and (yy.min() < 0 or yy.max() >= n_pub):
        raise ValueError(f"public_y of the proxies must lie in [0, {n_pub}), got [{yy.min()}, {yy.max()}]")
    return x, yy + label_space.public_slice[0], idx


def proxy_owners(packages: Sequence[ExpertPackage], indices: Any) -> np.ndarray:
    """Routing targets of proxies: (n, E) float64, row i spread evenly over the experts whose clients picked
    public sample ``indices[i]`` as a proxy (one-hot when one client did).

    A client picks its proxies to stand in for its private data, so the server may ask the router to send
    each proxy to its client's expert (``train_router(route_targets=...)``); the picks are public, nothing
    private is used. ``indices`` is the third value of :func:`proxy_training_set`.
    """
    idx = np.asarray(indices)
    if idx.ndim != 1 or idx.dtype.kind not in "iu":
        raise ValueError(f"indices must be a 1-D integer array of pool indices, got {idx.shape} {idx.dtype}")
    out = np.zeros((len(idx), len(packages)), dtype=np.float64)
    for e, p in enumerate(packages):
        out[:, e] = np.isin(idx, p.proxy_indices)
    picked = out.sum(1)
    if len(idx) and picked.min() == 0:
        row = int(np.argmin(picked))
        raise ValueError(f"pool index {int(idx[row])} (indices[{row}]) is not a proxy of any package")
    return out / picked[:, None]


# --------------------------------------------------------------------------- the unified model


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


def build_unified_model(
    seed_model: SeedModel,
    packages: Sequence[ExpertPackage],
    *,
    top_k: Optional[int] = None,
    context_routing: bool = True,
    context_lambda_init: float = 0.5,
    routed_head: bool = True,
    router_init: str = "prototypes",
    router_init_scale: float = 4.0,
    center_prototypes: bool = True,
    aux_loss_coef: float = 1e-2,
    z_loss_coef: float = 1e-3,
    lora_impl: str = "auto",
    validate: bool = True,
) -> UnifiedModel:
    """Stack the packages' LoRA experts into one MoE over a copy of the seed (the seed is not modified).

    Args:
        seed_model: the shared plain seed (a :class:`SeedModel` without LoRA).
        packages: loaded packages (:func:`validate_packages`), one expert each, in expert order.
        top_k: experts per token; default ``min(2, E)``.
        context_routing: two-pass context-aware routing (module docstring); False routes on tokens alone.
        context_lambda_init: initial lambda in (0, 1).
        routed_head: (classification, two or more experts) add ``log g_c`` to the logits of client c's private
            classes, where ``g_c`` is the sample's mean routing probability to expert c in the last MoE layer
            (:meth:`UnifiedModel.expert_weights`). Without it every client's private head rows score every
            sample, also samples routed to other experts, whose features those rows were never trained on.
            Not part of the paper's description; False gives the plain concatenated head.
        router_init: ``"prototypes"`` (rows from the packages' prototypes) or ``"zeros"`` (uniform routing).
        router_init_scale: > 0, norm of each router row after initialisation (inverse temperature).
        center_prototypes: subtract the mean prototype over the experts before normalising (module docstring).
        aux_loss_coef, z_loss_coef: weights of the load-balancing and z losses in
            :meth:`UnifiedModel.router_loss`.
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
    E = len(packages)
    if top_k is None:
        top_k = min(2, E)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"top_k must be an int in [1, {E}] (the number of experts), got {top_k!r}")
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
            top_k=top_k,
            alpha=cfg.alpha,
            layer_index=i,
            lora_impl=lora_impl,
            context_routing=context_routing,
            context_lambda_init=context_lambda_init,
            aux_loss_coef=aux_loss_coef,
            z_loss_coef=z_loss_coef,
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
    um = UnifiedModel(model, wrappers, space, [p.path.name for p in packages], context_routing, routed_head)
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


# --------------------------------------------------------------------------- training with checkpoints


def _fingerprint(x: Any, y: Optional[np.ndarray], route_targets: Optional[np.ndarray] = None) -> str:
    h = hashlib.sha256()
    items = sorted(x.items()) if isinstance(x, dict) else [("x", x)]
    for k, v in items:
        a = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        h.update(k.encode())
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    if y is not None:
        h.update(np.ascontiguousarray(np.asarray(y, dtype=np.int64)).tobytes())
    if route_targets is not None:
        h.update(b"route_targets" + np.ascontiguousarray(np.asarray(route_targets, dtype=np.float32)).tobytes())
    return h.hexdigest()


def _save_checkpoint(
    directory: Path, step: int, params: Dict[str, nn.Parameter], opt, meta: Dict[str, Any]
) -> None:
    from safetensors.torch import save_file


    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{k}": v.detach().cpu().contiguous().clone() for k, v in params.items()}
    sd = opt.state_dict()
    for i, st in sd["state"].items():
        for k, v in st.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            tensors[f"optim.{i}.{k}"] = t.detach().cpu().contiguous().clone()
    fname = f"ckpt-{step:08d}.safetensors"
    atomic_write(directory / fname, lambda p: save_file(tensors, str(p)))

    state = dict(meta)
    state.update(
        format=CHECKPOINT_FORMAT,
        step=step,
        tensors=fname,
        sha256=sha256_file(directory / fname),
        param_groups=sd["param_groups"],
    )
    atomic_write_text(directory / CHECKPOINT_STATE, json.dumps(state, indent=1) + "\n")
    for old in directory.glob("ckpt-*.safetensors"):  # the state file no longer points at them
        if old.name != fname:
            old.unlink(missing_ok=True)


def _load_checkpoint(
    directory: Path, params: Dict[str, nn.Parameter], opt, meta: Dict[str, Any]
) -> Optional[Dict]:
    from safetensors.torch import load_file


    sfile = directory / CHECKPOINT_STATE
    if not sfile.is_file():
        return None
    state = json.loads(sfile.read_text())
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{sfile} is not a metamoe router checkpoint")
    for key in ("config", "data"):
        if state.get(key) != meta[key]:
            raise ValueError(
                f"checkpoint {directory} was written by a different run ({key} differs); "
                "use another checkpoint_dir or resume=False"
            )
    tfile = directory / state["tensors"]
    if not tfile.is_file() or sha256_file(tfile) != state["sha256"]:
        raise ValueError(f"checkpoint {tfile} is missing or does not match its recorded sha256")
    tensors = load_file(str(tfile))
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[f"param.{k}"])
    opt_state: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = t
    opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    return state


def _task_loss(
    logits: torch.Tensor, batch, y: Optional[torch.Tensor], block: Optional[Tuple[int, int]] = None
) -> torch.Tensor:
    if y is not None:
        if block is not None:  # softmax within the classes the labels come from
            return nn.functional.cross_entropy(
                logits[:, block[0] : block[1]].float(), y.to(logits.device) - block[0]
            )
        return nn.functional.cross_entropy(logits.float(), y.to(logits.device))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    return nn.functional.cross_entropy(logits[:, :-1][valid].float(), ids[:, 1:][valid])


def _check_route_targets(route_targets: Any, n: int, E: int, coef: Any) -> torch.Tensor:
    """(n, E) float32 tensor of ``train_router``'s ``route_targets``, after checking them and ``route_loss_coef``."""
    a = route_targets.detach().cpu().numpy() if isinstance(route_targets, torch.Tensor) else route_targets
    rt = torch.as_tensor(np.asarray(a, dtype=np.float64))
    if rt.shape != (n, E):
        raise ValueError(f"route_targets must be (n={n}, E={E}), got {tuple(rt.shape)}")
    if not bool(torch.isfinite(rt).all()) or bool((rt < 0).any()):
        raise ValueError("route_targets must be finite and non-negative")
    if not torch.allclose(rt.sum(1), torch.ones(n, dtype=rt.dtype), atol=1e-6):
        raise ValueError("every row of route_targets must sum to 1 (a distribution over the experts)")
    if isinstance(coef, bool) or not (isinstance(coef, (int, float)) and math.isfinite(coef) and coef > 0):
        raise ValueError(f"route_loss_coef must be a positive finite number, got {coef!r}")
    return rt.float()


def _route_loss(model: UnifiedModel, batch: Dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Mean over the MoE layers of the cross-entropy between ``targets`` (B, E) and each sample's mean routing
    probability per expert in that layer (of the forward just run)."""
    terms = []
    for layer in range(len(model.moe_layers)):
        g = model.expert_weights(batch, layer)
        logg = torch.log(g.clamp_min(torch.finfo(g.dtype).tiny))
        terms.append(-(targets.to(logg.dtype) * logg).sum(1).mean())
    return torch.stack(terms).mean()


def train_router(
    model: UnifiedModel,
    x: Any,
    y: Optional[Any] = None,
    *,
    epochs: int = 10,
    lr: float = 5e-3,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    train_lora: bool = False,
    train_head: bool = False,
    seed: int = 0,
    checkpoint_dir: Optional[PathLike] = None,
    checkpoint_every: int = 50,
    resume: bool = True,
    label_block: Optional[Tuple[int, int]] = None,
    route_targets: Optional[Any] = None,
    route_loss_coef: float = 1.0,
    callback: Optional[Callable[[int, float], None]] = None,
    progress: bool = False,
) -> Dict[str, Any]:
    """Train the routers (and lambda; optionally the LoRAs and the head) of ``model`` in place.

    Loss per step: the task loss (cross-entropy over the unified label space; next-token loss for a causal
    LM) plus :meth:`UnifiedModel.router_loss` (load balancing + z loss of every layer). AdamW. Step ``s``
    belongs to epoch ``s // steps_per_epoch`` and reads its batch from a permutation seeded by
    ``(seed, epoch)``, so the run is a pure function of its arguments and can stop and resume anywhere.
    The context vectors (first pass, base model) are computed once per sample and cached: they depend only
    on the frozen base.

    Args:
        model: from :func:`build_unified_model`.
        x: training inputs (n, ...), e.g. the union of the proxies (:func:`proxy_training_set`).
        y: (n,) int labels in the unified label space (classification); None for a causal LM.
        epochs, lr, batch_size, weight_decay: optimisation.
        train_lora: also train the experts' LoRA factors. train_head: also train the head.
        seed: shuffling.
        checkpoint_dir: if given, every ``checkpoint_every`` steps and at the end the trainable parameters,
            the optimizer state and the step go to ``checkpoint_dir`` (``ckpt-<step>.safetensors`` written
            atomically, then ``state.json`` atomically pointing at it). With ``resume=True`` an existing
            checkpoint of the same run (same config and data) is loaded first and training continues from its
            step: an interrupted-and-resumed run ends with exactly the parameters of an uninterrupted one.
        label_block: None: the cross-entropy runs over the whole unified label space. ``(start, stop)``: over
            those classes only (every label must lie inside): e.g. ``label_space.public_slice`` for proxies,
            whose labels are public classes, so that probability a sample puts on a client's private classes
            is not counted as an error (the private class may name the same thing: ``"rotated:3"`` and
            ``"3"``).
        route_targets: None, or (n, E) non-negative rows summing to 1: the share of each expert every sample
            should be routed to (:func:`proxy_owners` for proxies: their clients' experts). Adds
            ``route_loss_coef`` times the routing cross-entropy, averaged over the MoE layers:
            ``-sum_e target_e log g_e`` with ``g`` the sample's mean routing probability per expert
            (:meth:`UnifiedModel.expert_weights`). Not part of the paper's description (task loss plus
            load balancing only); None (default) trains as the paper does.
        route_loss_coef: > 0, the weight of that term.
        callback: ``callback(step, loss)`` after every step (step counts from 1); may raise to stop.
        progress: a tqdm bar.

    Returns:
        Metrics: ``steps``, ``resumed_from``, ``loss_per_epoch`` (mean task loss of every completed epoch),
        ``final_lambda`` (per layer, or None), ``seconds``; with ``route_targets`` also
        ``route_loss_per_epoch``.
    """
    from tqdm.auto import tqdm

    if not isinstance(model, UnifiedModel):
        raise TypeError(f"model must be a UnifiedModel (build_unified_model), got {type(model).__name__}")
    for nm, v in (("epochs", epochs), ("batch_size", batch_size), ("checkpoint_every", checkpoint_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{nm} must be a positive int, got {v!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    n = SeedModel.num_samples(x)
    if n == 0:
        raise ValueError("x is empty (0 training samples)")
    classes = model.label_space.kind == "classes"
    if classes:
        if y is None:
            raise ValueError("y is required to train a classification model")
        yt = torch.as_tensor(np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y))
        if yt.shape != (n,) or yt.is_floating_point():
            raise ValueError(f"y must be (n={n},) integers, got {tuple(yt.shape)} {yt.dtype}")
        yt = yt.long()
        if label_block is not None:
            lb = tuple(int(v) for v in label_block)
            if len(lb) != 2 or not 0 <= lb[0] < lb[1] <= model.label_space.num_classes:
                raise ValueError(
                    f"label_block must be (start, stop) inside [0, {model.label_space.num_classes}], "
                    f"got {label_block!r}"
                )
            if int(yt.min()) < lb[0] or int(yt.max()) >= lb[1]:
                raise ValueError(
                    f"every y must lie in label_block [{lb[0]}, {lb[1]}), "
                    f"got [{int(yt.min())}, {int(yt.max())}]"
                )
            label_block = lb
        C = model.label_space.num_classes
        if int(yt.min()) < 0 or int(yt.max()) >= C:
            raise ValueError(
                f"y must lie in [0, {C}) (the unified label space), got [{int(yt.min())}, {int(yt.max())}]"
            )
    else:
        if y is not None:
            raise ValueError("a causal LM trains on next tokens; y must be None")
        if label_block is not None:
            raise ValueError(
                "label_block applies to classification; a causal LM's loss is over its vocabulary"
            )
        yt = None
    rt = None if route_targets is None else _check_route_targets(route_targets, n, model.num_experts, route_loss_coef)
    for w in model._wrappers:
        for name, prm in w.moe.named_parameters():
            if name.startswith("lora_"):
                prm.requires_grad_(bool(train_lora))
    head = model.seed.head() if classes else None
    if head is not None:
        for prm in head.parameters():
            prm.requires_grad_(bool(train_head))
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("model has nothing to train (a one-expert soup has no router to train)")
    opt = torch.optim.AdamW(list(params.values()), lr=float(lr), weight_decay=float(weight_decay))
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    config = dict(
        epochs=epochs,
        lr=float(lr),
        batch_size=batch_size,
        weight_decay=float(weight_decay),
        train_lora=bool(train_lora),
        train_head=bool(train_head),
        seed=int(seed),
        params=sorted(params),
        label_block=None if label_block is None else list(label_block),
        route_loss_coef=None if rt is None else float(route_loss_coef),
    )
    meta = {
        "config": config,
        "data": _fingerprint(x, None if yt is None else yt.numpy(), None if rt is None else rt.numpy()),
        "loss_per_epoch": [],
        "route_loss_per_epoch": [],
    }
    start, losses, route_losses = 0, [], []
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    resumed_from = None
    if ckpt is not None and resume:
        st = _load_checkpoint(ckpt, params, opt, meta)
        if st is not None:
            start, losses, resumed_from = int(st["step"]), list(st["loss_per_epoch"]), int(st["step"])
            route_losses = list(st.get("route_loss_per_epoch", []))
    t0 = time.perf_counter()

    contexts = None
    if model.context_routing:
        parts = []
        for s in range(0, n, 256):
            parts.append(model.compute_context(model.prepare(SeedModel.take(x, slice(s, s + 256)))))
        contexts = torch.cat(parts, dim=1)  # (L, n, D)

    model.train()
    ep_sum, ep_route, ep_cnt = 0.0, 0.0, 0
    if resumed_from is not None and start % steps_per_epoch:  # resumed inside an epoch
        ep_sum, ep_cnt = float(st["epoch_loss_sum"]), int(st["epoch_loss_count"])
        ep_route = float(st.get("epoch_route_loss_sum", 0.0))
    perm, perm_epoch = None, -1
    with tqdm(total=total, initial=start, disable=not progress, desc="train router", leave=False) as bar:
        for step in range(start, total):
            epoch = step // steps_per_epoch
            if epoch != perm_epoch:
                g = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
                perm, perm_epoch = torch.randperm(n, generator=g), epoch
            idx = perm[(step % steps_per_epoch) * batch_size : (step % steps_per_epoch + 1) * batch_size]
            batch = model.prepare(SeedModel.take(x, idx))
            ctx = None if contexts is None else contexts[:, idx]
            logits = model(batch, ctx)
            task = _task_loss(logits, batch, None if yt is None else yt[idx], label_block)
            loss = task + model.router_loss()
            if rt is not None:
                route = _route_loss(model, batch, rt[idx])
                loss = loss + float(route_loss_coef) * route
                ep_route += float(route.detach()) * len(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ep_sum += float(task.detach()) * len(idx)
            ep_cnt += len(idx)
            bar.update(1)
            done = step + 1
            if done % steps_per_epoch == 0:
                losses.append(ep_sum / max(ep_cnt, 1))
                if rt is not None:
                    route_losses.append(ep_route / max(ep_cnt, 1))
                ep_sum, ep_route, ep_cnt = 0.0, 0.0, 0
            if ckpt is not None and (done % checkpoint_every == 0 or done == total):
                meta.update(loss_per_epoch=losses, epoch_loss_sum=ep_sum, epoch_loss_count=ep_cnt,
                            route_loss_per_epoch=route_losses, epoch_route_loss_sum=ep_route)
                _save_checkpoint(ckpt, done, params, opt, meta)
            if callback is not None:
                callback(done, float(loss.detach()))
    model.eval()
    lam = None
    if model.context_routing:
        lam = [float(m.context_lambda.detach()) for m in model.moe_layers]
    out = {
        "steps": total,
        "resumed_from": resumed_from,
        "loss_per_epoch": losses,
        "final_lambda": lam,
        "seconds": time.perf_counter() - t0,
        "trained": sorted(params),
    }
    if rt is not None:
        out["route_loss_per_epoch"] = route_losses
    return out
