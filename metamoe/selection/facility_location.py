"""Facility location (coverage) selection on a kNN or dense similarity graph, exact greedy at million scale.

Objective, for a selection A of pool rows (candidates j) and ground points i with weights w_i >= 0:

    f(A) = sum_i w_i max(0, max_{j in A} s_ij)

The ground set is the pool itself (default) or a separate set, e.g. a client's private embeddings
(``ground=P``: how well the picks cover the private distribution). ``s`` is the cosine similarity (or
inner product) restricted to a graph: each ground point's ``n_neighbors`` nearest pool rows
(``graph="knn"``), every pool row (``graph="dense"``), or a prebuilt :class:`KnnGraph`. Entries
missing from the graph count as 0, and so do negative similarities.

Greedy with exact incremental gains: with ``cur_i`` the current coverage of ground point i, the gain of
candidate j is ``sum_{i: j in N(i)} w_i max(0, s_ij - cur_i)``. Picking j raises ``cur_i`` only for
the ground points j covers, so only the candidates that share one of them need a new gain: about K^2
work per pick on a K-NN graph, instead of a pass over the pool.

Implementations (op ``facility_location``): ``cuda`` (csrc/cuda/facility_location.cu: exact gains kept
on the device, argmax per pick; optimizers lazy/naive), ``cpp`` (csrc/cpu/facility_location.cpp,
OpenMP; lazy priority queue, naive, stochastic) and ``torch`` (this file; any device; exact gains
kept with vectorised segment sums). Every exact optimizer returns the picks of naive greedy
(argmax gain, ties to the lowest index).

``graph="dense"``: up to DENSE_MATERIALIZE_PAIRS ground x pool pairs the similarities are materialised
as CSR and any backend runs. Above it they are computed on the fly
(:mod:`metamoe.selection.facility_location_dense`): memory O((N + M) D) (a pool larger than
``DENSE_POOL_COPY_BYTES``, e.g. a memmap, is read tile by tile: O(M D + N)), exact lazy greedy with
incremental bounds, in torch only (CPU or GPU). The cpp and cuda backends decline such calls with a
reason, so ``backend="auto"`` falls to torch: the work is dense matmuls that torch already runs at
BLAS / cuBLAS speed, and a C++ path would add a second copy of that arithmetic (whose similarities must
match bit for bit) for no gain.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

import numpy as np

from ..backends import CallSpec, define_op
from ..backends.availability import require_extension
from ..utils.checks import check_choice
from ..utils.progress import progress_bar, update_every
from .facility_location_dense import (
    DenseSimilarities,
    check_dense_memory,
    dense_blocks,
    dense_csr,
    dense_on_the_fly_greedy,
)
from .knn_graph import KnnGraph, build_knn_graph
from .result import Selection
from .validation import check_embeddings, check_k, check_weights, first_zero_row

facility_location = define_op(
    "facility_location",
    priority=("cuda", "cpp", "torch"),
    doc="Greedy facility location on a sparse similarity graph, exact incremental gains.",
)

OPTIMIZERS = ("lazy", "stochastic", "naive")
GRAPHS = ("knn", "dense")
FL_METRICS = ("cosine", "ip")
_OPT_CODE = {"naive": 0, "lazy": 1, "stochastic": 2}

# graph="dense": up to this many ground x pool pairs the similarities are materialised as CSR (about 24
# bytes per positive pair with the transpose: ~100 MiB here) and every backend (cpp, cuda, torch) can run
# the exact incremental greedy on it; above it they are computed on the fly, blockwise, in the torch
# backend (see facility_location_dense), with memory O((N + M) D) instead of O(N M).
DENSE_MATERIALIZE_PAIRS = 2**22


@dataclass
class FacilityLocationProblem:
    """The graph as CSR "ground point -> candidates" plus ground weights (what every backend takes).

    indptr int64 (M + 1,), indices int32 or int64 (nnz,) in [0, N), similarities float32 (nnz,), weights
    float64 (M,), n_candidates N.

    ``cache_on``: an object that outlives the call (the :class:`KnnGraph` the arrays come from), on which the
    cpp backend keeps its candidate -> ground transpose (:func:`cpp_transpose`) for the next call on the same
    graph; None builds a transpose for this call only. The transpose depends on the graph arrays alone (not on
    the weights) and is reused only while they are the same buffers with the same bytes (checked with a
    checksum each call).
    """

    indptr: np.ndarray
    indices: np.ndarray
    similarities: np.ndarray
    weights: np.ndarray
    n_candidates: int
    cache_on: Any = None

    @property
    def n_ground(self) -> int:
        return int(self.indptr.shape[0] - 1)

    def transpose(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Candidate -> ground CSR (t_ptr int64 (N + 1,), t_row int64, t_sim float32), keeping entries with
        s > 0 and w > 0, each row in increasing ground index (the summation order of every backend)."""
        rows = np.repeat(np.arange(self.n_ground, dtype=np.int64), np.diff(self.indptr))
        keep = (self.similarities > 0) & (self.weights[rows] > 0)
        rows, cols, sims = rows[keep], self.indices[keep].astype(np.int64), self.similarities[keep]
        order = np.argsort(cols, kind="stable")
        t_ptr = np.zeros(self.n_candidates + 1, dtype=np.int64)
        np.cumsum(np.bincount(cols, minlength=self.n_candidates), out=t_ptr[1:])
        return t_ptr, rows[order], sims[order]


class _TransposeCache:
    """Holds the cpp transpose cached on a graph object (attribute ``_facility_location_transpose``), and its
    NumPy arrays once the torch or CUDA backend asked for them. Deep copies and pickles of the graph get an
    empty holder (the transpose references the original's arrays); a shallow copy shares the holder, as it
    shares the arrays."""

    __slots__ = ("transpose", "arrays")

    def __init__(self, transpose=None):
        self.transpose = transpose
        self.arrays = None

    def __deepcopy__(self, memo):
        return _TransposeCache()

    def __reduce__(self):
        return (_TransposeCache, ())


TRANSPOSE_CACHE_ATTR = "_facility_location_transpose"


def cpp_transpose(problem: FacilityLocationProblem):
    """The ``_C.FacilityLocationTranspose`` of ``problem``'s graph: the one cached on ``problem.cache_on``
    when it was built from the same arrays with the same bytes, else a new one (then cached there)."""
    _C = require_extension("_C")
    args = (problem.indptr, problem.indices, problem.similarities, int(problem.n_candidates))
    holder = getattr(problem.cache_on, TRANSPOSE_CACHE_ATTR, None) if problem.cache_on is not None else None
    if isinstance(holder, _TransposeCache) and holder.transpose is not None and holder.transpose.matches(*args):
        return holder.transpose
    if isinstance(holder, _TransposeCache):
        holder.transpose = None  # stale: free it before building the new one
    transpose = _C.FacilityLocationTranspose(*args)
    if problem.cache_on is not None:
        object.__setattr__(problem.cache_on, TRANSPOSE_CACHE_ATTR, _TransposeCache(transpose))
    return transpose


def transpose_arrays(problem: FacilityLocationProblem) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate -> ground CSR (t_ptr int64, t_row int64, t_sim float32) for the torch and CUDA backends.

    With the C++ extension: the arrays of the cached :func:`cpp_transpose` (built once per graph by the
    parallel counting sort, converted once and kept beside it); it keeps the entries of ground points with
    weight 0 too, which add exactly +0.0 to every gain. Without it: :meth:`FacilityLocationProblem.transpose`.
    """
    from ..backends.availability import backend_unavailable_reason

    if backend_unavailable_reason("cpp") is not None:
        return problem.transpose()
    transpose = cpp_transpose(problem)
    holder = getattr(problem.cache_on, TRANSPOSE_CACHE_ATTR, None) if problem.cache_on is not None else None
    if isinstance(holder, _TransposeCache) and holder.transpose is transpose and holder.arrays is not None:
        return holder.arrays
    arrays = tuple(transpose.to_numpy())
    if isinstance(holder, _TransposeCache) and holder.transpose is transpose:
        holder.arrays = arrays
    return arrays


def sample_size(n: int, k: int, epsilon: float) -> int:
    """Mirzasoleiman et al.'s per-pick sample, ceil((N / k) log(1 / epsilon)), at most N."""
    return int(min(n, max(1, math.ceil(n / k * math.log(1.0 / epsilon)))))


def _chunk(k: int) -> int:
    return update_every(k, per=50, cap=1024)


def _ranges(ptr, rows):
    """Entry positions of CSR rows ``rows`` (torch): (positions, segment id of each position)."""
    import torch

    lo, hi = ptr[rows], ptr[rows + 1]
    lens = hi - lo
    total = int(lens.sum())
    seg = torch.repeat_interleave(torch.arange(len(rows), device=ptr.device), lens, output_size=total)
    starts = torch.repeat_interleave(lo - (torch.cumsum(lens, 0) - lens), lens, output_size=total)
    return starts + torch.arange(total, device=ptr.device), seg


# --------------------------------------------------------------------------- torch


@facility_location.register("torch", devices=("cpu", "cuda"), dtypes=("float32",))
def facility_location_torch(problem: FacilityLocationProblem, k: int, optimizer: str, n_sample: int, seed: int,
                            device: str, progress: bool = False):
    """Pure PyTorch on any device: float64 gains, segment sums with index_add_; host sync per pick.

    Also the only backend of graph="dense" on the fly (``problem`` a :class:`DenseSimilarities`)."""
    import torch

    if isinstance(problem, DenseSimilarities):
        return dense_on_the_fly_greedy(problem, k, optimizer, n_sample, seed, progress)
    dev = torch.device(device)
    f64 = dict(dtype=torch.float64, device=dev)
    n, m = problem.n_candidates, problem.n_ground
    t_ptr_np, t_row_np, t_sim_np = transpose_arrays(problem)
    t_ptr = torch.as_tensor(t_ptr_np, device=dev)
    t_row = torch.as_tensor(t_row_np, device=dev)
    t_sim = torch.as_tensor(t_sim_np, device=dev).double()
    t_cand = torch.repeat_interleave(torch.arange(n, device=dev), t_ptr[1:] - t_ptr[:-1], output_size=len(t_row_np))
    g_ptr = torch.as_tensor(problem.indptr, device=dev)
    g_idx = torch.as_tensor(problem.indices, dtype=torch.int64, device=dev)
    g_sim = torch.as_tensor(problem.similarities, device=dev).double()
    w = torch.as_tensor(problem.weights, **f64)
    w_t = w[t_row]
    cur = torch.zeros(m, **f64)
    neg_inf = float("-inf")

    def all_gains():
        contrib = w_t * torch.clamp(t_sim - cur[t_row], min=0.0)
        return torch.zeros(n, **f64).index_add_(0, t_cand, contrib)

    def gains_of(cands):
        pos, seg = _ranges(t_ptr, cands)
        contrib = w_t[pos] * torch.clamp(t_sim[pos] - cur[t_row[pos]], min=0.0)
        return torch.zeros(len(cands), **f64).index_add_(0, seg, contrib)

    selected = torch.zeros(n, dtype=torch.bool, device=dev)
    ALL = object()

    def commit(j: int):
        """Raise the coverage of the ground points j covers; return the unpicked candidates that share them."""
        selected[j] = True
        lo, hi = int(t_ptr[j]), int(t_ptr[j + 1])
        rows, s = t_row[lo:hi], t_sim[lo:hi]
        old = cur[rows]
        up = s > old
        rows, old = rows[up], old[up]
        cur[rows] = s[up]
        if optimizer == "naive" or len(rows) == 0:
            return None
        if int((g_ptr[rows + 1] - g_ptr[rows]).sum()) * 16 > len(t_row_np):
            return ALL  # dense-like graphs: refreshing everything is cheaper than finding who changed
        pos, seg = _ranges(g_ptr, rows)
        hit = g_sim[pos] > old[seg]
        cands = torch.unique(g_idx[pos[hit]])
        return cands[~selected[cands]]

    picks, gains = [], []
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    gain = all_gains() if optimizer != "stochastic" else torch.zeros(n, **f64)
    dirty = torch.ones(n, dtype=torch.bool, device=dev) if optimizer == "stochastic" else None
    with progress_bar(k, progress, "facility location (torch)") as bar:
        for _ in range(k):
            if optimizer == "naive":
                gain = all_gains().masked_fill_(selected, neg_inf)
                j = int(torch.argmax(gain))  # first maximal index: ties to the lowest index
                gj = float(gain[j])
            elif optimizer == "lazy":
                j = int(torch.argmax(gain))
                gj = float(gain[j])
            else:
                remaining = torch.nonzero(~selected).flatten()
                r = len(remaining)
                sample = remaining if n_sample >= r else remaining[torch.randperm(r, generator=gen)[:n_sample].to(dev)]
                stale = sample[dirty[sample]]
                if len(stale):
                    gain[stale] = gains_of(stale)
                    dirty[stale] = False
                vals = gain[sample]
                best = vals.max()
                j = int(sample[vals == best].min())
                gj = float(best)
            picks.append(j)
            gains.append(gj)
            gain[j] = neg_inf
            touched = commit(j)
            if touched is ALL:
                if optimizer == "lazy":
                    gain = all_gains().masked_fill_(selected, neg_inf)
                else:
                    dirty.fill_(True)
            elif touched is not None and len(touched):
                if optimizer == "lazy":
                    gain[touched] = gains_of(touched)
                else:
                    dirty[touched] = True
            bar.update(1)
    objective = float((w * cur).sum())
    return np.asarray(picks, dtype=np.int64), np.asarray(gains, dtype=np.float64), objective


# --------------------------------------------------------------------------- cpp


def _on_the_fly_reason(spec: CallSpec):
    if spec.get("graph") == "dense-on-the-fly":
        return [
            f"graph='dense' with M x N = {spec['m']} x {spec['n']} pairs (above DENSE_MATERIALIZE_PAIRS = "
            f"{DENSE_MATERIALIZE_PAIRS}) computes similarities on the fly, which runs in the torch backend "
            f"(CPU or GPU); this backend takes a materialised graph (graph='knn', a KnnGraph, or a smaller dense one)"
        ]
    return []


@facility_location.register("cpp", devices=("cpu",), dtypes=("float32",), check=_on_the_fly_reason)
def facility_location_cpp(problem: FacilityLocationProblem, k: int, optimizer: str, n_sample: int, seed: int,
                          device: str, progress: bool = False):
    """C++/OpenMP: lazy priority queue with dirty flags, naive, stochastic; float64 gains. The candidate ->
    ground transpose is built once per graph (parallel counting sort) and cached on ``problem.cache_on``."""
    _C = require_extension("_C")
    state = _C.FacilityLocationGreedy(
        cpp_transpose(problem), problem.weights, int(k), _OPT_CODE[optimizer], int(n_sample), int(seed) & (2**64 - 1),
    )
    idx, gn = [], []
    with progress_bar(k, progress, "facility location (cpp)") as bar:
        while state.picked < k:
            i, g = state.run(min(_chunk(k), k - state.picked))
            idx.append(i)
            gn.append(g)
            bar.update(len(i))
    return np.concatenate(idx), np.concatenate(gn), float(state.objective())


# --------------------------------------------------------------------------- cuda


def _cuda_check(spec: CallSpec):
    if spec.get("optimizer") == "stochastic":
        return ["the CUDA backend runs exact greedy only (optimizer 'lazy' or 'naive'); 'stochastic' runs on cpp/torch"]
    return _on_the_fly_reason(spec)


@facility_location.register("cuda", devices=("cuda",), dtypes=("float32",), check=_cuda_check)
def facility_location_cuda(problem: FacilityLocationProblem, k: int, optimizer: str, n_sample: int, seed: int,
                           device: str, progress: bool = False):
    """CUDA kernels: exact gains on the device, incremental refresh of the touched candidates, argmax per pick."""
    import torch

    ext = require_extension("_C_cuda")
    dev = torch.device(device)
    n, m = int(problem.n_candidates), problem.n_ground
    t_ptr, t_row, t_sim = transpose_arrays(problem)
    graph_t = [
        torch.as_tensor(t_ptr, device=dev),
        torch.as_tensor(t_row, device=dev),
        torch.as_tensor(t_sim, device=dev),
        torch.as_tensor(problem.indptr, device=dev),
        torch.as_tensor(problem.indices, dtype=torch.int64, device=dev),
        torch.as_tensor(problem.similarities, device=dev),
        torch.as_tensor(problem.weights, dtype=torch.float64, device=dev),
    ]
    graph = [t.data_ptr() for t in graph_t]
    nb = ext.fl_num_blocks(n)
    f64 = dict(dtype=torch.float64, device=dev)
    bufs = [
        torch.zeros(m, **f64),  # cur
        torch.empty(n, **f64),  # gain
        torch.zeros(n, dtype=torch.int32, device=dev),  # dirty
        torch.zeros(n, dtype=torch.int32, device=dev),  # selected
        torch.empty(n, dtype=torch.int64, device=dev),  # dirty_list
        torch.zeros(1, dtype=torch.int64, device=dev),  # dirty_count (unsigned long long)
        torch.empty(nb, **f64),  # block_val
        torch.empty(nb, dtype=torch.int64, device=dev),  # block_idx
        torch.full((1,), -1, dtype=torch.int64, device=dev),  # best_idx
    ]
    ws = [b.data_ptr() for b in bufs]
    out_idx = torch.full((k,), -1, dtype=torch.int64, device=dev)
    out_gain = torch.zeros(k, **f64)
    stream = torch.cuda.current_stream(dev).cuda_stream
    with torch.cuda.device(dev):
        ext.set_device(dev.index if dev.index is not None else torch.cuda.current_device())
        ext.fl_init(graph, n, m, ws, nb, stream)
        t = 0
        with progress_bar(k, progress, "facility location (cuda)") as bar:
            while t < k:
                count = min(_chunk(k), k - t)
                ext.fl_picks(graph, n, m, ws, nb, t, count, out_idx.data_ptr(), out_gain.data_ptr(), stream)
                t += count
                torch.cuda.current_stream(dev).synchronize()  # one sync per chunk, for the progress bar
                bar.update(count)
        objective = float((bufs[0] * graph_t[6]).sum())
    return out_idx.cpu().numpy(), out_gain.cpu().numpy(), objective


# --------------------------------------------------------------------------- checks and graph construction


def _check_options(optimizer: str, metric: str, graph: Union[str, KnnGraph], epsilon: float, seed: int):
    """(optimizer, metric, graph) checked and normalised; epsilon and seed checked."""
    optimizer = check_choice(optimizer, "optimizer", OPTIMIZERS)
    metric = check_choice(metric, "metric", FL_METRICS)
    if not isinstance(graph, KnnGraph):
        if not isinstance(graph, str):
            raise TypeError(f"graph must be 'knn', 'dense' or a KnnGraph, got {type(graph).__name__}")
        graph = check_choice(graph, "graph", GRAPHS)
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not 0.0 < float(epsilon) < 1.0:
        raise ValueError(f"epsilon must be a number in (0, 1), got {epsilon!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    return optimizer, metric, graph


def _check_ground(ground: Any, Xt):
    """The ground set as a torch tensor (None: the pool itself), checked against the pool ``Xt``."""
    if ground is None:
        return None
    Gt = check_embeddings(ground, "ground", zero_copy_readonly=True)
    d = Xt.shape[1]
    if Gt.shape[1] != d:
        raise ValueError(f"ground has dimension D={Gt.shape[1]}, but X has D={d}: both must be embeddings of one model")
    if Gt.device != Xt.device:
        raise ValueError(f"ground is on {Gt.device}, X on {Xt.device}: put them on the same device")
    return Gt


def _check_given_graph(graph: KnnGraph, Xt, Gt, metric: str) -> None:
    graph.check_matches(Xt, Gt)
    if graph.metric != metric:
        raise ValueError(
            f"graph was built with metric={graph.metric!r} but metric={metric!r}; facility location needs a "
            f"similarity graph ('cosine' or 'ip'): pass metric={graph.metric!r} or rebuild the graph"
            if graph.metric in FL_METRICS
            else f"graph was built with metric={graph.metric!r}; facility location needs a similarity graph "
            f"('cosine' or 'ip')"
        )


def _build_problem(graph: Union[str, KnnGraph], Xt, Gt, w: np.ndarray, metric: str, n_neighbors: int,
                   on_the_fly: bool, progress: bool):
    """(problem, graph info, graph seconds): what the backend runs, a :class:`FacilityLocationProblem` or, for
    graph='dense' on the fly, a :class:`DenseSimilarities`. graph='dense' checks its memory first."""
    n, d = Xt.shape
    m = n if Gt is None else Gt.shape[0]
    g_info: dict
    if isinstance(graph, KnnGraph):
        _check_given_graph(graph, Xt, Gt, metric)
        indptr, indices, sims = graph.indptr, graph.indices, graph.similarities  # int32 or int64 indices, no copy
        g_info = {"graph": "knn (given)", "n_neighbors": graph.n_neighbors, **graph.info}
        graph_seconds = 0.0
    elif graph == "knn":
        tg = time.perf_counter()
        kg = build_knn_graph(Xt, n_neighbors, queries=Gt, metric=metric, include_self=True, progress=progress,
                             check_input=False)  # X and ground were checked above
        indptr, indices, sims = kg.indptr, kg.indices, kg.similarities
        graph_seconds = time.perf_counter() - tg
        g_info = {"graph": "knn", "n_neighbors": kg.n_neighbors, **kg.info}
    else:
        tile, block = dense_blocks(Xt.device.type, n, m)
        check_dense_memory(Xt.device, n, m, d, tile, block, on_the_fly)
        if Gt is None and metric == "cosine":
            zero = first_zero_row(Xt)  # blockwise: no N x D temporary
            if zero is not None:
                raise ValueError(f"X row {zero} is all zeros; cosine needs non-zero rows")
        tg = time.perf_counter()
        dense = DenseSimilarities.build(Xt, Gt, w, metric, tile, block)
        g_info = {"graph": "dense (on the fly)" if on_the_fly else "dense", "tile": tile, "block": block}
        if on_the_fly:
            return dense, g_info, time.perf_counter() - tg
        indptr, indices, sims = dense_csr(dense)
        g_info["nnz"] = int(indptr[-1])
        del dense
        graph_seconds = time.perf_counter() - tg
    if indices.dtype not in (np.int32, np.int64):
        indices = indices.astype(np.int64)
    problem = FacilityLocationProblem(
        np.ascontiguousarray(indptr, dtype=np.int64), np.ascontiguousarray(indices),
        np.ascontiguousarray(sims, dtype=np.float32), w, n,
        cache_on=graph if isinstance(graph, KnnGraph) else None,
    )
    return problem, g_info, graph_seconds


# --------------------------------------------------------------------------- public API


def select_facility_location(
    X: Any,
    k: int,
    *,
    ground: Any = None,
    weights: Any = None,
    graph: Union[str, KnnGraph] = "knn",
    n_neighbors: int = 20,
    optimizer: str = "lazy",
    epsilon: float = 0.01,
    metric: str = "cosine",
    seed: int = 0,
    backend: Optional[str] = None,
    progress: bool = True,
) -> Selection:
    """Pick ``k`` pool rows that cover the ground set best: greedy facility location.

    Maximises ``f(A) = sum_i w_i max(0, max_{j in A} s_ij)`` over ground points i (the pool itself, or
    ``ground``) with candidates j = the pool rows, s the similarity on ``graph``.

    Args:
        X: (N, D) pool embeddings (the candidates); NumPy array, ``np.memmap``, torch tensor (CPU or
            CUDA) or CuPy array; float32, float16, bfloat16 or float64; finite rows (non-zero for cosine).
        k: number of picks, 1 <= k <= N.
        ground: (M, D) ground set, e.g. a client's private embeddings (coverage of the private set);
            same formats, same D as X. None (default) means the pool itself (M = N).
        weights: (M,) non-negative weights w_i of the ground points (NumPy or torch); None = all ones.
        graph: ``"knn"`` (default: each ground point's ``n_neighbors`` most similar pool rows, built with
            :func:`build_knn_graph`; with ground = pool each point lists itself), ``"dense"`` (every
            similarity, exact: up to DENSE_MATERIALIZE_PAIRS (4.2e6) ground x pool pairs they are
            materialised as CSR for any backend; above, they are computed on the fly, blockwise, by the
            torch backend (CPU or GPU) with memory O((N + M) D) (O(M D + N) when the float32 pool exceeds
            DENSE_POOL_COPY_BYTES = 256 MiB: the pool, e.g. a memmap, is then read tile by tile), checked
            up front (MemoryError naming N, M, D and the bytes); N = M = 1e5, D = 64, k = 200 takes minutes
            on one CPU core; float32 similarities, float64 gains; same picks as the materialised path) or a
            :class:`KnnGraph` from ``build_knn_graph(X, K, queries=ground)``, which is checked against X and
            ground (shape and fingerprint; a graph built for other data raises).
        n_neighbors: K for ``graph="knn"``, 1 <= K < N. The graph is built by :func:`build_knn_graph`
            with its defaults: with ``ground`` given (Nq x N <= 1e10 pairs) an exact search that streams
            the pool in slices; with ground = pool and a large N an IVF index whose float32 lists hold
            N x D x 4 bytes: for a pool larger than memory build the graph yourself with
            ``build_knn_graph(X, K, storage="int8")`` (or ``"float16"``) and pass it as ``graph``.
        optimizer: ``"lazy"`` (default; exact greedy: the same picks as naive greedy), ``"stochastic"``
            (Mirzasoleiman et al., AAAI 2015: each pick evaluates a seeded uniform sample of
            ceil((N / k) log(1 / epsilon)) unpicked candidates; (1 - 1/e - epsilon) in expectation) or
            ``"naive"`` (recomputes every gain each pick; for tests).
        epsilon: stochastic greedy's epsilon in (0, 1). The default 0.01 samples 4.6 N / k candidates
            per pick. Note: apricot's default (0.9) samples only 0.105 N / k, a much weaker setting.
        metric: ``"cosine"`` (default) or ``"ip"`` (inner product); must match a given KnnGraph's metric.
        seed: seeds stochastic greedy's samples (reproducible for a given backend).
        backend: ``"auto"`` (default, or ``METAMOE_BACKEND``), ``"cuda"``, ``"cpp"`` or ``"torch"``.
        progress: tqdm progress bars (only on a terminal).

    Returns:
        :class:`Selection`: ``indices`` int64 (k,) in pick order, ``gains`` float64 (k,) the marginal
        gain of each pick, ``objective`` = f(A) accumulated in float64, ``backend``, ``seconds`` (graph
        build included; ``info["graph_seconds"]`` and ``info["select_seconds"]`` split it), and ``info``
        with the graph's description (method, recall for IVF), optimizer and sample size.

    Ties go to the lowest index. Exact optimizers give the picks of naive greedy on the same graph.
    """
    t0 = time.perf_counter()
    optimizer, metric, graph = _check_options(optimizer, metric, graph, epsilon, seed)
    Xt = check_embeddings(X, "X", zero_copy_readonly=True)
    n, d = Xt.shape
    k = check_k(k, n)
    Gt = _check_ground(ground, Xt)
    m = n if Gt is None else Gt.shape[0]
    w = check_weights(weights, m)

    # pick the backend before building the graph: a backend that cannot run fails fast
    n_sample = sample_size(n, k, float(epsilon)) if optimizer == "stochastic" else n
    on_the_fly = isinstance(graph, str) and graph == "dense" and n * m > DENSE_MATERIALIZE_PAIRS
    graph_kind = "dense-on-the-fly" if on_the_fly else (graph if isinstance(graph, str) else "knn")
    spec = CallSpec(device=Xt.device.type, dtype="float32",
                    extra={"n": n, "m": m, "k": k, "optimizer": optimizer, "graph": graph_kind})
    impl = facility_location.select(spec, backend)
    problem, g_info, graph_seconds = _build_problem(graph, Xt, Gt, w, metric, n_neighbors, on_the_fly, progress)

    ts = time.perf_counter()
    device = str(Xt.device) if Xt.device.type != "cpu" else "cpu"
    idx, gains, objective = impl.fn(problem, k, optimizer, n_sample, int(seed), device, progress)
    select_seconds = time.perf_counter() - ts
    info = {
        "optimizer": optimizer, "metric": metric, "k_requested": k, "n": n, "m": m, "d": d,
        "ground": "pool" if Gt is None else "given", "graph_seconds": graph_seconds,
        "select_seconds": select_seconds, **g_info,
    }
    if optimizer == "stochastic":
        info.update(epsilon=float(epsilon), sample_size=n_sample, seed=int(seed))
    if on_the_fly:  # candidate gains computed (each tile evaluation covers `tile` candidates)
        info["candidate_evaluations"] = problem.tile_evaluations * problem.tile
    return Selection(
        indices=idx, gains=gains, objective=objective, backend=impl.backend,
        seconds=time.perf_counter() - t0, method="facility_location", info=info,
    )


__all__ = [
    "select_facility_location", "FacilityLocationProblem", "facility_location", "sample_size",
    "OPTIMIZERS", "DENSE_MATERIALIZE_PAIRS",
]
