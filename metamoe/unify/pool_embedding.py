"""Sharded embedding of a public pool: one memmap shard per rank, a JSON manifest that ties them together.

    torchrun --nproc_per_node=4 -m metamoe embed-pool --distributed --model timm:vit_small_patch16_224 \\
        --checkpoint seed/ --data pool.npy --out pool_emb/
    metamoe select --private P.npy --public pool_emb/manifest.json --k 500 --out sel.json

The files and the manifest are the pool embedding format of :mod:`metamoe.utils.pool_format`, which
also opens them (:func:`open_pool_embeddings`); the command line is :mod:`metamoe.unify.pool_embedding_cli`.

Under torch.distributed (:func:`metamoe.utils.distributed.init_distributed`) rank r embeds shard r, the
rows of :func:`metamoe.utils.distributed.pool_shard_range` -- the rows that ``metamoe select
--distributed`` gives rank r with the same world size, so each rank later reads exactly one file. The only
collective is one all_gather at the start (every rank must see the same pool, model and plan), under the
process group's timeout: a rank that dies before it makes the others fail with a clear error after at most
the timeout; a rank that dies later costs only its own shard (the others finish theirs), and that shard is
redone alone, without torchrun: ``metamoe embed-pool ... --shards 1`` or ``embed_pool_sharded(...,
shard=[1])``. Shards whose record is valid are skipped on a rerun (resumable), unless ``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import numbers
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from ..utils.checks import check_int
from ..utils.files import read_json, sha256_file, write_json
from ..utils.pool_format import (
    DTYPES,
    FORMAT,
    MANIFEST,
    VERSION,
    PoolEmbeddings,
    PoolIncompleteError,
    PoolIntegrityError,
    check_shard_record,
    finalize_pool,
    open_pool_embeddings,
    record_file,
    shard_file,
    shard_plan,
)
from ..utils.progress import progress_bar

PathLike = Union[str, os.PathLike]

__all__ = [
    "embed_pool_sharded", "open_pool_embeddings", "finalize_pool", "PoolEmbeddings", "PoolIncompleteError",
    "PoolIntegrityError", "shard_file",
]


def _array_bytes(x: Any) -> Tuple[str, Tuple[int, ...], bytes]:
    import torch

    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().contiguous()
        return str(x.dtype).replace("torch.", ""), tuple(x.shape), x.reshape(-1).view(torch.uint8).numpy().tobytes()
    a = np.ascontiguousarray(np.asarray(x))
    return a.dtype.str, a.shape, a.tobytes()


def _hash_rows(h, batch: Any) -> None:
    """Feed a batch of input rows (array, tensor or mapping of them, keys sorted) into the hash ``h``."""
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        for k in sorted(batch.keys()):
            if batch[k] is None:
                continue
            h.update(str(k).encode() + b"\0")
            _hash_rows(h, batch[k])
        return
    dt, shape, raw = _array_bytes(batch)
    h.update(f"{dt}{shape[1:]}".encode())
    h.update(raw)


def _source_fingerprint(data: Any, n: int) -> str:
    """sha256 of the pool's shape, dtype and 16 rows spread over it: cheap, identical on every rank.

    The full content of each shard's input rows is hashed separately (the record's ``rows_sha256``)."""
    from ..models.registry import SeedModel as SM  # SM.take indexes arrays, tensors and mappings alike

    h = hashlib.sha256(f"n={n}".encode())
    idx = np.unique(np.linspace(0, n - 1, num=min(n, 16)).round().astype(np.int64))
    _hash_rows(h, SM.take(data, idx))
    return h.hexdigest()


# --------------------------------------------------------------------------- writing


def _embed_shard(model, data, out: Path, m: Dict[str, Any], i: int, batch_size: int,
                 progress: bool) -> Dict[str, Any]:
    from ..models.registry import SeedModel
    from .client import embed

    ns, d = m["num_shards"], m["d"]
    start, stop = m["shards"][i]["start"], m["shards"][i]["stop"]
    final = out / shard_file(i, ns)
    for stale in out.glob(f".{final.name}.*.tmp"):  # a crashed run's half-written shard
        stale.unlink(missing_ok=True)
    tmp = out / f".{final.name}.{socket.gethostname()}-{os.getpid()}.tmp"
    t0 = time.perf_counter()
    rows_h = hashlib.sha256()
    try:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(m["dtype"]), shape=(stop - start, d))
        # client.embed is called batch by batch (eval mode, no grad: the features embed gives), not once: the
        # input rows are hashed, checked and cast per batch and written into the shard's memmap as they come,
        # so a shard never needs a (rows, D) float32 array in memory.
        with progress_bar(stop - start, progress, f"embed shard {i}/{ns} ({model.name})", "sample") as bar:
            for a in range(start, stop, batch_size):
                b = min(stop, a + batch_size)
                raw = SeedModel.take(data, slice(a, b))
                if isinstance(raw, np.ndarray) and not raw.flags.writeable:
                    raw = np.array(raw)  # a read-only memmap slice: torch wants a writable buffer
                _hash_rows(rows_h, raw)
                f = embed(model, raw, batch_size=b - a, progress=False)  # one forward: (b - a, D) float32
                if not np.isfinite(f).all():
                    row = a + int(np.flatnonzero(~np.isfinite(f).all(axis=1))[0])
                    raise ValueError(f"the seed model gave NaN/inf features for pool row {row}")
                with np.errstate(over="ignore"):  # overflow is reported below, with the rows
                    h = f.astype(arr.dtype)
                if not np.isfinite(h).all():
                    raise ValueError(f"features of pool rows {a}:{b} overflow {m['dtype']} (|x| > "
                                     f"{float(np.finfo(arr.dtype).max):g}); store them with dtype='float32'")
                arr[a - start : b - start] = h
                bar.update(b - a)
        arr.flush()
        del arr
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    rec = {"format": FORMAT + ".shard", "version": VERSION, "shard": i, "num_shards": ns, "start": start,
           "stop": stop, "rows": stop - start, "d": d, "dtype": m["dtype"], "file": final.name,
           "sha256": sha256_file(final), "model": m["model"], "source_fingerprint": m["source"]["fingerprint"],
           "rows_sha256": rows_h.hexdigest(), "seconds": time.perf_counter() - t0, "host": socket.gethostname(),
           "finished_unix": time.time()}
    write_json(out / record_file(i, ns), rec)
    return rec


def _agree(fields: Sequence[int], timeout_note: str) -> None:
    """One all_gather of a few int64 fields: every rank must see the same pool, model and plan."""
    import torch
    import torch.distributed as dist

    from ..utils.distributed import comm_device

    t = torch.tensor(list(fields), dtype=torch.int64, device=comm_device())
    got = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    try:
        dist.all_gather(got, t)
    except RuntimeError as exc:
        raise RuntimeError(f"embed-pool: the start-up all_gather failed: another rank died or hangs ({timeout_note}). "
                           f"Cause: {str(exc).splitlines()[0]}") from None
    rows = [g.cpu().tolist() for g in got]
    if any(r != rows[0] for r in rows):
        names = ("N", "D", "source fingerprint", "model weight hash", "num_shards", "dtype")
        diff = [names[j] for j in range(len(names)) if len({r[j] for r in rows}) > 1]
        raise ValueError(f"the ranks disagree on {', '.join(diff)}: every rank must embed the same pool with the "
                         f"same seed model and options")


def embed_pool_sharded(
    seed_model: Any,
    data: Any,
    out_dir: PathLike,
    *,
    num_shards: Optional[int] = None,
    shard: Optional[Union[int, Sequence[int]]] = None,
    batch_size: int = 256,
    dtype: str = "float16",
    progress: bool = True,
    overwrite: bool = False,
    source: Optional[str] = None,
    command: Optional[Sequence[str]] = None,
) -> Dict[str, Any]:
    """Embed a public pool with the seed model into memmap shards under ``out_dir`` (module docstring).

    Args:
        seed_model: a :class:`metamoe.models.SeedModel` (frozen; run in eval mode on its own device).
        data: the pool's raw inputs, N rows: images (N, C, H, W) / (N, H, W) float, token ids (N, L) int, or a
            mapping with ``input_ids`` / ``attention_mask`` (N, L); NumPy (a read-only memmap is fine: each shard
            reads only its rows) or torch. Identical on every rank.
        out_dir: the pool folder (created).
        num_shards: how many shards the pool is cut into. Under a process group: None or the world size.
            Without one: None means the existing manifest's count, else 1.
        shard: without a process group, the shard index (or indices) to embed, e.g. ``[1]`` to redo a crashed
            rank's shard; None: every shard. Not allowed under a process group (rank r embeds shard r).
        batch_size: rows per forward pass.
        dtype: ``"float16"`` (default, half the disk) or ``"float32"`` -- the dtype of the stored embeddings.
        progress: tqdm bar per shard.
        overwrite: re-embed the listed shards even if their record is valid (default: skip them).
        source: a description of the data (e.g. its path), stored in the manifest (not part of the fingerprint).
        command: the ``metamoe embed-pool`` arguments that reproduce this pool, stored so that errors can print the
            command that redoes missing shards (the CLI passes it).

    Returns:
        The manifest (dict) after this call: ``n``, ``d``, ``dtype``, ``num_shards``, ``shards`` (``start``,
        ``stop``, ``file``, ``status``), ``model`` (``name``, ``weight_hash``), ``source``, ``complete``, and
        ``this_call``: {``embedded``: [indices], ``skipped``: [indices]}.

    Raises:
        ValueError / TypeError: bad arguments; ``out_dir`` holds a pool made from another source, model, N, D,
            dtype or number of shards (the message names what differs); NaN/inf features.
        RuntimeError: under a process group, the start-up all_gather failed (a peer died), after at most the
            group's timeout.
    """
    import torch

    from ..models.registry import SeedModel, weight_hash
    from .client import check_batch_size, check_seed_model

    model = check_seed_model(seed_model)
    batch_size = check_batch_size(batch_size)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a path, got {type(out_dir).__name__}")
    n = SeedModel.num_samples(data)
    if n == 0:
        raise ValueError("data is empty (0 rows)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    existing = read_json(out / MANIFEST)
    if existing is not None and existing.get("format") != FORMAT:
        raise ValueError(f"{out / MANIFEST} exists and is not a pool manifest; choose another out_dir")
    dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
    if dist_on:
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if shard is not None:
            raise ValueError("shard= is for redoing shards without a process group; under torch.distributed rank r "
                             "embeds shard r")
        if num_shards is not None and check_int(num_shards, "num_shards", 1) != world:
            raise ValueError(f"num_shards={num_shards} but the process group has {world} ranks (one shard per rank)")
        num_shards = world
        mine = [rank]
    else:
        rank = 0
        if num_shards is None:
            num_shards = existing["num_shards"] if existing is not None else 1
        num_shards = check_int(num_shards, "num_shards", 1)
        if shard is None:
            mine = list(range(num_shards))
        else:
            shards = [shard] if isinstance(shard, numbers.Integral) and not isinstance(shard, bool) else list(shard)
            mine = sorted({check_int(s, "shard", 0) for s in shards})
            if not mine or mine[-1] >= num_shards:
                raise ValueError(f"shard must list indices in [0, {num_shards}), got {shard!r}")
    if num_shards > n:
        raise ValueError(f"num_shards={num_shards} exceeds the pool's {n} rows")
    plan = shard_plan(n, num_shards)
    m = {
        "format": FORMAT, "version": VERSION, "n": n, "d": int(model.feature_dim), "dtype": dtype,
        "num_shards": num_shards,
        "shards": [{"index": i, "start": a, "stop": b, "file": shard_file(i, num_shards), "status": "pending"}
                   for i, (a, b) in enumerate(plan)],
        "model": {"name": model.name, "weight_hash": weight_hash(model)},
        "source": {"fingerprint": _source_fingerprint(data, n), "description": source},
        "command": list(command) if command else None,
        "complete": False,
    }
    if existing is not None:
        diff = [k for k in ("n", "d", "dtype", "num_shards", "model") if existing.get(k) != m[k]]
        if existing.get("source", {}).get("fingerprint") != m["source"]["fingerprint"]:
            diff.append("source fingerprint (the data differ)")
        if diff:
            raise ValueError(f"{out} holds a pool embedded with other settings ({', '.join(diff)} differ): "
                             f"use another out_dir, or delete it to start over")
    if existing is None and rank == 0:
        write_json(out / MANIFEST, m)
    elif existing is not None and command and not existing.get("command") and rank == 0:
        write_json(out / MANIFEST, dict(existing, command=list(command)))
    if dist_on:  # every rank sees the same plan; afterwards the manifest exists, so no rank can finish first
        fp = int(m["source"]["fingerprint"][:15], 16)
        wh = int(m["model"]["weight_hash"][:15], 16)
        _agree([n, m["d"], fp, wh, num_shards, DTYPES.index(dtype)], "collective timeout of init_distributed")
    m = read_json(out / MANIFEST) or m
    embedded, skipped = [], []
    for i in mine:
        if not overwrite and check_shard_record(out, m, i, hash_file=True)[1] is None:
            skipped.append(i)
            continue
        (out / record_file(i, num_shards)).unlink(missing_ok=True)  # not done until the new record lands
        _embed_shard(model, data, out, m, i, batch_size, progress)
        embedded.append(i)
    res = finalize_pool(out)
    res["this_call"] = {"embedded": embedded, "skipped": skipped}
    return res
