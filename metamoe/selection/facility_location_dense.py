"""graph="dense" facility location: every pool x ground similarity, computed blockwise by fixed-shape calls.

:class:`DenseSimilarities` holds the pool and the ground set as float32 (L2-normalised for cosine), padded
to whole candidate tiles and ground blocks, and computes every similarity by the same fixed-shape matmul,
so that a similarity, and a gain, is a deterministic function of its inputs. Two uses:

* materialised (up to ``facility_location.DENSE_MATERIALIZE_PAIRS`` ground x pool pairs): :func:`dense_csr`
  turns the similarities into the CSR graph that every backend of ``facility_location`` takes;
* on the fly (above it): :func:`dense_on_the_fly_greedy`, exact lazy greedy with incremental bounds in
  torch (CPU or GPU), memory O((N + M) D) instead of O(N M); a pool larger than DENSE_POOL_COPY_BYTES
  (e.g. a memmap) is read tile by tile, memory O(M D + N).

Both paths see bitwise the same float32 similarities, so they give the same picks.
:func:`check_dense_memory` estimates what either path allocates and refuses up front when it does not fit.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from ..utils.memory import available_bytes
from ..utils.progress import progress_bar
from .validation import block_rows, row_norms

# (candidate tile T, ground block B) of the on-the-fly similarity blocks, per device type. Every
# similarity is computed by one fixed-shape call "tile (T, D) @ ground block (D, B)" (see
# DenseSimilarities): T = 32, B = 4096 keeps the float64 block (1 MiB) in a CPU core's L2; on a GPU
# the larger blocks amortise the kernel launches. Both must be multiples of 16.
DENSE_BLOCKS = {"cpu": (32, 4096), "cuda": (256, 32768)}
# DenseSimilarities keeps the candidates (the pool) as one float32 (N_pad, D) tensor up to this many
# bytes; a larger pool (e.g. a float16 memmap of 10M x 768, 29 GiB as float32) is read from its storage
# tile by tile instead (_StreamedCandidates), each tile cast and normalised on the way in: the same
# float32 rows (the cast and the per-row normalisation do not depend on how many rows are converted
# together), with O(block x D) memory for the candidates. The ground set is always held (M_pad, D) float32.
DENSE_POOL_COPY_BYTES = 1 << 28


def _round_up(x: int, m: int) -> int:
    return -(-int(x) // m) * m


def dense_blocks(device_type: str, n: int, m: int) -> Tuple[int, int]:
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

    (Not the same job as :class:`metamoe.selection.relevance.PoolRows`, which only turns a sharded pool's rows
    into tensors: this one casts to float32, normalises for cosine and pads, i.e. stands in for the precomputed copy.)

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
    function of (j, cur): the exactness argument of :func:`dense_on_the_fly_greedy` holds in floating point,
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
        the coverage grows), plus (M + 8) 2^-53 |ghat_l| for the float64 arithmetic, counted twice: for the
        exact gain an estimate started from and for the one it is compared with. (N_pad,) or (tile,) float64."""
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


def dense_on_the_fly_greedy(sims: DenseSimilarities, k: int, optimizer: str, n_sample: int, seed: int,
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
    plain lazy greedy re-evaluates about half the pool per pick). ``naive`` recomputes every tile each
    pick (tests); the ``stochastic`` sample is gathered into tiles. The gain recorded for a pick is
    recomputed with the pick's coverage update, in the arithmetic of the exact gains.
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


def check_dense_memory(device, n: int, m: int, d: int, tile: int, block: int, on_the_fly: bool) -> None:
    """Raise MemoryError when graph='dense' (on the fly, or materialised as a matrix and its CSR) needs more
    memory than is available on ``device``; the message names N, M, D and the bytes."""
    need = dense_on_the_fly_bytes(n, m, d, tile, block, stream_pool=_stream_pool(n, d, tile))
    if not on_the_fly:
        need += 4 * _round_up(n, tile) * _round_up(m, block) + 24 * n * m  # the matrix and the CSR
    have, _ = available_bytes(device)
    if need > have:
        what = ("similarities on the fly: float32 copies of pool and ground, float64 gains and coverage, a "
                f"{tile} x {block} block workspace") if on_the_fly else "the materialised similarities and their CSR"
        raise MemoryError(
            f"graph='dense' needs about {need / 2**30:.2f} GiB ({need} bytes) for N={n} pool rows, M={m} ground "
            f"points, D={d} ({what}), "
            f"but only {have / 2**30:.2f} GiB ({have} bytes) is available on {device}; use graph='knn' "
            f"(a kNN-sparsified graph) or a smaller pool"
        )


def dense_csr(sims: DenseSimilarities) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
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


__all__ = [
    "DenseSimilarities", "DENSE_BLOCKS", "DENSE_POOL_COPY_BYTES", "check_dense_memory", "dense_blocks", "dense_csr",
    "dense_on_the_fly_bytes", "dense_on_the_fly_greedy",
]
