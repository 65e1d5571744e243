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
from .knn_graph import KnnGraph, build_knn_graph
from .result import Selection
from .validation import check_embeddings, check_k

facility_location = define_op(
    "facility_location",
    priority=("cuda", "cpp", "torch"),
    doc="Greedy facility location on a sparse similarity graph, exact incremental gains.",
)

OPTIMIZERS = ("lazy", "stochastic", "naive")
GRAPHS = ("knn", "dense")
FL_METRICS = ("cosine", "ip")
_OPT_CODE = {"naive": 0, "lazy": 1, "stochastic": 2}

# graph="dense" materialises every positive similarity as a CSR entry (int64 + float32, and the
# transpose): about 24 bytes per pair. 2e8 pairs (N = M ~ 14,000) is ~5 GiB.
DENSE_MAX_PAIRS = 2 * 10**8


@dataclass
class FacilityLocationProblem:
    """The graph as CSR "ground point -> candidates" plus ground weights (what every backend takes).

    indptr int64 (M + 1,), indices int64 (nnz,) in [0, N), similarities float32 (nnz,), weights
    float64 (M,), n_candidates N.
    """

    indptr: np.ndarray
    indices: np.ndarray
    similarities: np.ndarray
    weights: np.ndarray
    n_candidates: int

    @property
    def n_ground(self) -> int:
        return int(self.indptr.shape[0] - 1)

    def transpose(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Candidate -> ground CSR (t_ptr int64 (N + 1,), t_row int64, t_sim float32), keeping entries with
        s > 0 and w > 0, each row in increasing ground index (the summation order of every backend)."""
        rows = np.repeat(np.arange(self.n_ground, dtype=np.int64), np.diff(self.indptr))
        keep = (self.similarities > 0) & (self.weights[rows] > 0)
        rows, cols, sims = rows[keep], self.indices[keep], self.similarities[keep]
        order = np.argsort(cols, kind="stable")
        t_ptr = np.zeros(self.n_candidates + 1, dtype=np.int64)
        np.cumsum(np.bincount(cols, minlength=self.n_candidates), out=t_ptr[1:])
        return t_ptr, rows[order], sims[order]


def sample_size(n: int, k: int, epsilon: float) -> int:
    """Mirzasoleiman et al.'s per-pick sample, ceil((N / k) log(1 / epsilon)), at most N."""
    return int(min(n, max(1, math.ceil(n / k * math.log(1.0 / epsilon)))))


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="pick", disable=(None if enabled else True), leave=False)


def _chunk(k: int) -> int:
    return int(min(1024, max(16, k // 50)))


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
    """Pure PyTorch on any device: float64 gains, segment sums with index_add_; host sync per pick."""
    import torch

    dev = torch.device(device)
    f64 = dict(dtype=torch.float64, device=dev)
    n, m = problem.n_candidates, problem.n_ground
    t_ptr_np, t_row_np, t_sim_np = problem.transpose()
    t_ptr = torch.as_tensor(t_ptr_np, device=dev)
    t_row = torch.as_tensor(t_row_np, device=dev)
    t_sim = torch.as_tensor(t_sim_np, device=dev).double()
    t_cand = torch.repeat_interleave(torch.arange(n, device=dev), t_ptr[1:] - t_ptr[:-1], output_size=len(t_row_np))
    g_ptr = torch.as_tensor(problem.indptr, device=dev)
    g_idx = torch.as_tensor(problem.indices, device=dev)
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
    with _progress(k, progress, "facility location (torch)") as bar:
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


@facility_location.register("cpp", devices=("cpu",), dtypes=("float32",))
def facility_location_cpp(problem: FacilityLocationProblem, k: int, optimizer: str, n_sample: int, seed: int,
                          device: str, progress: bool = False):
    """C++/OpenMP: lazy priority queue with dirty flags, naive, stochastic; float64 gains."""
    _C = require_extension("_C")
    state = _C.FacilityLocationGreedy(
        problem.indptr, problem.indices, problem.similarities, problem.weights, int(problem.n_candidates), int(k),
        _OPT_CODE[optimizer], int(n_sample), int(seed) & (2**64 - 1),
    )
    idx, gn = [], []
    with _progress(k, progress, "facility location (cpp)") as bar:
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
    return []


@facility_location.register("cuda", devices=("cuda",), dtypes=("float32",), check=_cuda_check)
def facility_location_cuda(problem: FacilityLocationProblem, k: int, optimizer: str, n_sample: int, seed: int,
                           device: str, progress: bool = False):
    """CUDA kernels: exact gains on the device, incremental refresh of the touched candidates, argmax per pick."""
    import torch

    ext = require_extension("_C_cuda")
    dev = torch.device(device)
    n, m = int(problem.n_candidates), problem.n_ground
    t_ptr, t_row, t_sim = problem.transpose()
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
        ext.fl_init(graph, n, m, ws, nb, stream)
        t = 0
        with _progress(k, progress, "facility location (cuda)") as bar:
            while t < k:
                count = min(_chunk(k), k - t)
                ext.fl_picks(graph, n, m, ws, nb, t, count, out_idx.data_ptr(), out_gain.data_ptr(), stream)
                t += count
                torch.cuda.current_stream(dev).synchronize()  # one sync per chunk, for the progress bar
                bar.update(count)
        objective = float((bufs[0] * graph_t[6]).sum())
    return out_idx.cpu().numpy(), out_gain.cpu().numpy(), objective


# --------------------------------------------------------------------------- graph construction


def _check_weights(weights: Any, m: int) -> np.ndarray:
    if weights is None:
        return np.ones(m, dtype=np.float64)
    if hasattr(weights, "detach"):
        w = weights.detach().to("cpu").double().numpy()
    else:
        w = np.asarray(weights)
        if not np.issubdtype(w.dtype, np.number) or np.issubdtype(w.dtype, np.complexfloating):
            raise TypeError(f"weights must be a real-valued array, got dtype {w.dtype}")
        w = w.astype(np.float64)
    if w.ndim != 1 or w.shape[0] != m:
        raise ValueError(f"weights must have shape ({m},), one per ground point, got {tuple(w.shape)}")
    if not np.isfinite(w).all():
        raise ValueError(f"weights has NaN or inf values (first at {int(np.flatnonzero(~np.isfinite(w))[0])})")
    if w.min() < 0:
        raise ValueError(f"weights must be >= 0, got a minimum of {w.min():.4g} at {int(np.argmin(w))}")
    return np.ascontiguousarray(w)


def _dense_problem(Xt, Gt, metric: str, block_rows: int = 4096) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every positive similarity between ground rows and pool rows, as CSR (float32, blockwise)."""
    import torch

    n = Xt.shape[0]
    Q = Xt if Gt is None else Gt
    m = Q.shape[0]
    if n * m > DENSE_MAX_PAIRS:
        raise ValueError(
            f"graph='dense' stores all M x N = {m} x {n} = {m * n:.3g} similarities (about "
            f"{24 * m * n / 2**30:.1f} GiB), above the limit of {DENSE_MAX_PAIRS:.0e} pairs (N ~ 1.4e4 for "
            f"ground = pool); use graph='knn' (a kNN-sparsified graph) for pools this large"
        )
    norm = metric == "cosine"
    P = Xt.to(torch.float32)
    if norm:
        P = torch.nn.functional.normalize(P, dim=1)
    ptr, idx, sim = [np.zeros(1, np.int64)], [], []
    total = 0
    for s in range(0, m, block_rows):
        qb = Q[s : s + block_rows].to(torch.float32)
        if norm:
            qb = torch.nn.functional.normalize(qb, dim=1)
        S = qb @ P.T
        pos = S > 0
        counts = pos.sum(1).cpu().numpy()
        r, c = pos.nonzero(as_tuple=True)  # row-major order: rows in order, columns increasing
        idx.append(c.cpu().numpy())
        sim.append(S[r, c].cpu().numpy())
        ptr.append(total + np.cumsum(counts))
        total += int(counts.sum())
    return np.concatenate(ptr), np.concatenate(idx).astype(np.int64), np.concatenate(sim).astype(np.float32)


def _check_choice(value: Any, name: str, allowed) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
    return value


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
            similarity, computed blockwise; at most 2e8 ground x pool pairs, so N up to about 1.4e4 for
            ground = pool) or a :class:`KnnGraph` from ``build_knn_graph(X, K, queries=ground)``, which
            is checked against X and ground (shape and fingerprint; a graph built for other data raises).
        n_neighbors: K for ``graph="knn"``, 1 <= K < N.
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
    optimizer = _check_choice(optimizer, "optimizer", OPTIMIZERS)
    metric = _check_choice(metric, "metric", FL_METRICS)
    if not isinstance(graph, KnnGraph):
        if not isinstance(graph, str):
            raise TypeError(f"graph must be 'knn', 'dense' or a KnnGraph, got {type(graph).__name__}")
        graph = _check_choice(graph, "graph", GRAPHS)
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not 0.0 < float(epsilon) < 1.0:
        raise ValueError(f"epsilon must be a number in (0, 1), got {epsilon!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    Xt = check_embeddings(X, "X", zero_copy_readonly=True)
    n, d = Xt.shape
    k = check_k(k, n)
    Gt = None
    if ground is not None:
        Gt = check_embeddings(ground, "ground", zero_copy_readonly=True)
        if Gt.shape[1] != d:
            raise ValueError(f"ground has dimension D={Gt.shape[1]}, but X has D={d}: both must be embeddings of one model")
        if Gt.device != Xt.device:
            raise ValueError(f"ground is on {Gt.device}, X on {Xt.device}: put them on the same device")
    m = n if Gt is None else Gt.shape[0]
    w = _check_weights(weights, m)

    # pick the backend before building the graph: a backend that cannot run fails fast
    n_sample = sample_size(n, k, float(epsilon)) if optimizer == "stochastic" else n
    spec = CallSpec(device=Xt.device.type, dtype="float32", extra={"n": n, "m": m, "k": k, "optimizer": optimizer})
    impl = facility_location.select(spec, backend)

    g_info: dict
    if isinstance(graph, KnnGraph):
        graph.check_matches(Xt, Gt)
        if graph.metric != metric:
            raise ValueError(
                f"graph was built with metric={graph.metric!r} but metric={metric!r}; facility location needs a "
                f"similarity graph ('cosine' or 'ip'): pass metric={graph.metric!r} or rebuild the graph"
                if graph.metric in FL_METRICS
                else f"graph was built with metric={graph.metric!r}; facility location needs a similarity graph "
                f"('cosine' or 'ip')"
            )
        indptr, indices, sims = graph.indptr, graph.indices.astype(np.int64), graph.similarities
        g_info = {"graph": "knn (given)", "n_neighbors": graph.n_neighbors, **graph.info}
        graph_seconds = 0.0
    elif graph == "knn":
        tg = time.perf_counter()
        kg = build_knn_graph(Xt, n_neighbors, queries=Gt, metric=metric, include_self=True, progress=progress)
        indptr, indices, sims = kg.indptr, kg.indices.astype(np.int64), kg.similarities
        graph_seconds = time.perf_counter() - tg
        g_info = {"graph": "knn", "n_neighbors": kg.n_neighbors, **kg.info}
    else:
        if Gt is None and metric == "cosine":
            zero = Xt.abs().amax(dim=1) == 0
            if bool(zero.any()):
                raise ValueError(f"X row {int(zero.nonzero()[0, 0])} is all zeros; cosine needs non-zero rows")
        tg = time.perf_counter()
        indptr, indices, sims = _dense_problem(Xt, Gt, metric)
        graph_seconds = time.perf_counter() - tg
        g_info = {"graph": "dense", "nnz": int(indptr[-1])}

    problem = FacilityLocationProblem(
        np.ascontiguousarray(indptr, dtype=np.int64), np.ascontiguousarray(indices, dtype=np.int64),
        np.ascontiguousarray(sims, dtype=np.float32), w, n,
    )
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
    return Selection(
        indices=idx, gains=gains, objective=objective, backend=impl.backend,
        seconds=time.perf_counter() - t0, method="facility_location", info=info,
    )


__all__ = ["select_facility_location", "FacilityLocationProblem", "facility_location", "sample_size", "OPTIMIZERS"]
