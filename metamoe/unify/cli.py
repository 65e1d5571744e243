"""The pipeline on your own data: three commands, one per role (docs/design.md, "The method").

* ``metamoe train-expert --config client.yaml`` (a client): :mod:`metamoe.unify.train_expert_cli`.
* ``metamoe unify --config server.yaml`` (the server), here: validates the packages, builds the LoRA-expert MoE
  with prototype-initialised, context-aware routers, trains the routers on the union of the clients' proxies and
  writes the unified model folder (router weights + a JSON manifest naming the seed model and the packages by hash).
* ``metamoe evaluate --model DIR --data PATH`` (anyone): :mod:`metamoe.unify.evaluate_cli`.

The unified model folder::

    <output>/
        unified.json          written last, atomically: the finished result. Format 2: the seed model (its
                              folder relative to the output and absolute), the packages (paths inside the
                              output + manifest sha256), the MoE options, the label space, the
                              router weights' sha256, ``config`` (everything the unify run used: the packages'
                              selection settings, the public pool's fingerprint, the MoE options, the router
                              training options), ``run_sha256`` (the digest of that run's identity) and
                              ``unified_sha256``: the sha256 of the file's canonical JSON (every field but
                              itself, :func:`metamoe.unify.package_format.canonical_manifest`), so an edit shows
        router.safetensors    the trained parameters
        packages/<name>/      copies of the expert packages, so the folder moves or is copied as one
                              (:func:`load_unified` also loads a unified.json naming packages outside it,
                              by a path relative to the folder or absolute)
        checkpoints/          the router checkpoints and ``run.json`` (the run they belong to): a killed run
                              resumes from them when rerun with the same configuration
        previous/             the result and checkpoints of the last run with a different configuration, moved
                              aside when a new run starts (never loaded)

A run removes ``unified.json`` before it trains, so a folder holds a ``unified.json`` only once a run has
finished; a run with another configuration first moves the old result aside. :func:`load_unified` checks
``unified_sha256``, the router weights' sha256 and the packages' manifest sha256; a format-1 file (no
``unified_sha256``) loads with an :class:`UnverifiedUnifiedWarning`.

The config keys and the seed model: :mod:`metamoe.unify.config`; the data sets: :mod:`metamoe.unify.data_loading`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..utils.files import atomic_write, atomic_write_text, save_safetensors, sha256_file
from ..utils.preflight import check_free_space, check_output
from .checkpoint import CheckpointMismatchError
from .config import (
    SERVER_YAML,
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
from .data_loading import check_inputs_for_seed, load_data
from .package_format import MANIFEST, canonical_manifest, is_sha256_hex, parse_manifest, pool_fingerprint
from .router_training import RouterTraining, train_router, training_storage_bytes

__all__ = [
    "UNIFIED_MANIFEST",
    "UNIFIED_WEIGHTS",
    "UNIFIED_DIGEST",
    "UnverifiedUnifiedWarning",
    "unified_digest",
    "unify_from_config",
    "unify_storage_bytes",
    "load_unified",
    "read_unified_manifest",
    "main_unify",
]

UNIFIED_MANIFEST = "unified.json"
UNIFIED_WEIGHTS = "router.safetensors"
UNIFIED_DIGEST = "unified_sha256"
UNIFIED_FORMAT = 2
UNIFIED_CHECKPOINTS = "checkpoints"
UNIFIED_PREVIOUS = "previous"
UNIFIED_PACKAGES = "packages"
RUN_FILE = "run.json"
OUTPUT_WHAT = "unify output folder"


class UnverifiedUnifiedWarning(UserWarning):
    """A format-1 ``unified.json`` (no ``unified_sha256``): its content cannot be checked for edits."""


def unified_digest(manifest: Dict[str, Any]) -> str:
    """Hex sha256 of the canonical JSON of ``manifest`` without its ``unified_sha256`` field.

    The writer hashes the dict it writes; the reader hashes the file parsed with
    :func:`~metamoe.unify.package_format.parse_manifest` ``(numbers_as_written=True)``, so any edit (a number's
    spelling included) changes the digest while whitespace and key order do not."""
    return hashlib.sha256(canonical_manifest({k: v for k, v in manifest.items() if k != UNIFIED_DIGEST})).hexdigest()


# --------------------------------------------------------------------------- unify


def _build(cfg: Dict[str, Any], base: Optional[str], seed_model, moe: Dict[str, Any], public=None):
    from .server import validate_packages
    from .unified_model import build_unified_model

    pk = cfg.get("packages")
    if not isinstance(pk, list) or not pk:
        raise ConfigError("packages must be a non-empty list of package folders")
    paths = [resolve_path(base, p, "packages[]") for p in pk]
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"package folder not found: {p}")
    public_x, public_y = (None, None) if public is None else public
    pkgs = validate_packages(paths, seed_model=seed_model, public_x=public_x, public_y=public_y)
    return paths, pkgs, build_unified_model


def unify_from_config(cfg: Dict[str, Any], out: Optional[str] = None, quiet: bool = False) -> Path:
    """The server side from a parsed server.yaml (``SERVER_YAML``); returns the unified model folder.

    Before any work the output folder is checked to be writable (:func:`~metamoe.utils.preflight.check_output`),
    the public pool to fit the seed model (:func:`~metamoe.unify.data_loading.check_inputs_for_seed`) and,
    once the model is built and before the first epoch, its disk to hold :func:`unify_storage_bytes`; each
    failure is a one-line :class:`~metamoe.utils.preflight.PreflightError` / ``ConfigError``."""

    from .server import proxy_owners, proxy_training_set

    defaults = RouterTraining()  # server.yaml's training defaults (SERVER_YAML documents them)
    base = cfg.get("_base")
    check_keys(cfg, ("seed_model", "packages", "public", "moe", "training", "output"), "server.yaml")
    if "public" not in cfg:
        raise ConfigError("server.yaml needs 'public' (the pool the proxies index)")
    output = out if out is not None else cfg.get("output")
    if output is None:
        raise ConfigError("server.yaml needs 'output' (the unified model folder) or --out")
    output = resolve_path(base if out is None else None, output, "output")
    moe = read_section(cfg, "moe", ("top_k", "context_routing", "routed_head", "router_init_scale"))
    tr = read_section(
        cfg,
        "training",
        ("epochs", "lr", "batch_size", "seed", "train_lora", "loss", "route_loss", "checkpoint_every"),
    )
    loss = tr.get("loss", "block")
    if loss not in ("block", "full"):
        raise ConfigError(f"training.loss must be block or full, got {loss!r}")
    route_loss = read_float(tr, "route_loss", defaults.route_loss_coef, "training", lo=0.0, inclusive=True)
    training = RouterTraining(
        epochs=read_int(tr, "epochs", defaults.epochs, "training"),
        lr=read_float(tr, "lr", defaults.lr, "training"),
        batch_size=read_int(tr, "batch_size", defaults.batch_size, "training"),
        seed=read_int(tr, "seed", defaults.seed, "training", lo=0),
        train_lora=read_bool(tr, "train_lora", defaults.train_lora, "training"),
        checkpoint_every=read_int(tr, "checkpoint_every", defaults.checkpoint_every, "training"),
        route_loss_coef=route_loss if route_loss > 0 else defaults.route_loss_coef,
    )
    say = (lambda s: None) if quiet else (lambda s: print(s, flush=True))
    check_output(output, OUTPUT_WHAT)  # before the pool is read and the model built
    seed_model = seed_model_from_config(cfg, base, progress=not quiet)
    xq, yq, _ = load_data(cfg["public"], base, "public")
    check_inputs_for_seed(seed_model, xq, "public")
    # the packages are checked against this pool: size, and content and order by their fingerprints
    paths, pkgs, build_unified_model = _build(cfg, base, seed_model, moe, public=(xq, yq))
    opts = {
        "top_k": moe.get("top_k"),
        "context_routing": read_bool(moe, "context_routing", True, "moe"),
        "routed_head": read_bool(moe, "routed_head", True, "moe"),
        "router_init_scale": read_float(moe, "router_init_scale", 4.0, "moe"),
    }
    model = build_unified_model(seed_model, pkgs, **opts)
    space = model.label_space
    x, y, picked = proxy_training_set(pkgs, xq, yq, space)
    n_labels = space.num_classes if space.kind == "classes" else "vocabulary"
    say(f"unify: {len(pkgs)} experts, {len(x)} proxies in the union, label space {n_labels}")
    config = {  # everything this run uses, recorded in unified.json
        "packages": [
            {
                "path": _relative_to(p, output),
                "manifest_sha256": sha256_file(p / MANIFEST),
                "selection": {"method": pk.method, "k": pk.k},
            }
            for p, pk in zip(paths, pkgs)
        ],
        "public": {"size": len(xq), "sha256": _pool_sha256(pkgs, xq, yq)},
        "moe": opts,
        "training": {**dataclasses.asdict(training), "loss": loss, "route_loss": route_loss},
    }
    run_sha256 = _run_digest(seed_model_hash=pkgs[0].seed_hash, config=config)
    check_free_space(output, unify_storage_bytes(model, training, paths), OUTPUT_WHAT)
    # every check has passed: from here on the folder's old result is no longer the result
    _start_run(output, run_sha256, config, say)
    try:
        metrics = train_router(
            model,
            x,
            y,
            training=training,
            checkpoint_dir=output / UNIFIED_CHECKPOINTS,
            label_block=(space.public_slice if loss == "block" and space.kind == "classes" else None),
            route_targets=proxy_owners(pkgs, picked) if route_loss > 0 else None,
            progress=not quiet,
            log=None if quiet else say,
        )
    except CheckpointMismatchError as e:
        raise ValueError(
            f"{e.directory} holds router checkpoints of another training run ({e.key} differs); delete that "
            "folder to start over, or write to another folder (server.yaml 'output' or --out)"
        ) from None
    state = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    atomic_write(output / UNIFIED_WEIGHTS, lambda tmp: save_safetensors(state, tmp))
    copies = _copy_packages(paths, output)
    manifest = {
        "format": UNIFIED_FORMAT,
        "seed_model": {k: v for k, v in cfg["seed_model"].items()},
        # the seed model's folder relative to the output folder (the output and the seed's folder can move
        # together), and absolute (the output folder can move alone); load_unified tries them in that order
        "seed_model_base": None if base is None else _relative_to(base, output),
        "seed_model_base_absolute": None if base is None else str(Path(base).resolve()),
        "seed_model_weight_hash": pkgs[0].seed_hash,
        "packages": copies,  # copies inside the output folder, which moves as one
        "package_manifest_sha256": [sha256_file(output / c / MANIFEST) for c in copies],
        "moe": opts,
        "label_space": space.to_dict(),
        "weights_sha256": sha256_file(output / UNIFIED_WEIGHTS),
        "train_lora": training.train_lora,
        "config": config,
        "run_sha256": run_sha256,
        "metrics": {k: v for k, v in metrics.items() if k != "trained"},
    }
    manifest = json.loads(json.dumps(manifest, default=str))  # exactly what the file holds, then its digest
    manifest[UNIFIED_DIGEST] = unified_digest(manifest)
    atomic_write_text(output / UNIFIED_MANIFEST, json.dumps(manifest, indent=1) + "\n")  # last: the run is done
    final = metrics["loss_per_epoch"][-1] if metrics["loss_per_epoch"] else float("nan")
    say(f"wrote unified model {output} ({training.epochs} epochs, final router loss {final:.4f})")
    return output


def _pool_sha256(pkgs, xq, yq) -> str:
    """The pool's fingerprint: the one every package records (validate_packages checked it against this pool, so
    it is not hashed again), else computed."""
    recorded = {p.public_pool_sha256 for p in pkgs}
    return recorded.pop() if len(recorded) == 1 and None not in recorded else pool_fingerprint(xq, yq)


def unify_storage_bytes(model, training: RouterTraining, packages: List[Path]) -> int:
    """Free disk ``metamoe unify`` needs in its output folder, an upper estimate: the router checkpoints and
    weights (:func:`~metamoe.unify.router_training.training_storage_bytes`: 4 bytes x trained parameters x
    (1 weights + 2 AdamW moments) x 2) plus the packages copied into ``packages/``."""
    return training_storage_bytes(model, training) + sum(_folder_bytes(p) for p in packages)


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def _run_digest(seed_model_hash: str, config: Dict[str, Any]) -> str:
    """The identity of a unify run: the seed weights, the packages' and the pool's content, the MoE and training
    options. Paths and ``checkpoint_every`` are left out: they do not change the result."""
    ident = {
        "seed_model_weight_hash": seed_model_hash,
        "packages": [p["manifest_sha256"] for p in config["packages"]],
        "public": config["public"],
        "moe": config["moe"],
        "training": {k: v for k, v in config["training"].items() if k != "checkpoint_every"},
    }
    return hashlib.sha256(canonical_manifest(json.loads(json.dumps(ident, default=str)))).hexdigest()


def _recorded_run(path: Path) -> Optional[str]:
    """The ``run_sha256`` a ``unified.json`` or ``run.json`` records; None when absent or unreadable."""
    try:
        v = json.loads(path.read_text()).get("run_sha256")
    except (OSError, ValueError, AttributeError):
        return None
    return v if isinstance(v, str) else None


def _start_run(output: Path, run_sha256: str, config: Dict[str, Any], say) -> None:
    """Prepare ``output`` for the run ``run_sha256`` before it trains.

    The finished result of an earlier run stops being one: with the same run its ``unified.json`` is removed
    (the run resumes from its checkpoints and writes it again); with another run the result and its checkpoints
    are moved to ``previous/`` (replacing what was there). Checkpoints of another run (per ``checkpoints/
    run.json``) are moved aside too, so they are not resumed. Then ``checkpoints/run.json`` records this run.
    """
    man, ckpt = output / UNIFIED_MANIFEST, output / UNIFIED_CHECKPOINTS
    runs = {r for r in (_recorded_run(man) if man.is_file() else None, _recorded_run(ckpt / RUN_FILE)) if r}
    other = bool(runs - {run_sha256}) or (man.is_file() and not runs)
    if other:
        prev = output / UNIFIED_PREVIOUS
        if prev.exists():
            shutil.rmtree(prev)
        prev.mkdir(parents=True)
        for name in (UNIFIED_MANIFEST, UNIFIED_WEIGHTS, UNIFIED_CHECKPOINTS, UNIFIED_PACKAGES):  # unified.json first
            if (output / name).exists():
                os.replace(output / name, prev / name)
        say(f"{output} held the result of a run with another configuration: moved it to {prev}")
    elif man.is_file():
        man.unlink()
    output.mkdir(parents=True, exist_ok=True)
    record = {"run_sha256": run_sha256, "config": config}
    atomic_write_text(ckpt / RUN_FILE, json.dumps(record, indent=1, default=str) + "\n")


def _copy_packages(paths: List[Path], output: Path) -> List[str]:
    """Copy the package folders into ``output/packages/<name>/`` (replacing that folder; a name used twice gets
    ``-2``, ``-3``, ...) and return their paths relative to ``output``."""
    names: List[str] = []
    for p in paths:
        name, i = p.resolve().name, 2
        while name in names:
            name, i = f"{p.resolve().name}-{i}", i + 1
        names.append(name)
    tmp = output / f".{UNIFIED_PACKAGES}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    for p, name in zip(paths, names):
        shutil.copytree(p, tmp / name)
    if (output / UNIFIED_PACKAGES).exists():
        shutil.rmtree(output / UNIFIED_PACKAGES)
    os.replace(tmp, output / UNIFIED_PACKAGES)
    return [f"{UNIFIED_PACKAGES}/{name}" for name in names]


def _relative_to(path: Any, folder: Path) -> str:
    """``path`` relative to ``folder`` (both resolved), e.g. ``../packages/a``; absolute if on another drive."""
    try:
        return os.path.relpath(Path(path).resolve(), Path(folder).resolve())
    except ValueError:  # Windows: different drives
        return str(Path(path).resolve())


def read_unified_manifest(model_dir: Any) -> Dict[str, Any]:
    """The verified ``unified.json`` of a unified model folder (module docstring).

    Raises:
        FileNotFoundError: the folder holds no finished result (no ``unified.json``; one line saying whether an
            unfinished run left checkpoints there).
        ValueError: the file is not valid JSON, does not match its ``unified_sha256`` (edited after unify), or
            lacks a required field.
    Warns:
        UnverifiedUnifiedWarning: a format-1 file, which records no ``unified_sha256``.
    """
    d = Path(model_dir)
    mp = d / UNIFIED_MANIFEST
    if not mp.is_file():
        if (d / UNIFIED_CHECKPOINTS).is_dir():
            raise FileNotFoundError(
                f"{d} holds no finished unified model (no {UNIFIED_MANIFEST}): its `metamoe unify` run did not "
                f"finish; rerun it with the same config to resume"
            )
        raise FileNotFoundError(f"{d} is not a unified model folder (no {UNIFIED_MANIFEST}); run `metamoe unify`")
    text = mp.read_text()
    try:
        as_written = parse_manifest(text, numbers_as_written=True)
        m = parse_manifest(text)
    except ValueError as e:
        raise ValueError(f"{mp} is not valid JSON ({e}): edited or damaged after `metamoe unify` wrote it") from None
    if not isinstance(m, dict):
        raise ValueError(f"{mp} is not a JSON object: edited or damaged after `metamoe unify` wrote it")
    fmt = m.get("format")
    if fmt not in (1, UNIFIED_FORMAT):
        raise ValueError(f"{mp}: unknown format {fmt!r} (this metamoe reads 1 and {UNIFIED_FORMAT})")
    digest = m.get(UNIFIED_DIGEST)
    if fmt == 1 and digest is None:
        warnings.warn(
            f"{mp} records no {UNIFIED_DIGEST} (format 1): its content is not verified; rerun `metamoe unify` "
            "to write a verifiable one",
            UnverifiedUnifiedWarning,
            stacklevel=2,
        )
    elif not is_sha256_hex(digest) or unified_digest(as_written) != digest:
        raise ValueError(
            f"{mp} was edited after `metamoe unify` wrote it (its content does not match its {UNIFIED_DIGEST})"
        )
    for key in ("seed_model", "packages", "package_manifest_sha256", "moe", "weights_sha256"):
        if key not in m:
            raise ValueError(f"{mp} lacks {key!r}")
    hashes = [m["weights_sha256"], *m["package_manifest_sha256"]]
    if not all(is_sha256_hex(h) for h in hashes) or len(m["packages"]) != len(m["package_manifest_sha256"]):
        raise ValueError(f"{mp}: malformed weights_sha256 / packages / package_manifest_sha256")
    return m


def _recorded_seed_model(m: Dict[str, Any], d: Path):
    """The seed model ``unified.json`` records, its paths resolved against ``seed_model_base`` (relative to
    ``d``) and, when not found there, ``seed_model_base_absolute``."""
    rel, absolute = m.get("seed_model_base"), m.get("seed_model_base_absolute")
    bases = [None] if rel is None else [str(d / rel)] + ([absolute] if isinstance(absolute, str) else [])
    for base in bases[:-1]:
        try:
            return seed_model_from_config({"seed_model": m["seed_model"]}, base)
        except FileNotFoundError:
            pass
    return seed_model_from_config({"seed_model": m["seed_model"]}, bases[-1])


def load_unified(model_dir: Any):
    """Rebuild a unified model written by ``metamoe unify``: seed model + packages + the trained router weights."""
    from safetensors.torch import load_file

    d = Path(model_dir)
    m = read_unified_manifest(d)
    mp = d / UNIFIED_MANIFEST
    wp = d / UNIFIED_WEIGHTS
    if not wp.is_file():
        raise FileNotFoundError(f"{wp} is missing")
    if sha256_file(wp) != m["weights_sha256"]:
        raise ValueError(f"{wp} does not match the sha256 in {mp} (modified after unify?)")
    packages = [str(d / p) for p in m["packages"]]  # relative to d (absolute paths: as written)
    for p, h in zip(packages, m["package_manifest_sha256"]):
        if not (Path(p) / MANIFEST).is_file():
            raise FileNotFoundError(f"package {p} of {mp} is missing (packages are found relative to {d})")
        if sha256_file(Path(p) / MANIFEST) != h:
            raise ValueError(f"package {p} changed since unify (manifest sha256 differs)")
    seed_model = _recorded_seed_model(m, d)
    _, pkgs, build_unified_model = _build({"packages": packages}, None, seed_model, m["moe"])
    want = m.get("seed_model_weight_hash")
    if want is not None and pkgs[0].seed_hash != want:
        raise ValueError(f"the packages of {mp} were made from another seed model than the one it records")
    model = build_unified_model(seed_model, pkgs, **{"routed_head": False, **m["moe"]})  # no routed_head key: none
    state = load_file(str(wp))
    missing = model.load_state_dict(state, strict=False)
    if missing.unexpected_keys:
        raise ValueError(f"{wp} holds parameters the rebuilt model lacks: {missing.unexpected_keys[:5]}")
    model.eval()
    return model


# --------------------------------------------------------------------------- command lines


def command_parser(prog: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """The argument parser of a pipeline command (its epilog, the YAML keys, printed as written)."""
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def run_command(fn, *args) -> int:
    """``fn(*args)``; a bad config, a missing file or bad input prints ``error: ...`` and returns 2, else 0."""
    try:
        fn(*args)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main_unify(argv: Optional[List[str]] = None) -> int:
    """``metamoe unify --config server.yaml [--out DIR] [--quiet]``."""
    p = command_parser(
        "metamoe unify",
        "Server side: validate the expert packages (same seed model and weights, intact files, disjoint private label "
        "spaces, proxy indices in range), build the LoRA-expert MoE with routers initialised from the packages' "
        "prototypes, train the routers on the union of the proxies (checkpointed; a rerun resumes) and write the "
        f"unified model folder ({UNIFIED_WEIGHTS} + {UNIFIED_MANIFEST}, written last). A run removes the folder's "
        f"{UNIFIED_MANIFEST} before training; a run with another configuration first moves the old result to "
        f"{UNIFIED_PREVIOUS}/.",
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
    return run_command(lambda: unify_from_config(load_config(a.config), a.out, a.quiet))
