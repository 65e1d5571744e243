"""``metamoe train-expert --config client.yaml``: a client's side of the pipeline (:mod:`metamoe.unify.cli`).

Embeds the private data and the public pool with the frozen seed model, scores relevance, selects proxies, trains
a proxy-aligned LoRA expert and writes an expert package (safetensors + manifest; no private sample or per-sample
private embedding goes into it). The config keys: ``CLIENT_YAML`` in :mod:`metamoe.unify.config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ..selection.methods import canonical_method
from .cli import command_parser, run_command
from .config import (
    CLIENT_YAML,
    ConfigError,
    check_keys,
    load_config,
    read_bool,
    read_float,
    read_int,
    read_section,
    resolve_path,
    seed_model_from_config,
)
from .data_loading import DATA_HELP, load_data

__all__ = ["train_expert_from_config", "main_train_expert"]


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
    check_keys(
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
    output = resolve_path(base if out is None else None, output, "output")
    sel = read_section(cfg, "selection", ("method", "k", "kernel", "relevance_epochs", "features"))
    tr = read_section(cfg, "training", ("lora_rank", "epochs", "lr", "batch_size", "seed", "align"))
    try:
        method = canonical_method(sel.get("method", "dpp"), "selection.method")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    say = (lambda s: None) if quiet else (lambda s: print(s, flush=True))

    seed_model = seed_model_from_config(cfg, base)
    causal = seed_model.task == "causal_lm"
    xp, yp, priv_names = load_data(cfg["private"], base, "private")
    xq, yq, pub_names = load_data(cfg["public"], base, "public")
    if not causal and (yp is None or yq is None):
        raise ConfigError(
            "classification needs labels for the private data and the public pool (labels / y_key)"
        )
    N = len(xq)
    k = read_int(sel, "k", min(100, N), "selection")
    if k > N:
        raise ConfigError(f"selection.k={k} exceeds the public pool ({N} samples)")
    seed = read_int(tr, "seed", 0, "training", lo=0)
    client = str(cfg.get("client_name") or output.name)
    say(f"client {client}: {len(xp)} private samples, public pool {N}, seed model {seed_model.name}")
    features = sel.get("features", "pooled")
    if features not in EMBED_FEATURES:
        raise ConfigError(f"selection.features must be one of {', '.join(EMBED_FEATURES)}, got {features!r}")
    pub_emb = embed(seed_model, xq, progress=not quiet, features=features)
    priv_emb = embed(seed_model, xp, progress=not quiet, features=features)
    rel = relevance_scores(
        priv_emb, pub_emb, epochs=read_int(sel, "relevance_epochs", 5, "selection"), seed=seed, progress=False
    )
    if method == "dpp":
        kernel = sel.get("kernel", "rbf")
        if kernel not in ("rbf", "cosine"):
            raise ConfigError(f"selection.kernel must be rbf or cosine, got {kernel!r}")
        picked = select_dpp(pub_emb, k, rel, kernel=kernel, progress=False)
    elif method == "facility_location":
        picked = select_facility_location(pub_emb, k, ground=priv_emb, progress=False)
    elif method == "top_relevance":
        picked = select_top_relevance(rel, k)
    else:
        picked = select_random(N, k, seed=seed)
    idx = np.asarray(picked.indices, dtype=np.int64)
    say(f"selected {len(idx)} proxies ({method})")
    align = read_bool(tr, "align", True, "training")
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
        lora_rank=read_int(tr, "lora_rank", 8, "training"),
        epochs=read_int(tr, "epochs", 5, "training"),
        lr=read_float(tr, "lr", 1e-3, "training"),
        batch_size=read_int(tr, "batch_size", 64, "training"),
        seed=seed,
        progress=not quiet,
    )
    path = write_expert_package(
        output,
        ex,
        proxy_indices=idx,
        public_pool_size=N,
        public_x=xq,
        public_y=yq,
        method=method,
        k=k,
        overwrite=read_bool(cfg, "overwrite", False, "client.yaml"),
    )
    say(f"wrote expert package {path}")
    return path


def main_train_expert(argv: Optional[List[str]] = None) -> int:
    """``metamoe train-expert --config client.yaml [--out DIR] [--quiet]``."""
    p = command_parser(
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
    return run_command(lambda: train_expert_from_config(load_config(a.config), a.out, a.quiet))
