"""``metamoe train-expert --config client.yaml``: a client's side of the pipeline (:mod:`metamoe.unify.cli`).

Embeds the private data and the public pool with the frozen seed model, scores relevance, selects proxies, trains
a proxy-aligned LoRA expert and writes an expert package (safetensors + manifest; no private sample or per-sample
private embedding goes into it). The config keys: ``CLIENT_YAML`` in :mod:`metamoe.unify.config`.
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ..selection.methods import canonical_method
from ..utils.preflight import check_free_space, check_output, check_writable
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
from .data_loading import DATA_HELP, check_inputs_for_seed, load_data

__all__ = [
    "OVERWRITE_HINT",
    "checkpoint_folder",
    "learning_warning",
    "main_train_expert",
    "train_expert_from_config",
    "training_summary",
]

OVERWRITE_HINT = "set `overwrite: true` in client.yaml or pass --overwrite"


def train_expert_from_config(
    cfg: Dict[str, Any], out: Optional[str] = None, quiet: bool = False, overwrite: Optional[bool] = None
) -> Path:
    """The client side from a parsed client.yaml (module docstring, ``CLIENT_YAML``); returns the package path.

    ``overwrite`` (None: the YAML's ``overwrite``) replaces an existing package. Before the data is loaded the
    package folder must be writable and, without ``overwrite``, absent; before the first embedding its disk
    must hold the package and the training checkpoint (:func:`~metamoe.unify.client.expert_storage_bytes`).
    Training keeps a checkpoint in :func:`checkpoint_folder` after every epoch: a rerun of an interrupted run
    resumes there, and the folder is removed once the package is written. Prints a summary after training
    (unless ``quiet``) and, always, a ``warning:`` line on stderr when the expert barely learned
    (:func:`learning_warning`).
    """
    from ..selection import (
        relevance_scores,
        select_dpp,
        select_facility_location,
        select_random,
        select_top_relevance,
    )
    from .client import EMBED_FEATURES, embed, expert_storage_bytes, train_expert
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
    features = sel.get("features", "pooled")
    if features not in EMBED_FEATURES:
        raise ConfigError(f"selection.features must be one of {', '.join(EMBED_FEATURES)}, got {features!r}")
    seed = read_int(tr, "seed", 0, "training", lo=0)
    options = dict(
        lora_rank=read_int(tr, "lora_rank", 8, "training"),
        epochs=read_int(tr, "epochs", 5, "training"),
        lr=read_float(tr, "lr", 1e-3, "training"),
        batch_size=read_int(tr, "batch_size", 64, "training"),
        seed=seed,
    )
    if overwrite is None:
        overwrite = read_bool(cfg, "overwrite", False, "client.yaml")
    output = check_output(output, "package folder", exists_hint=None if overwrite else OVERWRITE_HINT)
    ckpt_dir = check_writable(checkpoint_folder(output), "checkpoint folder")

    seed_model = seed_model_from_config(cfg, base, progress=not quiet)
    causal = seed_model.task == "causal_lm"
    xp, yp, priv_names = load_data(cfg["private"], base, "private")
    xq, yq, pub_names = load_data(cfg["public"], base, "public")
    check_inputs_for_seed(seed_model, xp, "private")
    check_inputs_for_seed(seed_model, xq, "public")
    if not causal and (yp is None or yq is None):
        raise ConfigError(
            "classification needs labels for the private data and the public pool (labels / y_key)"
        )
    N = len(xq)
    k = read_int(sel, "k", min(100, N), "selection")
    if k > N:
        raise ConfigError(f"selection.k={k} exceeds the public pool ({N} samples)")
    client = str(cfg.get("client_name") or output.name)
    names = [] if causal else [*priv_names, *pub_names]
    names_bytes = sum(len(client) + len(str(c)) + 4 for c in names)  # "client:name", quoted, separated
    need = expert_storage_bytes(seed_model, options["lora_rank"], len(names), k, names_bytes)
    check_free_space(output, need, "package folder and its training checkpoint")
    say(f"client {client}: {len(xp)} private samples, public pool {N}, seed model {seed_model.name}")
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
        **options,
        progress=not quiet,
        checkpoint_dir=ckpt_dir,
        log=say,
    )
    for line in training_summary(ex.metrics, causal):
        say(line)
    warning = learning_warning(ex.metrics, None if causal else len(priv_names), None if causal else len(pub_names))
    if warning is not None:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    path = write_expert_package(
        output,
        ex,
        proxy_indices=idx,
        public_pool_size=N,
        public_x=xq,
        public_y=yq,
        method=method,
        k=k,
        overwrite=overwrite,
    )
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    say(f"wrote expert package {path}")
    return path


def checkpoint_folder(output: Path) -> Path:
    """Where ``metamoe train-expert`` keeps the training checkpoint of the package ``output``: the hidden folder
    ``.<name>.checkpoints`` beside it (removed once the package is written)."""
    output = Path(output)
    return output.parent / f".{output.name}.checkpoints"


def training_summary(metrics: Dict[str, Any], causal: bool) -> List[str]:
    """The lines ``metamoe train-expert`` prints after training, from :func:`~metamoe.unify.train_expert`'s
    ``metrics``: loss first -> last epoch, accuracies, sample counts, seconds."""
    losses = metrics["loss_per_epoch"]
    what = "next-token accuracy" if causal else "accuracy"
    lines = [
        f"training: {len(losses)} epochs in {metrics['train_seconds']:.1f} s, "
        f"loss {losses[0]:.4f} -> {losses[-1]:.4f} (first -> last epoch)",
        f"  private: {metrics['n_private']} samples, {what} {_fmt(metrics.get('private_accuracy'))}",
    ]
    if metrics.get("n_proxies"):
        lines.append(f"  proxies: {metrics['n_proxies']} samples, {what} {_fmt(metrics.get('proxy_accuracy'))}")
    else:
        lines.append("  proxies: none (trained on the private data alone)")
    return lines


def _fmt(acc: Optional[float]) -> str:
    return "n/a" if acc is None else f"{acc:.3f}"


def learning_warning(
    metrics: Dict[str, Any], n_classes: Optional[int], n_proxy_classes: Optional[int] = None
) -> Optional[str]:
    """Why the expert barely learned (one line ending in what to try), or None when it learned.

    The final epoch's loss must lie below the first epoch's (with two or more epochs). For classification
    (``n_classes`` private classes; None for a causal LM, judged on the loss alone) the private accuracy must
    also exceed chance ``p = 1 / n_classes`` by more than ``max(0.05, 2 * sqrt(p * (1 - p) / n))``: two standard
    errors of the accuracy a guessing expert would show on the ``n`` private samples, and at least 5 points;
    with proxies and ``n_proxy_classes`` (the public label space's size) the proxy accuracy likewise, on the
    ``n_proxies`` proxies (an expert that fits its private data but not the proxies is not aligned with them).
    """
    losses = metrics["loss_per_epoch"]
    reasons = []
    for which, acc, k, n in (
        ("private", metrics.get("private_accuracy"), n_classes, metrics.get("n_private")),
        ("proxy", metrics.get("proxy_accuracy"), n_proxy_classes, metrics.get("n_proxies")),
    ):
        if k is None or acc is None or not n:
            continue
        p = 1.0 / k
        margin = max(0.05, 2.0 * math.sqrt(p * (1.0 - p) / int(n)))
        if acc <= p + margin:
            reasons.append(f"its {which} accuracy {acc:.3f} is within {margin:.3f} of chance ({p:.3f} for {k} classes)")
    if len(losses) >= 2 and not losses[-1] < losses[0]:
        reasons.append(f"its loss did not fall ({losses[0]:.4f} in the first epoch, {losses[-1]:.4f} in the last)")
    if not reasons:
        return None
    return (
        f"the expert barely learned: {'; '.join(reasons)}; try more epochs (training.epochs, "
        f"{metrics['epochs']} now) or a higher learning rate (training.lr, {metrics['lr']:g} now)"
    )


def main_train_expert(argv: Optional[List[str]] = None) -> int:
    """``metamoe train-expert --config client.yaml [--out DIR] [--overwrite] [--quiet]``."""
    p = command_parser(
        "metamoe train-expert",
        "Client side: embed private data and the public pool with the frozen seed model, select proxies, train a "
        "proxy-aligned LoRA expert and write an expert package (no private sample or per-sample private embedding "
        "goes into it). The package folder is checked (writable, absent unless overwriting) before any data is "
        "read, and the room on its disk before the first embedding. Training is checkpointed after every epoch "
        "in the hidden folder .<package name>.checkpoints beside the package; a rerun of an interrupted run "
        "resumes there, and the folder is removed once the package is written.",
        CLIENT_YAML + "\n\n" + DATA_HELP,
    )
    p.add_argument(
        "--config",
        required=True,
        help="client.yaml (keys below); relative paths are resolved against its folder",
    )
    p.add_argument("--out", default=None, help="package folder to write (overrides the YAML's 'output')")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing package folder (sets the YAML's 'overwrite: true')",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages (warnings still go to stderr)")
    a = p.parse_args(argv)
    return run_command(
        lambda: train_expert_from_config(load_config(a.config), a.out, a.quiet, True if a.overwrite else None)
    )
