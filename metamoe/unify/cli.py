"""``metamoe train-expert``, ``metamoe unify``, ``metamoe evaluate``: the pipeline on your own data.

Three commands, one per role (DESIGN.md section 1):

* ``metamoe train-expert --config client.yaml`` (a client): embeds its private data and the public pool with the
  frozen seed model, scores relevance, selects proxies, trains a proxy-aligned LoRA expert and writes an expert
  package (safetensors + manifest; no private sample or per-sample private embedding goes into it).
* ``metamoe unify --config server.yaml`` (the server): validates the packages, builds the LoRA-expert MoE with
  prototype-initialised, context-aware routers, trains the routers on the union of the clients' proxies and writes
  the unified model folder (router weights + a JSON manifest naming the seed model and the packages by hash).
* ``metamoe evaluate --model DIR --data PATH`` (anyone): rebuilds the unified model and prints its accuracy.

Data (``private``, ``public``, ``--data``), each a mapping in YAML or a path on the command line:

* ``path: data.npz``: NumPy archive, arrays ``x_key`` (default ``x``) and ``y_key`` (default ``y``, optional);
* ``path: x.npy`` with ``labels: y.npy``: NumPy arrays (labels optional for the public pool of a causal LM);
* ``path: folder/`` with one sub-folder per class: an image folder (PNG/JPEG/...; read with Pillow, converted
  to ``channels`` 1 (grey) or 3 (RGB), resized to ``image_size`` if given, scaled to [0, 1]); class names are the
  sub-folder names, sorted;
* ``path: folder/`` written by Hugging Face ``datasets`` ``save_to_disk`` (it holds ``dataset_info.json`` or
  ``state.json``): columns ``x_key`` (default ``image``) and ``y_key`` (default ``label``); needs the ``datasets``
  package, which metamoe does not install (a clear error says so).
* ``class_names: [...]`` names the label values 0..C-1 (default: the folder names, else ``"0"``, ``"1"``, ...).

Images are float arrays (n, H, W) (one channel) or (n, C, H, W); integer arrays (n, L) are token ids for an
``hf:`` decoder (then labels are not used: the task is next-token prediction).

Seed model (``seed_model``, the same on every client and on the server; packages record its weight hash):
``name`` (``timm:<arch>`` or ``hf:<model_type>``), ``checkpoint`` (a local folder from
:func:`metamoe.models.save_seed_model` / ``save_pretrained``; recommended), or ``config`` (architecture fields)
with ``seed`` (random-init seed) to build it from scratch; ``num_classes`` (classification head size).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["load_data", "load_config", "main_train_expert", "main_unify", "main_evaluate"]

UNIFIED_MANIFEST = "unified.json"
UNIFIED_WEIGHTS = "router.safetensors"
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}

CLIENT_YAML = """\
client.yaml keys (required: seed_model.name, private, public, output):
  client_name: str           name of this client; private classes are named "<client_name>:<class>" (default: the
                             output folder's name)
  seed_model:
    name: timm:<arch> | hf:<model_type>
    checkpoint: PATH         local seed checkpoint folder (recommended; same file on every client and the server)
    config: {..}             architecture fields when building from scratch (e.g. img_size, patch_size, in_chans,
                             embed_dim, depth, num_heads for timm; hidden_size, num_hidden_layers, vocab_size for hf)
    seed: 0                  random-init seed when building from scratch
    num_classes: int         size of the seed's own classification head (optional)
  private: DATA              the client's labelled private data (never leaves the client)
  public: DATA               the public pool (labels required for classification: the proxies' labels)
  selection:
    method: dpp              dpp (relevance-weighted DPP, default) | facility_location | topk | random
    k: 100                   proxies to select (<= pool size)
    kernel: rbf              DPP kernel: rbf (default) | cosine
    relevance_epochs: 5      epochs of the private-vs-public relevance classifier
    features: pooled         what relevance and selection see: pooled (the head's input, default) | context
                             (every FFN layer's mean input, concatenated) | pooled+context (both; the digits
                             harness's choice, where the seed's head input hardly tells domains apart)
  training:
    lora_rank: 8             LoRA rank on every FFN projection
    epochs: 5                expert training epochs (private data + proxies)
    lr: 0.001                AdamW learning rate
    batch_size: 64
    seed: 0                  LoRA/head init and shuffling
    align: true              false: train on private data only (the no_alignment ablation)
  output: PATH               the expert package folder to write
  overwrite: false           replace an existing package
DATA = {path: PATH, labels: PATH (.npy), x_key: str, y_key: str, class_names: [..], image_size: [H, W] or int,
        channels: 1|3}"""

SERVER_YAML = """\
server.yaml keys (required: seed_model, packages, public, output):
  seed_model: {name, checkpoint | config + seed, num_classes}   the same seed model as the clients'
  packages: [PATH, ...]      expert package folders (one expert each, in expert order)
  public: DATA               the same public pool the clients selected from (labels: the proxies' labels)
  moe:
    top_k: 2                 experts per token (default min(2, number of experts))
    context_routing: true    two-pass context-aware routing (false: route on tokens alone)
    routed_head: true        weigh each client's private classes by the sample's routing to its expert
    router_init_scale: 4.0   norm of each prototype-initialised router row
  training:
    epochs: 10               router training epochs on the union of the proxies
    lr: 0.01
    batch_size: 64
    seed: 0
    train_lora: false        also fine-tune the experts' LoRA factors
    loss: block              block: cross-entropy over the public classes only (the proxies' labels); full: over
                             the whole unified label space
    route_loss: 1.0          the proxies supervise the routers: each proxy is sent towards the expert of the
                             client(s) that picked it, with this weight (default 1.0, as the digits harness's
                             metamoe); 0: the task + load-balancing loss only
    checkpoint_every: 50     steps between checkpoints (in OUTPUT/checkpoints; a rerun resumes from them)
  output: PATH               the unified model folder to write
DATA as in client.yaml."""


DATA_HELP = "Data (" + __doc__.split("Data (", 1)[1].split("Seed model (", 1)[0].rstrip()


class ConfigError(ValueError):
    """A configuration problem, with the key that is wrong."""


# --------------------------------------------------------------------------- config and data


def load_config(path: Any) -> Dict[str, Any]:
    """Read a YAML mapping from ``path``; relative data/model paths in it are resolved against its folder."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        cfg = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{p}: the config must be a YAML mapping, got {type(cfg).__name__}")
    cfg["_base"] = str(p.resolve().parent)
    return cfg


def _resolve(base: Optional[str], path: Any, key: str) -> Path:
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ConfigError(f"{key} must be a path, got {path!r}")
    p = Path(path).expanduser()
    return p if p.is_absolute() or base is None else Path(base) / p


def _check_keys(d: Dict[str, Any], allowed: Sequence[str], where: str) -> None:
    bad = sorted(k for k in d if k not in allowed and not k.startswith("_"))
    if bad:
        raise ConfigError(f"unknown key(s) {bad} in {where}; allowed: {', '.join(allowed)}")


DATA_KEYS = ("path", "labels", "x_key", "y_key", "class_names", "image_size", "channels")


def load_data(
    spec: Any, base: Optional[str] = None, where: str = "data"
) -> Tuple[np.ndarray, Optional[np.ndarray], List[str]]:
    """Load a data set described by ``spec`` (a path or a mapping, module docstring).

    Returns:
        ``(x, y, class_names)``: x (n, ...) float32 images or int64 token ids; y (n,) int64 in
        ``[0, len(class_names))`` or None when the data has no labels; class_names the label names.
    """
    if isinstance(spec, (str, os.PathLike)):
        spec = {"path": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a path or a mapping with 'path', got {type(spec).__name__}")
    _check_keys(spec, DATA_KEYS, where)
    if "path" not in spec:
        raise ConfigError(f"{where} needs 'path'")
    path = _resolve(base, spec["path"], f"{where}.path")
    if not path.exists():
        raise FileNotFoundError(f"{where}.path not found: {path}")
    names: Optional[List[str]] = None
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
        x, y, names = _load_hf_disk(path, spec.get("x_key", "image"), spec.get("y_key", "label"), spec, where)
    elif path.is_dir():
        x, y, names = _load_image_folder(path, spec, where)
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            xk, yk = spec.get("x_key", "x"), spec.get("y_key", "y")
            if xk not in z:
                raise ConfigError(f"{where}: {path} has no array {xk!r} (x_key); it holds {sorted(z.files)}")
            x = z[xk]
            y = z[yk] if yk in z else None
    elif path.suffix == ".npy":
        x = np.load(path, allow_pickle=False)
        y = None
        if spec.get("labels") is not None:
            lp = _resolve(base, spec["labels"], f"{where}.labels")
            if not lp.is_file():
                raise FileNotFoundError(f"{where}.labels not found: {lp}")
            y = np.load(lp, allow_pickle=False)
    else:
        raise ConfigError(
            f"{where}.path {path}: expected a .npz or .npy file, an image folder or a datasets save_to_disk folder"
        )
    x = np.asarray(x)
    if x.dtype.kind == "f":
        x = x.astype(np.float32)
    elif x.dtype.kind in "iu":
        x = x.astype(np.int64)
    else:
        raise ConfigError(f"{where}: x must be float images or integer token ids, got dtype {x.dtype}")
    if x.ndim < 2 or len(x) == 0:
        raise ConfigError(f"{where}: x must be (n, ...) with n > 0, got shape {x.shape}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise ConfigError(f"{where}: x holds NaN or inf")
    if y is not None:
        y = np.asarray(y)
        if y.shape != (len(x),) or y.dtype.kind not in "iu":
            raise ConfigError(
                f"{where}: labels must be ({len(x)},) integers, got shape {y.shape} dtype {y.dtype}"
            )
        y = y.astype(np.int64)
        if y.min() < 0:
            raise ConfigError(f"{where}: labels must be >= 0, got {y.min()}")
    if spec.get("class_names") is not None:
        cn = spec["class_names"]
        if (
            not isinstance(cn, list)
            or not all(isinstance(c, (str, int)) for c in cn)
            or len(set(map(str, cn))) != len(cn)
        ):
            raise ConfigError(f"{where}.class_names must be a list of distinct names")
        names = [str(c) for c in cn]
    if names is None:
        names = [str(i) for i in range(int(y.max()) + 1)] if y is not None else []
    if y is not None and y.max() >= len(names):
        raise ConfigError(f"{where}: label {int(y.max())} but only {len(names)} class_names")
    return x, y, names


def _load_image_folder(path: Path, spec: Dict[str, Any], where: str):
    from PIL import Image

    classes = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ConfigError(
            f"{where}: {path} is a folder without class sub-folders (expected <path>/<class>/<image>)"
        )
    channels = spec.get("channels", 1)
    if channels not in (1, 3):
        raise ConfigError(f"{where}.channels must be 1 or 3, got {channels!r}")
    size = spec.get("image_size")
    if isinstance(size, int):
        size = (size, size)
    if size is not None and (not isinstance(size, (list, tuple)) or len(size) != 2):
        raise ConfigError(f"{where}.image_size must be an int or [H, W], got {size!r}")
    xs, ys = [], []
    for ci, c in enumerate(classes):
        for f in sorted((path / c).iterdir()):
            if f.suffix.lower() not in IMAGE_EXTS:
                continue
            with Image.open(f) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                if size is not None:
                    im = im.resize((int(size[1]), int(size[0])))
                a = np.asarray(im, dtype=np.float32) / 255.0
            if channels == 3:
                a = a.transpose(2, 0, 1)
            xs.append(a)
            ys.append(ci)
    if not xs:
        raise ConfigError(f"{where}: no images ({', '.join(sorted(IMAGE_EXTS))}) under {path}")
    shapes = {a.shape for a in xs}
    if len(shapes) > 1:
        raise ConfigError(f"{where}: images of different sizes {sorted(shapes)[:3]}...; set image_size")
    return np.stack(xs), np.asarray(ys, dtype=np.int64), classes


def _load_hf_disk(path: Path, xk: str, yk: str, spec: Dict[str, Any], where: str):
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"{where}: {path} is a Hugging Face datasets folder (save_to_disk), but the 'datasets' package is not "
            "installed; `pip install datasets`, or export the data to .npz"
        ) from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        raise ConfigError(f"{where}: {path} holds splits {list(ds)}; point path at one split's folder")
    if xk not in ds.column_names:
        raise ConfigError(f"{where}: column {xk!r} (x_key) not in {ds.column_names}")
    col = ds[xk]
    if len(col) and hasattr(col[0], "convert"):  # PIL images
        ch = spec.get("channels", 1)
        col = [np.asarray(im.convert("L" if ch == 1 else "RGB"), dtype=np.float32) / 255.0 for im in col]
        col = [a if ch == 1 else a.transpose(2, 0, 1) for a in col]
    x = np.asarray(col)
    y, names = None, None
    if yk in ds.column_names:
        y = np.asarray(ds[yk])
        feat = ds.features[yk]
        names = list(getattr(feat, "names", None) or []) or None
    return x, y, names


def _seed_model(cfg: Dict[str, Any], base: Optional[str]):
    from ..models import create_seed_model

    sm = cfg.get("seed_model")
    if not isinstance(sm, dict) or "name" not in sm:
        raise ConfigError("seed_model must be a mapping with 'name' (timm:<arch> or hf:<model_type>)")
    _check_keys(sm, ("name", "checkpoint", "config", "seed", "num_classes", "task"), "seed_model")
    conf = sm.get("config") or {}
    if not isinstance(conf, dict):
        raise ConfigError("seed_model.config must be a mapping of architecture fields")
    conf = dict(conf)
    num_classes = sm.get("num_classes")
    if "num_classes" in conf:
        if num_classes is not None and num_classes != conf["num_classes"]:
            raise ConfigError("seed_model.num_classes and seed_model.config.num_classes disagree")
        num_classes = conf.pop("num_classes")
    ckpt = _resolve(base, sm["checkpoint"], "seed_model.checkpoint") if sm.get("checkpoint") else None
    if ckpt is None and "seed" not in sm:
        raise ConfigError(
            "seed_model without checkpoint needs 'seed' (the random init must be identical on every client and "
            "the server)"
        )
    return create_seed_model(
        sm["name"],
        checkpoint=ckpt,
        num_classes=num_classes,
        task=sm.get("task"),
        seed=sm.get("seed"),
        **conf,
    )


def _section(cfg: Dict[str, Any], key: str, allowed: Sequence[str]) -> Dict[str, Any]:
    d = cfg.get(key) or {}
    if not isinstance(d, dict):
        raise ConfigError(f"{key} must be a mapping")
    _check_keys(d, allowed, key)
    return d


def _int(d: Dict[str, Any], key: str, default: Any, where: str, lo: int = 1) -> int:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ConfigError(f"{where}.{key} must be an int >= {lo}, got {v!r}")
    return v


def _float(d: Dict[str, Any], key: str, default: Any, where: str) -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0:
        raise ConfigError(f"{where}.{key} must be a positive number, got {v!r}")
    return float(v)


def _bool(d: Dict[str, Any], key: str, default: bool, where: str) -> bool:
    v = d.get(key, default)
    if not isinstance(v, bool):  # YAML's true/false; a quoted "false" would be truthy under bool()
        raise ConfigError(f"{where}.{key} must be true or false, got {v!r}")
    return v


# --------------------------------------------------------------------------- train-expert


def train_expert_from_config(cfg: Dict[str, Any], out: Optional[str] = None, quiet: bool = False) -> Path:
    """The client side from a parsed client.yaml (module docstring, ``CLIENT_YAML``); returns the package path."""
    from ..selection import (
        relevance_scores,
        select_dpp,
        select_facility_location,
        select_random,
        select_top_relevance,
    )
    from .client import EMBED_FEATURES, embed, train_expert
    from .package import write_expert_package

    base = cfg.get("_base")
    _check_keys(
        cfg,
        ("client_name", "seed_model", "private", "public", "selection", "training", "output", "overwrite"),
        "client.yaml",
    )
    for req in ("private", "public"):
        if req not in cfg:
            raise ConfigError(f"client.yaml needs '{req}'")
    output = out if out is not None else cfg.get("output")
    if output is None:
        raise ConfigError("client.yaml needs 'output' (the package folder) or --out")
    output = _resolve(base if out is None else None, output, "output")
    sel = _section(cfg, "selection", ("method", "k", "kernel", "relevance_epochs", "features"))
    tr = _section(cfg, "training", ("lora_rank", "epochs", "lr", "batch_size", "seed", "align"))
    method = sel.get("method", "dpp")
    if method not in ("dpp", "facility_location", "topk", "random"):
        raise ConfigError(f"selection.method must be dpp, facility_location, topk or random, got {method!r}")
    say = (lambda s: None) if quiet else (lambda s: print(s, flush=True))

    seed_model = _seed_model(cfg, base)
    causal = seed_model.task == "causal_lm"
    xp, yp, priv_names = load_data(cfg["private"], base, "private")
    xq, yq, pub_names = load_data(cfg["public"], base, "public")
    if not causal and (yp is None or yq is None):
        raise ConfigError(
            "classification needs labels for the private data and the public pool (labels / y_key)"
        )
    N = len(xq)
    k = _int(sel, "k", min(100, N), "selection")
    if k > N:
        raise ConfigError(f"selection.k={k} exceeds the public pool ({N} samples)")
    seed = _int(tr, "seed", 0, "training", lo=0)
    client = str(cfg.get("client_name") or output.name)
    say(f"client {client}: {len(xp)} private samples, public pool {N}, seed model {seed_model.name}")
    features = sel.get("features", "pooled")
    if features not in EMBED_FEATURES:
        raise ConfigError(f"selection.features must be one of {', '.join(EMBED_FEATURES)}, got {features!r}")
    pub_emb = embed(seed_model, xq, progress=not quiet, features=features)
    priv_emb = embed(seed_model, xp, progress=not quiet, features=features)
    rel = relevance_scores(
        priv_emb, pub_emb, epochs=_int(sel, "relevance_epochs", 5, "selection"), seed=seed, progress=False
    )
    if method == "dpp":
        kernel = sel.get("kernel", "rbf")
        if kernel not in ("rbf", "cosine"):
            raise ConfigError(f"selection.kernel must be rbf or cosine, got {kernel!r}")
        picked = select_dpp(pub_emb, k, rel, kernel=kernel, progress=False)
    elif method == "facility_location":
        picked = select_facility_location(pub_emb, k, ground=priv_emb, progress=False)
    elif method == "topk":
        picked = select_top_relevance(rel, k)
    else:
        picked = select_random(N, k, seed=seed)
    idx = np.asarray(picked.indices, dtype=np.int64)
    say(f"selected {len(idx)} proxies ({method})")
    align = _bool(tr, "align", True, "training")
    if causal:
        spaces, priv, prox = None, xp, (xq[idx] if align else None)
    else:
        spaces = {"private": [f"{client}:{c}" for c in priv_names], "public": list(pub_names)}
        priv, prox = (xp, yp), ((xq[idx], yq[idx]) if align else None)
    ex = train_expert(
        seed_model,
        priv,
        prox,
        spaces,
        lora_rank=_int(tr, "lora_rank", 8, "training"),
        epochs=_int(tr, "epochs", 5, "training"),
        lr=_float(tr, "lr", 1e-3, "training"),
        batch_size=_int(tr, "batch_size", 64, "training"),
        seed=seed,
        progress=not quiet,
    )
    path = write_expert_package(
        output,
        ex,
        proxy_indices=idx,
        public_pool_size=N,
        method=method,
        k=k,
        overwrite=_bool(cfg, "overwrite", False, "client.yaml"),
    )
    say(f"wrote expert package {path}")
    return path


# --------------------------------------------------------------------------- unify


def _build(cfg: Dict[str, Any], base: Optional[str], seed_model, moe: Dict[str, Any]):
    from .server import build_unified_model, validate_packages

    pk = cfg.get("packages")
    if not isinstance(pk, list) or not pk:
        raise ConfigError("packages must be a non-empty list of package folders")
    paths = [_resolve(base, p, "packages[]") for p in pk]
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"package folder not found: {p}")
    return paths, validate_packages(paths, seed_model=seed_model), build_unified_model


def unify_from_config(cfg: Dict[str, Any], out: Optional[str] = None, quiet: bool = False) -> Path:
    """The server side from a parsed server.yaml (``SERVER_YAML``); returns the unified model folder."""
    from safetensors.torch import save_file

    from ..utils.files import atomic_write_text
    from .server import proxy_owners, proxy_training_set, train_router

    base = cfg.get("_base")
    _check_keys(cfg, ("seed_model", "packages", "public", "moe", "training", "output"), "server.yaml")
    if "public" not in cfg:
        raise ConfigError("server.yaml needs 'public' (the pool the proxies index)")
    output = out if out is not None else cfg.get("output")
    if output is None:
        raise ConfigError("server.yaml needs 'output' (the unified model folder) or --out")
    output = _resolve(base if out is None else None, output, "output")
    moe = _section(cfg, "moe", ("top_k", "context_routing", "routed_head", "router_init_scale"))
    tr = _section(
        cfg,
        "training",
        ("epochs", "lr", "batch_size", "seed", "train_lora", "loss", "route_loss", "checkpoint_every"),
    )
    loss = tr.get("loss", "block")
    if loss not in ("block", "full"):
        raise ConfigError(f"training.loss must be block or full, got {loss!r}")
    route_loss = tr.get("route_loss", 1.0)
    if isinstance(route_loss, bool) or not isinstance(route_loss, (int, float)) or not route_loss >= 0:
        raise ConfigError(f"training.route_loss must be a number >= 0, got {route_loss!r}")
    say = (lambda s: None) if quiet else (lambda s: print(s, flush=True))
    seed_model = _seed_model(cfg, base)
    paths, pkgs, build_unified_model = _build(cfg, base, seed_model, moe)
    xq, yq, _ = load_data(cfg["public"], base, "public")
    opts = {
        "top_k": moe.get("top_k"),
        "context_routing": _bool(moe, "context_routing", True, "moe"),
        "routed_head": _bool(moe, "routed_head", True, "moe"),
        "router_init_scale": _float(moe, "router_init_scale", 4.0, "moe"),
    }
    model = build_unified_model(seed_model, pkgs, **opts)
    space = model.label_space
    x, y, picked = proxy_training_set(pkgs, xq, yq, space)
    say(
        f"unify: {len(pkgs)} experts, {len(x)} proxies in the union, label space {space.num_classes if space.kind == 'classes' else 'vocabulary'}"
    )
    output.mkdir(parents=True, exist_ok=True)
    metrics = train_router(
        model,
        x,
        y,
        epochs=_int(tr, "epochs", 10, "training"),
        lr=_float(tr, "lr", 1e-2, "training"),
        batch_size=_int(tr, "batch_size", 64, "training"),
        seed=_int(tr, "seed", 0, "training", lo=0),
        train_lora=_bool(tr, "train_lora", False, "training"),
        checkpoint_dir=output / "checkpoints",
        checkpoint_every=_int(tr, "checkpoint_every", 50, "training"),
        label_block=(space.public_slice if loss == "block" and space.kind == "classes" else None),
        route_targets=proxy_owners(pkgs, picked) if route_loss > 0 else None,
        route_loss_coef=float(route_loss) if route_loss > 0 else 1.0,
        progress=not quiet,
    )
    state = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    tmp = output / f".{UNIFIED_WEIGHTS}.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, output / UNIFIED_WEIGHTS)
    manifest = {
        "format": 1,
        "seed_model": {k: v for k, v in cfg["seed_model"].items()},
        # paths relative to the output folder, so the output, its packages and the seed model's folder can
        # move together (load_unified resolves them against the folder unified.json is in)
        "seed_model_base": None if base is None else _relative_to(base, output),
        "packages": [_relative_to(p, output) for p in paths],
        "package_manifest_sha256": [
            hashlib.sha256((p / "manifest.json").read_bytes()).hexdigest() for p in paths
        ],
        "moe": opts,
        "label_space": space.to_dict(),
        "weights_sha256": hashlib.sha256((output / UNIFIED_WEIGHTS).read_bytes()).hexdigest(),
        "train_lora": _bool(tr, "train_lora", False, "training"),
        "metrics": {k: v for k, v in metrics.items() if k != "trained"},
    }
    atomic_write_text(output / UNIFIED_MANIFEST, json.dumps(manifest, indent=1, default=str) + "\n")
    say(f"router loss per epoch: {[round(v, 4) for v in metrics['loss_per_epoch']]}")
    say(f"wrote unified model {output}")
    return output


def _relative_to(path: Any, folder: Path) -> str:
    """``path`` relative to ``folder`` (both resolved), e.g. ``../packages/a``; absolute if on another drive."""
    try:
        return os.path.relpath(Path(path).resolve(), Path(folder).resolve())
    except ValueError:  # Windows: different drives
        return str(Path(path).resolve())


def load_unified(model_dir: Any):
    """Rebuild a unified model written by ``metamoe unify``: seed model + packages + the trained router weights."""
    from safetensors.torch import load_file

    d = Path(model_dir)
    mp = d / UNIFIED_MANIFEST
    if not mp.is_file():
        raise FileNotFoundError(
            f"{d} is not a unified model folder (no {UNIFIED_MANIFEST}); run `metamoe unify`"
        )
    m = json.loads(mp.read_text())
    wp = d / UNIFIED_WEIGHTS
    if not wp.is_file():
        raise FileNotFoundError(f"{wp} is missing")
    if hashlib.sha256(wp.read_bytes()).hexdigest() != m["weights_sha256"]:
        raise ValueError(f"{wp} does not match the sha256 in {mp} (modified after unify?)")
    packages = [str(d / p) for p in m["packages"]]  # relative to d (absolute paths: as written)
    for p, h in zip(packages, m["package_manifest_sha256"]):
        if not (Path(p) / "manifest.json").is_file():
            raise FileNotFoundError(f"package {p} of {mp} is missing (packages are found relative to {d})")
        if hashlib.sha256((Path(p) / "manifest.json").read_bytes()).hexdigest() != h:
            raise ValueError(f"package {p} changed since unify (manifest sha256 differs)")
    base = m.get("seed_model_base")
    base = None if base is None else str(d / base)
    seed_model = _seed_model({"seed_model": m["seed_model"]}, base)
    _, pkgs, build_unified_model = _build({"packages": packages}, None, seed_model, m["moe"])
    model = build_unified_model(seed_model, pkgs, **{"routed_head": False, **m["moe"]})  # older files: no routed head
    state = load_file(str(wp))
    missing = model.load_state_dict(state, strict=False)
    if missing.unexpected_keys:
        raise ValueError(f"{wp} holds parameters the rebuilt model lacks: {missing.unexpected_keys[:5]}")
    model.eval()
    return model


def _target_map(space_names: Sequence[str], class_names: Sequence[str]) -> np.ndarray:
    """Target index of each unified class: its name, or the part after its last ':', among class_names; -1 if none."""
    pos = {c: i for i, c in enumerate(class_names)}
    return np.array([pos.get(n, pos.get(n.rsplit(":", 1)[-1], -1)) for n in space_names], dtype=np.int64)


def evaluate_model(
    model, x: np.ndarray, y: Optional[np.ndarray], class_names: Sequence[str], batch_size: int = 256
) -> Dict[str, Any]:
    """Accuracy (classification: probabilities summed per test class name, module docstring) or next-token loss."""
    import torch

    from ..models.registry import SeedModel

    if model.label_space.kind != "classes":
        tot, cnt = 0.0, 0
        with torch.no_grad():
            for s in range(0, len(x), batch_size):
                b = model.prepare(SeedModel.take(x, slice(s, s + batch_size)))
                logits = model(b)[:, :-1].double()
                t = b["input_ids"][:, 1:]
                tot += float(
                    torch.nn.functional.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]), t.reshape(-1), reduction="sum"
                    )
                )
                cnt += t.numel()
        return {"n": int(len(x)), "next_token_loss": tot / cnt, "perplexity": float(np.exp(tot / cnt))}
    if y is None:
        raise ConfigError("evaluation of a classifier needs labels (labels / y_key)")
    tm = _target_map(model.label_space.names, class_names)
    if (tm < 0).all():
        raise ConfigError(
            f"no class of the unified label space ({model.label_space.names[:6]}...) matches the test class names "
            f"{list(class_names)[:6]}...: give class_names"
        )
    p = model.predict_proba(x, batch_size=batch_size)
    marg = np.zeros((len(x), len(class_names)))
    for c, t in enumerate(tm):
        if t >= 0:
            marg[:, t] += p[:, c]
    return {"n": int(len(x)), "accuracy": float((marg.argmax(1) == y).mean())}


# --------------------------------------------------------------------------- command lines


def _parser(prog: str, description: str, epilog: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _run(fn, *args) -> int:
    try:
        fn(*args)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main_train_expert(argv: Optional[List[str]] = None) -> int:
    """``metamoe train-expert --config client.yaml [--out DIR] [--quiet]``."""
    p = _parser(
        "metamoe train-expert",
        "Client side: embed private data and the public pool with the frozen seed model, select proxies, train a "
        "proxy-aligned LoRA expert and write an expert package (no private sample or per-sample private embedding "
        "goes into it).",
        CLIENT_YAML + "\n\n" + DATA_HELP,
    )
    p.add_argument(
        "--config",
        required=True,
        help="client.yaml (keys below); relative paths are resolved against its folder",
    )
    p.add_argument("--out", default=None, help="package folder to write (overrides the YAML's 'output')")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    a = p.parse_args(argv)
    return _run(lambda: train_expert_from_config(load_config(a.config), a.out, a.quiet))


def main_unify(argv: Optional[List[str]] = None) -> int:
    """``metamoe unify --config server.yaml [--out DIR] [--quiet]``."""
    p = _parser(
        "metamoe unify",
        "Server side: validate the expert packages (same seed model and weights, intact files, disjoint private label "
        "spaces, proxy indices in range), build the LoRA-expert MoE with routers initialised from the packages' "
        "prototypes, train the routers on the union of the proxies (checkpointed; a rerun resumes) and write the "
        f"unified model folder ({UNIFIED_WEIGHTS} + {UNIFIED_MANIFEST}).",
        SERVER_YAML,
    )
    p.add_argument(
        "--config",
        required=True,
        help="server.yaml (keys below); relative paths are resolved against its folder",
    )
    p.add_argument("--out", default=None, help="unified model folder (overrides the YAML's 'output')")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    a = p.parse_args(argv)
    return _run(lambda: unify_from_config(load_config(a.config), a.out, a.quiet))


def main_evaluate(argv: Optional[List[str]] = None) -> int:
    """``metamoe evaluate --model DIR --data PATH [--labels Y.npy] [--json FILE]``."""
    p = _parser(
        "metamoe evaluate",
        "Rebuild a unified model written by `metamoe unify` (checking the router weights' and packages' hashes) and "
        "evaluate it on labelled data. Classification: the probabilities of unified classes that name the same "
        "test class (exactly, or after the last ':' as in 'clientA:3' and '3') are summed, then argmax = accuracy. "
        "A causal LM: mean next-token loss and perplexity.",
        DATA_HELP,
    )
    p.add_argument("--model", required=True, help="unified model folder from `metamoe unify`")
    p.add_argument(
        "--data",
        required=True,
        action="append",
        help="test data: .npz (x, y), .npy (with --labels), an image folder, or NAME=PATH; repeat for several sets",
    )
    p.add_argument("--labels", default=None, help="labels .npy for a .npy --data (only with a single --data)")
    p.add_argument("--x-key", default=None, help="array/column name of the inputs (.npz default 'x')")
    p.add_argument("--y-key", default=None, help="array/column name of the labels (.npz default 'y')")
    p.add_argument(
        "--class-names", default=None, help="comma-separated names of labels 0..C-1 (default '0','1',...)"
    )
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    a = p.parse_args(argv)

    def run():
        if a.labels and len(a.data) > 1:
            raise ConfigError("--labels applies to a single --data")
        model = load_unified(a.model)
        res = {}
        for item in a.data:
            name, sep, path = item.partition("=")
            if not sep:
                name, path = Path(item).stem, item
            spec: Dict[str, Any] = {"path": path}
            for k, v in (("labels", a.labels), ("x_key", a.x_key), ("y_key", a.y_key)):
                if v is not None:
                    spec[k] = v
            if a.class_names:
                spec["class_names"] = [c.strip() for c in a.class_names.split(",")]
            x, y, names = load_data(spec, None, f"--data {item}")
            r = evaluate_model(model, x, y, names)
            res[name] = r
            if "accuracy" in r:
                print(f"{name}: accuracy {r['accuracy']:.4f} (n={r['n']})")
            else:
                print(
                    f"{name}: next-token loss {r['next_token_loss']:.4f}, perplexity {r['perplexity']:.2f} (n={r['n']})"
                )
        if a.json:
            from ..utils.files import atomic_write_text

            atomic_write_text(Path(a.json), json.dumps(res, indent=1) + "\n")

    return _run(run)
