"""The expert package format: file names, manifest keys, :class:`ExpertPackage` and :class:`PackageError`.

A package is a folder, safetensors + JSON only (no pickle anywhere)::

    <package>/
        manifest.json            format version, seed model name + weight hash, selection method, k,
                                 proxy indices into the public pool (and the pool's size), label space,
                                 LoRA config, prototype shape, aggregate training metrics, sha256 of every file
        lora.safetensors         layers.{i}.{projection}.lora_A (r, in) / .lora_B (out, r), float32
        prototypes.safetensors   prototypes (L, D) float32: mean FFN input per FFN layer over the training data
        head.safetensors         weight (C, D), bias (C,): only if a classification head was trained

Nothing per-sample from the private data goes in: the proxies are public indices, the prototypes are means
over the training set, the metrics are aggregates. The selection method is recorded by its canonical name
(:data:`metamoe.selection.methods.SELECTION_METHODS`); manifests that use a short spelling (``topk``) still load.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

from ..models.lora import LoRAConfig
from ..selection.methods import canonical_method

PathLike = Union[str, os.PathLike]

FORMAT = "metamoe-expert"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LORA_FILE = "lora.safetensors"
PROTOTYPES_FILE = "prototypes.safetensors"
HEAD_FILE = "head.safetensors"
TENSOR_FILES = (LORA_FILE, PROTOTYPES_FILE, HEAD_FILE)
MANIFEST_KEYS = (
    "format",
    "format_version",
    "metamoe_version",
    "seed_model",
    "selection",
    "label_space",
    "lora",
    "prototypes",
    "head",
    "metrics",
    "files",
)
LORA_KEY = re.compile(r"^layers\.(\d+)\.(.+)\.lora_([AB])$")


class PackageError(ValueError):
    """A package that cannot be used; ``path`` is the package folder, ``problem`` what is wrong with it."""

    def __init__(self, path: Any, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"expert package {self.path}: {problem}")


@dataclass
class ExpertPackage:
    """A loaded, validated package.

    Attributes:
        path: the package folder.
        manifest: the parsed manifest.json.
        lora_state: {``layers.{i}.{proj}.lora_A`` (r, in), ``.lora_B`` (out, r)} float32 tensors.
        prototypes: (L, D) float32.
        head_state: {``weight`` (C, D), ``bias`` (C,)} or None.
    """

    path: Path
    manifest: Dict[str, Any]
    lora_state: Dict[str, torch.Tensor]
    prototypes: torch.Tensor
    head_state: Optional[Dict[str, torch.Tensor]]

    @property
    def seed_name(self) -> str:
        return self.manifest["seed_model"]["name"]

    @property
    def seed_hash(self) -> str:
        return self.manifest["seed_model"]["weight_hash"]

    @property
    def proxy_indices(self) -> np.ndarray:
        """int64 (k_picked,): indices into the public pool, in pick order."""
        return np.asarray(self.manifest["selection"]["proxy_indices"], dtype=np.int64)

    @property
    def public_pool_size(self) -> int:
        return int(self.manifest["selection"]["public_pool_size"])

    @property
    def method(self) -> str:
        """The canonical name of the selection method (a manifest may record a short spelling such as ``topk``)."""
        return canonical_method(self.manifest["selection"]["method"], "selection.method")

    @property
    def k(self) -> int:
        return int(self.manifest["selection"]["k"])

    @property
    def label_space(self) -> Dict[str, Any]:
        return self.manifest["label_space"]

    @property
    def lora_config(self) -> LoRAConfig:
        return LoRAConfig.from_dict(
            {k: self.manifest["lora"][k] for k in ("rank", "alpha", "dropout", "projections")}
        )

    @property
    def num_layers(self) -> int:
        return int(self.manifest["lora"]["num_layers"])


__all__ = [
    "PathLike", "FORMAT", "FORMAT_VERSION", "MANIFEST", "LORA_FILE", "PROTOTYPES_FILE", "HEAD_FILE", "TENSOR_FILES",
    "MANIFEST_KEYS", "LORA_KEY", "PackageError", "ExpertPackage",
]
