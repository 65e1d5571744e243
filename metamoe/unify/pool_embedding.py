"""Sharded embedding of a public pool: one memmap shard per rank, a JSON manifest that ties them together.

    torchrun --nproc_per_node=4 -m metamoe embed-pool --distributed --model timm:vit_small_patch16_224 \\
        --checkpoint seed/ --data pool.npy --out pool_emb/
    metamoe select --private P.npy --public pool_emb/manifest.json --k 500 --out sel.json

Layout of ``out_dir`` (no pickle anywhere: ``.npy`` opened with ``allow_pickle=False`` and JSON):

* ``shard-00001-of-00004.npy``: rows [start, stop) of the pool's embeddings, (rows, D) float16 or float32.
  Written through ``np.lib.format.open_memmap`` under a temporary name and renamed with ``os.replace`` once
  flushed, so a shard that exists under its final name is whole.
* ``shard-00001-of-00004.json``: the shard's record, written atomically after the rename: rows, D, dtype,
  sha256 of the ``.npy`` file, seed model name and weight hash, the fingerprint of the pool source and a
  sha256 of the shard's input rows, seconds. A shard is done when its record is present and agrees with
  the file and the plan; nothing else marks it done.
* ``manifest.json``: N, D, dtype, the shard ranges and files, the seed model, the source fingerprint, the
  status of every shard and the command that made the pool (so an error can print the command that redoes
  a missing shard). Written by rank 0 (or the single process) up front with every shard ``pending``, and
  completed by whichever process finds every record in place after writing its own (no collective needed),
  or by :func:`finalize_pool`.

Under torch.distributed (:func:`metamoe.selection.distributed.init_distributed`) rank r embeds shard r, the
rows of :func:`metamoe.selection.distributed.pool_shard_range` -- the rows that ``metamoe select
--distributed`` gives rank r with the same world size, so each rank later reads exactly one file. The only
collective is one all_gather at the start (every rank must see the same pool, model and plan), under the
process group's timeout: a rank that dies before it makes the others fail with a clear error after at most
the timeout; a rank that dies later costs only its own shard (the others finish theirs), and that shard is
redone alone, without torchrun: ``metamoe embed-pool ... --shards 1`` or ``embed_pool_sharded(...,
shard=[1])``. Shards whose record is valid are skipped on a rerun (resumable), unless ``overwrite=True``.

Reading: :func:`open_pool_embeddings` validates the manifest and the records (missing shards: an error naming
them and the redo command; sha256 mismatch, wrong D or dtype: an error naming the file) and returns a
:class:`PoolEmbeddings`, a lazy read-only (N, D) view over the memmapped shards (never the whole pool in
memory), or with ``rows=(start, stop)`` just those rows (a zero-copy memmap slice when they lie in one shard).
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..selection.validation import check_int, check_row_range
from .package import sha256_file

FORMAT = "metamoe.pool_embeddings"
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = ("float16", "float32")

PathLike = Union[str, os.PathLike]

__all__ = [
    "embed_pool_sharded", "open_pool_embeddings", "finalize_pool", "PoolEmbeddings", "PoolIncompleteError",
    "PoolIntegrityError", "shard_file", "main",
]


class PoolIncompleteError(RuntimeError):
    """Shards of a pool are missing or unfinished; the message names them and the command that redoes them."""


class PoolIntegrityError(ValueError):
    """A shard file does not match its record or the manifest (sha256, shape, dtype, model, source)."""


# --------------------------------------------------------------------------- names, hashes, plan


def shard_file(index: int, num_shards: int) -> str:
    """File name of shard ``index`` of ``num_shards``: ``shard-00001-of-00004.npy``."""
    return f"shard-{index:05d}-of-{num_shards:05d}.npy"


def _record_file(index: int, num_shards: int) -> str:
    return shard_file(index, num_shards)[: -len(".npy")] + ".json"


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


def _plan(n: int, num_shards: int) -> List[Tuple[int, int]]:
    from ..selection.distributed import pool_shard_range

    return [pool_shard_range(n, i, num_shards) for i in range(num_shards)]


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj: Dict[str, Any]) -> None:
    from ..selection.result import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- records and the manifest


def _check_record(out: Path, m: Dict[str, Any], i: int, *,
                  hash_file: bool) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """(record, None) when shard i is done (record present and consistent with the plan and the file), else
    (the record or None, why not). The record is read once, here, and returned for the caller to use."""
    ns = m["num_shards"]
    rec = _read_json(out / _record_file(i, ns))
    f = out / shard_file(i, ns)
    if rec is None:
        return rec, "no record (never finished)"
    start, stop = m["shards"][i]["start"], m["shards"][i]["stop"]
    want = {"shard": i, "num_shards": ns, "start": start, "stop": stop, "rows": stop - start, "d": m["d"],
            "dtype": m["dtype"], "model": m["model"], "source_fingerprint": m["source"]["fingerprint"]}
    bad = [k for k, v in want.items() if rec.get(k) != v]
    if bad:
        return rec, f"its record disagrees with the manifest on {', '.join(bad)}"
    if not f.is_file():
        return rec, f"{f.name} is missing"
    if hash_file and sha256_file(f) != rec.get("sha256"):
        return rec, f"sha256 of {f.name} differs from its record"
    return rec, None


def _redo_hint(out: Path, m: Dict[str, Any], missing: Sequence[int]) -> str:
    cmd = m.get("command")
    listed = ",".join(str(i) for i in missing)
    if cmd:
        return shlex.join(["metamoe", "embed-pool", *cmd, "--shards", listed])
    return (f"embed_pool_sharded(seed_model, data, {str(out)!r}, num_shards={m['num_shards']}, "
            f"shard=[{', '.join(str(i) for i in missing)}])  (same seed model and data)")


def finalize_pool(out_dir: PathLike, *, hash_files: bool = False) -> Dict[str, Any]:
    """Mark the manifest complete if every shard's record is in place; returns the manifest (dict).

    Called by :func:`embed_pool_sharded` after each shard; safe to call from several processes at once (the
    manifest is written atomically and its content depends only on the records). The records are the truth:
    :func:`open_pool_embeddings` checks them, not the manifest's ``status``, so a summary left stale by two
    ranks finishing at the same instant (one writes "pending" after the other wrote "complete"; each
    re-checks once after writing to make that unlikely) never hides or invents a shard. ``hash_files`` re-hashes
    every shard file (O(pool) reads); by default the records are trusted here and the files are hashed when
    opened. Shards that are not done stay ``pending``; the manifest's ``complete`` is False then.
    """
    out = Path(out_dir)
    for _ in range(2):  # a second look after writing: a peer's record may have landed meanwhile
        new = _finalize_once(out, hash_files)
        if new["complete"]:
            break
    return new


def _finalize_once(out: Path, hash_files: bool) -> Dict[str, Any]:
    m = _read_json(out / MANIFEST)
    if m is None or m.get("format") != FORMAT:
        raise FileNotFoundError(f"{out / MANIFEST}: no pool manifest (made by embed_pool_sharded / metamoe embed-pool)")
    done = True
    shards = []
    for i, s in enumerate(m["shards"]):
        s = dict(s)
        rec, prob = _check_record(out, m, i, hash_file=hash_files)
        if prob is None:
            s.update(status="done", sha256=rec["sha256"], rows_sha256=rec["rows_sha256"], seconds=rec["seconds"])
        else:
            s.update(status="pending")
            for k in ("sha256", "rows_sha256", "seconds"):
                s.pop(k, None)
            done = False
        shards.append(s)
    new = dict(m, shards=shards, complete=done)
    if new != m:
        _write_json(out / MANIFEST, new)
    return new


# --------------------------------------------------------------------------- writing


def _embed_shard(model, data, out: Path, m: Dict[str, Any], i: int, batch_size: int,
                 progress: bool) -> Dict[str, Any]:
    from .client import _progress, embed
    from ..models.registry import SeedModel

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
        with _progress(stop - start, progress, f"embed shard {i}/{ns} ({model.name})", "sample") as bar:
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
    _write_json(out / _record_file(i, ns), rec)
    return rec


def _agree(fields: Sequence[int], timeout_note: str) -> None:
    """One all_gather of a few int64 fields: every rank must see the same pool, model and plan."""
    import torch
    import torch.distributed as dist

    from ..selection.distributed import _comm_device

    t = torch.tensor(list(fields), dtype=torch.int64, device=_comm_device())
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

    from .client import _check_batch_size, _check_seed_model
    from ..models.registry import SeedModel, weight_hash

    model = _check_seed_model(seed_model)
    batch_size = _check_batch_size(batch_size)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a path, got {type(out_dir).__name__}")
    n = SeedModel.num_samples(data)
    if n == 0:
        raise ValueError("data is empty (0 rows)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    existing = _read_json(out / MANIFEST)
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
    plan = _plan(n, num_shards)
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
        _write_json(out / MANIFEST, m)
    elif existing is not None and command and not existing.get("command") and rank == 0:
        _write_json(out / MANIFEST, dict(existing, command=list(command)))
    if dist_on:  # every rank sees the same plan; afterwards the manifest exists, so no rank can finish first
        fp = int(m["source"]["fingerprint"][:15], 16)
        wh = int(m["model"]["weight_hash"][:15], 16)
        _agree([n, m["d"], fp, wh, num_shards, DTYPES.index(dtype)], "collective timeout of init_distributed")
    m = _read_json(out / MANIFEST) or m
    embedded, skipped = [], []
    for i in mine:
        if not overwrite and _check_record(out, m, i, hash_file=True)[1] is None:
            skipped.append(i)
            continue
        (out / _record_file(i, num_shards)).unlink(missing_ok=True)  # not done until the new record lands
        _embed_shard(model, data, out, m, i, batch_size, progress)
        embedded.append(i)
    res = finalize_pool(out)
    res["this_call"] = {"embedded": embedded, "skipped": skipped}
    return res


# --------------------------------------------------------------------------- reading


class PoolEmbeddings:
    """Read-only (N, D) view of a sharded pool: rows are read from the memmapped shard files on demand.

    Attributes: ``shape`` (N, D), ``dtype`` (NumPy float16/float32), ``manifest`` (dict), ``path`` (folder),
    ``shard_ranges`` (list of (start, stop)). ``pool[i]`` -> (D,) row; ``pool[a:b]`` -> (b-a, D) (a memmap slice
    when it lies in one shard, else a copy of just those rows); ``pool[idx]`` (int array / list / tensor) ->
    (len(idx), D) copy in the order of ``idx``; :meth:`rows` for explicit ranges; :meth:`to_array` for one array.
    Never loads the whole pool unless asked to (:meth:`to_array`).
    """

    is_pool_embeddings = True  # what metamoe.selection.relevance looks for to read a pool row by row

    def __init__(self, path: Path, manifest: Dict[str, Any], arrays: List[np.ndarray]):
        self.path = path
        self.manifest = manifest
        self._arrays = arrays
        self.shard_ranges = [(s["start"], s["stop"]) for s in manifest["shards"]]
        self._starts = np.asarray([a for a, _ in self.shard_ranges], dtype=np.int64)
        self.shape = (int(manifest["n"]), int(manifest["d"]))
        self.dtype = np.dtype(manifest["dtype"])
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.dtype.itemsize

    def __repr__(self) -> str:
        return (f"PoolEmbeddings(shape={self.shape}, dtype={self.dtype.name}, shards={len(self._arrays)}, "
                f"path={str(self.path)!r})")

    def __array__(self, *a, **k):
        raise TypeError("PoolEmbeddings is a lazy view over shard files: use .rows(start, stop), indexing, or "
                        ".to_array() to build one array explicitly")

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as (stop - start, D): a zero-copy read-only memmap slice when they lie in one shard,
        else a copy of those rows only (read from each shard's memmap)."""
        n = self.shape[0]
        if not (0 <= start <= stop <= n):
            raise ValueError(f"rows must satisfy 0 <= start <= stop <= {n}, got ({start}, {stop})")
        parts = []
        for arr, (a, b) in zip(self._arrays, self.shard_ranges):
            lo, hi = max(a, start), min(b, stop)
            if lo < hi:
                parts.append(arr[lo - a : hi - a])
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return np.empty((0, self.shape[1]), dtype=self.dtype)
        return np.concatenate(parts)

    def _take(self, idx: np.ndarray) -> np.ndarray:
        n = self.shape[0]
        idx = np.asarray(idx)
        if idx.dtype.kind == "b":
            if idx.shape != (n,):
                raise IndexError(f"a boolean mask must have shape ({n},), got {idx.shape}")
            idx = np.nonzero(idx)[0]
        if idx.dtype.kind not in "iu" or idx.ndim != 1:
            raise IndexError(f"index arrays must be 1-D integers, got dtype {idx.dtype}, shape {idx.shape}")
        idx = idx.astype(np.int64)
        idx = np.where(idx < 0, idx + n, idx)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"row index out of range for a pool of {n} rows")
        out = np.empty((idx.size, self.shape[1]), dtype=self.dtype)
        which = np.searchsorted(self._starts, idx, side="right") - 1
        for s in np.unique(which):
            sel = np.nonzero(which == s)[0]
            out[sel] = self._arrays[s][idx[sel] - self._starts[s]]
        return out

    def __getitem__(self, key):
        if isinstance(key, tuple):
            if len(key) != 2:
                raise IndexError(f"a pool is 2-D, got {len(key)} indices")
            return self[key[0]][..., key[1]] if not isinstance(key[0], numbers.Integral) else self[key[0]][key[1]]
        if isinstance(key, numbers.Integral) and not isinstance(key, bool):
            i = int(key) + (self.shape[0] if key < 0 else 0)
            if not 0 <= i < self.shape[0]:
                raise IndexError(f"row {key} out of range for a pool of {self.shape[0]} rows")
            return self._take(np.asarray([i]))[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step == 1:
                return self.rows(start, max(start, stop))
            return self._take(np.arange(start, stop, step))
        if hasattr(key, "detach"):  # torch tensor
            key = key.detach().cpu().numpy()
        return self._take(np.asarray(key))

    def to_array(self, out: Optional[PathLike] = None) -> np.ndarray:
        """The whole pool as one (N, D) array: the shard's memmap itself for a one-shard pool (no copy); otherwise
        a copy, in memory (N x D x itemsize bytes) or, with ``out``, streamed shard by shard into a new ``.npy``
        at that path (bounded memory), returned as a read-only memmap."""
        if len(self._arrays) == 1 and out is None:
            return self._arrays[0]
        if out is None:
            return np.concatenate(self._arrays)
        dst = np.lib.format.open_memmap(out, mode="w+", dtype=self.dtype, shape=self.shape)
        for arr, (a, b) in zip(self._arrays, self.shard_ranges):
            for c in range(a, b, 65536):
                dst[c : min(b, c + 65536)] = arr[c - a : min(b, c + 65536) - a]
        dst.flush()
        del dst
        return np.load(out, mmap_mode="r", allow_pickle=False)


def _manifest_path(path: PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a pool folder or its manifest.json, got {type(path).__name__}")
    p = Path(path)
    p = p / MANIFEST if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"no pool manifest at {p} (expected a folder written by `metamoe embed-pool` or its "
                                f"{MANIFEST})")
    return p


def open_pool_embeddings(
    path: PathLike, rows: Optional[Tuple[int, int]] = None, *, verify: bool = True
) -> Union[PoolEmbeddings, np.ndarray]:
    """Open a pool written by :func:`embed_pool_sharded` / ``metamoe embed-pool``.

    Args:
        path: the pool folder or its ``manifest.json``.
        rows: None for the whole pool as a lazy :class:`PoolEmbeddings` view (N, D); ``(start, stop)`` for just
            those rows as a NumPy array (stop - start, D) -- a zero-copy read-only memmap slice when the range lies
            in one shard file, else a copy of those rows.
        verify: re-hash (sha256) the shard files that back the result (only the shards overlapping ``rows``) and
            compare with their records; False checks names, shapes and dtypes only.

    Returns:
        :class:`PoolEmbeddings` or a NumPy array, dtype the pool's (float16 or float32).

    Raises:
        PoolIncompleteError: shards missing or unfinished; the message names them and the exact command (or call)
            that redoes them.
        PoolIntegrityError: a shard file's sha256 differs from its record, or its shape/dtype from the manifest.
        FileNotFoundError: no manifest at ``path``. ValueError: not a pool manifest, bad ``rows``.
    """
    mp = _manifest_path(path)
    out = mp.parent
    m = _read_json(mp)
    if m is None or m.get("format") != FORMAT:
        raise ValueError(f"{mp} is not a pool manifest (format {FORMAT!r})")
    if m.get("version") != VERSION:
        raise ValueError(f"{mp}: pool manifest version {m.get('version')!r}, this metamoe reads version {VERSION}")
    n, d, ns = int(m["n"]), int(m["d"]), int(m["num_shards"])
    if m.get("dtype") not in DTYPES:
        raise PoolIntegrityError(f"{mp}: dtype {m.get('dtype')!r} is not one of {', '.join(DTYPES)}")
    if rows is not None:
        start, stop = check_row_range(rows, n, "rows")
    need = [i for i, s in enumerate(m["shards"]) if rows is None or (s["start"] < stop and s["stop"] > start)]
    records, problems = zip(*(_check_record(out, m, i, hash_file=False) for i in range(ns)))
    missing = [i for i in range(ns) if problems[i] is not None]
    missing_needed = [i for i in need if problems[i] is not None]
    if missing_needed:
        lines = "; ".join(f"shard {i} ({m['shards'][i]['file']}, rows {m['shards'][i]['start']}:"
                          f"{m['shards'][i]['stop']}): {problems[i]}" for i in missing_needed)
        raise PoolIncompleteError(
            f"pool {out} is incomplete: {len(missing)} of {ns} shards not done -- {lines}. Redo "
            f"{'it' if len(missing) == 1 else 'them'} with: {_redo_hint(out, m, missing)}"
        )
    arrays: List[np.ndarray] = []
    for i in range(ns):
        s = m["shards"][i]
        f = out / shard_file(i, ns)
        if i not in need:
            arrays.append(None)  # type: ignore[arg-type]
            continue
        if verify and sha256_file(f) != records[i]["sha256"]:
            raise PoolIntegrityError(f"{f}: sha256 differs from its record (the file was changed or corrupted after "
                                     f"it was written); redo it with: {_redo_hint(out, m, [i])} --overwrite"
                                     if m.get("command") else
                                     f"{f}: sha256 differs from its record (the file was changed or corrupted); "
                                     f"redo it with embed_pool_sharded(..., shard=[{i}], overwrite=True)")
        try:
            a = np.load(f, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise PoolIntegrityError(f"{f}: not a readable .npy shard ({exc})") from None
        if a.shape != (s["stop"] - s["start"], d) or a.dtype != np.dtype(m["dtype"]):
            raise PoolIntegrityError(f"{f}: shape {a.shape} dtype {a.dtype}, the manifest says "
                                     f"({s['stop'] - s['start']}, {d}) {m['dtype']}")
        arrays.append(a)
    view = PoolEmbeddings(out, m, arrays)
    if rows is None:
        return view
    return view.rows(start, stop)


# --------------------------------------------------------------------------- `metamoe embed-pool`

CONFIG_HELP = """\
pool.yaml keys (flags override them):
  seed_model: {name, checkpoint | config + seed, num_classes, task}   as in client.yaml (metamoe train-expert --help)
  data: DATA                 the public pool's raw inputs (labels are not needed)
  output: PATH               the pool folder to write (--out)
  batch_size: 256            rows per forward pass
  dtype: float16             float16 | float32, the stored embeddings
  num_shards: N              single-process runs only: how many shards (default: the existing manifest's, else 1)

A plain .npy DATA path is opened as a read-only memmap, so each rank reads only its own rows; other DATA kinds
(.npz, image folders, datasets save_to_disk folders) are loaded whole by metamoe.unify.cli.load_data on every rank.

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
    p.add_argument("--overwrite", action="store_true", help="re-embed shards whose record is valid (default: skip them)")
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
    from . import cli as ucli

    cfg: Dict[str, Any] = ucli.load_config(a.config) if a.config else {}
    base = cfg.get("_base")
    ucli._check_keys(cfg, ("seed_model", "data", "output", "batch_size", "dtype", "num_shards"), "pool.yaml")
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
            raise ucli.ConfigError(f"--model-config must be a JSON object: {exc}") from None
        if not isinstance(conf, dict):
            raise ucli.ConfigError("--model-config must be a JSON object of architecture fields")
        sm["config"] = conf
    if "name" not in sm:
        raise ucli.ConfigError("give the seed model: --model timm:<arch> | hf:<model_type> "
                               "(or seed_model.name in --config)")
    model = ucli._seed_model({"seed_model": sm}, base)
    spec = cfg.get("data") if a.data is None else {"path": os.path.abspath(a.data)}
    if spec is None:
        raise ucli.ConfigError("give the pool's data: --data PATH (or data: in --config)")
    if isinstance(spec, (str, os.PathLike)):
        spec = {"path": spec}
    if a.x_key is not None:
        spec = dict(spec, x_key=a.x_key)
    path = ucli._resolve(base, spec.get("path"), "data.path")
    if path.suffix == ".npy" and set(spec) <= {"path", "labels"}:
        if not path.is_file():
            raise FileNotFoundError(f"data.path not found: {path}")
        data = np.load(path, mmap_mode="r", allow_pickle=False)  # each rank reads only its rows
        if data.ndim < 2 or data.dtype.kind not in "fiu":
            raise ucli.ConfigError(f"{path}: expected (n, ...) float images or integer token ids, got shape "
                                   f"{data.shape} dtype {data.dtype}")
    else:
        data, _, _ = ucli.load_data(spec, base, "data")
    out = a.out if a.out is not None else cfg.get("output")
    if out is None:
        raise ucli.ConfigError("give the pool folder: --out DIR (or output: in --config)")
    a.out_resolved = str(ucli._resolve(base if a.out is None else None, out, "output"))
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
            from ..selection.distributed import init_distributed

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
            ex = _read_json(Path(a.out_resolved) / MANIFEST)
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
            from ..selection.distributed import cli_finish

            cli_finish(failed=failed)
    done = sum(s["status"] == "done" for s in res["shards"])
    tc = res["this_call"]
    print(f"embed-pool{rank_note}: embedded shards {tc['embedded'] or '-'}, "
          f"skipped (already done) {tc['skipped'] or '-'}; pool {res['n']} x {res['d']} {res['dtype']}, "
          f"{done}/{res['num_shards']} shards done"
          f"{'' if res['complete'] else ' (incomplete)'}; manifest {Path(a.out_resolved) / MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
