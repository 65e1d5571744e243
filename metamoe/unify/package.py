"""Expert packages: what a client ships to the server. A folder, safetensors + JSON only (no pickle anywhere).

Layout::

    <package>/
        manifest.json            format version, seed model name + weight hash, selection method, k,
                                 proxy indices into the public pool (and the pool's size), label space,
                                 LoRA config, prototype shape, aggregate training metrics, sha256 of every file
        lora.safetensors         layers.{i}.{projection}.lora_A (r, in) / .lora_B (out, r), float32
        prototypes.safetensors   prototypes (L, D) float32: mean FFN input per FFN layer over the training data
        head.safetensors         weight (C, D), bias (C,): only if a classification head was trained

Nothing per-sample from the private data goes in: the proxies are public indices, the prototypes are means
over the training set, the metrics are aggregates.

:func:`write_expert_package` writes into a temporary folder next to the target and renames it into place,
so a reader never sees half a package. :func:`load_expert_package` checks everything it reads and raises
:class:`PackageError` (a ``ValueError``) naming the package and the problem: missing or unexpected files, a
hash mismatch (tampering), malformed tensors, zero proxies, proxy indices outside the public pool.
:func:`check_package_set` checks packages against each other before unification: same seed model and
weight hash, same public pool, disjoint private label spaces, matching LoRA layout.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..utils.files import fsync_dir, sha256_file
from ..models.lora import LoRAConfig
from .client import TrainedExpert

PathLike = Union[str, os.PathLike]

FORMAT = "metamoe-expert"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LORA_FILE = "lora.safetensors"
PROTOTYPES_FILE = "prototypes.safetensors"
HEAD_FILE = "head.safetensors"
TENSOR_FILES = (LORA_FILE, PROTOTYPES_FILE, HEAD_FILE)
SELECTION_METHODS = ("dpp", "facility_location", "topk", "random")
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
_LORA_KEY = re.compile(r"^layers\.(\d+)\.(.+)\.lora_([AB])$")


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
        return self.manifest["selection"]["method"]

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


# --------------------------------------------------------------------------- helpers


def _save_tensors(tensors: Dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(
        {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
        str(path),
        metadata={"format": "pt"},
    )
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


# --------------------------------------------------------------------------- write


def write_expert_package(
    path: PathLike,
    expert: TrainedExpert,
    *,
    proxy_indices: Any,
    public_pool_size: int,
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
        public_pool_size: N, the public pool's size (indices are checked against it and it is recorded).
        method: ``dpp``, ``facility_location``, ``topk`` or ``random``.
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
    if method not in SELECTION_METHODS:
        raise ValueError(f"method must be one of {', '.join(SELECTION_METHODS)}, got {method!r}")
    if (
        isinstance(public_pool_size, bool)
        or not isinstance(public_pool_size, (int, np.integer))
        or public_pool_size < 1
    ):
        raise ValueError(f"public_pool_size must be a positive int, got {public_pool_size!r}")
    public_pool_size = int(public_pool_size)
    if k is None:
        k = max(1, len(np.asarray(proxy_indices).reshape(-1)))
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    idx = _check_proxy_indices(proxy_indices, public_pool_size, int(k))
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
    bad_keys = [key for key in expert.lora_state if not _LORA_KEY.match(key)]
    if bad_keys or not expert.lora_state:
        raise ValueError(
            f"expert.lora_state keys must look like layers.<i>.<projection>.lora_A/B, got {bad_keys[:3]}"
        )
    n_layers = len({int(_LORA_KEY.match(key).group(1)) for key in expert.lora_state})
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
            "k": int(k),
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
    if expert.head_state is not None:
        w = expert.head_state["weight"]
        manifest["head"] = {"num_classes": int(w.shape[0]), "dim": int(w.shape[1])}

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        _save_tensors({k2: v.float() for k2, v in expert.lora_state.items()}, tmp / LORA_FILE)
        _save_tensors({"prototypes": protos.float()}, tmp / PROTOTYPES_FILE)
        if expert.head_state is not None:
            _save_tensors({k2: v.float() for k2, v in expert.head_state.items()}, tmp / HEAD_FILE)
        manifest["files"] = {name: sha256_file(tmp / name) for name in TENSOR_FILES if (tmp / name).exists()}
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


# --------------------------------------------------------------------------- load and validate


def _need(cond: bool, path: Path, problem: str) -> None:
    if not cond:
        raise PackageError(path, problem)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validate_manifest(m: Any, path: Path, public_pool_size: Optional[int]) -> None:
    _need(isinstance(m, dict), path, "manifest.json is not a JSON object")
    _need(
        m.get("format") == FORMAT, path, f"manifest.json format is {m.get('format')!r}, expected {FORMAT!r}"
    )
    _need(
        m.get("format_version") == FORMAT_VERSION,
        path,
        f"format_version {m.get('format_version')!r} is not supported (this metamoe reads {FORMAT_VERSION})",
    )
    missing = [key for key in MANIFEST_KEYS if key not in m]
    _need(not missing, path, f"manifest.json lacks {', '.join(missing)}")
    extra = sorted(set(m) - set(MANIFEST_KEYS))
    _need(not extra, path, f"manifest.json has unexpected keys {extra}")
    seed = m["seed_model"]
    _need(
        isinstance(seed, dict)
        and isinstance(seed.get("name"), str)
        and isinstance(seed.get("weight_hash"), str)
        and re.fullmatch(r"[0-9a-f]{64}", seed["weight_hash"]) is not None,
        path,
        "seed_model must have a name and a 64-hex-digit weight_hash",
    )

    sel = m["selection"]
    _need(isinstance(sel, dict), path, "selection must be an object")
    _need(
        sel.get("method") in SELECTION_METHODS,
        path,
        f"selection method {sel.get('method')!r} is not one of {', '.join(SELECTION_METHODS)}",
    )
    n_pool = sel.get("public_pool_size")
    _need(_is_int(n_pool) and n_pool >= 1, path, f"public_pool_size must be a positive int, got {n_pool!r}")
    if public_pool_size is not None:
        _need(
            n_pool == public_pool_size,
            path,
            f"was built against a public pool of {n_pool} samples, this pool has {public_pool_size}",
        )
    k = sel.get("k")
    _need(_is_int(k) and k >= 1, path, f"selection k must be a positive int, got {k!r}")
    idx = sel.get("proxy_indices")
    _need(isinstance(idx, list), path, "proxy_indices must be a list")
    _need(len(idx) > 0, path, "has zero proxies (proxy_indices is empty)")
    _need(all(_is_int(i) for i in idx), path, "proxy_indices must be integers")
    bad = [i for i in idx if not 0 <= i < n_pool]
    _need(
        not bad,
        path,
        f"proxy index {bad[0] if bad else ''} is out of range for the public pool of {n_pool} samples",
    )
    _need(len(set(idx)) == len(idx), path, "proxy_indices has duplicates")
    _need(len(idx) <= k, path, f"{len(idx)} proxy indices exceed k={k}")

    ls = m["label_space"]
    _need(
        isinstance(ls, dict) and ls.get("kind") in ("classes", "vocabulary"),
        path,
        "label_space.kind must be 'classes' or 'vocabulary'",
    )
    if ls["kind"] == "classes":
        _need(
            set(ls) == {"kind", "private", "public"},
            path,
            "a classes label_space has exactly kind, private, public",
        )
        for key in ("private", "public"):
            names = ls[key]
            _need(
                isinstance(names, list) and all(isinstance(s, str) and s for s in names),
                path,
                f"label_space.{key} must be a list of non-empty strings",
            )
            _need(len(set(names)) == len(names), path, f"label_space.{key} has duplicate names")
        _need(len(ls["private"]) > 0, path, "label_space.private is empty")
        clash = sorted(set(ls["private"]) & set(ls["public"]))
        _need(not clash, path, f"label space collision: {clash[:5]} are both private and public classes")
    else:
        _need(
            set(ls) == {"kind", "size"} and _is_int(ls["size"]) and ls["size"] >= 1,
            path,
            "a vocabulary label_space has exactly kind and a positive int size",
        )

    lora = m["lora"]
    _need(
        isinstance(lora, dict) and set(lora) == {"rank", "alpha", "dropout", "projections", "num_layers"},
        path,
        "lora must have rank, alpha, dropout, projections, num_layers",
    )
    _need(
        _is_int(lora["rank"])
        and lora["rank"] >= 1
        and _is_int(lora["num_layers"])
        and lora["num_layers"] >= 1,
        path,
        "lora rank and num_layers must be positive ints",
    )
    _need(
        isinstance(lora["projections"], list)
        and lora["projections"]
        and all(isinstance(p, str) for p in lora["projections"]),
        path,
        "lora.projections must be a non-empty list of names",
    )
    _need(
        isinstance(lora["alpha"], (int, float)) and not isinstance(lora["alpha"], bool) and lora["alpha"] > 0,
        path,
        "lora.alpha must be a positive number",
    )
    protos = m["prototypes"]
    _need(
        isinstance(protos, dict) and _is_int(protos.get("num_layers")) and _is_int(protos.get("dim")),
        path,
        "prototypes must record num_layers and dim",
    )
    _need(
        protos["num_layers"] == lora["num_layers"],
        path,
        f"{protos['num_layers']} prototype layers but LoRA on {lora['num_layers']} layers",
    )
    head = m["head"]
    if head is not None:
        _need(
            isinstance(head, dict) and _is_int(head.get("num_classes")) and _is_int(head.get("dim")),
            path,
            "head must be null or record num_classes and dim",
        )
        _need(ls["kind"] == "classes", path, "a head needs a classes label_space")
        n_cls = len(ls["private"]) + len(ls["public"])
        _need(
            head["num_classes"] == n_cls,
            path,
            f"head has {head['num_classes']} classes, the label space {n_cls} (private + public)",
        )
    _need(isinstance(m["metrics"], dict), path, "metrics must be an object")
    files = m["files"]
    _need(
        isinstance(files, dict) and all(isinstance(v, str) for v in files.values()),
        path,
        "files must map file names to sha256 strings",
    )
    unknown = sorted(set(files) - set(TENSOR_FILES))
    _need(not unknown, path, f"manifest lists unknown files {unknown}")
    for required in (LORA_FILE, PROTOTYPES_FILE):
        _need(required in files, path, f"manifest does not list {required}")
    _need(
        (HEAD_FILE in files) == (head is not None),
        path,
        "head.safetensors listed iff the manifest has a head",
    )


def _load_tensors(path: Path, name: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path / name), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise PackageError(path, f"{name} is not a readable safetensors file ({exc})") from None


def _validate_tensors(
    m: Dict[str, Any],
    path: Path,
    lora: Dict[str, torch.Tensor],
    protos: Dict[str, torch.Tensor],
    head: Optional[Dict[str, torch.Tensor]],
) -> None:
    cfg = m["lora"]
    L, r = cfg["num_layers"], cfg["rank"]
    expected = {f"layers.{i}.{p}.lora_{ab}" for i in range(L) for p in cfg["projections"] for ab in "AB"}
    missing, extra = sorted(expected - set(lora)), sorted(set(lora) - expected)
    _need(
        not missing and not extra,
        path,
        f"lora.safetensors keys do not match the manifest: missing {missing[:3]}, unexpected {extra[:3]}",
    )
    for i in range(L):
        for p in cfg["projections"]:
            a, b = lora[f"layers.{i}.{p}.lora_A"], lora[f"layers.{i}.{p}.lora_B"]
            _need(
                a.dim() == 2 and b.dim() == 2 and a.shape[0] == r and b.shape[1] == r,
                path,
                f"layers.{i}.{p}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not have rank {r}",
            )
            ref_a, ref_b = lora[f"layers.0.{p}.lora_A"], lora[f"layers.0.{p}.lora_B"]
            _need(
                a.shape == ref_a.shape and b.shape == ref_b.shape,
                path,
                f"layers.{i}.{p} has shapes {tuple(a.shape)}/{tuple(b.shape)}, layer 0 {tuple(ref_a.shape)}/{tuple(ref_b.shape)}",
            )
    for key, t in lora.items():
        _need(
            t.dtype == torch.float32 and bool(torch.isfinite(t).all()),
            path,
            f"lora tensor {key} must be finite float32",
        )
    _need(
        set(protos) == {"prototypes"},
        path,
        f"prototypes.safetensors must hold one tensor 'prototypes', has {sorted(protos)}",
    )
    pt = protos["prototypes"]
    want = (m["prototypes"]["num_layers"], m["prototypes"]["dim"])
    _need(
        tuple(pt.shape) == want and pt.dtype == torch.float32 and bool(torch.isfinite(pt).all()),
        path,
        f"prototypes must be finite float32 of shape {want}, got {pt.dtype} {tuple(pt.shape)}",
    )
    if head is not None:
        h = m["head"]
        _need(
            set(head) == {"weight", "bias"},
            path,
            f"head.safetensors must hold weight and bias, has {sorted(head)}",
        )
        _need(
            tuple(head["weight"].shape) == (h["num_classes"], h["dim"])
            and tuple(head["bias"].shape) == (h["num_classes"],),
            path,
            f"head shapes {tuple(head['weight'].shape)}/{tuple(head['bias'].shape)} do not match "
            f"({h['num_classes']}, {h['dim']})",
        )
        _need(all(bool(torch.isfinite(t).all()) for t in head.values()), path, "head has NaN or inf values")


def load_expert_package(
    path: PathLike, *, public_pool_size: Optional[int] = None, seed_model: Any = None
) -> ExpertPackage:
    """Read and validate one package; :class:`PackageError` on any problem.

    Checks: manifest present and well-formed, every listed file present with the recorded sha256, no other
    files, tensors with the recorded names, shapes and finite values, at least one proxy, proxy indices
    unique and inside the public pool (and ``public_pool_size`` equal to the recorded one when given).
    With ``seed_model`` (a SeedModel) also: same name and weight hash, LoRA and prototype shapes matching
    its FFN layers.
    """
    path = Path(path)
    _need(path.is_dir(), path, "does not exist or is not a folder")
    mfile = path / MANIFEST
    _need(mfile.is_file(), path, f"missing {MANIFEST}")
    try:
        manifest = json.loads(mfile.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(path, f"{MANIFEST} is not valid JSON ({exc})") from None
    if public_pool_size is not None and (
        isinstance(public_pool_size, bool) or not isinstance(public_pool_size, int)
    ):
        raise TypeError(f"public_pool_size must be an int, got {type(public_pool_size).__name__}")
    _validate_manifest(manifest, path, public_pool_size)
    files = manifest["files"]
    present = sorted(p.name for p in path.iterdir())
    for name in files:
        _need((path / name).is_file(), path, f"missing file {name}")
    unexpected = sorted(set(present) - set(files) - {MANIFEST})
    _need(not unexpected, path, f"unexpected file(s) {unexpected} not listed in the manifest")
    for name, digest in files.items():
        actual = sha256_file(path / name)
        _need(
            actual == digest,
            path,
            f"{name} was modified: its sha256 is {actual}, the manifest records {digest}",
        )
    lora = _load_tensors(path, LORA_FILE)
    protos = _load_tensors(path, PROTOTYPES_FILE)
    head = _load_tensors(path, HEAD_FILE) if HEAD_FILE in files else None
    _validate_tensors(manifest, path, lora, protos, head)
    pkg = ExpertPackage(path, manifest, lora, protos["prototypes"], head)
    if seed_model is not None:
        _check_against_seed(pkg, seed_model)
    return pkg


def _check_against_seed(pkg: ExpertPackage, seed_model: Any) -> None:
    from ..models.registry import SeedModel, weight_hash

    if not isinstance(seed_model, SeedModel):
        raise TypeError(f"seed_model must be a SeedModel, got {type(seed_model).__name__}")
    _need(
        pkg.seed_name == seed_model.name,
        pkg.path,
        f"was trained from seed model {pkg.seed_name!r}, not {seed_model.name!r}",
    )
    h = weight_hash(seed_model)
    _need(
        pkg.seed_hash == h,
        pkg.path,
        f"was trained from seed weights {pkg.seed_hash[:12]}..., this seed model hashes "
        f"to {h[:12]}... (same name, different weights)",
    )
    layers = seed_model.ffn_layers()
    _need(
        pkg.num_layers == len(layers),
        pkg.path,
        f"has LoRA on {pkg.num_layers} layers, the seed has {len(layers)} FFN layers",
    )
    for layer in layers:
        for p in pkg.lora_config.projections:
            _need(
                p in layer.projections,
                pkg.path,
                f"projection {p!r} is not one of the seed's ({', '.join(layer.projections)})",
            )
            lin = layer.linear(seed_model.net, p)
            a, b = (
                pkg.lora_state[f"layers.{layer.index}.{p}.lora_A"],
                pkg.lora_state[f"layers.{layer.index}.{p}.lora_B"],
            )
            _need(
                a.shape[1] == lin.in_features and b.shape[0] == lin.out_features,
                pkg.path,
                f"layers.{layer.index}.{p} LoRA maps {a.shape[1]} -> {b.shape[0]}, the seed's linear "
                f"{lin.in_features} -> {lin.out_features}",
            )
    _need(
        pkg.prototypes.shape[1] == layers[0].hidden_size,
        pkg.path,
        f"prototypes have width {pkg.prototypes.shape[1]}, the seed's FFN input {layers[0].hidden_size}",
    )
    if pkg.head_state is not None:
        _need(
            seed_model.head_path is not None,
            pkg.path,
            f"has a classification head but the seed model ({seed_model.task}) has none",
        )
        _need(
            pkg.head_state["weight"].shape[1] == seed_model.feature_dim,
            pkg.path,
            f"head reads {pkg.head_state['weight'].shape[1]} features, the seed model gives {seed_model.feature_dim}",
        )


def expert_from_package(seed_model: Any, package: ExpertPackage) -> Any:
    """Rebuild a client's expert from the shared seed and its package: seed + LoRA (+ the package's head).

    Args:
        seed_model: the plain seed (a SeedModel without LoRA); it is checked against the package (name, weight
            hash, shapes) and not modified.
        package: a loaded :class:`ExpertPackage`.

    Returns:
        A new SeedModel in eval mode computing what the client's trained expert computed (LoRA unmerged).
    """
    import copy

    from ..models.lora import apply_lora, has_lora, load_lora_state_dict

    if not isinstance(package, ExpertPackage):
        raise TypeError(f"package must be an ExpertPackage (load_expert_package), got {type(package).__name__}")
    _check_against_seed(package, seed_model)
    if has_lora(seed_model):
        raise ValueError("seed_model already has LoRA adapters; pass the plain seed model")
    model = copy.deepcopy(seed_model)
    if package.head_state is not None:
        head = model.replace_head(int(package.head_state["weight"].shape[0]))
        head.load_state_dict(package.head_state)
    cfg = package.lora_config
    apply_lora(model, cfg.rank, cfg.alpha, cfg.dropout, projections=cfg.projections)
    load_lora_state_dict(model, package.lora_state)
    model.eval()
    return model


def check_package_set(
    packages: Sequence[ExpertPackage], *, seed_model: Any = None, public_pool_size: Optional[int] = None
) -> None:
    """Check packages against each other (and the seed, if given) before unification; PackageError on a conflict.

    Same seed model name and weight hash; same public pool size; same label-space kind; for classes the
    same public label space and pairwise disjoint private label spaces (a collision names both packages);
    same LoRA layers and projections; same prototype width; no package given twice.
    """
    if isinstance(packages, ExpertPackage) or not isinstance(packages, Sequence):
        raise TypeError("packages must be a sequence of ExpertPackage")
    if not packages:
        raise ValueError("packages is empty; unification needs at least one expert package")
    for p in packages:
        if not isinstance(p, ExpertPackage):
            raise TypeError(f"packages must hold ExpertPackage objects, got {type(p).__name__}")
    first = packages[0]
    seen: Dict[str, Path] = {}
    owner: Dict[str, Path] = {}
    for p in packages:
        key = str(p.path.resolve())
        _need(key not in seen, p.path, "is given twice")
        seen[key] = p.path
        _need(
            p.seed_name == first.seed_name,
            p.path,
            f"comes from seed model {p.seed_name!r}, but {first.path} from {first.seed_name!r}",
        )
        _need(
            p.seed_hash == first.seed_hash,
            p.path,
            f"comes from seed weights {p.seed_hash[:12]}..., but {first.path} from {first.seed_hash[:12]}... "
            f"(same name {p.seed_name!r}, different weights)",
        )
        _need(
            p.public_pool_size == first.public_pool_size,
            p.path,
            f"indexes a public pool of {p.public_pool_size}, but {first.path} one of {first.public_pool_size}",
        )
        if public_pool_size is not None:
            _need(
                p.public_pool_size == public_pool_size,
                p.path,
                f"indexes a public pool of {p.public_pool_size}, this pool has {public_pool_size}",
            )
        _need(
            p.label_space["kind"] == first.label_space["kind"],
            p.path,
            f"label space kind {p.label_space['kind']!r} differs from {first.path}'s {first.label_space['kind']!r}",
        )
        if p.label_space["kind"] == "classes":
            _need(
                p.label_space["public"] == first.label_space["public"],
                p.path,
                f"public label space differs from {first.path}'s",
            )
            for name in p.label_space["private"]:
                _need(
                    name not in owner,
                    p.path,
                    f"label space collision: private class {name!r} is also a private class of {owner.get(name)}",
                )
            for name in p.label_space["private"]:
                owner[name] = p.path
        else:
            _need(
                p.label_space["size"] == first.label_space["size"],
                p.path,
                f"vocabulary size {p.label_space['size']} differs from {first.path}'s {first.label_space['size']}",
            )
        _need(
            p.num_layers == first.num_layers and p.lora_config.projections == first.lora_config.projections,
            p.path,
            f"LoRA layout ({p.num_layers} layers, {list(p.lora_config.projections)}) differs from {first.path}'s "
            f"({first.num_layers} layers, {list(first.lora_config.projections)})",
        )
        _need(
            p.prototypes.shape == first.prototypes.shape,
            p.path,
            f"prototypes {tuple(p.prototypes.shape)} differ in shape from {first.path}'s {tuple(first.prototypes.shape)}",
        )
        if seed_model is not None:
            _check_against_seed(p, seed_model)


def load_expert_packages(
    paths: Sequence[PathLike], *, seed_model: Any = None, public_pool_size: Optional[int] = None
) -> List[ExpertPackage]:
    """Load every package and check them as a set (:func:`load_expert_package` + :func:`check_package_set`)."""
    pkgs = [load_expert_package(p, public_pool_size=public_pool_size, seed_model=seed_model) for p in paths]
    check_package_set(pkgs, public_pool_size=public_pool_size)
    return pkgs
