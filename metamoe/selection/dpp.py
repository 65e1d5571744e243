"""Relevance-weighted DPP, greedy MAP inference (Chen et al., NeurIPS 2018), at million-sample scale.

Kernel ``L = diag(r) (Xn Xn^T + ridge I) diag(r)``, ``Xn`` the L2-normalised rows of ``X``.
Greedy MAP picks, at each step, the candidate with the largest residual variance given the picks so
far (ties to the lowest index): exactly Chen et al.'s fast greedy. Instead of their k x N Cholesky
workspace, the residual updates come from feature space (a Gram-Schmidt direction per pick), so one
pick costs one N x D matrix-vector product and nothing of size N x N or k x N is ever stored.

Implementations (op ``dpp_greedy``): ``cuda`` (csrc/cuda/dpp_greedy.cu), ``cpp`` (csrc/cpu/dpp_greedy.cpp,
OpenMP) and ``torch`` (this file; any device).
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Optional

import numpy as np

from ..backends import CallSpec, define_op
from ..backends.availability import require_extension
from ..backends.tensors import dtype_name
from .result import Selection
from .validation import check_embeddings, check_k, check_nonnegative, check_relevance

dpp_greedy = define_op(
    "dpp_greedy",
    priority=("cuda", "cpp", "torch"),
    doc="Greedy MAP for the relevance-weighted cosine DPP, in feature space (O(N D k)).",
)

DEFAULT_EPS = 1e-9


class DppRankWarning(UserWarning):
    """The kernel ran out of rank before k picks (a linear kernel has rank <= D)."""


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="pick", disable=(None if enabled else True), leave=False)


def _chunk(k: int) -> int:
    return int(min(256, max(16, k // 100)))


# --------------------------------------------------------------------------- torch


@dpp_greedy.register("torch", devices=("cpu", "cuda"), dtypes=("float32", "float16", "bfloat16", "float64"))
def dpp_greedy_torch(X, relevance: np.ndarray, k: int, ridge: float, eps: float, progress: bool = False):
    """Pure PyTorch: float64 on the CPU; on a GPU the N x D product runs in float32, the rest in float64."""
    import torch

    dev = X.device
    work = torch.float64 if dev.type == "cpu" else torch.float32
    Xw = X.to(work)
    n, d = Xw.shape
    r = torch.as_tensor(relevance, dtype=torch.float64, device=dev)
    norms = torch.linalg.vector_norm(Xw.double(), dim=1) if work == torch.float64 else torch.linalg.vector_norm(Xw, dim=1).double()
    scale = r / norms
    d2 = r * r * (1.0 + ridge)
    Qd = torch.zeros(k, d, dtype=torch.float64, device=dev)
    Qe = torch.zeros(k, k, dtype=torch.float64, device=dev) if ridge > 0 else None
    picks, resid = [], []
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float64, device=dev)
    with _progress(k, progress, "dpp (torch)") as bar:
        for t in range(k):
            j = int(torch.argmax(d2))  # first maximal index: ties go to the lowest index
            dj2 = float(d2[j])
            if not dj2 > eps:
                break
            picks.append(j)
            resid.append(dj2)
            vd = scale[j] * Xw[j].double()
            ve = torch.zeros(t + 1, dtype=torch.float64, device=dev)
            for _ in range(2):  # classical Gram-Schmidt, twice
                if t == 0:
                    break
                c = Qd[:t] @ vd
                if Qe is not None:
                    c = c + Qe[:t, : t + 1] @ ve
                vd = vd - c @ Qd[:t]
                if Qe is not None:
                    ve = ve - c @ Qe[:t, : t + 1]
            inv = 1.0 / np.sqrt(dj2)
            Qd[t] = vd * inv
            if Qe is not None:
                ve[t] = np.sqrt(ridge) * float(r[j])
                Qe[t, : t + 1] = ve * inv
            e = (Xw @ Qd[t].to(work)).double() * scale
            d2 = d2 - e * e
            d2[j] = neg_inf  # stays -inf: -inf - e^2 = -inf
            bar.update(1)
    return np.asarray(picks, dtype=np.int64), np.asarray(resid, dtype=np.float64)


# --------------------------------------------------------------------------- cpp


@dpp_greedy.register("cpp", devices=("cpu",), dtypes=("float32", "float64"))
def dpp_greedy_cpp(X, relevance: np.ndarray, k: int, ridge: float, eps: float, progress: bool = False):
    """C++/OpenMP: reads X in place (float32/float64), float64 arithmetic."""
    _C = require_extension("_C")
    arr = X.detach().numpy() if hasattr(X, "detach") else np.asarray(X)
    arr = np.ascontiguousarray(arr)
    cls = _C.DppGreedyCosineF32 if arr.dtype == np.float32 else _C.DppGreedyCosineF64
    state = cls(arr, relevance, float(ridge), int(k))
    idx, res = [], []
    with _progress(k, progress, "dpp (cpp)") as bar:
        while state.picked < k and not state.exhausted:
            i, r = state.run(min(_chunk(k), k - state.picked), float(eps))
            idx.append(i)
            res.append(r)
            bar.update(len(i))
    return np.concatenate(idx) if idx else np.zeros(0, np.int64), np.concatenate(res) if res else np.zeros(0)


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
        torch.empty(k, d, **f64),  # qd
        torch.zeros(k, k, **f64) if ridge > 0 else torch.zeros(1, **f64),  # qe
        torch.zeros(k, **f64),  # coef
        torch.zeros(d + k + 1, **f64),  # vec
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
        ext.dpp_init(X.data_ptr(), code, n, d, rel.data_ptr(), float(ridge), ws, nb, stream)
        bad = int(bufs[10].item())
        if bad != 2**31 - 1:
            raise ValueError(f"X row {bad} has zero or non-finite norm; cosine similarity needs non-zero finite rows")
        t = 0
        with _progress(k, progress, "dpp (cuda)") as bar:
            while t < k:
                count = min(_chunk(k), k - t)
                ext.dpp_picks(X.data_ptr(), code, n, d, k, rel.data_ptr(), float(ridge), float(eps), t, count, ws, nb,
                              out_idx.data_ptr(), out_res.data_ptr(), stream)
                t += count
                stopped = bool(bufs[11].item())  # one sync per chunk, for the progress bar and the stop test
                bar.update(count)
                if stopped:
                    break
    idx = out_idx.cpu().numpy()
    res = out_res.cpu().numpy()
    m = int((idx >= 0).sum())
    return idx[:m].copy(), res[:m].copy()


# --------------------------------------------------------------------------- public API


def select_dpp(
    X: Any,
    k: int,
    relevance: Optional[Any] = None,
    *,
    kernel: str = "cosine",
    ridge: float = 0.0,
    eps: float = DEFAULT_EPS,
    backend: Optional[str] = None,
    progress: bool = True,
) -> Selection:
    """Pick ``k`` samples that are relevant and diverse: greedy MAP of a relevance-weighted DPP.

    Args:
        X: (N, D) embeddings of the public pool; NumPy array, torch tensor (CPU or CUDA) or CuPy array;
            float32, float16, bfloat16 or float64. Rows must be finite and non-zero.
        k: number of picks, 1 <= k <= N.
        relevance: (N,) weights r_i in [0, 1] (e.g. from :func:`relevance_scores`); None means all ones
            (plain diversity).
        kernel: ``"cosine"``: L = diag(r) (Xn Xn^T + ridge I) diag(r).
        ridge: >= 0. With ridge = 0 the kernel has rank <= D: greedy stops once the best residual falls
            below ``eps`` (and warns); ridge > 0 makes it full rank so that k > D picks stay diverse.
        eps: stop when the best residual is <= eps times the largest diagonal entry of L.
        backend: ``"auto"`` (default, or ``METAMOE_BACKEND``), ``"cuda"``, ``"cpp"`` or ``"torch"``.
        progress: show a tqdm progress bar (only on a terminal).

    Returns:
        :class:`Selection` with ``indices`` (int64, pick order), ``gains`` (log of each pick's residual,
        so that ``objective`` = log det L[S, S]), ``backend`` and ``seconds``.
    """
    if kernel != "cosine":
        raise ValueError(f"kernel must be 'cosine', got {kernel!r}")
    t0 = time.perf_counter()
    Xt = check_embeddings(X)
    n, d = Xt.shape
    k = check_k(k, n)
    r = check_relevance(relevance, n)
    ridge = check_nonnegative(ridge, "ridge")
    eps = check_nonnegative(eps, "eps")
    norms_ok = Xt.abs().amax(dim=1) > 0
    if not bool(norms_ok.all()):
        row = int((~norms_ok).nonzero()[0, 0])
        raise ValueError(f"X row {row} is all zeros; the cosine kernel needs non-zero rows")
    spec = CallSpec(device=Xt.device.type, dtype=dtype_name(Xt), extra={"n": n, "d": d, "k": k})
    impl = dpp_greedy.select(spec, backend)
    diag_max = float((r * r).max()) * (1.0 + ridge)
    eps_abs = eps * diag_max if diag_max > 0 else eps
    idx, resid = impl.fn(Xt, r, k, ridge, eps_abs, progress)
    info = {"kernel": kernel, "ridge": ridge, "eps": eps, "k_requested": k, "n": n, "d": d}
    if len(idx) < k:
        info["stopped_early"] = (
            f"best residual fell below eps after {len(idx)} picks: the kernel has rank <= D={d} with ridge=0"
            if ridge == 0
            else f"best residual fell below eps after {len(idx)} picks"
        )
        warnings.warn(
            f"select_dpp stopped after {len(idx)} of {k} picks: the remaining candidates have residual "
            f"<= eps (the cosine kernel with ridge={ridge} has rank <= D={d}). More picks would only follow "
            f"relevance order; pass ridge > 0 (e.g. 1e-3) for a full-rank kernel.",
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
