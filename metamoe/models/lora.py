"""LoRA on every FFN projection of a seed model, in plain PyTorch.

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
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import nn


@dataclass(frozen=True)
class LoRAConfig:
    """rank r, alpha (update scale alpha / r), dropout on the LoRA branch input, projections wrapped."""

    rank: int
    alpha: float
    dropout: float
    projections: Tuple[str, ...]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        d = asdict(self)
        d["projections"] = list(self.projections)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAConfig":
        keys = {"rank", "alpha", "dropout", "projections"}
        if not isinstance(d, dict) or set(d) != keys:
            raise ValueError(f"LoRA config must have exactly the keys {sorted(keys)}, got {d!r}")
        return cls(int(d["rank"]), float(d["alpha"]), float(d["dropout"]), tuple(d["projections"]))


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update.

    Parameters (state-dict keys): ``weight`` (out, in) and ``bias`` (out,) or None: the wrapped linear's own
    Parameters, frozen; ``lora_A`` (r, in) and ``lora_B`` (out, r), same dtype/device as ``weight``.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        generator: Optional[torch.Generator] = None,
    ):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        if base.bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.rank
        kw = dict(dtype=base.weight.dtype, device=base.weight.device)
        bound = 1.0 / math.sqrt(self.in_features)
        a = torch.empty(self.rank, self.in_features, dtype=torch.float32)
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(**kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.rank, **kw))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """(out, in) = (alpha / r) B A."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        z = nn.functional.linear(nn.functional.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return y + z * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.sub_(self.delta_weight())
            self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the base weights (unmerged) sharing the Parameters."""
        if self.merged:
            raise ValueError("unmerge before removing LoRA")
        lin = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            dtype=self.weight.dtype,
            device=self.weight.device,
        )
        lin.weight = self.weight
        if self.bias is not None:
            lin.bias = self.bias
        return lin

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def _seed_net(model):
    from .registry import SeedModel

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
