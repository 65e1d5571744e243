"""faiss for the kNN graph: index construction, sliced exact search, blocked search and the merge of
per-slice top-K lists (ties to the lowest index), plus the float32 row blocks every search reads."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np


def block_f32(t, start: int, stop: int, normalize: bool):
    """Rows [start, stop) as a contiguous float32 torch tensor (on the tensor's device), L2-normalised if asked."""
    import torch

    b = t[start:stop].to(torch.float32)
    if normalize:
        b = torch.nn.functional.normalize(b, dim=1)
    return b.contiguous()


def block_np(t, start: int, stop: int, normalize: bool) -> np.ndarray:
    b = block_f32(t, start, stop, normalize)
    return np.ascontiguousarray(b.detach().to("cpu").numpy())


def faiss_index(d: int, metric: str, nlist: int = 0, storage: str = "float32", quantizer: str = "flat"):
    import faiss

    mt = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    if quantizer == "hnsw" and nlist > 0:
        coarse = faiss.IndexHNSWFlat(d, 32, mt)
    else:
        coarse = faiss.IndexFlatL2(d) if metric == "l2" else faiss.IndexFlatIP(d)
    if nlist <= 0:
        return coarse
    # faiss's Python wrapper keeps a reference to `coarse` in the IVF index
    if storage == "float32":
        return faiss.IndexIVFFlat(coarse, d, nlist, mt)
    qt = faiss.ScalarQuantizer.QT_fp16 if storage == "float16" else faiss.ScalarQuantizer.QT_8bit
    return faiss.IndexIVFScalarQuantizer(coarse, d, nlist, qt, mt)


def merge_topk(best_s, best_i, s, i, K: int):
    """Merge two (Nq, *) candidate lists into the top K per row: similarity descending, index ascending on
    ties (faiss pads with index -1 and similarity -inf/-3.4e38; those sort last)."""
    cs = np.concatenate([best_s, s], axis=1)
    ci = np.concatenate([best_i, i], axis=1)
    key_i = np.where(ci >= 0, ci, np.iinfo(np.int64).max)
    key_s = np.where(ci >= 0, cs, -np.inf)
    order = row_lexsort(key_s, key_i)[:, :K]
    rows = np.arange(cs.shape[0])[:, None]
    return cs[rows, order], ci[rows, order]


def row_lexsort(key_s, key_i):
    """Per row: order by key_s descending, then key_i ascending."""
    o = np.argsort(key_i, axis=1, kind="stable")
    s_sorted = np.take_along_axis(key_s, o, axis=1)
    o2 = np.argsort(-s_sorted, axis=1, kind="stable")
    return np.take_along_axis(o, o2, axis=1)


def exact_faiss_sliced(Xt, Qt, K: int, metric: str, slice_rows: int, block_rows: int, progress: bool):
    """Exact top-K of every query over a pool too large for one Flat index: ``faiss.knn`` (brute force on
    the slice's own float32 array, no index copy) per slice of ``slice_rows`` pool rows, queries in blocks
    of ``block_rows``, the per-slice top-K merged (ties to the lower index). Memory: one float32 slice,
    one query block and the (Nq, 2K) merge. Returns (sims float32 (Nq, K), idx int64 (Nq, K))."""
    import faiss
    from tqdm.auto import tqdm

    n, d = Xt.shape
    nq = Qt.shape[0]
    mt = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    best_s = np.full((nq, 0), -np.inf, dtype=np.float32)
    best_i = np.full((nq, 0), -1, dtype=np.int64)
    slices = range(0, n, slice_rows)
    for s0 in tqdm(slices, desc="knn (exact, sliced)", disable=None if progress else True, leave=False):
        s1 = min(n, s0 + slice_rows)
        xb = np.empty((s1 - s0, d), dtype=np.float32)  # filled block by block: one slice, one block in memory
        for b0 in range(s0, s1, block_rows):
            b1 = min(s1, b0 + block_rows)
            xb[b0 - s0 : b1 - s0] = block_np(Xt, b0, b1, metric == "cosine")
        sims, idx = faiss_search(lambda q, k, xb=xb: faiss.knn(q, xb, k, metric=mt), Qt, min(K, s1 - s0), metric,
                                  block_rows, False, "")
        idx = np.where(idx >= 0, idx + s0, -1)
        del xb
        best_s, best_i = merge_topk(best_s, best_i, sims, idx, K)
    return best_s, best_i


def faiss_search(search, Q, K: int, metric: str, q_block: int, progress: bool, desc: str):
    """(sims float32 (Nq, K), idx int64 (Nq, K)) of ``search(query_block, K) -> (D, I)`` (a faiss index's
    ``search``, or ``faiss.knn`` on one slice) over the queries in blocks of ``q_block`` rows."""
    from tqdm.auto import tqdm

    nq = Q.shape[0]
    sims = np.empty((nq, K), dtype=np.float32)
    idx = np.empty((nq, K), dtype=np.int64)
    for qs in tqdm(range(0, nq, q_block), desc=desc, disable=None if progress else True, leave=False):
        qe = min(nq, qs + q_block)
        dist, ids = search(block_np(Q, qs, qe, metric == "cosine"), K)
        sims[qs:qe] = -dist if metric == "l2" else dist  # faiss L2 returns squared distances
        idx[qs:qe] = ids
    return sims, idx


def default_nlist(n: int) -> int:
    return int(max(1, min(n // 39, round(4 * math.sqrt(n)))))


def faiss_reason() -> Optional[str]:
    """Why faiss cannot be imported here, or None."""
    try:
        import faiss  # noqa: F401
    except ImportError as exc:
        return f"faiss is not installed ({exc})"
    return None


def faiss_gpu_reason() -> Optional[str]:
    """Why faiss cannot search on a GPU here (not installed, no GPU support, no GPU seen), or None."""
    try:
        import faiss
    except ImportError as exc:
        return f"faiss is not installed ({exc})"
    if not hasattr(faiss, "StandardGpuResources"):
        return "this faiss build has no GPU support (faiss-cpu); install faiss-gpu"
    try:
        if faiss.get_num_gpus() <= 0:
            return "faiss sees no GPU"
    except Exception as exc:  # pragma: no cover
        return f"faiss GPU probe failed: {exc}"
    return None
