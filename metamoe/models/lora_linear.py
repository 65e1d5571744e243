"""The LoRA layer: a frozen ``nn.Linear`` plus a trainable low-rank update, in plain PyTorch.

``y = x W^T + b + (alpha / r) * dropout(x) A^T B^T`` with ``A`` (r, in) drawn like ``nn.Linear`` weights
(uniform, bound 1/sqrt(in)) and ``B`` (out, r) zero, so a freshly wrapped model computes exactly what the
base computes. The base weight and bias stay the very same ``Parameter`` objects, frozen; only ``A`` and
``B`` train. ``merge`` folds ``(alpha / r) B A`` into the base weight for evaluation, ``unmerge`` takes it out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Tuple

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
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
            f"alpha={self.alpha}, merged={self.merged}"
        )
