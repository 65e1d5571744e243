"""Client-side relevance: a domain classifier (private = 1, public = 0) on frozen embeddings.

MetaMoE's first stage scores every public sample by how much it looks like the client's private data:
r_i = P(private | x_i) from a class-balanced logistic regression trained on the embeddings. The
scores then weight the DPP kernel (:func:`metamoe.selection.select_dpp`) or rank the pool
(:func:`metamoe.selection.select_top_relevance`).

Why mini-batch Adam and not full-batch L-BFGS: the public pool may be a million-row ``np.memmap``
larger than memory. A mini-batch step touches ``batch_size`` rows, so training streams from the
memmap with O(batch_size x D) memory; full-batch L-BFGS needs the whole (standardised) pool for every
function evaluation, or a subsample chosen up front. The problem is convex and the features are
standardised, so a few hundred Adam steps reach a ranking (what the selectors consume) within noise of
the exact optimum; the L2 penalty keeps the weights bounded when the domains are separable.
Sampling is seeded (NumPy ``default_rng``), initialisation is zero, so on the CPU two calls with the
same seed return identical scores.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Tuple

import numpy as np

from ..backends.tensors import device_type
from ..utils.checks import check_int, check_row_range
from .validation import block_rows, check_embeddings, readonly_from_numpy

MIN_STEPS = 300  # Adam steps at least, however small the sets (one "epoch" of 100 rows is one step)
PROB_CLIP = 1e-12  # scores are clipped to [PROB_CLIP, 1 - PROB_CLIP] so that they lie strictly in (0, 1)


def _check_real(value: Any, name: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'}, got {value}")
    return value


class PoolRows:
    """A sharded pool (``is_pool_embeddings``) seen as a row-indexable tensor: CPU torch tensors for rows.

    Row slices and index tensors give CPU torch tensors in the pool's dtype, zero copy where the pool returns
    a memmap slice. (Also used by :func:`metamoe.selection.distributed.pool_moments`; not to be confused with
    the streamed candidates of :mod:`metamoe.selection.facility_location_dense`, which cast, normalise and
    pad the rows they read.)"""

    def __init__(self, pool):
        import torch

        self.pool, self.shape, self.device = pool, tuple(pool.shape), torch.device("cpu")

    def __getitem__(self, idx):
        import torch

        if torch.is_tensor(idx):
            idx = idx.cpu().numpy()
        return readonly_from_numpy(np.ascontiguousarray(self.pool[idx]))  # may be a read-only memmap slice


def _moments(X, chunk: int):
    """Per-feature (mean, E[x^2]) in float64 over the rows of X, streamed in chunks of rows."""
    import torch

    s = torch.zeros(X.shape[1], dtype=torch.float64, device=X.device)
    s2 = torch.zeros_like(s)
    for a in range(0, X.shape[0], chunk):
        bs, bs2 = chunk_sums(X, a, chunk)
        s += bs
        s2 += bs2
    n = X.shape[0]
    return s / n, s2 / n


def default_chunk_rows(d: int) -> int:
    """Rows per chunk of :func:`relevance_scores` (and of ``distributed.pool_moments``) for dimension ``d``:
    one chunk of float64 values takes about 16 MiB (2,730 rows at D = 768)."""
    return block_rows(d, 8)


def chunk_sums(X, a: int, chunk: int):
    """(sum x, sum x^2) in float64 over rows [a, a + chunk) of X: the terms of the pool's moments.

    :func:`relevance_scores` adds them up in chunk order; :func:`metamoe.selection.distributed.pool_moments`
    computes them shard by shard and adds them the same way."""
    block = X[a : a + chunk].double()
    return block.sum(0), (block * block).sum(0)


def _check_moments(moments: Any, d: int):
    import torch

    if not isinstance(moments, (tuple, list)) or len(moments) != 2:
        raise TypeError(f"public_moments must be a (mean, E[x^2]) pair, got {type(moments).__name__}")
    out = [torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v).detach().cpu().double() for v in moments]
    if any(v.shape != (d,) for v in out) or not all(bool(torch.isfinite(v).all()) for v in out):
        raise ValueError(f"public_moments must be two finite (D,) = ({d},) vectors, got shapes "
                         f"{[tuple(v.shape) for v in out]}")
    return out[0], out[1]


class _Stream:
    """Endless seeded stream of row indices: one permutation per pass, batches sorted (memmap locality)."""

    def __init__(self, n: int, rng: np.random.Generator):
        self.n, self.rng = n, rng
        self.perm = rng.permutation(n)
        self.pos = 0

    def next(self, size: int) -> np.ndarray:
        size = min(size, self.n)
        if self.pos + size > self.n:
            self.perm = self.rng.permutation(self.n)
            self.pos = 0
        out = self.perm[self.pos : self.pos + size]
        self.pos += size
        return np.sort(out)


def _train(steps, streams, half, P, X, prep, w, b, weight_decay, opt, progress):
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    with tqdm(
        total=steps, desc="relevance: train", unit="step", disable=(None if progress else True), leave=False
    ) as bar:
        for _ in range(steps):
            ip = torch.as_tensor(streams[0].next(half), device=P.device)
            ix = torch.as_tensor(streams[1].next(half), device=X.device)
            zp = prep(P[ip]) @ w + b
            zx = prep(X[ix]) @ w + b
            loss = 0.5 * F.binary_cross_entropy_with_logits(zp, torch.ones_like(zp))
            loss = loss + 0.5 * F.binary_cross_entropy_with_logits(zx, torch.zeros_like(zx))
            loss = loss + 0.5 * weight_decay * (w * w).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)


def relevance_scores(
    private: Any,
    public: Any,
    *,
    epochs: int = 5,
    lr: float = 0.01,
    weight_decay: float = 1e-4,
    batch_size: int = 1024,
    seed: int = 0,
    device: Optional[Any] = None,
    chunk_size: Optional[int] = None,
    progress: bool = True,
    score_rows: Optional[Tuple[int, int]] = None,
    public_moments: Optional[Tuple[Any, Any]] = None,
) -> np.ndarray:
    """P(private | x) for every public sample, from a class-balanced logistic regression on embeddings.

    The classifier separates the client's private embeddings (label 1) from the public pool (label 0).
    Features are standardised with the mean and standard deviation of the class-balanced mixture
    (each set weighted 1/2, so a large pool does not drown the private statistics), computed by
    streaming both sets. Training is mini-batch Adam on the loss
    ``0.5 * BCE(private batch, 1) + 0.5 * BCE(public batch, 0) + 0.5 * weight_decay * ||w||^2``:
    every batch holds ``batch_size // 2`` rows of each class (balanced by sampling, each set visited
    in seeded permutations). Then the pool is scored chunk by chunk.

    Args:
        private: (M, D) private embeddings; NumPy array, ``np.memmap``, torch tensor (CPU or CUDA) or
            CuPy array; float32, float16, bfloat16 or float64; finite.
        public: (N, D) public pool, same kinds and dtypes; read in chunks of ``chunk_size`` rows, so a
            memmap is never loaded whole.
        epochs: passes over the larger of the two sets (at least ``MIN_STEPS`` = 300 steps in all).
        lr: Adam learning rate (> 0).
        weight_decay: L2 penalty on the weights (not the bias), >= 0.
        batch_size: rows per step, half from each class (>= 2).
        seed: seeds the batch sampling; with zero initialisation the result is deterministic on the CPU.
        device: where to train and score (``"cpu"``, ``"cuda"``, a ``torch.device``); None: the device
            of ``public`` (CUDA tensors and CuPy arrays stay on their GPU), else the CPU.
        chunk_size: rows per chunk when computing statistics and scoring (None: :func:`default_chunk_rows`,
            about 16 MiB of float64 per chunk, so the temporaries stay small next to a large pool).
        progress: tqdm progress bars (training steps, scoring chunks).
        score_rows: ``(start, stop)``: train as usual (on the whole pool, so the classifier is the same
            whatever the range), then score only rows [start, stop) -- one rank's shard under
            ``metamoe select --distributed``. The chunks scored are those of the whole-pool run (the
            ``chunk_size`` grid, cut to the range afterwards), so the scores are bit-identical to
            ``relevance_scores(...)[start:stop]``. None: every row.
        public_moments: (mean, E[x^2]) of the whole pool, two (D,) float64 vectors with the bits this
            function would compute (:func:`metamoe.selection.distributed.pool_moments` gathers them from
            the shards). With it the pool is not read whole: no moments pass and no NaN/inf scan of every
            row (the caller checked its rows; non-finite scores still raise); only the training samples
            and the scored rows are read. None: computed here.

    ``public`` may also be a sharded pool on disk (:class:`metamoe.utils.pool_format.PoolEmbeddings`,
    marked ``is_pool_embeddings``; finite by construction): it is read through its row indexing.

    Returns:
        (N,) float64 NumPy array (or (stop - start,) with ``score_rows``), P(private | x_i), clipped to
        [1e-12, 1 - 1e-12] so that every value lies strictly in (0, 1).

    Raises:
        TypeError: non-array or integer-dtype inputs, non-integer epochs/batch_size/seed/chunk_size.
        ValueError: empty or non-2-D inputs, NaN/inf rows, D differing between private and public,
            non-positive lr/epochs/batch_size/chunk_size, negative weight_decay.
    """
    import torch
    from tqdm.auto import tqdm

    P = check_embeddings(private, "private", zero_copy_readonly=True)
    X = PoolRows(public) if getattr(public, "is_pool_embeddings", False) else check_embeddings(
        public, "public", zero_copy_readonly=True, check_finite=public_moments is None)
    if P.shape[1] != X.shape[1]:
        raise ValueError(
            f"private and public must have the same embedding dimension D, got private D={P.shape[1]} "
            f"and public D={X.shape[1]}"
        )
    epochs = check_int(epochs, "epochs", 1)
    batch_size = check_int(batch_size, "batch_size", 2)
    chunk_size = default_chunk_rows(X.shape[1]) if chunk_size is None else check_int(chunk_size, "chunk_size", 1)
    seed = check_int(seed, "seed", 0)
    lr = _check_real(lr, "lr", positive=True)
    weight_decay = _check_real(weight_decay, "weight_decay", positive=False)
    if device is None:
        device = torch.device(device_type(public) if device_type(public) != "cpu" else "cpu")
        if device.type == "cuda" and torch.is_tensor(X) and X.is_cuda:
            device = X.device
    else:
        device = torch.device(device)
    m, n, d = P.shape[0], X.shape[0], X.shape[1]
    lo, hi = (0, n) if score_rows is None else check_row_range(score_rows, n, "score_rows")

    # standardisation from the class-balanced mixture of both sets
    mp, sp = _moments(P, chunk_size)
    mx, sx = _moments(X, chunk_size) if public_moments is None else _check_moments(public_moments, d)
    mu = 0.5 * (mp.to(device) + mx.to(device))
    var = 0.5 * (sp.to(device) + sx.to(device)) - mu * mu
    std = torch.sqrt(torch.clamp(var, min=0.0))
    # constant features (zero spread in both sets): leave them unscaled
    std = torch.where(std > 1e-12 * (1.0 + mu.abs()), std, torch.ones_like(std))
    mu32, inv32 = mu.float(), (1.0 / std).float()

    def prep(rows):
        return (rows.to(device=device, dtype=torch.float32) - mu32) * inv32

    rng = np.random.default_rng(seed)
    streams = (_Stream(m, rng), _Stream(n, rng))
    half = batch_size // 2
    steps = max(epochs * math.ceil(max(m, n) / half), MIN_STEPS)
    w = torch.zeros(d, dtype=torch.float32, device=device, requires_grad=True)
    b = torch.zeros((), dtype=torch.float32, device=device, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    # A step is tiny ((batch_size x D) matvecs): on the CPU it runs on one thread, since intra-op
    # threading only adds synchronisation there (measured 25x slower with 2 threads on a loaded 2-core box).
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        _train(steps, streams, half, P, X, prep, w, b, weight_decay, opt, progress)
    finally:
        torch.set_num_threads(threads)

    out = np.empty(hi - lo, dtype=np.float64)
    bar = tqdm(total=hi - lo, desc="relevance: score", unit="row", disable=None if progress else True, leave=False)
    with torch.no_grad(), bar:
        wd, bd = w.detach().double(), b.detach().double()
        for a in range(lo - lo % chunk_size, hi, chunk_size):  # the whole-pool chunk grid
            rows = X[a : a + chunk_size]
            z = prep(rows).double() @ wd + bd
            a0, b0 = max(a, lo), min(a + rows.shape[0], hi)
            out[a0 - lo : b0 - lo] = torch.sigmoid(z[a0 - a : b0 - a]).cpu().numpy()
            bar.update(b0 - a0)
    if public_moments is not None and not np.isfinite(out).all():
        row = lo + int(np.nonzero(~np.isfinite(out))[0][0])
        raise ValueError(f"public has NaN or inf values (the score of row {row} is not finite)")
    np.clip(out, PROB_CLIP, 1.0 - PROB_CLIP, out=out)
    return out


__all__ = ["relevance_scores", "PoolRows", "chunk_sums", "default_chunk_rows"]
