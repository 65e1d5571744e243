"""k-nearest-neighbour similarity graphs in CSR form, for facility location at million-sample scale.

``build_knn_graph(X, K)`` returns a :class:`KnnGraph`: for every query row (the pool itself, or a
separate query set such as a client's private embeddings) its ``K`` most similar pool rows and their
similarities, as CSR arrays. Where it runs:

* CPU: faiss. Exact ``IndexFlatIP`` / ``IndexFlatL2`` when the pool is small; an inverted-file index
  (``IndexIVFFlat``, ``nlist ~ 4 sqrt(N)`` lists) when it is large, with recall@K measured on a sample
  of queries against exact search and stored in ``graph.info["recall"]``.
* GPU: faiss-gpu when it is importable, otherwise exact blocked matmul + ``torch.topk`` in torch
  (row blocks of queries against column blocks of the pool, bounded memory).

Inputs are NumPy arrays, ``np.memmap`` (read block by block), torch tensors on CPU or GPU, in
float32/float16/bfloat16/float64; every block is cast to float32 on its way in.

Pools larger than memory (e.g. a float16 memmap of 10M x 768): exact CPU search never holds more than
``max_index_bytes`` of float32 pool rows (slices searched with ``faiss.knn``, per-slice top-K merged);
an IVF index holds every pool row by nature, so ``storage="float16"`` / ``"int8"`` (scalar-quantised
lists) halve / quarter that against float32's N x D x 4 bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np

from ..backends.tensors import as_torch, is_torch
from ..utils.checks import check_int
from .knn_faiss import (
    block_f32,
    block_np,
    default_nlist,
    exact_faiss_sliced,
    faiss_gpu_reason,
    faiss_index,
    faiss_reason,
    faiss_search,
)
from .validation import block_rows as _rows_for_bytes
from .validation import check_embeddings, first_zero_row

METRICS = ("cosine", "ip", "l2")
KNN_METHODS = ("auto", "exact", "ivf", "torch", "faiss-gpu")

# "auto" on the CPU switches from exact to IVF when queries x pool rows exceed this (about 1e5 x 1e5:
# exact is then ~1e10 * D FLOP, minutes on 2 cores at D = 768, hours at 1e6).
AUTO_IVF_MIN_PAIRS = 10**10
# Exact search on the CPU: a faiss Flat index holds a float32 copy of what it searches (and, while it
# grows, up to twice that). Up to this many bytes (256 MiB: 87k rows at D = 768) the pool goes into one
# index; a larger pool (e.g. a memmap larger than memory) is searched one slice of that size at a time
# (faiss.knn on the slice) and the per-slice top-K are merged, so memory stays O(slice x D + Nq x K)
# whatever N is.
EXACT_INDEX_BYTES = 1 << 28
# IVF storage: the inverted lists hold every pool row. "float32" (IndexIVFFlat) takes N x D x 4 bytes
# (29 GiB for 10M x 768); "float16" / "int8" (IndexIVFScalarQuantizer) a half / a quarter of that, at a
# small cost in recall (measured in info["recall"]).
IVF_STORAGE = ("float32", "float16", "int8")
# IVF coarse quantizer: "flat" compares every query with all nlist centroids (nlist x D per query, which
# rivals the scanned lists once nlist reaches thousands); "hnsw" finds the nprobe nearest centroids through
# an HNSW graph over the centroids (faiss's "IVF<nlist>_HNSW32" for pools of tens of millions of rows).
IVF_QUANTIZERS = ("auto", "flat", "hnsw")
AUTO_HNSW_MIN_NLIST = 4096
_FORMAT = "metamoe.knn_graph/1"


def fingerprint(t) -> Dict[str, Any]:
    """N, D and a SHA-256 of up to 64 evenly spaced rows (cast to float32), for "is this the same data?".

    Cheap (it never reads the whole pool), so a change confined to rows it does not sample goes unnoticed.
    """
    n, d = int(t.shape[0]), int(t.shape[1])
    rows = np.unique(np.linspace(0, n - 1, num=min(n, 64)).round().astype(np.int64))
    block = t[_torch_index(rows, t)]
    block = block.detach().to("cpu").float().numpy() if is_torch(block) else np.asarray(block, dtype=np.float32)
    h = hashlib.sha256()
    h.update(np.asarray([n, d], dtype=np.int64).tobytes())
    h.update(rows.tobytes())
    h.update(np.ascontiguousarray(block, dtype=np.float32).tobytes())
    return {"n": n, "d": d, "sha256": h.hexdigest()[:32]}


def _torch_index(rows: np.ndarray, t):
    if is_torch(t):
        import torch

        return torch.as_tensor(rows, device=t.device)
    return rows


@dataclass
class KnnGraph:
    """A k-NN similarity graph in CSR form: row q lists pool rows and their similarities.

    Attributes:
        indptr: int64 (Nq + 1,), row q's entries are ``indptr[q]:indptr[q + 1]``.
        indices: int32 (or int64 when the pool has >= 2^31 rows) (nnz,), pool row of each entry.
        similarities: float32 (nnz,), similarity of each entry (cosine, inner product, or the negated
            squared Euclidean distance for ``metric="l2"``), each row sorted by decreasing similarity.
        n_points: number of pool rows N (the columns).
        metric: ``"cosine"``, ``"ip"`` or ``"l2"``.
        n_neighbors: K requested.
        self_included: for the pool's own graph, whether each row lists the point itself.
        pool_fingerprint / query_fingerprint: ``{"n", "d", "sha256"}`` of the data the graph was built
            from (query_fingerprint is None for the pool's own graph).
        info: method, seconds, and for IVF ``nlist``, ``nprobe`` and the measured ``recall``.
    """

    indptr: np.ndarray
    indices: np.ndarray
    similarities: np.ndarray
    n_points: int
    metric: str
    n_neighbors: int
    self_included: bool
    pool_fingerprint: Dict[str, Any]
    query_fingerprint: Optional[Dict[str, Any]] = None
    info: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.indptr = np.ascontiguousarray(self.indptr, dtype=np.int64)
        self.indices = np.ascontiguousarray(self.indices)
        if self.indices.dtype not in (np.int32, np.int64):
            raise TypeError(f"indices must be int32 or int64, got {self.indices.dtype}")
        self.similarities = np.ascontiguousarray(self.similarities, dtype=np.float32)
        if self.indptr.ndim != 1 or self.indptr.shape[0] < 2 or self.indptr[0] != 0:
            raise ValueError("indptr must be 1-D with Nq + 1 >= 2 entries, starting at 0")
        if np.any(np.diff(self.indptr) < 0):
            raise ValueError("indptr must be non-decreasing")
        nnz = int(self.indptr[-1])
        if self.indices.shape != (nnz,) or self.similarities.shape != (nnz,):
            raise ValueError(
                f"indices {self.indices.shape} and similarities {self.similarities.shape} must have shape ({nnz},)"
            )
        if nnz and (int(self.indices.min()) < 0 or int(self.indices.max()) >= self.n_points):
            raise ValueError(f"indices must lie in [0, n_points={self.n_points})")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")

    @property
    def n_queries(self) -> int:
        return int(self.indptr.shape[0] - 1)

    @property
    def shape(self):
        """(Nq, N): queries x pool rows."""
        return (self.n_queries, int(self.n_points))

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def __repr__(self) -> str:
        return (
            f"KnnGraph(shape={self.shape}, n_neighbors={self.n_neighbors}, metric={self.metric!r}, "
            f"nnz={self.nnz}, method={self.info.get('method')!r}, recall={self.info.get('recall')})"
        )

    def check_matches(self, X: Any, queries: Any = None, *, name: str = "graph") -> None:
        """Raise ValueError unless this graph was built from ``X`` (and ``queries``; None = the pool's own graph)."""
        fp = fingerprint(X if isinstance(X, np.ndarray) else as_torch(X))  # NumPy/memmap: no copy
        if fp != self.pool_fingerprint:
            raise ValueError(
                f"{name} was built for other data: pool fingerprint {self.pool_fingerprint} "
                f"!= X's {fp} (N, D or the rows differ); rebuild it with build_knn_graph(X, ...)"
            )
        if queries is None:
            if self.query_fingerprint is not None:
                raise ValueError(
                    f"{name} was built for separate queries ({self.query_fingerprint['n']} rows), "
                    f"but it is used as the pool's own graph (queries/ground=None)"
                )
            return
        qfp = fingerprint(queries if isinstance(queries, np.ndarray) else as_torch(queries))
        if self.query_fingerprint is None:
            raise ValueError(
                f"{name} is the pool's own kNN graph, but separate queries/ground ({qfp['n']} rows) were given; "
                f"build it with build_knn_graph(X, K, queries=ground)"
            )
        if qfp != self.query_fingerprint:
            raise ValueError(
                f"{name} was built for other queries: fingerprint {self.query_fingerprint} != {qfp}; "
                f"rebuild it with build_knn_graph(X, K, queries=...)"
            )

    # ------------------------------------------------------------------ persistence (.npz, no pickle)

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the graph to ``path`` (.npz; arrays plus a JSON header, loadable without pickle)."""
        meta = {
            "format": _FORMAT,
            "n_points": int(self.n_points),
            "metric": self.metric,
            "n_neighbors": int(self.n_neighbors),
            "self_included": bool(self.self_included),
            "pool_fingerprint": self.pool_fingerprint,
            "query_fingerprint": self.query_fingerprint,
            "info": self.info,
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, indptr=self.indptr, indices=self.indices, similarities=self.similarities,
                 meta=np.array(json.dumps(meta)))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "KnnGraph":
        """Read a graph written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("indptr", "indices", "similarities", "meta") if k not in z.files]
            if missing:
                raise ValueError(f"{path} is not a metamoe kNN graph (missing {', '.join(missing)})")
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != _FORMAT:
                raise ValueError(f"{path}: unknown graph format {meta.get('format')!r}, expected {_FORMAT!r}")
            return cls(
                indptr=z["indptr"], indices=z["indices"], similarities=z["similarities"],
                n_points=meta["n_points"], metric=meta["metric"], n_neighbors=meta["n_neighbors"],
                self_included=meta["self_included"], pool_fingerprint=meta["pool_fingerprint"],
                query_fingerprint=meta["query_fingerprint"], info=meta["info"],
            )


# ---------------------------------------------------------------------------------------------------


def _exact_torch(Q, P, K: int, metric: str, *, q_block: int = 2048, p_block: int = 32768, progress: bool = False):
    """Exact top-K of each query among the pool: blocked matmul + torch.topk, float32, bounded memory.

    Q, P: torch tensors (Nq, D), (N, D) on the same device, any float dtype (cast per block).
    Returns (sims float32 (Nq, K), idx int64 (Nq, K)) on that device, each row sorted by decreasing
    similarity, equal similarities by increasing index (ties at the K-th place: whichever topk keeps).
    Peak extra memory: about q_block x p_block floats (256 MiB at the defaults).
    """
    import torch
    from tqdm.auto import tqdm

    nq, n = Q.shape[0], P.shape[0]
    norm = metric == "cosine"
    dev = Q.device
    out_s = torch.empty(nq, K, dtype=torch.float32, device=dev)
    out_i = torch.empty(nq, K, dtype=torch.int64, device=dev)
    for qs in tqdm(range(0, nq, q_block), desc="knn (exact, torch)", disable=None if progress else True, leave=False):
        qe = min(nq, qs + q_block)
        qb = block_f32(Q, qs, qe, norm)
        best_s = torch.empty((qe - qs, 0), dtype=torch.float32, device=dev)
        best_i = torch.empty((qe - qs, 0), dtype=torch.int64, device=dev)
        for ps in range(0, n, p_block):
            pe = min(n, ps + p_block)
            pb = block_f32(P, ps, pe, norm)
            s = qb @ pb.T
            if metric == "l2":  # -||q - p||^2 = 2 q.p - |q|^2 - |p|^2
                s = 2 * s - (qb * qb).sum(1, keepdim=True) - (pb * pb).sum(1)[None, :]
            bs, bi = torch.topk(s, min(K, pe - ps), dim=1)
            cand_s = torch.cat([best_s, bs], dim=1)
            cand_i = torch.cat([best_i, bi + ps], dim=1)
            # order by (similarity desc, index asc): sort by index, then a stable sort by similarity
            o = torch.argsort(cand_i, dim=1)
            cand_s, cand_i = torch.gather(cand_s, 1, o), torch.gather(cand_i, 1, o)
            o = torch.sort(cand_s, dim=1, descending=True, stable=True).indices[:, :K]
            best_s, best_i = torch.gather(cand_s, 1, o), torch.gather(cand_i, 1, o)
            del s
        out_s[qs:qe] = best_s
        out_i[qs:qe] = best_i
    return out_s, out_i


def build_knn_graph(
    X: Any,
    n_neighbors: int,
    *,
    queries: Any = None,
    metric: str = "cosine",
    method: str = "auto",
    include_self: bool = True,
    nlist: Optional[int] = None,
    nprobe: Optional[int] = None,
    recall_sample: int = 1000,
    block_rows: Optional[int] = None,
    seed: int = 0,
    progress: bool = True,
    check_input: bool = True,
    storage: str = "float32",
    quantizer: str = "auto",
    max_index_bytes: Optional[int] = None,
) -> KnnGraph:
    """The ``n_neighbors`` most similar pool rows of every query row, as a CSR :class:`KnnGraph`.

    Args:
        X: (N, D) pool embeddings; NumPy array, ``np.memmap`` (read in blocks of ``block_rows``), torch
            tensor on CPU or GPU, or CuPy array; float32, float16, bfloat16 or float64 (cast to float32
            block by block). Rows must be finite (and non-zero for ``metric="cosine"``).
        n_neighbors: K, 1 <= K < N.
        queries: (Nq, D) query rows (e.g. a client's private embeddings), same formats; None means the
            pool's own graph (queries = X).
        metric: ``"cosine"`` (default; rows L2-normalised, similarity in [-1, 1]), ``"ip"`` (inner
            product) or ``"l2"`` (similarity = minus the squared Euclidean distance).
        method: ``"auto"`` (CPU: exact faiss Flat when Nq * N <= 1e10 — the exact torch search where
            faiss is not installed — else IVF; GPU: faiss-gpu when importable, else ``"torch"``), ``"exact"``
            (faiss Flat on CPU data, torch on GPU data), ``"ivf"`` (faiss IndexIVFFlat, approximate; CPU),
            ``"torch"`` (exact blocked matmul + topk on the data's device) or ``"faiss-gpu"``.
        include_self: for the pool's own graph (queries=None): True (default) lists every point among
            its own neighbours (similarity 1 under cosine: the natural graph for facility location with
            ground set = pool, since a picked point covers itself); if the search misses it (more than
            K exact duplicates, or IVF), it replaces the last neighbour. False drops the point itself
            and returns K other points. Ignored when ``queries`` is given.
        nlist, nprobe: IVF lists (default ``4 sqrt(N)``) and lists probed per query (default
            ``max(16, nlist // 32)``, capped at nlist).
        recall_sample: for IVF, how many random queries are also searched exactly to measure
            recall@K (``info["recall"]``); 0 skips it.
        block_rows: rows per block when reading X/queries (memory bound for memmaps and GPU search);
            None: about 16 MiB of float32 per block (5,461 rows at D = 768).
        seed: seeds the IVF training sample and the recall sample.
        progress: tqdm progress bars (only on a terminal).
        check_input: scan X and queries for NaN/inf (default). Callers that have already validated
            them (``select_facility_location`` does) pass False to skip a second pass over the pool.
        storage: what the IVF lists hold per pool row: ``"float32"`` (IndexIVFFlat, N x D x 4 bytes),
            ``"float16"`` or ``"int8"`` (IndexIVFScalarQuantizer: a half or a quarter of that, for pools
            whose float32 copy does not fit in memory; recall is measured as usual). IVF only.
        quantizer: how IVF finds a query's nprobe lists: ``"flat"`` (every centroid, exact), ``"hnsw"``
            (an HNSW graph over the centroids: per-query cost nearly independent of nlist, for pools of
            tens of millions with nlist in the thousands) or ``"auto"`` (default: hnsw from
            ``AUTO_HNSW_MIN_NLIST`` = 4096 lists). ``info["quantizer"]`` says which ran. IVF only.
        max_index_bytes: exact CPU search (faiss Flat) puts at most this many bytes of float32 pool rows
            into one index (None: ``EXACT_INDEX_BYTES`` = 256 MiB). A larger pool, e.g. a float16 memmap of
            10M x 768, is searched slice by slice with the per-slice top-K merged (ties to the lower
            index): the same neighbours, with O(slice x D + Nq x K) memory.

    Memory: X is never converted or copied whole (blocks of ``block_rows``), except by what the chosen
    index itself stores: an IVF index holds every pool row (see ``storage``); exact search holds one slice.

    Returns:
        :class:`KnnGraph` with ``indptr`` int64 (Nq + 1,), ``indices`` int32/int64 (Nq * K,) and
        ``similarities`` float32 (Nq * K,), rows sorted by decreasing similarity; ``info`` holds the
        method, seconds and (IVF) nlist, nprobe and recall.

    Raises:
        ValueError: n_neighbors >= N, unknown metric or method, empty or NaN/inf input, D mismatch.
        TypeError: integer inputs, non-array inputs.
    """
    import torch

    t0 = time.perf_counter()
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if method not in KNN_METHODS:
        raise ValueError(f"method must be one of {', '.join(KNN_METHODS)}, got {method!r}")
    Xt = check_embeddings(X, "X", check_finite=check_input, zero_copy_readonly=True)
    n, d = Xt.shape
    K = check_int(n_neighbors, "n_neighbors")
    if K >= n:
        raise ValueError(f"n_neighbors={K} must be smaller than the pool size N={n}")
    block_rows = _rows_for_bytes(d, 4) if block_rows is None else check_int(block_rows, "block_rows")
    if storage not in IVF_STORAGE:
        raise ValueError(f"storage must be one of {', '.join(map(repr, IVF_STORAGE))}, got {storage!r}")
    if quantizer not in IVF_QUANTIZERS:
        raise ValueError(f"quantizer must be one of {', '.join(map(repr, IVF_QUANTIZERS))}, got {quantizer!r}")
    if max_index_bytes is None:
        max_index_bytes = EXACT_INDEX_BYTES
    max_index_bytes = check_int(max_index_bytes, "max_index_bytes")
    slice_rows = max(1, max_index_bytes // (4 * d))  # float32 pool rows one exact faiss index may hold
    own = queries is None
    if own:
        Qt = Xt
    else:
        Qt = check_embeddings(queries, "queries", check_finite=check_input, zero_copy_readonly=True)
        if Qt.shape[1] != d:
            raise ValueError(f"queries have dimension D={Qt.shape[1]}, but X has D={d}")
        if Qt.device != Xt.device:
            raise ValueError(f"queries are on {Qt.device}, X on {Xt.device}: put them on the same device")
    if metric == "cosine":
        for name, t in (("X", Xt), ("queries", Qt)):
            zero = first_zero_row(t, block_rows)
            if zero is not None:
                raise ValueError(f"{name} row {zero} is all zeros; cosine needs non-zero rows")
    nq = Qt.shape[0]
    on_gpu = Xt.device.type != "cpu"
    drop_self = own and not include_self
    Ks = K + 1 if drop_self else K
    info: Dict[str, Any] = {}

    if method == "auto":
        if on_gpu:
            method = "faiss-gpu" if faiss_gpu_reason() is None else "torch"
        elif nq * n > AUTO_IVF_MIN_PAIRS:
            method = "ivf"
        else:
            method = "exact" if faiss_reason() is None else "torch"
    if method == "exact" and on_gpu:
        method = "torch"
    if method in ("exact", "ivf"):
        reason = faiss_reason()
        if reason:
            raise ValueError(
                f"method={method!r} on CPU data needs faiss: {reason}. Install faiss-cpu "
                "(pip install faiss-cpu), or use the exact torch search: method='torch' (any device; "
                "hours on a CPU past about 1e10 query x pool pairs) or a CUDA tensor for X"
            )
    if method == "ivf" and on_gpu:
        raise ValueError("method='ivf' runs on the CPU (faiss); X is on a GPU: use method='torch' or 'faiss-gpu'")
    if method == "faiss-gpu":
        reason = faiss_gpu_reason()
        if reason:
            raise ValueError(f"method='faiss-gpu' is not available: {reason}")

    if method == "torch":
        s, i = _exact_torch(Qt, Xt, Ks, metric, progress=progress)
        sims, idx = s.cpu().numpy(), i.cpu().numpy()
        info["method"] = "torch-exact"
    elif method == "exact" and n > slice_rows:
        sims, idx = exact_faiss_sliced(Xt, Qt, Ks, metric, slice_rows, block_rows, progress)
        info["method"] = "faiss-flat"
        info["slices"] = -(-n // slice_rows)
    elif method in ("exact", "faiss-gpu"):
        index = faiss_index(d, metric)
        if method == "faiss-gpu":
            import faiss

            index = faiss.index_cpu_to_all_gpus(index)
        for s0 in range(0, n, block_rows):
            index.add(block_np(Xt, s0, min(n, s0 + block_rows), metric == "cosine"))
        sims, idx = faiss_search(index.search, Qt, Ks, metric, block_rows, progress, f"knn ({method})")
        info["method"] = "faiss-flat" if method == "exact" else "faiss-gpu-flat"
    else:  # ivf
        import faiss

        nl = default_nlist(n) if nlist is None else check_int(nlist, "nlist")
        nl = min(nl, n)
        npb = max(16, nl // 32) if nprobe is None else check_int(nprobe, "nprobe")
        npb = min(npb, nl)
        if quantizer == "auto":
            quantizer = "hnsw" if nl >= AUTO_HNSW_MIN_NLIST else "flat"
        index = faiss_index(d, metric, nl, storage, quantizer)
        if quantizer == "hnsw":
            faiss.downcast_index(index.quantizer).hnsw.efSearch = max(64, 2 * npb)  # >= the nprobe lists wanted
        rng = np.random.default_rng(seed)
        n_train = int(min(n, max(64 * nl, 39 * nl)))
        train_rows = np.sort(rng.choice(n, size=n_train, replace=False)) if n_train < n else np.arange(n)
        train = _gather_rows(Xt, train_rows, metric == "cosine", block_rows)
        index.cp.seed = int(seed)
        index.train(train)
        del train
        for s0 in range(0, n, block_rows):
            index.add(block_np(Xt, s0, min(n, s0 + block_rows), metric == "cosine"))
        index.nprobe = npb
        sims, idx = faiss_search(index.search, Qt, Ks, metric, block_rows, progress, "knn (ivf)")
        info.update(method="faiss-ivf", nlist=nl, nprobe=npb, n_train=n_train, storage=storage, quantizer=quantizer)
        if recall_sample > 0:
            m = min(int(recall_sample), nq)
            qrows = np.sort(rng.choice(nq, size=m, replace=False))
            qs = torch.from_numpy(_gather_rows(Qt, qrows, False, block_rows))
            _, ex_i = _exact_torch(qs, Xt, Ks, metric)
            ex_i = ex_i.numpy()
            hits = [len(np.intersect1d(idx[q][idx[q] >= 0], ex_i[a])) for a, q in enumerate(qrows)]
            info["recall"] = float(np.sum(hits) / (m * Ks))
            info["recall_sample"] = m

    sims = np.ascontiguousarray(sims, dtype=np.float32)
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    if own:
        sims, idx = _fix_self(sims, idx, metric, Xt, block_rows, drop_self)
    counts = (idx >= 0).sum(axis=1)
    keep = idx >= 0
    indptr = np.zeros(nq + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    out_idx = idx[keep].astype(np.int32 if n < 2**31 else np.int64)
    if int(counts.min()) < K:
        info["short_rows"] = int((counts < K).sum())  # IVF can return fewer than K (faiss pads with -1)
    info["seconds"] = time.perf_counter() - t0
    info["device"] = str(Xt.device)
    return KnnGraph(
        indptr=indptr,
        indices=out_idx,
        similarities=sims[keep],
        n_points=n,
        metric=metric,
        n_neighbors=K,
        self_included=bool(own and include_self),
        pool_fingerprint=fingerprint(Xt),
        query_fingerprint=None if own else fingerprint(Qt),
        info=info,
    )


def _gather_rows(t, rows: np.ndarray, normalize: bool, block_rows: int) -> np.ndarray:
    out = np.empty((len(rows), t.shape[1]), dtype=np.float32)
    for s in range(0, len(rows), block_rows):
        r = rows[s : s + block_rows]
        b = t[_torch_index(r, t)]
        out[s : s + len(r)] = block_np(b, 0, len(r), normalize)
    return out


def _self_sim(Xt, metric: str, block_rows: int) -> np.ndarray:
    """Similarity of each pool row with itself under ``metric`` (cosine 1, ip |x|^2, l2 0)."""
    n = Xt.shape[0]
    if metric == "cosine":
        return np.ones(n, dtype=np.float32)
    if metric == "l2":
        return np.zeros(n, dtype=np.float32)
    out = np.empty(n, dtype=np.float32)
    for s in range(0, n, block_rows):
        b = block_f32(Xt, s, min(n, s + block_rows), False)
        out[s : s + b.shape[0]] = (b * b).sum(1).cpu().numpy()
    return out


def _fix_self(sims: np.ndarray, idx: np.ndarray, metric: str, Xt, block_rows: int, drop: bool):
    """Make row q list q itself (include) or not (drop), keeping rows sorted by decreasing similarity."""
    n, width = idx.shape
    rows = np.arange(n)[:, None]
    is_self = idx == rows
    has_self = is_self.any(axis=1)
    if drop:
        # remove the self entry if present, else the last (K + 1 were searched)
        pos = np.where(has_self, is_self.argmax(axis=1), width - 1)
        mask = np.ones_like(idx, dtype=bool)
        mask[np.arange(n), pos] = False
        return sims[mask].reshape(n, width - 1), idx[mask].reshape(n, width - 1)
    if has_self.all():
        return sims, idx
    miss = np.flatnonzero(~has_self)
    ss = _self_sim(Xt, metric, block_rows)
    for q in miss:  # rare: > K exact duplicates of q, or an approximate search that missed it
        s_row = np.concatenate([sims[q, : width - 1], [ss[q]]]).astype(np.float32)
        i_row = np.concatenate([idx[q, : width - 1], [q]])
        valid = i_row >= 0
        order = np.lexsort((np.where(valid, i_row, np.iinfo(np.int64).max), -np.where(valid, s_row, -np.inf)))
        sims[q], idx[q] = s_row[order], i_row[order]
    return sims, idx


__all__ = ["KnnGraph", "build_knn_graph", "METRICS", "KNN_METHODS", "fingerprint", "faiss_gpu_reason"]
