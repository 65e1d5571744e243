"""LoRA on every FFN projection of a seed model (the layer itself: :mod:`metamoe.models.lora_linear`).

``y = x W^T + b + (alpha / r) * dropout(x) A^T B^T`` with ``A`` (r, in) drawn like ``nn.Linear`` weights
(uniform, bound 1/sqrt(in)) and ``B`` (out, r) zero, so a freshly wrapped model computes exactly what the
base computes. The base weight and bias stay the very same ``Parameter`` objects, frozen; only ``A`` and
``B`` train. ``merge`` folds ``(alpha / r) B A`` into the base weight for evaluation, ``unmerge`` takes it out.

LoRA state dicts are keyed by FFN layer index and native projection name, independent of where the
module sits in the model: ``layers.{i}.{projection}.lora_A`` (r, in) and ``layers.{i}.{projection}.lora_B``
(out, r), e.g. ``layers.0.fc1.lora_A`` for a timm ViT, ``layers.3.gate_proj.lora_B`` for LLaMA.
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import nn

from .lora_linear import LoRAConfig, LoRALinear
from .registry import SeedModel


def _seed_net(model):
    if not isinstance(model, SeedModel):
        raise TypeError(f"model must be a SeedModel (create_seed_model), got {type(model).__name__}")
    return model.net


def has_lora(model) -> bool:
    return any(isinstance(m, LoRALinear) for m in _seed_net(model).modules())


def lora_modules(model) -> Dict[Tuple[int, str], LoRALinear]:
    """{(FFN layer index, projection name): LoRALinear} of a wrapped model, in layer order."""
    net = _seed_net(model)
    out = {}
    for layer in model.ffn_layers():
        for name in layer.projections:
            mod = layer.linear(net, name)
            if isinstance(mod, LoRALinear):
                out[(layer.index, name)] = mod
    return out


def apply_lora(
    model,
    rank: int = 8,
    alpha: Optional[float] = None,
    dropout: float = 0.0,
    *,
    projections: Optional[Sequence[str]] = None,
    seed: int = 0,
) -> LoRAConfig:
    """Wrap the FFN projections of every FFN layer of ``model`` (a SeedModel) with LoRA, in place.

    Every parameter of ``model.net`` is frozen first; only the new ``lora_A``/``lora_B`` train (unfreeze a
    head yourself). ``alpha`` defaults to ``2 * rank``; ``projections`` defaults to all of the adapter's
    projections (``fc1, fc2`` / ``gate_proj, up_proj, down_proj`` / ``intermediate.dense, output.dense``).
    ``A`` is drawn from a generator seeded with ``seed`` (same seed, same A), ``B`` is zero.
    """
    net = _seed_net(model)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    alpha = float(2 * rank if alpha is None else alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    if not (0.0 <= float(dropout) < 1.0):
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if has_lora(model):
        raise ValueError("model already has LoRA adapters")
    layers = model.ffn_layers()
    known = tuple(model.adapter.projection_names)
    projections = known if projections is None else tuple(projections)
    bad = [p for p in projections if p not in known]
    if bad or not projections or len(set(projections)) != len(projections):
        raise ValueError(
            f"projections must be distinct names among {', '.join(known)}, got {list(projections)}"
        )
    for p in net.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(int(seed))
    for layer in layers:
        for name in projections:
            path = layer.projections[name]
            parent_path, _, attr = path.rpartition(".")
            parent = net.get_submodule(parent_path)
            setattr(
                parent, attr, LoRALinear(getattr(parent, attr), rank, alpha, float(dropout), generator=gen)
            )
    return LoRAConfig(rank, alpha, float(dropout), projections)


def remove_lora(model) -> None:
    """Put the plain linears back (unmerged base weights); LoRA weights are dropped."""
    net = _seed_net(model)
    for layer in model.ffn_layers():
        for path in layer.projections.values():
            parent_path, _, attr = path.rpartition(".")
            parent = net.get_submodule(parent_path)
            mod = getattr(parent, attr)
            if isinstance(mod, LoRALinear):
                setattr(parent, attr, mod.to_linear())


def lora_state_dict(model) -> Dict[str, torch.Tensor]:
    """{``layers.{i}.{proj}.lora_A``: (r, in), ``...lora_B``: (out, r)}: detached contiguous CPU copies."""
    out = {}
    for (i, name), mod in lora_modules(model).items():
        out[f"layers.{i}.{name}.lora_A"] = mod.lora_A.detach().to("cpu").contiguous().clone()
        out[f"layers.{i}.{name}.lora_B"] = mod.lora_B.detach().to("cpu").contiguous().clone()
    if not out:
        raise ValueError("model has no LoRA adapters (apply_lora first)")
    return out


@torch.no_grad()
def load_lora_state_dict(model, state: Dict[str, torch.Tensor]) -> None:
    """Copy LoRA weights into a wrapped (unmerged) model. Keys and shapes must match exactly (ValueError otherwise)."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("model has no LoRA adapters (apply_lora first)")
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict of tensors, got {type(state).__name__}")
    expected = {}
    for (i, name), mod in mods.items():
        if mod.merged:
            raise ValueError(f"LoRA of layer {i} {name} is merged; unmerge before loading new weights")
        expected[f"layers.{i}.{name}.lora_A"] = mod.lora_A
        expected[f"layers.{i}.{name}.lora_B"] = mod.lora_B
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(
            f"LoRA state keys do not match the model: missing {missing[:4]}, unexpected {extra[:4]}"
        )
    for key, param in expected.items():
        t = state[key]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"LoRA state {key!r} must be a tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(param.shape):
            raise ValueError(
                f"LoRA state {key!r} has shape {tuple(t.shape)}, the model expects {tuple(param.shape)}"
            )
        if not torch.isfinite(t).all():
            raise ValueError(f"LoRA state {key!r} has NaN or inf values")
        param.copy_(t.to(dtype=param.dtype, device=param.device))


def merge_lora(model) -> None:
    """Fold every LoRA update into its base weight (eval speed); idempotent."""
    for mod in lora_modules(model).values():
        mod.merge()


def unmerge_lora(model) -> None:
    """Undo :func:`merge_lora`; idempotent."""
    for mod in lora_modules(model).values():
        mod.unmerge()


@contextlib.contextmanager
def merged(model) -> Iterator[None]:
    """``with merged(model):`` runs with LoRA folded in, unmerged afterwards (also on error)."""
    merge_lora(model)
    try:
        yield
    finally:
        unmerge_lora(model)


def trainable_parameters(model) -> Dict[str, nn.Parameter]:
    """{name: parameter} of everything with ``requires_grad`` in ``model.net``."""
    return {n: p for n, p in _seed_net(model).named_parameters() if p.requires_grad}
