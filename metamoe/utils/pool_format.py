"""The pool embedding format: memmap shards of a public pool's embeddings tied by a JSON manifest.

Written by :func:`metamoe.unify.embed_pool_sharded` (``metamoe embed-pool``); read here, by the selection
(``metamoe select --public pool/manifest.json``) and by anything else that needs the pool's rows.

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

Reading: :func:`open_pool_embeddings` validates the manifest and the records (missing shards: an error naming
them and the redo command; sha256 mismatch, wrong D or dtype: an error naming the file) and returns a
:class:`PoolEmbeddings`, a lazy read-only (N, D) view over the memmapped shards (never the whole pool in
memory), or with ``rows=(start, stop)`` just those rows (a zero-copy memmap slice when they lie in one shard).
"""

from __future__ import annotations

import numbers
import os
import shlex
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .checks import check_row_range
from .distributed import pool_shard_range
from .files import read_json, sha256_file, write_json

PathLike = Union[str, os.PathLike]

FORMAT = "metamoe.pool_embeddings"
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = ("float16", "float32")


class PoolIncompleteError(RuntimeError):
    """Shards of a pool are missing or unfinished; the message names them and the command that redoes them."""


class PoolIntegrityError(ValueError):
    """A shard file does not match its record or the manifest (sha256, shape, dtype, model, source)."""


# --------------------------------------------------------------------------- names, hashes, plan


def shard_file(index: int, num_shards: int) -> str:
    """File name of shard ``index`` of ``num_shards``: ``shard-00001-of-00004.npy``."""
    return f"shard-{index:05d}-of-{num_shards:05d}.npy"


def record_file(index: int, num_shards: int) -> str:
    """File name of shard ``index``'s record: ``shard-00001-of-00004.json``."""
    return shard_file(index, num_shards)[: -len(".npy")] + ".json"



def shard_plan(n: int, num_shards: int) -> List[Tuple[int, int]]:
    """[start, stop) of every shard of an n-row pool cut into ``num_shards`` (:func:`pool_shard_range`)."""
    return [pool_shard_range(n, i, num_shards) for i in range(num_shards)]


# --------------------------------------------------------------------------- records and the manifest


def check_shard_record(out: Path, m: Dict[str, Any], i: int, *,
                  hash_file: bool) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """(record, None) when shard i is done (record present and consistent with the plan and the file), else
    (the record or None, why not). The record is read once, here, and returned for the caller to use."""
    ns = m["num_shards"]
    rec = read_json(out / record_file(i, ns))
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


def redo_command(out: Path, m: Dict[str, Any], missing: Sequence[int]) -> str:
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
    m = read_json(out / MANIFEST)
    if m is None or m.get("format") != FORMAT:
        raise FileNotFoundError(f"{out / MANIFEST}: no pool manifest (made by embed_pool_sharded / metamoe embed-pool)")
    done = True
    shards = []
    for i, s in enumerate(m["shards"]):
        s = dict(s)
        rec, prob = check_shard_record(out, m, i, hash_file=hash_files)
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
        write_json(out / MANIFEST, new)
    return new



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


def manifest_path(path: PathLike) -> Path:
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
    mp = manifest_path(path)
    out = mp.parent
    m = read_json(mp)
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
    records, problems = zip(*(check_shard_record(out, m, i, hash_file=False) for i in range(ns)))
    missing = [i for i in range(ns) if problems[i] is not None]
    missing_needed = [i for i in need if problems[i] is not None]
    if missing_needed:
        lines = "; ".join(f"shard {i} ({m['shards'][i]['file']}, rows {m['shards'][i]['start']}:"
                          f"{m['shards'][i]['stop']}): {problems[i]}" for i in missing_needed)
        raise PoolIncompleteError(
            f"pool {out} is incomplete: {len(missing)} of {ns} shards not done -- {lines}. Redo "
            f"{'it' if len(missing) == 1 else 'them'} with: {redo_command(out, m, missing)}"
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
                                     f"it was written); redo it with: {redo_command(out, m, [i])} --overwrite"
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
