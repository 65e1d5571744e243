"""The result of a selection: which samples, in pick order, and what each pick gained."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Union

import numpy as np

from ..utils.files import atomic_write_text


@dataclass
class Selection:
    """Selected sample indices and their marginal gains.

    Attributes:
        indices: int64 array (k,), indices into the pool, in pick order.
        gains: float64 array (k,), the objective's gain of each pick (for the DPP: log of the
            pick's residual variance, so that ``objective = log det L[S, S]``).
        objective: float, the objective of the whole selection.
        backend: str, the implementation that ran (``torch``, ``cpp``, ``cuda``, ``triton``).
        seconds: float, wall time of the selection.
        method: str, what was selected with (``dpp``, ``facility_location``, ...).
        info: dict of JSON-able extras (parameters, stop reason).
    """

    indices: np.ndarray
    gains: np.ndarray
    objective: float
    backend: str
    seconds: float
    method: str = ""
    info: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.indices = np.asarray(self.indices, dtype=np.int64).reshape(-1)
        self.gains = np.asarray(self.gains, dtype=np.float64).reshape(-1)
        if self.indices.shape != self.gains.shape:
            raise ValueError(f"indices {self.indices.shape} and gains {self.gains.shape} must have the same length")
        self.objective = float(self.objective)
        self.seconds = float(self.seconds)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def to_dict(self) -> Dict[str, Any]:
        return {
            "method": self.method,
            "backend": self.backend,
            "k": len(self),
            "indices": self.indices.tolist(),
            "gains": [float(g) for g in self.gains],
            "objective": self.objective,
            "seconds": self.seconds,
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Selection":
        missing = [key for key in ("indices", "gains", "objective", "backend", "seconds") if key not in d]
        if missing:
            raise ValueError(f"selection JSON lacks {', '.join(missing)}")
        return cls(
            indices=np.asarray(d["indices"], dtype=np.int64),
            gains=np.asarray(d["gains"], dtype=np.float64),
            objective=d["objective"],
            backend=d["backend"],
            seconds=d["seconds"],
            method=d.get("method", ""),
            info=dict(d.get("info", {})),
        )

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the selection as JSON, atomically."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Selection":
        with open(path) as fh:
            return cls.from_dict(json.load(fh))
