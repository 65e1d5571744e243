"""Relevance-weighted DPP, greedy MAP inference (Chen et al., NeurIPS 2018), at million-sample scale.

Two kernels, ``r`` the relevance and ``Xn`` the L2-normalised rows of ``X``:

* ``cosine``: ``L = diag(r) (Xn Xn^T + ridge I) diag(r)``. Greedy MAP picks, at each step, the
  candidate with the largest residual variance given the picks so far (ties to the lowest index):
  exactly Chen et al.'s fast greedy. Instead of their k x N Cholesky workspace, the residual updates
  come from feature space (a Gram-Schmidt direction per pick), so one pick costs one N x D
  matrix-vector product and nothing of size N x N or k x N is ever stored.
* ``rbf``: ``L = diag(r) (K + ridge I) diag(r)``, ``K_ij = exp(-gamma ||xn_i - xn_j||^2)``, full rank.
  Chen et al.'s algorithm as written: each pick computes one kernel row ``K[j, :]`` from ``X`` on the
  fly (O(N D)) and updates a k x N float64 Cholesky workspace (O(N t)); the workspace is checked
  against free memory before anything runs.

``candidates=M`` first keeps the top-M by relevance (the paper's protocol: top 2,000, then 500 picks).

Implementations: op ``dpp_greedy`` (cosine): ``cuda`` (csrc/cuda/dpp_greedy.cu), ``cpp``
(csrc/cpu/dpp_greedy.cpp, OpenMP) and ``torch`` (this file; any device). Op ``dpp_greedy_rbf``: ``cpp``
and ``torch`` (any device, so also the GPU path). The C++ code reads float16/bfloat16 storage in
place (a float16 ``np.memmap`` is never copied to float32); the torch paths stream X in row blocks
(``chunk_rows``), converting one block at a time, so a pool larger than memory works on every backend.
"""

from __future__ import annotations

import numbers
import time
import warnings
from typing import Any, Optional

import numpy as np

from ..backends import CallSpec, define_op
from ..backends.availability import require_extension
from ..backends.tensors import dtype_name
from ..utils.memory import available_bytes
from ..utils.progress import progress_bar, update_every
from .result import Selection
from .validation import (
    block_rows,
    check_embeddings,
    check_k,
    check_nonnegative,
    check_relevance,
    first_zero_row,
    row_norms,
)

dpp_greedy = define_op(
    "dpp_greedy",
    priority=("cuda", "cpp", "torch"),
    doc="Greedy MAP for the relevance-weighted cosine DPP, in feature space (O(N D k)).",
)
dpp_greedy_rbf = define_op(
    "dpp_greedy_rbf",
    priority=("cpp", "torch"),
    doc="Greedy MAP for the relevance-weighted RBF DPP: Chen et al.'s incremental Cholesky, rows on the fly.",
)

DEFAULT_EPS = 1e-9
KERNELS = ("cosine", "rbf")
STRATEGIES = ("auto", "lazy", "sweep")
DEFAULT_COSINE_RIDGE = 1e-3  # the select command's ridge for the cosine kernel: full rank, k > D picks stay diverse
GAMMA_SAMPLE = 1024  # rows used to estimate the default RBF gamma (median heuristic)


class DppRankWarning(UserWarning):
    """The kernel ran out of rank before k picks (a linear kernel has rank <= D)."""


def _chunk(k: int) -> int:
    return update_every(k, per=100, cap=256)


# --------------------------------------------------------------------------- torch


def add_direction(Qd, Qe, t: int, vd, r_j: float, ridge: float, dj2: float) -> None:
    """Write the pick's Gram-Schmidt direction into row t of Qd (feature part) and Qe (ridge coordinates).

    ``vd`` (D,) float64 is the pick's scaled feature vector r_j x_j / ||x_j||; classical Gram-Schmidt,
    twice, against the t earlier directions, then division by d_j = sqrt(dj2). Shared by the torch
    backend and the sharded version so that both do exactly the same arithmetic.
    """
    import torch

    ve = torch.zeros(t + 1, dtype=torch.float64, device=vd.device)
    for _ in range(2 if t > 0 else 0):
        c = Qd[:t] @ vd
        if Qe is not None:
            c = c + Qe[:t, : t + 1] @ ve
        vd = vd - c @ Qd[:t]
        if Qe is not None:
            ve = ve - c @ Qe[:t, : t + 1]
    inv = 1.0 / np.sqrt(dj2)
    Qd[t] = vd * inv
    if Qe is not None:
        ve[t] = np.sqrt(ridge) * r_j
        Qe[t, : t + 1] = ve * inv


def matvec_rows(d: int, chunk_rows=None) -> int:
    """Rows per block of the per-pick N x D product: about 16 MiB of float64, a multiple of 64.

    A multiple of 64 so that a row's offset inside its block is its global index mod 64 whether the pool
    is read whole or as 64-row-aligned shards (:func:`metamoe.selection.distributed.shard_range`): BLAS
    matrix-vector kernels can round a row differently depending on where it sits in the block, and the
    sharded greedy must reproduce the single-process products bit for bit.
    """
    if chunk_rows is not None:
        return int(chunk_rows)
    return max(64, block_rows(d, 8) // 64 * 64)


def matvec_blocks(X, q, work, rows: int):
    """(N,) float64 ``X @ q`` with X read ``rows`` rows at a time and cast to ``work`` per block.

    X in ``work`` already (no conversion needed): one product. Otherwise (float16/bfloat16/float32
    storage, e.g. a memmap of a pool larger than memory) only one converted block exists at a time.
    """
    import torch

    if X.dtype == work:
        return (X @ q).double()
    out = torch.empty(X.shape[0], dtype=torch.float64, device=X.device)
    for a in range(0, X.shape[0], rows):
        out[a : a + rows] = X[a : a + rows].to(work) @ q
    return out


@dpp_greedy.register("torch", devices=("cpu", "cuda"), dtypes=("float32", "float16", "bfloat16", "float64"))
def dpp_greedy_torch(
    X, relevance: np.ndarray, k: int, ridge: float, eps: float, progress: bool = False, *, chunk_rows=None
):
    """Pure PyTorch: float64 on the CPU; on a GPU the N x D product runs in float32, the rest in float64.

    X is never converted whole: each pick's N x D product reads ``chunk_rows`` rows at a time (None:
    16 MiB blocks), so a float16 memmap larger than memory is streamed with O(block + N) memory.
    """
    import torch

    dev = X.device
    work = torch.float64 if dev.type == "cpu" else torch.float32
    n, d = X.shape
    rows = matvec_rows(d, chunk_rows)
    r = torch.as_tensor(relevance, dtype=torch.float64, device=dev)
    norms = row_norms(X, work, rows)
    scale = r / norms
    d2 = r * r * (1.0 + ridge)
    Qd = torch.zeros(k, d, dtype=torch.float64, device=dev)
    Qe = torch.zeros(k, k, dtype=torch.float64, device=dev) if ridge > 0 else None
    picks, resid = [], []
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float64, device=dev)
    with progress_bar(k, progress, "dpp (torch)") as bar:
        for t in range(k):
            j = int(torch.argmax(d2))  # first maximal index: ties go to the lowest index
            dj2 = float(d2[j])
            if not dj2 > eps:
                break
            picks.append(j)
            resid.append(dj2)
            add_direction(Qd, Qe, t, scale[j] * X[j].to(work).double(), float(r[j]), ridge, dj2)
            e = matvec_blocks(X, Qd[t].to(work), work, rows) * scale
            d2 = d2 - e * e
            d2[j] = neg_inf  # stays -inf: -inf - e^2 = -inf
            bar.update(1)
    return np.asarray(picks, dtype=np.int64), np.asarray(resid, dtype=np.float64)


# --------------------------------------------------------------------------- cpp


_CPP_SUFFIX = {"float32": "F32", "float64": "F64", "float16": "F16", "bfloat16": "BF16"}


def _cpp_storage(X):
    """(array, class suffix) for the C++ module: a zero-copy NumPy view of a CPU tensor (16-bit: uint16)."""
    import torch

    X = X.detach()
    if not X.is_contiguous():
        X = X.contiguous()
    name = dtype_name(X)
    if X.dtype in (torch.float16, torch.bfloat16):
        return X.view(torch.int16).numpy().view(np.uint16), _CPP_SUFFIX[name]
    return X.numpy(), _CPP_SUFFIX[name]


def _run_cpp_state(state, k: int, eps: float, progress: bool, desc: str):
    idx, res = [], []
    with progress_bar(k, progress, desc) as bar:
        while state.picked < k and not state.exhausted:
            i, r = state.run(min(_chunk(k), k - state.picked), float(eps))
            idx.append(i)
            res.append(r)
            bar.update(len(i))
    return np.concatenate(idx) if idx else np.zeros(0, np.int64), np.concatenate(res) if res else np.zeros(0)


@dpp_greedy.register("cpp", devices=("cpu",), dtypes=("float32", "float64", "float16", "bfloat16"))
def dpp_greedy_cpp(
    X,
    relevance: np.ndarray,
    k: int,
    ridge: float,
    eps: float,
    progress: bool = False,
    *,
    strategy: str = "auto",
    stats: Optional[dict] = None,
):
    """C++/OpenMP: reads X in place (16-bit types converted in the inner loop), float64 arithmetic.

    ``strategy``: ``"sweep"`` (one pass over the pool per pick), ``"lazy"`` (a heap of stale residuals,
    only the top brought up to date) or ``"auto"`` (lazy, switching to the sweep when that is cheaper);
    all three give bit-identical picks. ``stats`` (a dict) receives the work done: ``row_updates``,
    ``row_dots`` (row . direction products; the sweep makes N - t per pick) and ``switched_at``.
    """
    _C = require_extension("_C")
    arr, suffix = _cpp_storage(X)
    state = getattr(_C, "DppGreedyCosine" + suffix)(arr, relevance, float(ridge), int(k), strategy)
    out = _run_cpp_state(state, k, eps, progress, f"dpp (cpp, {strategy})")
    if stats is not None:
        stats.update(
            row_updates=state.row_updates,
            row_dots=state.row_dots,
            refreshes=state.refreshes,
            switched_at=state.switched_at,
        )
    return out


# --------------------------------------------------------------------------- cuda

_CUDA_DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}


@dpp_greedy.register("cuda", devices=("cuda",), dtypes=("float32", "float16", "bfloat16"))
def dpp_greedy_cuda(X, relevance: np.ndarray, k: int, ridge: float, eps: float, progress: bool = False):
    """CUDA kernels: X read in its storage dtype, float64 residuals; no host sync inside a chunk of picks."""
    import torch

    ext = require_extension("_C_cuda")
    X = X.contiguous()
    n, d = X.shape
    dev = X.device
    f64 = dict(dtype=torch.float64, device=dev)
    nb = ext.dpp_num_blocks(n)
    rel = torch.as_tensor(relevance, **f64)
    bufs = [
        torch.empty(n, **f64),  # scale
        torch.empty(n, **f64),  # d2
        torch.empty(k, d, **f64),  # qd: the directions
        torch.zeros(k, **f64),  # coef
        torch.empty(ext.dpp_partial_chunks(k), d, **f64),  # partial sums of the projection
        torch.empty(nb, **f64),  # block_val
        torch.empty(nb, dtype=torch.int64, device=dev),  # block_idx
        torch.full((1,), -1, dtype=torch.int64, device=dev),  # best_idx
        torch.zeros(1, **f64),  # best_val
        torch.full((1,), 2**31 - 1, dtype=torch.int32, device=dev),  # bad_row
        torch.zeros(1, dtype=torch.int32, device=dev),  # stopped
    ]
    ws = [b.data_ptr() for b in bufs]
    out_idx = torch.full((k,), -1, dtype=torch.int64, device=dev)
    out_res = torch.zeros(k, **f64)
    stream = torch.cuda.current_stream(dev).cuda_stream
    code = _CUDA_DTYPES[dtype_name(X)]
    with torch.cuda.device(dev):
        ext.set_device(dev.index if dev.index is not None else torch.cuda.current_device())
        ext.dpp_init(X.data_ptr(), code, n, d, rel.data_ptr(), float(ridge), ws, nb, stream)
        bad = int(bufs[9].item())
        if bad != 2**31 - 1:
            raise ValueError(
                f"X row {bad} has zero or non-finite norm; cosine similarity needs non-zero finite rows"
            )
        t = 0
        with progress_bar(k, progress, "dpp (cuda)") as bar:
            while t < k:
                count = min(_chunk(k), k - t)
                ext.dpp_picks(
                    X.data_ptr(),
                    code,
                    n,
                    d,
                    k,
                    float(eps),
                    t,
                    count,
                    ws,
                    nb,
                    out_idx.data_ptr(),
                    out_res.data_ptr(),
                    stream,
                )
                t += count
                stopped = bool(bufs[10].item())  # one sync per chunk, for the progress bar and the stop test
                bar.update(count)
                if stopped:
                    break
    idx = out_idx.cpu().numpy()
    res = out_res.cpu().numpy()
    m = int((idx >= 0).sum())
    return idx[:m].copy(), res[:m].copy()


# --------------------------------------------------------------------------- rbf


def _inv_norms(X, chunk_rows: int, work=None):
    """(N,) float64 1 / ||x_i||, computed chunk by chunk (X may be a zero-copy memmap view); each chunk is
    cast to ``work`` (None: kept) before the float64 norm, as the kernel rows see it."""
    import torch

    out = torch.empty(X.shape[0], dtype=torch.float64, device=X.device)
    for a in range(0, X.shape[0], chunk_rows):
        b = X[a : a + chunk_rows]
        b = b if work is None else b.to(work)
        out[a : a + chunk_rows] = 1.0 / torch.linalg.vector_norm(b.double(), dim=1)
    return out


@dpp_greedy_rbf.register(
    "torch", devices=("cpu", "cuda"), dtypes=("float32", "float16", "bfloat16", "float64")
)
def dpp_greedy_rbf_torch(
    X,
    relevance: np.ndarray,
    k: int,
    ridge: float,
    eps: float,
    progress: bool = False,
    *,
    gamma: float = 1.0,
    chunk_rows: Optional[int] = None,
):
    """Pure PyTorch, Chen et al.'s algorithm: kernel row per pick from X, k x N float64 Cholesky rows.

    CPU: float64 throughout. GPU: the N x D kernel-row product runs in float32, the rest in float64.
    X is never converted whole: the per-pick work reads ``chunk_rows`` rows at a time (None: 16 MiB
    blocks), each cast to the working dtype, so a float16 memmap is streamed and the temporaries stay
    small next to the k x N workspace.
    """
    import torch

    dev = X.device
    work = torch.float64 if dev.type == "cpu" else torch.float32
    n, d = X.shape
    chunk_rows = block_rows(d, 8) if chunk_rows is None else int(chunk_rows)
    f64 = dict(dtype=torch.float64, device=dev)
    r = torch.as_tensor(relevance, **f64)
    inv = _inv_norms(X, chunk_rows, work)
    d2 = r * r * (1.0 + ridge)
    C = torch.empty(k, n, **f64)  # Chen et al.'s Cholesky rows c_t (row t written at pick t)
    picks, resid = [], []
    with progress_bar(k, progress, "dpp rbf (torch)") as bar:
        for t in range(k):
            j = int(torch.argmax(d2))  # first maximal index: ties go to the lowest index
            dj2 = float(d2[j])
            if not dj2 > eps:
                break
            picks.append(j)
            resid.append(dj2)
            xj = (X[j].to(work).double() * inv[j]).to(work)
            cj = C[:t, j].clone()
            inv_dj = 1.0 / np.sqrt(dj2)
            for a in range(0, n, chunk_rows):
                b = min(n, a + chunk_rows)
                cos = (X[a:b].to(work) @ xj).double() * inv[a:b]
                dist2 = torch.clamp(2.0 - 2.0 * cos, min=0.0)  # ||xn_i - xn_j||^2 for unit rows
                lrow = float(r[j]) * r[a:b] * torch.exp(-gamma * dist2)
                e = (lrow - cj @ C[:t, a:b]) * inv_dj if t else lrow * inv_dj
                C[t, a:b] = e
                d2[a:b] -= e * e
            d2[j] = float("-inf")
            bar.update(1)
    return np.asarray(picks, dtype=np.int64), np.asarray(resid, dtype=np.float64)


@dpp_greedy_rbf.register("cpp", devices=("cpu",), dtypes=("float32", "float64", "float16", "bfloat16"))
def dpp_greedy_rbf_cpp(
    X,
    relevance: np.ndarray,
    k: int,
    ridge: float,
    eps: float,
    progress: bool = False,
    *,
    gamma: float = 1.0,
    chunk_rows: Optional[int] = None,
):
    """C++/OpenMP: kernel row on the fly from X read in place, N x k float64 Cholesky rows."""
    _C = require_extension("_C")
    arr, suffix = _cpp_storage(X)
    state = getattr(_C, "DppGreedyRbf" + suffix)(arr, relevance, float(ridge), int(k), float(gamma))
    return _run_cpp_state(state, k, eps, progress, "dpp rbf (cpp)")


def default_rbf_gamma(X, *, sample: int = GAMMA_SAMPLE, seed: int = 0) -> float:
    """Median heuristic: 1 / median ||xn_i - xn_j||^2 over pairs of up to ``sample`` rows (seeded, so fixed).

    ``X``: (N, D) torch tensor of non-zero rows, any float dtype. Rows are L2-normalised first, so the
    squared distances lie in [0, 4] (about 2 for unrelated directions in high dimension). Returns 1.0
    when every sampled pair is identical.
    """
    import torch

    n = X.shape[0]
    if n > sample:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=sample, replace=False))
        Xs = X[torch.as_tensor(rows, device=X.device)]
    else:
        Xs = X
    Xs = Xs.double()
    Xs = Xs / torch.linalg.vector_norm(Xs, dim=1, keepdim=True)
    if Xs.shape[0] < 2:
        return 1.0
    dist2 = torch.clamp(2.0 - 2.0 * (Xs @ Xs.T), min=0.0)
    iu = torch.triu_indices(Xs.shape[0], Xs.shape[0], offset=1, device=Xs.device)
    med = float(torch.median(dist2[iu[0], iu[1]]))
    return 1.0 / med if med > 0 else 1.0


def rbf_workspace_bytes(n: int, k: int) -> int:
    """Bytes the RBF greedy holds: the k x N float64 Cholesky rows plus O(N) float64 vectors."""
    return 8 * n * k + 8 * 4 * n


def _check_rbf_memory(n: int, k: int, device, max_workspace_bytes: Optional[int]) -> int:
    need = rbf_workspace_bytes(n, k)
    if max_workspace_bytes is None:
        free, where = available_bytes(device)
        limit = int(0.8 * free)
        where = f"80% of the free {where}"
    else:
        limit, where = int(max_workspace_bytes), "max_workspace_bytes"
    if need > limit:
        raise ValueError(
            f"kernel='rbf' needs a k x N float64 Cholesky workspace: k={k} x N={n} x 8 bytes "
            f"= {need / 2**30:.2f} GiB ({need} bytes), more than {where} ({limit / 2**30:.2f} GiB). "
            f"Pass candidates=M to run the DPP on the top-M samples by relevance (the paper's protocol: "
            f"candidates=2000), lower k, or use kernel='cosine' with ridge > 0 (no k x N workspace)."
        )
    return need


# --------------------------------------------------------------------------- public API


def _memmap_past_memory(X) -> bool:
    """Whether ``X`` is an ``np.memmap`` (or a view of one) larger than 80% of the host's free memory."""
    base = X
    while isinstance(base, np.ndarray) and not isinstance(base, np.memmap) and base.base is not None:
        base = base.base
    if not isinstance(base, np.memmap):
        return False
    return X.nbytes > 0.8 * available_bytes("cpu")[0]


def _strategy_ran(strategy: str, stats: dict) -> str:
    """What ran: ``"sweep"``, ``"lazy"`` or ``"lazy, then sweep from pick T"`` (auto's switch)."""
    if strategy == "sweep":
        return "sweep"
    if stats.get("switched_at", -1) >= 0:
        return f"lazy, then sweep from pick {stats['switched_at']}"
    return "lazy"


def top_candidates(relevance: np.ndarray, m: int) -> np.ndarray:
    """Indices of the ``m`` largest relevance values, ties to the lower index, returned in ascending order.

    ``relevance``: (N,) float64. Returns (m,) int64, sorted ascending (so that the DPP's ties-to-lowest
    index rule means the same thing on the candidates as on the pool).
    """
    order = np.argsort(-relevance, kind="stable")  # stable: equal relevance keeps index order
    return np.sort(order[:m]).astype(np.int64)


def select_dpp(
    X: Any,
    k: int,
    relevance: Optional[Any] = None,
    *,
    kernel: str = "cosine",
    ridge: float = 0.0,
    gamma: Optional[float] = None,
    candidates: Optional[int] = None,
    eps: float = DEFAULT_EPS,
    backend: Optional[str] = None,
    progress: bool = True,
    chunk_rows: Optional[int] = None,
    max_workspace_bytes: Optional[int] = None,
    strategy: str = "auto",
) -> Selection:
    """Pick ``k`` samples that are relevant and diverse: greedy MAP of a relevance-weighted DPP.

    Args:
        X: (N, D) embeddings of the public pool; NumPy array or ``np.memmap`` (read in place, also when
            read-only), torch tensor (CPU or CUDA) or CuPy array; float32, float16, bfloat16 or float64.
            Rows must be finite and non-zero.
        k: number of picks, 1 <= k <= N (and k <= candidates).
        relevance: (N,) weights r_i in [0, 1] (e.g. from :func:`relevance_scores`); None means all ones
            (plain diversity).
        kernel: ``"cosine"``: L = diag(r) (Xn Xn^T + ridge I) diag(r), solved in feature space
            (O(N D k), no N x N or k x N memory). ``"rbf"``: L = diag(r) (K + ridge I) diag(r),
            K_ij = exp(-gamma ||xn_i - xn_j||^2) on the normalised rows, full rank; Chen et al.'s
            incremental Cholesky with each kernel row computed on the fly (O(N D + N t) per pick) and a
            k x N float64 workspace, checked against free memory up front.
        ridge: >= 0. With the cosine kernel and ridge = 0 the kernel has rank <= D: greedy stops once
            the best residual falls below ``eps`` (and warns); ridge > 0 makes it full rank so that
            k > D picks stay diverse.
        gamma: RBF bandwidth (> 0). None: the median heuristic, 1 / median squared distance between
            normalised rows over a fixed sample of up to 1,024 rows (of the candidates when
            ``candidates`` is given); see :func:`default_rbf_gamma`. Only for ``kernel="rbf"``.
        candidates: None (the whole pool) or M with k <= M <= N: keep only the top-M samples by
            relevance (ties to the lower index) and run the DPP on those; indices still refer to the
            full pool. ``candidates=2000`` with ``k=500`` is the paper's protocol. Only the M candidate rows are
            checked for NaN/inf (the rest of the pool is never read).
        eps: stop when the best residual is <= eps times the largest diagonal entry of L.
        backend: ``"auto"`` (default, or ``METAMOE_BACKEND``), ``"cuda"``, ``"cpp"`` or ``"torch"``
            (the RBF kernel has ``cpp`` and ``torch``; torch also runs on a GPU).
        progress: show a tqdm progress bar (only on a terminal).
        chunk_rows: rows of X per block in the torch paths and the input scans (bounds the temporaries;
            None: blocks of about 16 MiB of float64, 2,730 rows at D = 768). X itself is never
            converted or copied whole, so an ``np.memmap`` larger than memory works (the cpp backend
            reads it in place; the torch one streams it once per pick).
        max_workspace_bytes: cap for the RBF workspace; None means 80% of the free memory of the
            device (host MemAvailable, or ``torch.cuda.mem_get_info``).
        strategy: how the cosine kernel's ``cpp`` backend finds each pick; every strategy gives the same
            picks. ``"sweep"``: one pass over the whole pool per pick (memory-bound). ``"lazy"``: residuals
            only shrink, so stale ones are upper bounds kept in a heap, and each pick brings only the top
            candidates up to date, many directions per row read (compute-bound; at N = 1M, D = 768,
            k = 768 about 3x faster than the sweep on a 2-core CPU). ``"auto"`` (default): lazy, switching
            to the sweep when a cost model says the lazy updates cost more (small D with near-uniform
            residuals); the sweep from the start for an ``np.memmap`` larger than the free memory (the lazy
            updates would read it at random from disk). The torch and CUDA backends always sweep
            (``"lazy"`` there is an error); the RBF kernel takes only ``"auto"``.

    Returns:
        :class:`Selection` with ``indices`` (int64, pick order, into the full pool), ``gains`` (log of
        each pick's residual, so that ``objective`` = log det L[S, S]), ``backend`` and ``seconds``;
        ``info`` records the kernel, ridge, gamma and candidates.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(map(repr, KERNELS))}, got {kernel!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(map(repr, STRATEGIES))}, got {strategy!r}")
    if kernel == "rbf" and strategy != "auto":
        raise ValueError(f"strategy={strategy!r} applies to kernel='cosine' only; the rbf kernel takes 'auto'")
    t0 = time.perf_counter()
    # with candidates only the M gathered rows are scanned for NaN/inf (below), not the whole pool
    Xt = check_embeddings(X, zero_copy_readonly=True, check_finite=candidates is None)
    n, d = Xt.shape
    k = check_k(k, n)
    r = check_relevance(relevance, n)
    ridge = check_nonnegative(ridge, "ridge")
    eps = check_nonnegative(eps, "eps")
    if gamma is not None:
        if kernel != "rbf":
            raise ValueError(
                f"gamma is only used by kernel='rbf', got gamma={gamma!r} with kernel={kernel!r}"
            )
        gamma = check_nonnegative(gamma, "gamma")
        if gamma == 0:
            raise ValueError("gamma must be > 0 (the RBF bandwidth), got 0")
    if chunk_rows is not None and (
        isinstance(chunk_rows, bool) or not isinstance(chunk_rows, numbers.Integral) or chunk_rows < 1
    ):
        raise ValueError(f"chunk_rows must be a positive integer or None, got {chunk_rows!r}")
    rows = matvec_rows(d, chunk_rows)  # 64-row multiples: the sharded greedy reproduces these products
    cand = None
    if candidates is not None:
        if isinstance(candidates, bool) or not isinstance(candidates, numbers.Integral):
            raise TypeError(f"candidates must be an integer or None, got {type(candidates).__name__}")
        if not k <= int(candidates) <= n:
            raise ValueError(f"candidates must satisfy k={k} <= candidates <= N={n}, got {int(candidates)}")
        cand = top_candidates(r, int(candidates))
        Xt = Xt[torch_index(cand, Xt.device)]
        r = np.ascontiguousarray(r[cand])
        check_embeddings(Xt, "X", row_ids=cand)  # errors name the pool row
    m = Xt.shape[0]
    zero = first_zero_row(Xt, rows)
    if zero is not None:
        row = int(cand[zero]) if cand is not None else zero
        raise ValueError(f"X row {row} is all zeros; the {kernel} kernel needs non-zero rows")
    op = dpp_greedy if kernel == "cosine" else dpp_greedy_rbf
    spec = CallSpec(device=Xt.device.type, dtype=dtype_name(Xt), extra={"n": m, "d": d, "k": k})
    impl = op.select(spec, backend)
    diag_max = float((r * r).max()) * (1.0 + ridge)
    eps_abs = eps * diag_max if diag_max > 0 else eps
    info = {"kernel": kernel, "ridge": ridge, "eps": eps, "k_requested": k, "n": n, "d": d}
    if kernel == "rbf":
        if gamma is None:
            gamma = default_rbf_gamma(Xt)
        info["gamma"] = gamma
        info["workspace_bytes"] = _check_rbf_memory(m, k, Xt.device, max_workspace_bytes)
        idx, resid = impl.fn(Xt, r, k, ridge, eps_abs, progress, gamma=gamma, chunk_rows=rows)
    elif strategy == "lazy" and impl.backend != "cpp":
        raise ValueError(
            f"strategy='lazy' needs the cpp backend; the {impl.backend} backend sweeps the pool "
            f"(pass strategy='auto' or 'sweep', or backend='cpp')"
        )
    elif impl.backend == "cpp":
        stats: dict = {}
        if strategy == "auto" and cand is None and _memmap_past_memory(X):
            strategy = "sweep"  # lazy updates read rows at random: from disk, for a pool the page cache cannot hold
            info["strategy_note"] = "auto chose the sweep: X is a memmap larger than the free memory"
        idx, resid = impl.fn(Xt, r, k, ridge, eps_abs, progress, strategy=strategy, stats=stats)
        info["strategy"] = _strategy_ran(strategy, stats)
        info.update(stats)
    elif impl.backend == "torch":
        idx, resid = impl.fn(Xt, r, k, ridge, eps_abs, progress, chunk_rows=rows)
    else:
        idx, resid = impl.fn(Xt, r, k, ridge, eps_abs, progress)
    if cand is not None:
        idx = cand[idx]
        info["candidates"] = int(len(cand))
    if len(idx) < k:
        if kernel == "cosine" and ridge == 0:
            why = f"the cosine kernel with ridge=0 has rank <= D={d}"
            hint = "pass ridge > 0 (e.g. 1e-3) for a full-rank kernel"
        else:
            why = "the remaining candidates are (near-)duplicates of the picks or have relevance ~0"
            hint = "raise ridge, or drop duplicate rows"
        info["stopped_early"] = f"best residual fell below eps after {len(idx)} picks: {why}"
        warnings.warn(
            f"select_dpp stopped after {len(idx)} of {k} picks: the remaining candidates have residual "
            f"<= eps ({why}). More picks would only follow relevance order; {hint}.",
            DppRankWarning,
            stacklevel=2,
        )
    gains = np.log(resid) if len(resid) else np.zeros(0)
    return Selection(
        indices=idx,
        gains=gains,
        objective=float(gains.sum()),
        backend=impl.backend,
        seconds=time.perf_counter() - t0,
        method="dpp",
        info=info,
    )


def torch_index(idx: np.ndarray, device):
    """int64 torch index on ``device`` from a NumPy index array."""
    import torch

    return torch.as_tensor(np.asarray(idx, dtype=np.int64), device=device)
