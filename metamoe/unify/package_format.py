"""The expert package format: file names, manifest keys, :class:`ExpertPackage` and :class:`PackageError`.

A package is a folder, safetensors + JSON only (no pickle anywhere)::

    <package>/
        manifest.json            format version, seed model name + weight hash, selection method, k,
                                 proxy indices into the public pool, the pool's size and fingerprint and
                                 the fingerprint of the proxy rows (:func:`pool_fingerprint`), label space,
                                 LoRA config, prototype shape, aggregate training metrics, sha256 of every
                                 file, and ``manifest_sha256``: the digest of the manifest itself
                                 (:func:`manifest_digest`)
        lora.safetensors         layers.{i}.{projection}.lora_A (r, in) / .lora_B (out, r), float32
        prototypes.safetensors   prototypes (L, D) float32: mean FFN input per FFN layer over the training data
        head.safetensors         weight (C, D), bias (C,): only if a classification head was trained

Nothing per-sample from the private data goes in: the proxies are public indices, the prototypes are means
over the training set, the metrics are aggregates. The selection method is recorded by its canonical name
(:data:`metamoe.selection.methods.SELECTION_METHODS`); manifests that use a short spelling (``topk``) still load.

Integrity: every data file's sha256 is in the manifest, and ``manifest_sha256`` is the sha256 of the
manifest's canonical JSON (every field but ``manifest_sha256``, keys sorted, no whitespace, numbers spelled as
in the file), so an edit to any field or file shows. Digests are exactly 64 lowercase hex digits and are
compared in full. The digests detect edits and corruption; they are not signatures (whoever can rewrite a
package can recompute them).

``selection.public_pool_sha256`` fingerprints the public pool the proxy indices point into (its inputs, and its
labels when it has them, in row order) and ``selection.proxy_sha256`` the proxy rows in pick order; the server
recomputes both from its own pool (:func:`metamoe.unify.package_read.check_public_pool`). A package written
without the pool records neither.

Format versions: 2 (what :func:`~metamoe.unify.package_write.write_expert_package` writes) requires
``manifest_sha256``; 1 has neither the manifest digest nor the pool fingerprints and loads with an
:class:`UnverifiedPackageWarning`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from ..models.lora import LoRAConfig
from ..selection.methods import canonical_method

PathLike = Union[str, os.PathLike]

FORMAT = "metamoe-expert"
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
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
MANIFEST_DIGEST = "manifest_sha256"
POOL_DIGEST = "public_pool_sha256"
PROXY_DIGEST = "proxy_sha256"
LORA_KEY = re.compile(r"^layers\.(\d+)\.(.+)\.lora_([AB])$")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_POOL_CHUNK_BYTES = 1 << 26


def is_sha256_hex(value: Any) -> bool:
    """Whether ``value`` is a sha256 hex digest as packages record it: a str of exactly 64 lowercase hex digits."""
    return isinstance(value, str) and SHA256_HEX.fullmatch(value) is not None


class NumberText(str):
    """A JSON number exactly as the manifest spells it (:func:`parse_manifest` with ``numbers_as_written``)."""


def _no_duplicate_keys(pairs: Any) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def parse_manifest(text: str, numbers_as_written: bool = False) -> Any:
    """Parse manifest JSON; ValueError on invalid JSON or an object with a key given twice.

    With ``numbers_as_written`` every number is a :class:`NumberText` holding its spelling in ``text``, so
    :func:`manifest_digest` sees two spellings of one float (``0.1`` and ``0.10000000000000001``) as different.
    """
    if numbers_as_written:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_float=NumberText, parse_int=NumberText)
    return json.loads(text, object_pairs_hook=_no_duplicate_keys)


def _canonical(v: Any, out: list) -> None:
    if isinstance(v, NumberText):
        out.append(str(v))
    elif isinstance(v, dict):
        out.append("{")
        for i, k in enumerate(sorted(v)):
            out.append(("," if i else "") + json.dumps(k, ensure_ascii=True) + ":")
            _canonical(v[k], out)
        out.append("}")
    elif isinstance(v, (list, tuple)):
        out.append("[")
        for i, item in enumerate(v):
            if i:
                out.append(",")
            _canonical(item, out)
        out.append("]")
    else:  # str, bool, None, int, float (as json.dumps writes it: repr, NaN / Infinity)
        out.append(json.dumps(v, ensure_ascii=True))


def canonical_manifest(manifest: Dict[str, Any]) -> bytes:
    """The bytes :func:`manifest_digest` hashes: every field but ``manifest_sha256`` as JSON, keys sorted,
    no whitespace, ASCII only (strings escaped as ``json.dumps`` escapes them), numbers as written when
    parsed with ``numbers_as_written`` (:func:`parse_manifest`) and as ``json.dumps`` writes them otherwise."""
    out: list = []
    _canonical({k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}, out)
    return "".join(out).encode("ascii")


def manifest_digest(manifest: Dict[str, Any]) -> str:
    """Hex sha256 of :func:`canonical_manifest`: the digest recorded as ``manifest_sha256``.

    The writer hashes the manifest it writes (``json.dumps`` spells a number as this function does); the reader
    hashes the file's content parsed with ``numbers_as_written``, so an edit to any field, a number's spelling
    included, changes the digest, while whitespace and key order do not. The manifest records every file's
    sha256, so two packages with the same digest have the same content.
    """
    return hashlib.sha256(canonical_manifest(manifest)).hexdigest()


def _array_for_hash(v: Any, name: str) -> Tuple[np.ndarray, str]:
    if isinstance(v, torch.Tensor):
        t = v.detach().cpu()
        if t.dtype == torch.bfloat16:  # NumPy has no bfloat16: its bits as int16, under its own dtype name
            return t.view(torch.int16).numpy(), "bfloat16"
        a = t.numpy()
    else:
        a = np.asarray(v)
    if a.dtype.kind not in "biufc" or a.ndim == 0:
        raise TypeError(f"{name} must be an (N, ...) numeric array or tensor, got {a.dtype} of shape {a.shape}")
    return a, a.dtype.str


def _hash_rows(h: Any, a: np.ndarray) -> None:
    """Feed ``a``'s bytes into ``h`` in row order, a block of rows at a time (a memmap is read, not copied)."""
    row_bytes = max(1, a[:1].nbytes)
    step = max(1, _POOL_CHUNK_BYTES // row_bytes)
    for start in range(0, len(a), step):
        h.update(np.ascontiguousarray(a[start : start + step]).reshape(-1).view(np.uint8))


def _take(v: Any, rows: np.ndarray) -> Any:
    return v[torch.as_tensor(rows)] if isinstance(v, torch.Tensor) else v[rows]


def pool_fingerprint(x: Any, y: Any = None, rows: Any = None) -> str:
    """Hex sha256 of a public pool's content, in row order: the fingerprint a package records.

    Args:
        x: the pool's inputs (N, ...): a NumPy array (or memmap), a torch tensor, or a mapping of them (token
            ids with ``input_ids``, ``attention_mask``, ...; keys in sorted order, None values skipped).
        y: (N,) integer labels, or None for a pool without labels (hashed as int64).
        rows: optional 1-D integer indices: the fingerprint of those rows, in that order (a package's proxies).

    The hash covers N (or the number of rows), each array's name, dtype and shape, and every byte, so the
    same rows in another order, another dtype or other labels give another fingerprint. A torch tensor and a
    NumPy array with the same values and dtype give the same fingerprint.
    """
    items = sorted((str(k), v) for k, v in x.items() if v is not None) if isinstance(x, Mapping) else [("x", x)]
    if not items:
        raise ValueError("the pool has no arrays")
    idx = None
    if rows is not None:
        idx = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows)
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise ValueError(f"rows must be 1-D integer indices, got {idx.dtype} of shape {idx.shape}")
        idx = idx.astype(np.int64)
    arrays = []
    for k, v in items:
        a, dt = _array_for_hash(v if idx is None else _take(v, idx), f"pool {k!r}")
        arrays.append((k, a, dt))
    n = len(arrays[0][1])
    if any(len(a) != n for _, a, _ in arrays):
        raise ValueError(f"the pool's arrays differ in length: {[(k, len(a)) for k, a, _ in arrays]}")
    h = hashlib.sha256(f"metamoe-pool-fingerprint-1|n={n}".encode())
    for k, a, dt in arrays:
        h.update(f"|{k}|{dt}|{tuple(a.shape)}|".encode())
        _hash_rows(h, a)
    if y is not None:
        yy = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y)
        if yy.dtype.kind not in "iu":
            raise TypeError(f"pool labels y must be integers, got {yy.dtype}")
        yy = (yy if idx is None else yy[idx]).astype(np.int64)
        if yy.shape != (n,):
            raise ValueError(f"pool labels y must be ({n},), got shape {yy.shape}")
        h.update(b"|y|int64|")
        _hash_rows(h, yy)
    return h.hexdigest()


class UnverifiedPackageWarning(UserWarning):
    """A package that loads but could not be fully verified: a format-1 manifest (no ``manifest_sha256``) or a
    package that records no public pool fingerprint, whose pool is checked by its size alone."""


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
    def public_pool_sha256(self) -> Optional[str]:
        """The recorded fingerprint of the public pool (:func:`pool_fingerprint`), or None when there is none."""
        return self.manifest["selection"].get(POOL_DIGEST)

    @property
    def proxy_sha256(self) -> Optional[str]:
        """The recorded fingerprint of the proxy rows, in pick order, or None when there is none."""
        return self.manifest["selection"].get(PROXY_DIGEST)

    @property
    def content_sha256(self) -> str:
        """:func:`manifest_digest` of the manifest: equal for two packages exactly when their content is."""
        return manifest_digest(self.manifest)

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
    "PathLike", "FORMAT", "FORMAT_VERSION", "READABLE_FORMAT_VERSIONS", "MANIFEST", "LORA_FILE", "PROTOTYPES_FILE",
    "HEAD_FILE", "TENSOR_FILES", "MANIFEST_KEYS", "MANIFEST_DIGEST", "POOL_DIGEST", "PROXY_DIGEST", "LORA_KEY",
    "SHA256_HEX", "PackageError", "ExpertPackage", "UnverifiedPackageWarning", "is_sha256_hex",
    "NumberText", "parse_manifest", "canonical_manifest", "manifest_digest", "pool_fingerprint",
]
