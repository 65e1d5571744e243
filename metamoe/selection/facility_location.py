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
as CSR and any backend runs. Above it they are computed on the fly (:class:`DenseSimilarities`,
:func:`_dense_on_the_fly`): memory O((N + M) D) (a pool larger than DENSE_POOL_COPY_BYTES, e.g. a memmap,
is read tile by tile: O(M D + N)), exact lazy greedy with incremental bounds, in torch
only (CPU or GPU). The cpp and cuda backends decline such calls with a reason, so ``backend="auto"``
falls to torch: the work is dense matmuls that torch already runs at BLAS / cuBLAS speed, and a C++
path would add a second copy of that arithmetic (whose similarities must match bit for bit) for no gain.
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
from ..utils.checks import check_choice
from ..utils.memory import available_bytes
from ..utils.progress import progress_bar, update_every
from .result import Selection
from .validation import as_float64_vector, block_rows, check_embeddings, check_k, first_zero_row, row_norms

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
# backend (see _dense_on_the_fly), with memory O((N + M) D) instead of O(N M).
DENSE_MATERIALIZE_PAIRS = 2**22
# (candidate tile T, ground block B) of the on-the-fly similarity blocks, per device type. Every
# similarity is computed by one fixed-shape call "tile (T, D) @ ground block (D, B)" (see
# _DenseSimilarities): T = 32, B = 4096 keeps the float64 block (1 MiB) in a CPU core's L2; on a GPU
# the larger blocks amortise the kernel launches. Both must be multiples of 16.
DENSE_BLOCKS = {"cpu": (32, 4096), "cuda": (256, 32768)}
# graph="dense" on the fly keeps the candidates (the pool) as one float32 (N_pad, D) tensor up to this
# many bytes; a larger pool (e.g. a float16 memmap of 10M x 768, 29 GiB as float32) is read from its
# storage tile by tile instead (_StreamedCandidates), each tile cast and normalised on the way in: the same
# float32 rows (the cast and the per-row normalisation do not depend on how many rows are converted
# together), with O(block x D) memory for the candidates. The ground set is always held (M_pad, D) float32.
DENSE_POOL_COPY_BYTES = 1 << 28


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
    """Holds the cpp transpose cached on a graph object (attribute ``_facility_location_transpose``). Deep
    copies and pickles of the graph get an empty holder (the transpose references the original's arrays); a
    shallow copy shares the holder, as it shares the arrays."""

    __slots__ = ("transpose",)

    def __init__(self, transpose=None):
        self.transpose = transpose

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
        return _dense_on_the_fly(problem, k, optimizer, n_sample, seed, progress)
    dev = torch.device(device)
    f64 = dict(dtype=torch.float64, device=dev)
    n, m = problem.n_candidates, problem.n_ground
    t_ptr_np, t_row_np, t_sim_np = problem.transpose()
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


# --------------------------------------------------------------------------- dense, on the fly


def _round_up(x: int, m: int) -> int:
    return -(-int(x) // m) * m


def _dense_blocks(device_type: str, n: int, m: int) -> Tuple[int, int]:
    """(T, B) for a problem of N candidates and M ground points: DENSE_BLOCKS, shrunk for small problems,
    B chosen so that padding M to a multiple of B wastes less than 16 rows per block."""
    T, B = DENSE_BLOCKS.get(device_type, DENSE_BLOCKS["cuda"])
    for name, v in (("tile", T), ("block", B)):
        if not isinstance(v, int) or v < 16 or v % 16:
            raise ValueError(f"DENSE_BLOCKS[{device_type!r}] {name} must be a positive multiple of 16, got {v!r}")
    T = min(T, _round_up(n, 16))
    nb = -(-m // B)
    B = min(B, _round_up(-(-m // nb), 16))
    return T, B


def dense_on_the_fly_bytes(n: int, m: int, d: int, tile: int, block: int, stream_pool: bool = False) -> int:
    """Bytes that graph='dense' on the fly allocates: float32 copies of the pool and the ground set (padded
    to whole tiles / blocks, plus one unpadded conversion buffer), float64 per candidate (gain bound, its
    error terms, norm) and per ground point (coverage and its previous value, weight, norm, weight x norm),
    two flags per candidate, the (tile, block) workspace and the bound update's float32 + float64 chunk.
    ``stream_pool``: the pool is read tile by tile (see DENSE_POOL_COPY_BYTES): no pool copy, two
    converted blocks of :func:`block_rows` rows instead."""
    n_pad, m_pad = _round_up(n, tile), _round_up(m, block)
    pool = 2 * 4 * d * block_rows(d, 4) if stream_pool else 4 * d * n_pad
    return (pool + 4 * d * (m_pad + max(m, 1 if stream_pool else n)) + 8 * (5 * n_pad + 6 * m_pad) + 2 * n_pad
            + 12 * tile * block + 12 * (1 << 17))


def _stream_pool(n: int, d: int, tile: int) -> bool:
    return 4 * d * _round_up(n, tile) > DENSE_POOL_COPY_BYTES


class _StreamedCandidates:
    """The candidates of graph='dense' read from their storage on demand, never copied whole.

    (Not the same job as ``relevance._PoolRows``, which only turns a sharded pool's rows into tensors: this
    one casts to float32, normalises for cosine and pads, i.e. stands in for the precomputed copy.)

    Indexing (a slice of rows, or an index tensor of rows < N) returns what the precomputed copy would
    hold: float32 rows, L2-normalised for cosine, zero rows for the padding past N. ``shape`` is
    (N_pad, D). Used when the float32 pool would exceed DENSE_POOL_COPY_BYTES.
    """

    def __init__(self, src, n_pad: int, metric: str, device):
        self.src, self.n, self.metric, self.device = src, int(src.shape[0]), metric, device
        self.shape = (int(n_pad), int(src.shape[1]))

    def _prep(self, a):
        import torch

        a = a.to(device=self.device, dtype=torch.float32)
        return torch.nn.functional.normalize(a, dim=1) if self.metric == "cosine" else a

    def __getitem__(self, key):
        import torch

        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step != 1:
                raise ValueError("_StreamedCandidates takes contiguous slices")
            out = self._prep(self.src[start : min(stop, self.n)]) if start < self.n else None
            rows = max(0, stop - start)
            if out is not None and out.shape[0] == rows:
                return out
            full = torch.zeros(rows, self.shape[1], dtype=torch.float32, device=self.device)
            if out is not None:
                full[: out.shape[0]] = out
            return full
        idx = torch.as_tensor(key)
        if idx.numel() and int(idx.max()) >= self.n:
            raise IndexError("_StreamedCandidates: gather of a padding row")
        return self._prep(self.src[idx.to(self.src.device)])



class DenseSimilarities:
    """graph="dense" without the N x M matrix: similarities recomputed blockwise whenever they are needed.

    Holds the pool ``X`` (N_pad, D) float32 and the ground set ``Q`` (M_pad, D) float32 on one device,
    L2-normalised for cosine, zero-padded to whole candidate tiles of ``tile`` rows and ground blocks of
    ``block`` rows, and the ground weights ``w`` (M_pad,) float64 (0 on the padding).

    Every similarity s_ij is computed by the same fixed-shape call, ``X[tile of j] @ Q[block of i].T``
    into the same (tile, block) buffer, and every gain as the float64 row sums of those blocks added in
    block order. Dense BLAS does not give a dot product the same bits in every call shape (MKL's
    small-shape paths differ in the last bit), so fixing the call is what makes a gain a deterministic
    function of (j, cur): the exactness argument of :func:`_dense_on_the_fly` holds in floating point,
    duplicated candidates tie exactly, and the materialised path (built from the same calls) sees the same
    float32 similarities.
    """

    def __init__(self, X, Q, weights, n: int, m: int, tile: int, block: int):
        import torch

        self.X, self.Q, self.w = X, Q, weights
        self.n, self.m, self.tile, self.block = int(n), int(m), int(tile), int(block)
        self.n_tiles = X.shape[0] // tile
        self.n_blocks = Q.shape[0] // block
        self.device = X.device
        self._s32 = torch.empty(tile, block, dtype=torch.float32, device=X.device)
        self._g64 = torch.empty(tile, block, dtype=torch.float64, device=X.device)
        self.tile_evaluations = 0

    @classmethod
    def build(cls, Xt, Gt, weights: np.ndarray, metric: str, tile: int, block: int) -> "DenseSimilarities":
        import torch

        dev = Xt.device
        n, d = Xt.shape
        m = n if Gt is None else Gt.shape[0]

        def prep(A, rows):
            out = torch.zeros(rows, d, dtype=torch.float32, device=dev)
            step = block_rows(d, 4)
            for s in range(0, A.shape[0], step):  # converts memmaps and half precision in chunks
                a = A[s : s + step].to(device=dev, dtype=torch.float32)
                out[s : s + a.shape[0]] = torch.nn.functional.normalize(a, dim=1) if metric == "cosine" else a
            return out

        if _stream_pool(n, d, tile):
            X = _StreamedCandidates(Xt, _round_up(n, tile), metric, dev)
        else:
            X = prep(Xt, _round_up(n, tile))
        Q = prep(Xt if Gt is None else Gt, _round_up(m, block))
        w = torch.zeros(Q.shape[0], dtype=torch.float64, device=dev)
        w[:m] = torch.as_tensor(weights, dtype=torch.float64, device=dev)
        return cls(X, Q, w, n, m, tile, block)

    def _gains(self, xt, cur, row: Optional[int] = None, active=None):
        """Gains sum_i w_i max(0, s_ij - cur_i) of the ``tile`` rows ``xt`` (float64, (tile,)); with ``row``,
        also raise ``cur`` to max(cur, s_{:, row}) block by block, after that block's gains; with ``active``
        ((tile,) float64), add to it sum_i w_i |q_i| over the terms with s_ij > cur_i - eps (eps as in
        :meth:`update_bounds`): the only terms whose rounding can move the gain."""
        import torch

        acc = torch.zeros(self.tile, dtype=torch.float64, device=self.device)
        s32, g64, B = self._s32, self._g64, self.block
        if active is not None:
            self._norms()
        for b in range(self.n_blocks):
            lo, hi = b * B, (b + 1) * B
            torch.mm(xt, self.Q[lo:hi].T, out=s32)
            g64.copy_(s32).sub_(cur[lo:hi])
            if active is not None:
                active += (g64 > -self._eps).double() @ self._wq[lo:hi]
            g64.clamp_(min=0.0).mul_(self.w[lo:hi])
            acc += g64.sum(dim=1)
            if row is not None:
                torch.maximum(cur[lo:hi], s32[row].double(), out=cur[lo:hi])
        return acc

    def tile_gains(self, c: int, cur, active=None):
        """Exact gains of candidates [c * tile, (c + 1) * tile) given the coverage ``cur``."""
        self.tile_evaluations += 1
        return self._gains(self.X[c * self.tile : (c + 1) * self.tile], cur, active=active)

    def commit(self, j: int, cur) -> float:
        """The gain of candidate j (the arithmetic of :meth:`tile_gains`), then cur_i = max(cur_i, s_ij)."""
        c, p = divmod(int(j), self.tile)
        self.tile_evaluations += 1
        return float(self._gains(self.X[c * self.tile : (c + 1) * self.tile], cur, row=p)[p])

    def _norms(self):
        import torch

        if not hasattr(self, "_xn"):
            # blockwise: no (N, D) float64 copy of the pool
            xn = row_norms(self.X, torch.float64, block_rows(self.X.shape[1], 8)).to(self.device)
            self._xn = xn * (1 + 1e-6)
            self._qn = torch.linalg.vector_norm(self.Q.double(), dim=1) * (1 + 1e-6)
            self._wq = self.w * self._qn
            d = self.X.shape[1]
            self._gamma = d * 2.0**-24 / (1 - d * 2.0**-24)
            self._eps = self._gamma * float(self._xn.max()) * float(self._qn.max())
        return self._gamma

    def update_bounds(self, old, new, ghat, err, chunk_elems: int = 1 << 17):
        """After a pick raised the coverage from ``old`` to ``new`` (both (M_pad,) float64), lower every gain
        bound ``ghat`` (N_pad,) by a lower bound on its decrease, computed from the raised ground points C
        only, and add to ``err`` (N_pad,) what float rounding of that step can add.

        The decrease of candidate l is sum_{i in C} w_i max(0, min(s_il, new_i) - old_i), monotone in s_il.
        A computed s^_il is within eps >= gamma_D |x_l| |q_i| of the exact dot product (gamma_D = D u /
        (1 - D u), u = 2^-24, any summation order, FMA or not; Cauchy-Schwarz), so s^_il - eps <= s_il and
        sum_i w_i max(0, min(s^_il - eps, new_i) - old_i) is a lower bound, with no per-term bookkeeping
        (it gives away at most eps per raised term). It is computed in float32 with the thresholds
        old_i + eps rounded up and new_i - old_i rounded down, so only the float32 subtraction (2^-24 of
        each term), w in float32 (2^-24) and the float64 sum ((|C| + 2) 2^-53) can make it too large:
        ``err`` += 2^-22 (|C| + 4) times it covers them. How far the exact gains computed by the fixed-shape
        calls are from exact arithmetic is :meth:`base_error`.
        """
        import torch

        gamma = self._norms()
        changed = torch.nonzero(new > old).flatten()
        if len(changed) == 0:
            return
        Qc = self.Q[changed]
        eps = gamma * float(self._xn.max()) * float(self._qn[changed].max())  # >= every eps_il
        lo64 = old[changed] + eps
        lo = lo64.float()
        lo = torch.where(lo.double() < lo64, torch.nextafter(lo, torch.full_like(lo, float("inf"))), lo)
        span64 = new[changed] - old[changed]
        span = span64.float()
        span = torch.where(span.double() > span64, torch.nextafter(span, torch.full_like(span, float("-inf"))), span)
        wc = self.w[changed]
        rel = 2.0**-22 * (len(changed) + 4)
        rows = max(1, chunk_elems // len(changed))
        if isinstance(self.X, _StreamedCandidates):  # each chunk is converted from storage: keep it one block
            rows = min(rows, block_rows(self.X.shape[1], 4))
        for s in range(0, self.X.shape[0], rows):
            e = min(s + rows, self.X.shape[0])
            S = self.X[s:e] @ Qc.T  # (rows, |C|) float32
            S.sub_(lo)
            torch.minimum(S, span, out=S)
            dec = S.clamp_(min=0.0).double() @ wc
            ghat[s:e] -= dec
            err[s:e] += rel * dec

    def base_error(self, xn, ghat, active):
        """How far an exact gain (fixed-shape calls) can be from exact arithmetic: gamma_D |x_l| sum_i w_i |q_i|
        over the ``active`` terms (those whose float32 similarity can move the gain; they only get fewer as
        the coverage grows), plus (M + 8) 2^-53 |ghat_l| for the float64 arithmetic, counted twice: for the exact gain an
        estimate started from and for the one it is compared with. (N_pad,) or (tile,) float64."""
        rel = 2.0 * (self.Q.shape[0] + 8) * 2.0**-53
        return 2.0 * self._gamma * xn * active * (1 + 1e-6) + rel * ghat.abs().nan_to_num(posinf=0.0, neginf=0.0)

    def rows_gains(self, idx, cur):
        """Gains of arbitrary candidates ``idx`` (gathered in tiles; stochastic greedy's samples)."""
        import torch

        out = torch.empty(len(idx), dtype=torch.float64, device=self.device)
        buf = torch.zeros(self.tile, self.X.shape[1], dtype=torch.float32, device=self.device)
        for s in range(0, len(idx), self.tile):
            part = idx[s : s + self.tile]
            buf.zero_()
            buf[: len(part)] = self.X[part]
            self.tile_evaluations += 1
            out[s : s + len(part)] = self._gains(buf, cur)[: len(part)]
        return out

    def similarity_tile(self, c: int):
        """s_ij for the candidates of tile c and every (padded) ground point: float32 (tile, M_pad)."""
        import torch

        out = torch.empty(self.tile, self.Q.shape[0], dtype=torch.float32, device=self.device)
        xt = self.X[c * self.tile : (c + 1) * self.tile]
        for b in range(self.n_blocks):
            lo, hi = b * self.block, (b + 1) * self.block
            torch.mm(xt, self.Q[lo:hi].T, out=self._s32)
            out[:, lo:hi] = self._s32
        return out


def _dense_on_the_fly(sims: DenseSimilarities, k: int, optimizer: str, n_sample: int, seed: int,
                      progress: bool = False):
    """Greedy facility location on the dense similarities, computed blockwise, never stored (torch, any device).

    State: ``cur`` (M,) float64, the coverage max(0, max_{j in A} s_ij) of each ground point (every value
    a float32 similarity or 0), and per candidate l a bound u_l >= g_l on its gain
    g_l = sum_i w_i max(0, s_il - cur_i), kept as u_l = ghat_l + err_l + base_l; ``exact`` marks the
    candidates whose ghat is g_l itself, computed with the current ``cur`` by the fixed-shape calls of
    :class:`DenseSimilarities` (the arithmetic that defines the picks; u_l = ghat_l for them).

    Lazy greedy, exact. Each round takes j = argmax u (the first maximal index). If u_j is exact, every
    other candidate l has u_l < g_j, or u_l = g_j and l > j, hence g_l <= u_l and naive greedy (argmax of
    the exact gains, ties to the lowest index) picks j too; otherwise j's tile of T candidates is
    recomputed exactly and the round repeats. After a pick j raises the coverage on the ground points
    C_j (usually few once every region holds a pick), ghat_l of every candidate drops by a certified lower
    bound on its decrease, sum_{i in C_j} w_i max(0, min(s_il - eps, new_i) - old_i), from one
    (N x |C_j|) block of similarities (:meth:`DenseSimilarities.update_bounds`); err_l takes the rounding
    of that step, base_l how far an exact gain can be from exact arithmetic (twice: the one ghat started
    from, the one it is compared with; :meth:`DenseSimilarities.base_error`). Gains only decrease, so u
    stays an upper bound on the gain the exact arithmetic would give now. Cost per pick: |C_j| N D for
    the update plus a few tiles of T M D, instead of plain lazy greedy's re-evaluation of every candidate
    whose stale bound passed the best gain (on clustered data every pick lowers every gain a little, and
    plain lazy greedy re-evaluated about half the pool per pick). ``naive`` recomputes every tile each
    pick (tests); the ``stochastic`` sample is gathered into tiles. The gain recorded for a pick is
    recomputed with the pick's coverage update, in the
    arithmetic of the exact gains.
    """
    import torch

    T, n = sims.tile, sims.n
    dev = sims.device
    n_pad = sims.X.shape[0]
    neg_inf = float("-inf")
    f64 = dict(dtype=torch.float64, device=dev)
    cur = torch.zeros(sims.Q.shape[0], **f64)
    avail = torch.arange(n_pad, device=dev) < n
    ghat = torch.full((n_pad,), neg_inf, **f64)

    def refresh(c: int):
        sl = slice(c * T, (c + 1) * T)
        if optimizer == "lazy":
            act = torch.zeros(T, **f64)
            g = sims.tile_gains(c, cur, active=act)
            base[sl] = sims.base_error(sims._xn[sl], g, act)
            err[sl] = 0.0
            exact[sl] = True
        else:
            g = sims.tile_gains(c, cur)
        ghat[sl] = torch.where(avail[sl], g, neg_inf)

    def refresh_all(desc: Optional[str] = None):
        with progress_bar(sims.n_tiles, progress and desc is not None, desc or "", unit="tile") as bar:
            for c in range(sims.n_tiles):
                refresh(c)
                bar.update(1)

    picks, gains = [], []
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    if optimizer == "lazy":
        sims._norms()
        err = torch.zeros(n_pad, **f64)
        base = torch.zeros(n_pad, **f64)
        exact = torch.ones(n_pad, dtype=torch.bool, device=dev)
        refresh_all("facility location (dense, initial gains)")
    with progress_bar(k, progress, "facility location (dense, torch)") as bar:
        for t in range(k):
            if optimizer == "naive":
                refresh_all()
                j = int(torch.argmax(ghat))
            elif optimizer == "lazy":
                while True:
                    j = int(torch.argmax(torch.where(exact, ghat, ghat + err + base)))  # first maximal index
                    if bool(exact[j]):
                        break
                    refresh(j // T)
            else:
                remaining = torch.nonzero(avail).flatten()
                r = len(remaining)
                sample = remaining if n_sample >= r else remaining[torch.randperm(r, generator=gen)[:n_sample].to(dev)]
                vals = sims.rows_gains(sample, cur)
                j = int(sample[vals == vals.max()].min())
            old = cur.clone() if optimizer == "lazy" else None
            picks.append(j)
            gains.append(sims.commit(j, cur))
            avail[j] = False
            ghat[j] = neg_inf
            if optimizer == "lazy":
                exact.zero_()
                if t + 1 < k:
                    sims.update_bounds(old, cur, ghat, err)
            bar.update(1)
    objective = float((sims.w[: sims.m] * cur[: sims.m]).sum())
    return np.asarray(picks, dtype=np.int64), np.asarray(gains, dtype=np.float64), objective


# --------------------------------------------------------------------------- graph construction


def _check_weights(weights: Any, m: int) -> np.ndarray:
    if weights is None:
        return np.ones(m, dtype=np.float64)
    w = as_float64_vector(weights, m, "weights", ", one per ground point")
    if w.min() < 0:
        raise ValueError(f"weights must be >= 0, got a minimum of {w.min():.4g} at {int(np.argmin(w))}")
    return w


def _dense_problem(sims: DenseSimilarities) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every positive similarity between ground rows and pool rows, as CSR (float32), from the same fixed-shape
    calls as the on-the-fly path (so both see bitwise the same similarities)."""
    import torch

    n, m = sims.n, sims.m
    S = torch.empty(sims.X.shape[0], sims.Q.shape[0], dtype=torch.float32, device=sims.device)
    for c in range(sims.n_tiles):
        S[c * sims.tile : (c + 1) * sims.tile] = sims.similarity_tile(c)
    St = S[:n, :m].T
    pos = St > 0
    counts = pos.sum(1).cpu().numpy()
    r, c = pos.nonzero(as_tuple=True)  # row-major order: rows in order, columns increasing
    ptr = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    return ptr, c.cpu().numpy().astype(np.int64), St[r, c].cpu().numpy().astype(np.float32)


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
            up front (MemoryError naming N,
            M, D and the bytes); N = M = 1e5, D = 64, k = 200 takes minutes on one CPU core; float32
            similarities, float64 gains; same picks as the materialised path) or a :class:`KnnGraph` from ``build_knn_graph(X, K, queries=ground)``, which
            is checked against X and ground (shape and fingerprint; a graph built for other data raises).
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
    on_the_fly = isinstance(graph, str) and graph == "dense" and n * m > DENSE_MATERIALIZE_PAIRS
    graph_kind = "dense-on-the-fly" if on_the_fly else (graph if isinstance(graph, str) else "knn")
    spec = CallSpec(device=Xt.device.type, dtype="float32",
                    extra={"n": n, "m": m, "k": k, "optimizer": optimizer, "graph": graph_kind})
    impl = facility_location.select(spec, backend)
    if graph == "dense":
        tile, block = _dense_blocks(Xt.device.type, n, m)
        stream = _stream_pool(n, d, tile)
        need = dense_on_the_fly_bytes(n, m, d, tile, block, stream_pool=stream)
        if not on_the_fly:
            need += 4 * _round_up(n, tile) * _round_up(m, block) + 24 * n * m  # the matrix and the CSR
        have, _ = available_bytes(Xt.device)
        if need > have:
            what = ("similarities on the fly: float32 copies of pool and ground, float64 gains and coverage, a "
                    f"{tile} x {block} block workspace") if on_the_fly else "the materialised similarities and their CSR"
            raise MemoryError(
                f"graph='dense' needs about {need / 2**30:.2f} GiB ({need} bytes) for N={n} pool rows, M={m} ground "
                f"points, D={d} ({what}), "
                f"but only {have / 2**30:.2f} GiB ({have} bytes) is available on {Xt.device}; use graph='knn' "
                f"(a kNN-sparsified graph) or a smaller pool"
            )

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
        if Gt is None and metric == "cosine":
            zero = first_zero_row(Xt)  # blockwise: no N x D temporary
            if zero is not None:
                raise ValueError(f"X row {zero} is all zeros; cosine needs non-zero rows")
        tg = time.perf_counter()
        dense = DenseSimilarities.build(Xt, Gt, w, metric, tile, block)
        g_info = {"graph": "dense (on the fly)" if on_the_fly else "dense", "tile": tile, "block": block}
        if not on_the_fly:
            indptr, indices, sims = _dense_problem(dense)
            g_info["nnz"] = int(indptr[-1])
            del dense
        graph_seconds = time.perf_counter() - tg

    if on_the_fly:
        problem = dense
    else:
        if indices.dtype not in (np.int32, np.int64):
            indices = indices.astype(np.int64)
        problem = FacilityLocationProblem(
            np.ascontiguousarray(indptr, dtype=np.int64), np.ascontiguousarray(indices),
            np.ascontiguousarray(sims, dtype=np.float32), w, n,
            cache_on=graph if isinstance(graph, KnnGraph) else None,
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
    if on_the_fly:  # candidate gains computed (each tile evaluation covers `tile` candidates)
        info["candidate_evaluations"] = problem.tile_evaluations * problem.tile
    return Selection(
        indices=idx, gains=gains, objective=objective, backend=impl.backend,
        seconds=time.perf_counter() - t0, method="facility_location", info=info,
    )


__all__ = [
    "select_facility_location", "FacilityLocationProblem", "DenseSimilarities", "facility_location", "sample_size",
    "OPTIMIZERS", "DENSE_MATERIALIZE_PAIRS", "DENSE_BLOCKS",
]
