"""``metamoe embed-pool``: the command line of the sharded pool embedding (:mod:`metamoe.unify.pool_embedding`)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..utils.files import open_npy, read_json
from ..utils.pool_format import DTYPES, FORMAT, MANIFEST
from ..utils.preflight import check_writable
from .config import ConfigError, check_keys, load_config, resolve_path, seed_model_from_config
from .data_loading import load_data
from .pool_embedding import embed_pool_sharded

CONFIG_HELP = """\
pool.yaml keys (flags override them):
  seed_model: {name, checkpoint | config + seed, num_classes, task}   as in client.yaml (metamoe train-expert --help)
  data: DATA                 the public pool's raw inputs (labels are not needed)
  output: PATH               the pool folder to write (--out)
  batch_size: 256            rows per forward pass
  dtype: float16             float16 | float32, the stored embeddings
  num_shards: N              single-process runs only: how many shards (default: the existing manifest's, else 1)

A plain .npy DATA path is opened as a read-only memmap, so each rank reads only its own rows; other DATA kinds
(.npz, image folders, datasets save_to_disk folders) are loaded whole by metamoe.unify.data_loading.load_data on
every rank.

Redoing a crashed rank's shard, without torchrun: the same command with --shards I (and without --distributed);
`metamoe select --public OUT/manifest.json` (or an error from it) prints that command."""


def _parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="metamoe embed-pool",
        description="Embed a public pool with the frozen seed model into memmap shards (one per rank under "
        "torchrun) tied together by OUT/manifest.json; `metamoe select --public OUT/manifest.json` reads it.",
        epilog=CONFIG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=None,
                   help="pool.yaml with the keys below; relative paths resolve against its folder")
    p.add_argument("--model", default=None,
                   help="seed model name, timm:<arch> or hf:<model_type> (config: seed_model.name)")
    p.add_argument("--checkpoint", default=None, help="local seed checkpoint folder (config: seed_model.checkpoint)")
    p.add_argument("--model-seed", type=int, default=None,
                   help="random-init seed when building the seed model from --model-config (config: seed_model.seed)")
    p.add_argument("--model-config", default=None,
                   help="architecture fields as JSON, e.g. '{\"img_size\": 32}' (config: seed_model.config)")
    p.add_argument("--num-classes", type=int, default=None, help="size of the seed model's own head (optional)")
    p.add_argument("--data", default=None, help="the pool's raw inputs: .npy (memmapped), .npz, image folder or "
                   "datasets save_to_disk folder (config: data)")
    p.add_argument("--x-key", default=None, help="array/column of the inputs in a .npz or datasets folder")
    p.add_argument("--out", default=None, help="pool folder to write (config: output)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per forward pass (default 256)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="stored embedding dtype (default float16)")
    p.add_argument("--num-shards", type=int, default=None,
                   help="single process: cut the pool into this many shards (default: the existing manifest's, "
                   "else 1); under --distributed it is the world size")
    p.add_argument("--shards", default=None,
                   help="single process: embed only these shard indices, comma separated (e.g. 3,5): redoes a "
                   "crashed rank's shard without torchrun")
    p.add_argument("--overwrite", action="store_true",
                   help="re-embed shards whose record is valid (default: skip them)")
    p.add_argument("--distributed", action="store_true",
                   help="one shard per rank: run under "
                   "`torchrun --nproc_per_node=N -m metamoe embed-pool --distributed ...`")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="--distributed: timeout in seconds of the start-up collective (a dead peer makes the others "
                   "fail after at most this long; default 600)")
    p.add_argument("--dist-backend", default=None, choices=("gloo", "nccl"),
                   help="--distributed: process-group backend (default: nccl with a GPU per rank, else gloo)")
    p.add_argument("--device", default=None,
                   help="where the seed model runs (default: cuda:LOCAL_RANK when CUDA is available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _canonical_command(a, cfg_path: Optional[str]) -> List[str]:
    """The arguments that rebuild this pool (absolute paths; no --distributed/--shards/--overwrite)."""
    def ab(x):
        return os.path.abspath(x)

    cmd: List[str] = []
    if cfg_path:
        cmd += ["--config", ab(cfg_path)]
    for flag, val, path in (("--model", a.model, False), ("--checkpoint", a.checkpoint, True),
                            ("--model-seed", a.model_seed, False), ("--model-config", a.model_config, False),
                            ("--num-classes", a.num_classes, False), ("--data", a.data, True),
                            ("--x-key", a.x_key, False), ("--batch-size", a.batch_size, False),
                            ("--dtype", a.dtype, False), ("--device", a.device, False)):
        if val is not None:
            cmd += [flag, ab(val) if path else str(val)]
    cmd += ["--out", ab(a.out_resolved)]
    cmd += ["--num-shards", str(a.num_shards_resolved)]
    if a.no_progress:
        cmd += ["--no-progress"]
    return cmd


def _from_args(a):
    """(seed model, data, settings) from the parsed flags and the optional YAML."""
    cfg: Dict[str, Any] = load_config(a.config) if a.config else {}
    base = cfg.get("_base")
    check_keys(cfg, ("seed_model", "data", "output", "batch_size", "dtype", "num_shards"), "pool.yaml")
    sm = dict(cfg.get("seed_model") or {})
    if a.model is not None:
        sm["name"] = a.model
    if a.checkpoint is not None:
        sm["checkpoint"] = os.path.abspath(a.checkpoint)
    if a.model_seed is not None:
        sm["seed"] = a.model_seed
    if a.num_classes is not None:
        sm["num_classes"] = a.num_classes
    if a.model_config is not None:
        try:
            conf = json.loads(a.model_config)
        except ValueError as exc:
            raise ConfigError(f"--model-config must be a JSON object: {exc}") from None
        if not isinstance(conf, dict):
            raise ConfigError("--model-config must be a JSON object of architecture fields")
        sm["config"] = conf
    if "name" not in sm:
        raise ConfigError("give the seed model: --model timm:<arch> | hf:<model_type> "
                          "(or seed_model.name in --config)")
    model = seed_model_from_config({"seed_model": sm}, base, progress=not a.no_progress)
    spec = cfg.get("data") if a.data is None else {"path": os.path.abspath(a.data)}
    if spec is None:
        raise ConfigError("give the pool's data: --data PATH (or data: in --config)")
    if isinstance(spec, (str, os.PathLike)):
        spec = {"path": spec}
    if a.x_key is not None:
        spec = dict(spec, x_key=a.x_key)
    path = resolve_path(base, spec.get("path"), "data.path")
    if path.suffix == ".npy" and set(spec) <= {"path", "labels"}:
        if not path.is_file():
            raise FileNotFoundError(f"data.path not found: {path}")
        data = open_npy(path, "data.path")  # a memmap: each rank reads only its rows
        if data.ndim < 2 or data.dtype.kind not in "fiu":
            raise ConfigError(f"{path}: expected (n, ...) float images or integer token ids, got shape "
                              f"{data.shape} dtype {data.dtype}")
    else:
        data, _, _ = load_data(spec, base, "data")
    out = a.out if a.out is not None else cfg.get("output")
    if out is None:
        raise ConfigError("give the pool folder: --out DIR (or output: in --config)")
    a.out_resolved = str(check_writable(resolve_path(base if a.out is None else None, out, "output"), "--out"))
    a.batch_size_resolved = a.batch_size if a.batch_size is not None else cfg.get("batch_size", 256)
    a.dtype_resolved = a.dtype if a.dtype is not None else cfg.get("dtype", "float16")
    a.num_shards_cfg = a.num_shards if a.num_shards is not None else cfg.get("num_shards")
    return model, data, str(path)


def main(argv: Optional[List[str]] = None) -> int:
    """``metamoe embed-pool``: see ``metamoe embed-pool --help``."""
    a = _parser().parse_args(argv)
    failed = False
    rank_note = ""
    try:
        import torch

        if a.distributed:
            from ..utils.distributed import init_distributed

            if a.shards is not None or a.num_shards is not None:
                raise ValueError("--shards/--num-shards are for single-process runs; under --distributed rank r "
                                 "embeds shard r of WORLD_SIZE")
            if not a.timeout > 0:
                raise ValueError(f"--timeout must be > 0 seconds, got {a.timeout}")
            rank, world = init_distributed(a.dist_backend, a.timeout)
            rank_note = f" (rank {rank} of {world})"
        model, data, src = _from_args(a)
        device = a.device
        if device is None and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        if device is not None:
            model.to(torch.device(device))
        shard = None
        if a.shards is not None:
            try:
                shard = [int(s) for s in a.shards.split(",") if s.strip()]
            except ValueError:
                raise ValueError(f"--shards must be comma-separated shard indices, e.g. 3,5; "
                                 f"got {a.shards!r}") from None
        num_shards = a.num_shards_cfg
        if a.distributed:
            num_shards = torch.distributed.get_world_size()
        elif num_shards is None:
            ex = read_json(Path(a.out_resolved) / MANIFEST)
            num_shards = ex["num_shards"] if ex is not None and ex.get("format") == FORMAT else 1
        a.num_shards_resolved = num_shards
        res = embed_pool_sharded(model, data, a.out_resolved, num_shards=num_shards, shard=shard,
                                 batch_size=a.batch_size_resolved, dtype=a.dtype_resolved,
                                 progress=not a.no_progress, overwrite=a.overwrite, source=src,
                                 command=_canonical_command(a, a.config))
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        failed = True
        print(f"metamoe embed-pool{rank_note}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if a.distributed:
            from ..utils.distributed import finish

            finish(failed=failed)
    done = sum(s["status"] == "done" for s in res["shards"])
    tc = res["this_call"]
    print(f"embed-pool{rank_note}: embedded shards {tc['embedded'] or '-'}, "
          f"skipped (already done) {tc['skipped'] or '-'}; pool {res['n']} x {res['d']} {res['dtype']}, "
          f"{done}/{res['num_shards']} shards done"
          f"{'' if res['complete'] else ' (incomplete)'}; manifest {Path(a.out_resolved) / MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
