"""Reading expert packages: every check a reader runs, and rebuilding an expert from the seed and its package.

:func:`load_expert_package` checks everything it reads and raises :class:`PackageError` (a ``ValueError``)
naming the package and the problem: an edited manifest (``manifest_sha256``), missing or unexpected files, a
hash mismatch (tampering), malformed digests, malformed tensors, zero proxies, proxy indices outside the public
pool. :func:`check_package_set` checks packages against each other before unification: same seed model and
weight hash, same public pool, disjoint private label spaces, matching LoRA layout, no package given twice
(by path or by content). :func:`check_public_pool` checks packages against the public pool the server holds:
its size, and its content and order by the recorded fingerprints. The format itself:
:mod:`metamoe.unify.package_format`.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..selection.methods import canonical_method
from ..utils.checks import check_int
from ..utils.files import sha256_file
from .package_format import (
    FORMAT,
    HEAD_FILE,
    LORA_FILE,
    MANIFEST,
    MANIFEST_DIGEST,
    MANIFEST_KEYS,
    POOL_DIGEST,
    PROTOTYPES_FILE,
    PROXY_DIGEST,
    READABLE_FORMAT_VERSIONS,
    TENSOR_FILES,
    ExpertPackage,
    NumberText,
    PackageError,
    PathLike,
    UnverifiedPackageWarning,
    is_sha256_hex,
    manifest_digest,
    parse_manifest,
    pool_fingerprint,
)

SELECTION_KEYS = ("method", "k", "public_pool_size", "proxy_indices")


def _need(cond: bool, path: Path, problem: str) -> None:
    if not cond:
        raise PackageError(path, problem)


def _is_int(v: Any, lo: Optional[int] = None) -> bool:
    """Whether ``v`` is an integer (not a bool), and ``>= lo`` when ``lo`` is given."""
    try:
        check_int(v, "value", lo=-(1 << 63) if lo is None else lo)
    except (TypeError, ValueError):
        return False
    return True


def _shown(value: Any) -> str:
    """``repr(value)`` (a number as the manifest spells it), cut to 80 characters (error messages stay one line)."""
    r = str(value) if isinstance(value, NumberText) else repr(value)
    return r if len(r) <= 80 else r[:77] + "..."


def _check_manifest_digest(m: Dict[str, Any], path: Path) -> None:
    """From format_version 2: ``manifest_sha256`` is 64 lowercase hex digits and equals :func:`manifest_digest`
    of the manifest ``m`` as written (parsed with ``numbers_as_written``)."""
    _need(MANIFEST_DIGEST in m, path, f"{MANIFEST} lacks {MANIFEST_DIGEST} (required from format_version 2)")
    recorded = m[MANIFEST_DIGEST]
    _need(
        is_sha256_hex(recorded),
        path,
        f"{MANIFEST} {MANIFEST_DIGEST} must be exactly 64 lowercase hex digits, got {_shown(recorded)}",
    )
    actual = manifest_digest(m)
    _need(
        actual == recorded,
        path,
        f"{MANIFEST} was edited: its content hashes to {actual}, its {MANIFEST_DIGEST} records {recorded}",
    )


def _validate_manifest(m: Any, path: Path, public_pool_size: Optional[int], as_written: Any) -> None:
    """Check the parsed manifest ``m``; ``as_written`` is the same text parsed with ``numbers_as_written``."""
    _need(isinstance(m, dict), path, "manifest.json is not a JSON object")
    _need(
        m.get("format") == FORMAT, path, f"manifest.json format is {m.get('format')!r}, expected {FORMAT!r}"
    )
    version = m.get("format_version")
    _need(
        _is_int(version) and version in READABLE_FORMAT_VERSIONS,
        path,
        f"manifest.json format_version {version!r} is not supported (this metamoe reads "
        f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))})",
    )
    if version >= 2:  # before any other field is read: an edited manifest is reported as edited
        _check_manifest_digest(as_written, path)
    allowed = MANIFEST_KEYS + ((MANIFEST_DIGEST,) if version >= 2 else ())
    missing = [key for key in MANIFEST_KEYS if key not in m]
    _need(not missing, path, f"manifest.json lacks {', '.join(missing)}")
    extra = sorted(set(m) - set(allowed))
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
    extra = sorted(set(sel) - set(SELECTION_KEYS) - {POOL_DIGEST, PROXY_DIGEST})
    _need(not extra, path, f"selection has unexpected keys {extra}")
    _need(
        (POOL_DIGEST in sel) == (PROXY_DIGEST in sel),
        path,
        f"selection records {POOL_DIGEST} and {PROXY_DIGEST} together or neither",
    )
    for key in (POOL_DIGEST, PROXY_DIGEST):
        if key in sel:
            _need(
                is_sha256_hex(sel[key]),
                path,
                f"selection.{key} must be exactly 64 lowercase hex digits, got {_shown(sel[key])}",
            )
    try:  # a canonical name, or a short spelling (``topk``), which a manifest may record
        canonical_method(sel.get("method"), "selection.method")
    except ValueError as exc:
        raise PackageError(path, str(exc)) from None
    n_pool = sel.get("public_pool_size")
    _need(_is_int(n_pool, 1), path, f"public_pool_size must be a positive int, got {n_pool!r}")
    if public_pool_size is not None:
        _need(
            n_pool == public_pool_size,
            path,
            f"was built against a public pool of {n_pool} samples, this pool has {public_pool_size}",
        )
    k = sel.get("k")
    _need(_is_int(k, 1), path, f"selection k must be a positive int, got {k!r}")
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
            set(ls) == {"kind", "size"} and _is_int(ls["size"], 1),
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
        _is_int(lora["rank"], 1) and _is_int(lora["num_layers"], 1),
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
    _need(isinstance(files, dict), path, "files must map file names to sha256 digests")
    unknown = sorted(set(files) - set(TENSOR_FILES))
    _need(not unknown, path, f"manifest lists unknown files {unknown}")
    for name, digest in files.items():
        _need(
            is_sha256_hex(digest),
            path,
            f"the sha256 of {name} in the manifest must be exactly 64 lowercase hex digits, got {_shown(digest)}",
        )
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
                f"layers.{i}.{p} has shapes {tuple(a.shape)}/{tuple(b.shape)}, "
                f"layer 0 {tuple(ref_a.shape)}/{tuple(ref_b.shape)}",
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

    Checks: manifest present, well-formed and unedited (``manifest_sha256``: from format_version 2), every
    listed file present with the recorded sha256 (digests of 64 lowercase hex digits, compared in full), no
    other files, tensors with the recorded names, shapes and finite values, at least one proxy, proxy indices
    unique and inside the public pool (and ``public_pool_size`` equal to the recorded one when given).
    With ``seed_model`` (a SeedModel) also: same name and weight hash, LoRA and prototype shapes matching
    its FFN layers. A format-1 package (no manifest digest) loads with an :class:`UnverifiedPackageWarning`.
    """
    path = Path(path)
    _need(path.is_dir(), path, "does not exist or is not a folder")
    mfile = path / MANIFEST
    _need(mfile.is_file(), path, f"missing {MANIFEST}")
    try:
        text = mfile.read_text()
        manifest, as_written = parse_manifest(text), parse_manifest(text, numbers_as_written=True)
    except (UnicodeDecodeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError, so is a duplicate key
        raise PackageError(path, f"{MANIFEST} is not valid JSON ({exc})") from None
    if public_pool_size is not None and (
        isinstance(public_pool_size, bool) or not isinstance(public_pool_size, int)
    ):
        raise TypeError(f"public_pool_size must be an int, got {type(public_pool_size).__name__}")
    _validate_manifest(manifest, path, public_pool_size, as_written)
    if manifest["format_version"] == 1:
        warnings.warn(
            f"expert package {path}: format_version 1 manifest without {MANIFEST_DIGEST}; edits to its fields "
            "cannot be detected (the data files are checked against their sha256)",
            UnverifiedPackageWarning,
            stacklevel=2,
        )
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

    Same seed model name and weight hash; same public pool size, and the same pool fingerprint among the
    packages that record one; same label-space kind; for classes the same public label space and pairwise
    disjoint private label spaces (a collision names both packages); same LoRA layers and projections; same
    prototype width; no package given twice, neither by path nor as a copy with the same content (the
    error names both).
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
    contents: Dict[str, Path] = {}
    owner: Dict[str, Path] = {}
    pooled = next((p for p in packages if p.public_pool_sha256 is not None), None)
    for p in packages:
        key = str(p.path.resolve())
        _need(key not in seen, p.path, "is given twice")
        seen[key] = p.path
        digest = p.content_sha256
        _need(
            digest not in contents,
            p.path,
            f"has the same content as {contents.get(digest)} (manifest sha256 {digest}): the same expert "
            "given twice under two names",
        )
        contents[digest] = p.path
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
        if pooled is not None and p.public_pool_sha256 is not None:
            _need(
                p.public_pool_sha256 == pooled.public_pool_sha256,
                p.path,
                f"indexes a different public pool than {pooled.path}: same size ({p.public_pool_size}), "
                f"pool sha256 {p.public_pool_sha256} vs {pooled.public_pool_sha256}",
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
            f"prototypes {tuple(p.prototypes.shape)} differ in shape from {first.path}'s "
            f"{tuple(first.prototypes.shape)}",
        )
        if seed_model is not None:
            _check_against_seed(p, seed_model)


def check_public_pool(packages: Sequence[ExpertPackage], public_x: Any, public_y: Any = None) -> str:
    """Check that every package indexes this public pool; PackageError naming the package on a mismatch.

    Args:
        packages: loaded packages.
        public_x: the pool's inputs (N, ...), as :func:`~metamoe.unify.package_format.pool_fingerprint` takes them.
        public_y: its (N,) labels, or None for a pool without labels (a causal LM's).

    Each package must index a pool of N samples. A package that records a pool fingerprint must record this
    pool's (a pool with the same size but other content, other labels or the same rows in another order is
    refused) and the fingerprint of this pool's rows at its proxy indices. A package without a fingerprint
    (format 1, or written without the pool) is checked by size alone, with an :class:`UnverifiedPackageWarning`.

    Returns:
        The pool's fingerprint.
    """
    from ..models.registry import SeedModel

    n = SeedModel.num_samples(public_x)
    fingerprint = pool_fingerprint(public_x, public_y)
    for p in packages:
        if not isinstance(p, ExpertPackage):
            raise TypeError(f"packages must hold ExpertPackage objects, got {type(p).__name__}")
        _need(
            p.public_pool_size == n,
            p.path,
            f"the public pool differs: the package indexes a pool of {p.public_pool_size} samples, this pool has {n}",
        )
        if p.public_pool_sha256 is None:
            warnings.warn(
                f"expert package {p.path} records no public pool fingerprint (format_version "
                f"{p.manifest['format_version']}); only the pool's size ({n}) was checked, its content could not be "
                "verified",
                UnverifiedPackageWarning,
                stacklevel=2,
            )
            continue
        _need(
            p.public_pool_sha256 == fingerprint,
            p.path,
            f"the public pool differs: same size ({n} samples) but different content or order (this pool's sha256 "
            f"is {fingerprint}, the package records {p.public_pool_sha256})",
        )
        proxies = pool_fingerprint(public_x, public_y, rows=p.proxy_indices)
        _need(
            p.proxy_sha256 == proxies,
            p.path,
            f"the proxy rows differ: this pool's rows at the package's proxy indices hash to {proxies}, the "
            f"package records {p.proxy_sha256}",
        )
    return fingerprint


def load_expert_packages(
    paths: Sequence[PathLike], *, seed_model: Any = None, public_pool_size: Optional[int] = None
) -> List[ExpertPackage]:
    """Load every package and check them as a set (:func:`load_expert_package` + :func:`check_package_set`)."""
    pkgs = [load_expert_package(p, public_pool_size=public_pool_size, seed_model=seed_model) for p in paths]
    check_package_set(pkgs, public_pool_size=public_pool_size)
    return pkgs


__all__ = [
    "load_expert_package", "check_package_set", "check_public_pool", "load_expert_packages", "expert_from_package",
]
