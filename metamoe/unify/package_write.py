"""Writing expert packages: :func:`write_expert_package` (the format: :mod:`metamoe.unify.package_format`).

The package is written into a temporary folder next to the target, loaded back with every reader check
(:func:`~metamoe.unify.package_read.load_expert_package`) and only then renamed into place, so a reader never
sees half a package or one it would refuse.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..selection.methods import canonical_method
from ..utils.checks import check_int
from ..utils.files import fsync_dir, make_temp_dir, save_safetensors, sha256_file
from .client import TrainedExpert
from .package_format import (
    FORMAT,
    FORMAT_VERSION,
    HEAD_FILE,
    LORA_FILE,
    LORA_KEY,
    MANIFEST,
    MANIFEST_DIGEST,
    POOL_DIGEST,
    PROTOTYPES_FILE,
    PROXY_DIGEST,
    TENSOR_FILES,
    PackageError,
    PathLike,
    manifest_digest,
    pool_fingerprint,
)
from .package_read import load_expert_package


def _save_tensors(tensors: Dict[str, torch.Tensor], path: Path) -> None:
    save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, path, {"format": "pt"})
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _check_json_safe(obj: Any, where: str) -> None:
    """Metrics must be plain JSON: finite numbers, strings, bools, None, lists and str-keyed dicts."""
    if obj is None or isinstance(obj, (bool, str)):
        return
    if isinstance(obj, (int, np.integer)):
        return
    if isinstance(obj, (float, np.floating)):
        if not math.isfinite(float(obj)):
            raise ValueError(f"{where} is not finite ({obj})")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_json_safe(v, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise ValueError(f"{where} has a non-string key {k!r}")
            _check_json_safe(v, f"{where}.{k}")
        return
    raise TypeError(f"{where} must be JSON data (numbers, strings, lists, dicts), got {type(obj).__name__}")


def _to_json(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj


def _check_proxy_indices(proxy_indices: Any, public_pool_size: int, k: int) -> np.ndarray:
    arr = (
        proxy_indices.detach().cpu().numpy()
        if isinstance(proxy_indices, torch.Tensor)
        else np.asarray(proxy_indices)
    )
    if arr.ndim != 1:
        raise ValueError(f"proxy_indices must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("proxy_indices is empty (zero proxies); a package needs at least one proxy")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"proxy_indices must be integers, got {arr.dtype}")
    arr = arr.astype(np.int64)
    if int(arr.min()) < 0 or int(arr.max()) >= public_pool_size:
        raise ValueError(
            f"proxy_indices must lie in [0, public_pool_size={public_pool_size}), got [{int(arr.min())}, "
            f"{int(arr.max())}]"
        )
    if len(np.unique(arr)) != len(arr):
        raise ValueError("proxy_indices has duplicates")
    if len(arr) > k:
        raise ValueError(f"{len(arr)} proxy_indices for k={k}; a selection picks at most k")
    return arr


def write_expert_package(
    path: PathLike,
    expert: TrainedExpert,
    *,
    proxy_indices: Any,
    public_pool_size: Optional[int] = None,
    public_x: Any = None,
    public_y: Any = None,
    method: Optional[str] = None,
    k: Optional[int] = None,
    overwrite: bool = False,
) -> Path:
    """Write ``expert`` as a package folder at ``path``, atomically (temporary folder + rename).

    Args:
        path: the package folder to create (its parent is created if needed).
        expert: from :func:`metamoe.unify.client.train_expert`.
        proxy_indices: (k_picked,) int indices into the public pool, or a :class:`metamoe.selection.Selection`
            (then ``method`` and ``k`` default to its own). Must be non-empty, unique, in range; when the expert
            was trained with proxies, exactly as many as it was trained with.
        public_pool_size: N, the public pool's size (indices are checked against it and it is recorded);
            defaults to the size of ``public_x``, and must equal it when both are given.
        public_x: the public pool's inputs (N, ...) (array, tensor, or a mapping of them for token inputs), as
            the server will load them. When given, the package records the pool's fingerprint and that of the
            proxy rows (:func:`~metamoe.unify.package_format.pool_fingerprint`), which the server checks against
            its own pool; without it the server can check the pool's size only.
        public_y: the pool's (N,) integer labels, or None (a pool without labels); part of the fingerprint.
        method: ``dpp``, ``facility_location``, ``top_relevance`` or ``random``
            (:data:`~metamoe.selection.methods.SELECTION_METHODS`; a short spelling such as ``topk`` is accepted
            and the canonical name is recorded).
        k: the selection budget (>= number of indices).
        overwrite: replace an existing package at ``path`` (atomically); otherwise FileExistsError.

    Returns:
        The package path.
    """
    if not isinstance(expert, TrainedExpert):
        raise TypeError(f"expert must be a TrainedExpert (train_expert), got {type(expert).__name__}")
    if hasattr(proxy_indices, "indices") and hasattr(proxy_indices, "method"):  # a Selection
        method = proxy_indices.method if method is None else method
        k = len(proxy_indices) if k is None else k
        proxy_indices = proxy_indices.indices
    method = canonical_method(method, "method")
    if public_y is not None and public_x is None:
        raise ValueError("public_y is given without public_x; pass the pool's inputs too")
    if public_x is not None:
        from ..models.registry import SeedModel

        n_pool = SeedModel.num_samples(public_x)
        if public_pool_size is None:
            public_pool_size = n_pool
        elif check_int(public_pool_size, "public_pool_size") != n_pool:
            raise ValueError(f"public_pool_size={public_pool_size} but public_x has {n_pool} samples")
    if public_pool_size is None:
        raise TypeError("write_expert_package needs public_x (the public pool) or public_pool_size")
    public_pool_size = check_int(public_pool_size, "public_pool_size")
    if k is None:
        k = max(1, len(np.asarray(proxy_indices).reshape(-1)))
    k = check_int(k, "k")
    idx = _check_proxy_indices(proxy_indices, public_pool_size, k)
    n_trained = int(expert.metrics.get("n_proxies", 0))
    if n_trained and n_trained != len(idx):
        raise ValueError(
            f"the expert was trained with {n_trained} proxies but {len(idx)} proxy_indices were given"
        )
    _check_json_safe(expert.metrics, "expert.metrics")

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    protos = expert.prototypes
    if protos.dim() != 2 or not torch.isfinite(protos).all():
        raise ValueError(f"expert.prototypes must be a finite (L, D) tensor, got shape {tuple(protos.shape)}")
    bad_keys = [key for key in expert.lora_state if not LORA_KEY.match(key)]
    if bad_keys or not expert.lora_state:
        raise ValueError(
            f"expert.lora_state keys must look like layers.<i>.<projection>.lora_A/B, got {bad_keys[:3]}"
        )
    n_layers = len({int(LORA_KEY.match(key).group(1)) for key in expert.lora_state})
    if n_layers != protos.shape[0]:
        raise ValueError(f"expert has LoRA on {n_layers} layers but {protos.shape[0]} prototypes")

    from ..version import __version__

    manifest: Dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "metamoe_version": __version__,
        "seed_model": {"name": expert.seed_name, "weight_hash": expert.seed_hash},
        "selection": {
            "method": method,
            "k": k,
            "public_pool_size": public_pool_size,
            "proxy_indices": idx.tolist(),
        },
        "label_space": _to_json(expert.label_space),
        "lora": {**expert.lora_config.to_dict(), "num_layers": n_layers},
        "prototypes": {"num_layers": int(protos.shape[0]), "dim": int(protos.shape[1])},
        "head": None,
        "metrics": _to_json(expert.metrics),
        "files": {},
    }
    if public_x is not None:
        manifest["selection"][POOL_DIGEST] = pool_fingerprint(public_x, public_y)
        manifest["selection"][PROXY_DIGEST] = pool_fingerprint(public_x, public_y, rows=idx)
    if expert.head_state is not None:
        w = expert.head_state["weight"]
        manifest["head"] = {"num_classes": int(w.shape[0]), "dim": int(w.shape[1])}

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        _save_tensors({k2: v.float() for k2, v in expert.lora_state.items()}, tmp / LORA_FILE)
        _save_tensors({"prototypes": protos.float()}, tmp / PROTOTYPES_FILE)
        if expert.head_state is not None:
            _save_tensors({k2: v.float() for k2, v in expert.head_state.items()}, tmp / HEAD_FILE)
        manifest["files"] = {name: sha256_file(tmp / name) for name in TENSOR_FILES if (tmp / name).exists()}
        # the digest of what is written: the manifest as JSON gives it back (lists for tuples, plain numbers)
        manifest[MANIFEST_DIGEST] = manifest_digest(json.loads(json.dumps(manifest, allow_nan=False)))
        text = json.dumps(manifest, indent=1, allow_nan=False) + "\n"
        with open(tmp / MANIFEST, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(tmp)
        try:  # what is written must load: the same checks a reader runs, before the package becomes visible
            load_expert_package(tmp)
        except PackageError as exc:
            raise ValueError(f"refusing to write an invalid package to {path}: {exc.problem}") from None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.rename(path, old / "pkg")
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


__all__ = ["write_expert_package"]
