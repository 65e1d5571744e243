"""Sharded proxy selection on torch.distributed: each rank holds a contiguous shard of the public pool.

Every function here is collective: call it on every rank of the default process group (or ``group``),
each with its own shard. Shards are contiguous and in rank order (rank 0 holds the first rows); their
sizes may differ and are exchanged once (all_gather), so global index = rank offset + local index.

* :func:`select_dpp_sharded` -- exact sharded greedy for the relevance-weighted cosine DPP (ridge >= 0).
  Per pick: every rank takes its best residual, one all_gather of (value, global index) pairs picks the
  global argmax (ties to the lowest global index, compared exactly in float64), the owner broadcasts
  the chosen row's scaled feature vector and relevance, every rank builds the same Gram-Schmidt
  direction from identical inputs with identical arithmetic (so the directions are bit-identical on
  every rank) and updates its own residuals. The arithmetic is the single-process torch backend's
  (:func:`metamoe.selection.dpp.dpp_greedy_torch`: float64 on the CPU, the N x D product in float32 on
  a GPU), so the picks are those of ``select_dpp(..., backend="torch")`` on the same device.
  Communication per pick: world x 2 float64 + D + 1 float64; work per rank: O(N_rank D).
* :func:`select_facility_location_private_sharded` -- exact sharded facility location whose ground set
  is a small set P replicated on every rank (the client's private embeddings). Each rank holds its
  candidates' float32 similarities to P, computed with the same fixed-shape matmuls as
  :class:`metamoe.selection.facility_location_dense.DenseSimilarities`, and their gains, summed in increasing
  ground index without FMA like the C++ backend; lazy greedy finds each rank's exact best, one
  all_gather picks the global argmax (ties to the lowest global index), the owner broadcasts the
  winner's similarity column (M float32) and every rank raises its coverage. The picks are those of
  ``select_facility_location(X, k, ground=P, graph="dense")``. Memory per rank: N_rank x M float32.
* :func:`select_facility_location_greedi` -- GreeDi (Mirzasoleiman et al., NeurIPS 2013) for ground =
  the pool: greedy facility location on each shard (ground = the shard, its own kNN or dense graph),
  the k candidates of every rank are gathered on every rank, then greedy over their union with the
  true objective on the whole pool: the ground points stay sharded, each rank computes the gains of
  the union's candidates over its own ground points (dense cosine similarities) and one all_reduce sums
  them. Not the single-process picks; the objective is reported on the whole pool (dense similarities)
  so that it can be compared with the single-process run.

* :func:`pool_moments` -- the pool's per-feature (mean, E[x^2]) for the relevance classifier: each rank sums
  the chunks that start in its rows, one all_reduce, every rank adds the chunk sums in order: the bits of
  :func:`metamoe.selection.relevance_scores`' own pass, without any rank reading the whole pool.

Timeouts: :func:`init_distributed` sets ``init_process_group(timeout=...)`` (default 10 min); with gloo
a collective whose peer died raises after that timeout (or at once when the peer's socket closes), so
the surviving ranks exit with an error instead of hanging.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Optional, Tuple

import numpy as np

from ..utils.distributed import (
    DEFAULT_TIMEOUT_S,
    SHARD_ALIGN,
    collective_errors,
    comm_device,
    global_argmax,
    init_distributed,
    owner_rank,
    pool_shard_range,
    shard_offsets,
    shard_range,
)
from .dpp import DEFAULT_EPS, DppRankWarning, add_direction, matvec_blocks, matvec_rows
from .facility_location_dense import DenseSimilarities, dense_blocks
from .result import Selection
from .validation import (
    check_embeddings,
    check_k,
    check_nonnegative,
    check_relevance,
    check_weights,
    first_zero_row,
    row_norms,
)

# --------------------------------------------------------------------------- DPP


def select_dpp_sharded(
    X_shard: Any,
    k: int,
    relevance_shard: Optional[Any] = None,
    *,
    ridge: float = 0.0,
    eps: float = DEFAULT_EPS,
    group=None,
    device: Optional[Any] = None,
) -> Selection:
    """Exact sharded greedy MAP of the relevance-weighted cosine DPP (collective: call on every rank).

    Args:
        X_shard: (N_rank, D) this rank's contiguous rows of the pool (rank order = pool order), NumPy
            array / ``np.memmap`` slice (read in place) or torch tensor; float32, float16, bfloat16 or
            float64; finite non-zero rows. N_rank >= 1; shards may differ in size.
        k: number of picks, 1 <= k <= N (the whole pool).
        relevance_shard: (N_rank,) relevance of this rank's rows in [0, 1]; None means all ones.
        ridge: >= 0, as in :func:`metamoe.selection.select_dpp` (cosine kernel).
        eps: stop when the best residual is <= eps times the largest diagonal entry of L (over the pool).
        group: process group (default: the default group).
        device: where this rank computes (default: the rank's CUDA device under nccl, else the CPU).
            A CPU shard is moved there in its storage dtype; the products convert one block of rows at a
            time to the working dtype (float64 on the CPU, float32 on a GPU), so a CPU shard is never copied
            whole.

    Returns:
        The same :class:`Selection` on every rank: ``indices`` int64 (<= k,) global pool indices in pick
        order, ``gains`` float64 log residuals, ``objective`` = log det L[S, S]; ``backend`` is
        ``"torch-distributed"``; ``info`` records world size and shard sizes. Warns
        :class:`DppRankWarning` when the residuals fall below eps before k picks (as select_dpp does).
    """
    import torch
    import torch.distributed as dist

    t0 = time.perf_counter()
    cdev = comm_device(group)
    dev = torch.device(device) if device is not None else cdev
    Xt = check_embeddings(X_shard, "X_shard", zero_copy_readonly=True)
    n_local, d = Xt.shape
    r_local = check_relevance(relevance_shard, n_local)
    ridge = check_nonnegative(ridge, "ridge")
    eps = check_nonnegative(eps, "eps")
    rows = matvec_rows(d)
    zero = first_zero_row(Xt, rows)  # blockwise: a shard can be a memmap larger than memory
    if zero is not None:
        raise ValueError(f"X_shard row {zero} is all zeros; the cosine kernel needs non-zero rows")
    offset, n, sizes = shard_offsets(n_local, group, cdev)
    dims = [torch.zeros(1, dtype=torch.int64, device=cdev) for _ in sizes]
    dist.all_gather(dims, torch.tensor([d], dtype=torch.int64, device=cdev), group=group)
    if len({int(x.item()) for x in dims}) != 1:
        raise ValueError(f"every rank's X_shard must have the same D; got {[int(x.item()) for x in dims]}")
    k = check_k(k, n)
    work = torch.float64 if dev.type == "cpu" else torch.float32
    # the shard is read in 64-row-aligned blocks, one converted block at a time, exactly as dpp_greedy_torch
    # reads the whole pool (same block grid relative to the global index: the shard starts are multiples of 64)
    if Xt.device != dev:
        Xt = Xt.to(dev)  # e.g. a CPU memmap shard onto this rank's GPU, in its storage dtype
    r = torch.as_tensor(r_local, dtype=torch.float64, device=dev)
    norms = row_norms(Xt, work, rows)
    scale = r / norms
    d2 = r * r * (1.0 + ridge)
    rmax = torch.tensor([float((r * r).max())], dtype=torch.float64, device=cdev)
    dist.all_reduce(rmax, op=dist.ReduceOp.MAX, group=group)
    diag_max = float(rmax.item()) * (1.0 + ridge)
    eps_abs = eps * diag_max if diag_max > 0 else eps

    Qd = torch.zeros(k, d, dtype=torch.float64, device=dev)
    Qe = torch.zeros(k, k, dtype=torch.float64, device=dev) if ridge > 0 else None
    payload = torch.zeros(d + 1, dtype=torch.float64, device=cdev)
    picks, resid = [], []
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float64, device=dev)
    for t in range(k):
        jl = int(torch.argmax(d2))  # first maximal index: ties to the lowest index
        dj2, j = global_argmax(float(d2[jl]), offset + jl, group, cdev)
        if not dj2 > eps_abs:
            break
        owner = owner_rank(j, sizes)
        if owner == dist.get_rank(group):
            jl = j - offset
            payload[:d] = (scale[jl] * Xt[jl].to(work).double()).to(cdev)
            payload[d] = r[jl].to(cdev)
        dist.broadcast(payload, src=dist.get_global_rank(group, owner) if group is not None else owner, group=group)
        vd = payload[:d].to(dev).clone()
        rj = float(payload[d])
        picks.append(j)
        resid.append(dj2)
        add_direction(Qd, Qe, t, vd, rj, ridge, dj2)  # the arithmetic of dpp_greedy_torch
        e = matvec_blocks(Xt, Qd[t].to(work), work, rows) * scale
        d2 = d2 - e * e
        if owner == dist.get_rank(group):
            d2[j - offset] = neg_inf
    idx = np.asarray(picks, dtype=np.int64)
    res = np.asarray(resid, dtype=np.float64)
    info = {"kernel": "cosine", "ridge": ridge, "eps": eps, "k_requested": k, "n": n, "d": d,
            "world_size": len(sizes), "shard_sizes": sizes}
    if len(idx) < k:
        if ridge == 0:
            why = f"the cosine kernel with ridge=0 has rank <= D={d}"
            hint = "pass ridge > 0 (e.g. 1e-3) for a full-rank kernel"
        else:
            why, hint = ("the remaining candidates are (near-)duplicates of the picks or have relevance ~0",
                         "raise ridge, or drop duplicate rows")
        info["stopped_early"] = f"best residual fell below eps after {len(idx)} picks: {why}"
        warnings.warn(
            f"select_dpp stopped after {len(idx)} of {k} picks: the remaining candidates have residual "
            f"<= eps ({why}). More picks would only follow relevance order; {hint}.",
            DppRankWarning,
            stacklevel=2,
        )
    gains = np.log(res) if len(res) else np.zeros(0)
    return Selection(indices=idx, gains=gains, objective=float(gains.sum()), backend="torch-distributed",
                     seconds=time.perf_counter() - t0, method="dpp", info=info)


# --------------------------------------------------------------------------- facility location, ground = P


def _seq_gains(ST, rows, cur, w, chunk: int = 4096):
    """Gains of candidate columns ``rows`` of ST (M, N_rank) float32: sum_i w_i max(0, s_ij - cur_i) in float64,
    summed in increasing ground index with separate multiply and add (the C++ backend's order, no FMA):
    the terms of a block of candidates form a (rows, M) float64 matrix and its row-wise cumsum, a
    sequential scan on the CPU, ends in exactly that left-to-right sum."""
    import torch

    out = torch.empty(len(rows), dtype=torch.float64, device=ST.device)
    for a in range(0, len(rows), chunk):
        r = rows[a : a + chunk]
        terms = torch.clamp(ST[:, r].T.double() - cur, min=0.0).mul_(w)
        out[a : a + chunk] = torch.cumsum(terms, dim=1)[:, -1]
    return out


def select_facility_location_private_sharded(
    X_shard: Any,
    P: Any,
    k: int,
    *,
    weights: Optional[Any] = None,
    metric: str = "cosine",
    group=None,
    refresh: int = 64,
) -> Selection:
    """Exact sharded facility location covering a replicated ground set P (collective: call on every rank).

    Maximises f(A) = sum_i w_i max(0, max_{j in A} s_ij) over the rows i of P with candidates j = the pool
    rows, dense similarities (cosine or inner product) in float32 and float64 gains: the picks of
    ``select_facility_location(X, k, ground=P, weights=weights, graph="dense", metric=metric)``.

    Args:
        X_shard: (N_rank, D) this rank's contiguous rows of the pool (rank order = pool order); NumPy,
            ``np.memmap`` slice or CPU torch tensor; float32, float16, bfloat16 or float64.
        P: (M, D) ground set, identical on every rank (e.g. the client's private embeddings).
        k: number of picks, 1 <= k <= N.
        weights: (M,) ground weights >= 0 (None: ones), identical on every rank.
        metric: ``"cosine"`` or ``"ip"``.
        group: process group (default: the default group).
        refresh: lazy-greedy batch: stale candidates whose gains are recomputed together.

    Returns:
        The same :class:`Selection` on every rank: ``indices`` int64 (k,) global indices in pick order,
        ``gains`` float64 (k,), ``objective`` f(A) float64, ``backend`` ``"torch-distributed"``.
        Memory per rank: N_rank x M float32 similarities.
    """
    import torch
    import torch.distributed as dist

    t0 = time.perf_counter()
    if metric not in ("cosine", "ip"):
        raise ValueError(f"metric must be 'cosine' or 'ip', got {metric!r}")
    cdev = torch.device("cpu") if dist.get_backend(group) == "gloo" else comm_device(group)
    Xt = check_embeddings(X_shard, "X_shard", zero_copy_readonly=True)
    Gt = check_embeddings(P, "P", zero_copy_readonly=True)
    n_local, d = Xt.shape
    if Gt.shape[1] != d:
        raise ValueError(f"P has dimension D={Gt.shape[1]}, but X_shard has D={d}")
    m = Gt.shape[0]
    w_np = check_weights(weights, m)
    offset, n, sizes = shard_offsets(n_local, group, cdev)
    k = check_k(k, n)
    # the single process's fixed matmul shapes (tile from the whole pool's N), so that every similarity
    # has the bits of select_facility_location(..., graph="dense")
    tile, block = dense_blocks("cpu", n, m)
    sims = DenseSimilarities.build(Xt.cpu(), Gt.cpu(), w_np, metric, tile, block)
    ST = torch.empty(m, n_local, dtype=torch.float32)
    for c in range(sims.n_tiles):
        a = c * tile
        b = min(n_local, a + tile)
        if a >= n_local:
            break
        ST[:, a:b] = sims.similarity_tile(c)[: b - a, :m].T
    del sims
    w = torch.as_tensor(w_np)
    cur = torch.zeros(m, dtype=torch.float64)
    ub = _seq_gains(ST, torch.arange(n_local), cur, w)  # exact at the start; upper bounds afterwards
    fresh = torch.ones(n_local, dtype=torch.bool)
    picks, gains = [], []
    neg_inf = float("-inf")
    col = torch.zeros(m, dtype=torch.float32, device=cdev)
    for _ in range(k):
        while True:  # lazy greedy: the argmax of the bounds, once exact, is this rank's exact best
            jl = int(torch.argmax(ub))
            if bool(fresh[jl]) or ub[jl] == neg_inf:
                break
            stale = (~fresh) & (ub > neg_inf)
            cand = torch.nonzero(stale).flatten()
            top = cand[torch.topk(ub[cand], min(refresh, len(cand))).indices]
            ub[top] = _seq_gains(ST, top, cur, w)
            fresh[top] = True
        gj, j = global_argmax(float(ub[jl]), offset + jl, group, cdev)
        owner = owner_rank(j, sizes)
        if owner == dist.get_rank(group):
            col.copy_(ST[:, j - offset])
            ub[j - offset] = neg_inf
        dist.broadcast(col, src=dist.get_global_rank(group, owner) if group is not None else owner, group=group)
        picks.append(j)
        gains.append(gj)
        torch.maximum(cur, col.cpu().double(), out=cur)
        fresh.zero_()
    objective = float((w * cur).sum())
    info = {"optimizer": "lazy", "metric": metric, "graph": "dense", "ground": "given", "k_requested": k,
            "n": n, "m": m, "d": d, "world_size": len(sizes), "shard_sizes": sizes}
    return Selection(indices=np.asarray(picks, dtype=np.int64), gains=np.asarray(gains, dtype=np.float64),
                     objective=objective, backend="torch-distributed", seconds=time.perf_counter() - t0,
                     method="facility_location", info=info)


# --------------------------------------------------------------------------- facility location, GreeDi


def select_facility_location_greedi(
    X_shard: Any,
    k: int,
    *,
    weights_shard: Optional[Any] = None,
    graph: str = "knn",
    n_neighbors: int = 20,
    metric: str = "cosine",
    backend: Optional[str] = None,
    group=None,
    refresh: int = 16,
    max_dense_bytes: int = 256 << 20,
) -> Selection:
    """GreeDi facility location over a sharded pool, ground = the pool (collective: call on every rank).

    Round 1: :func:`metamoe.selection.select_facility_location` on this rank's shard (ground = the shard,
    its own ``graph``: ``"knn"`` with ``n_neighbors`` or ``"dense"``), min(k, N_rank) picks. Round 2: the
    picks of every rank are gathered on every rank (union U, |U| <= world x k, in global index order)
    and greedy picks k of U maximising the true objective on the whole pool, f(A) = sum_i w_i max(0,
    max_{j in A} s_ij) with dense similarities: the ground points stay sharded, each rank sums the gains
    over its own ground points and one all_reduce adds them (lazy greedy, ties to the lowest index in U).

    Args:
        X_shard: (N_rank, D) this rank's contiguous rows (rank order = pool order); NumPy / memmap slice or
            CPU tensor, any float dtype.
        k: number of picks, 1 <= k <= N.
        weights_shard: (N_rank,) ground weights >= 0 of this rank's rows (None: ones).
        graph, n_neighbors, metric, backend: round 1's graph and backend (see select_facility_location).
        group: process group. refresh: lazy-greedy batch of round 2.
        max_dense_bytes: round 2 keeps the N_rank x |U| float32 similarities in memory when they take at most
            this many bytes; otherwise it recomputes the columns it needs from the shard, block by block
            (memory O(block x |U|), one extra N_rank x D pass per refreshed column batch and per pick).

    Returns:
        The same :class:`Selection` on every rank: ``indices`` int64 (k,) global indices in pick order,
        ``gains`` float64 (k,), ``objective`` = f(A) on the whole pool with dense similarities (comparable
        with ``select_facility_location(X, k, weights=w, graph="dense").objective``). Memory per rank:
        N_rank x |U| float32 up to ``max_dense_bytes``, then O(block x |U|). Guarantee (Mirzasoleiman et al.
        2013): a constant fraction of the greedy objective in the worst case; close to it on data whose shards
        look alike (the benchmark reports it).
    """
    import torch
    import torch.distributed as dist

    from .facility_location import select_facility_location

    t0 = time.perf_counter()
    if metric not in ("cosine", "ip"):
        raise ValueError(f"metric must be 'cosine' or 'ip', got {metric!r}")
    cdev = comm_device(group)
    Xt = check_embeddings(X_shard, "X_shard", zero_copy_readonly=True)
    n_local, d = Xt.shape
    w_local = torch.as_tensor(check_weights(weights_shard, n_local))
    offset, n, sizes = shard_offsets(n_local, group, cdev)
    k = check_k(k, n)
    world = len(sizes)
    k_local = min(k, n_local)
    kw = {}
    if graph == "knn":
        kw["n_neighbors"] = max(1, min(n_neighbors, n_local - 1))
    if n_local == 1:
        local_idx = np.zeros(1, dtype=np.int64)
    else:
        local_idx = select_facility_location(Xt, k_local, weights=w_local.numpy(), graph=graph, metric=metric,
                                             backend=backend, progress=False, **kw).indices
    t1 = time.perf_counter()
    # gather the candidates' global indices and (normalised) rows on every rank, padded to k rows
    def rows_f32(sel):  # float32 (normalised for cosine) rows of the shard, converted only where read
        b = Xt[sel].float()
        return torch.nn.functional.normalize(b, dim=1) if metric == "cosine" else b

    idx_pad = torch.full((k,), -1, dtype=torch.int64)
    idx_pad[: len(local_idx)] = torch.as_tensor(local_idx) + offset
    rows_pad = torch.zeros(k, d, dtype=torch.float32)
    rows_pad[: len(local_idx)] = rows_f32(torch.as_tensor(local_idx))
    all_idx = [torch.zeros_like(idx_pad, device=cdev) for _ in range(world)]
    all_rows = [torch.zeros_like(rows_pad, device=cdev) for _ in range(world)]
    dist.all_gather(all_idx, idx_pad.to(cdev), group=group)
    dist.all_gather(all_rows, rows_pad.to(cdev), group=group)
    gi = torch.cat([a.cpu() for a in all_idx])
    gr = torch.cat([a.cpu() for a in all_rows])
    keep = gi >= 0
    gi, gr = gi[keep], gr[keep]
    order = torch.argsort(gi)
    U, C = gi[order], gr[order]  # union in global index order (disjoint shards: no duplicates)
    # similarities of the shard's rows to the union, float32, negatives never count; the shard is converted
    # block by block. Kept whole (N_rank x |U|) when small enough, else recomputed per use from the shard.
    blk = matvec_rows(d)
    col_chunk = 4096  # columns per block product when streaming: a (blk, 4096) float32 block is ~43 MiB at D=768

    def sims(a: int, cols) -> "torch.Tensor":
        return torch.clamp(rows_f32(slice(a, a + blk)) @ C[cols].T, min=0.0)

    S = None
    if n_local * len(U) * 4 <= max_dense_bytes:
        S = torch.cat([sims(a, slice(None)) for a in range(0, n_local, blk)])
    cur = torch.zeros(n_local, dtype=torch.float64)

    def gains_of(cols):
        cols = torch.as_tensor(cols)
        if S is not None:
            part = (w_local[:, None] * torch.clamp(S[:, cols].double() - cur[:, None], min=0.0)).sum(0)
        else:
            part = torch.zeros(len(cols), dtype=torch.float64)
            for c0 in range(0, len(cols), col_chunk):
                cc = cols[c0 : c0 + col_chunk]
                for a in range(0, n_local, blk):
                    g = torch.clamp(sims(a, cc).double() - cur[a : a + blk, None], min=0.0)
                    part[c0 : c0 + len(cc)] += (w_local[a : a + blk, None] * g).sum(0)
        part = part.to(cdev)
        dist.all_reduce(part, group=group)  # every rank receives the same sums
        return part.cpu()

    def column(j: int):
        if S is not None:
            return S[:, j]
        return torch.cat([sims(a, [j])[:, 0] for a in range(0, n_local, blk)])

    neg_inf = float("-inf")
    ub = gains_of(torch.arange(len(U)))
    fresh = torch.ones(len(U), dtype=torch.bool)
    picks, gains = [], []
    for _ in range(min(k, len(U))):
        while True:
            j = int(torch.argmax(ub))
            if bool(fresh[j]) or ub[j] == neg_inf:
                break
            cand = torch.nonzero((~fresh) & (ub > neg_inf)).flatten()
            top = cand[torch.topk(ub[cand], min(refresh, len(cand))).indices]
            ub[top] = gains_of(top)
            fresh[top] = True
        picks.append(int(U[j]))
        gains.append(float(ub[j]))
        torch.maximum(cur, column(j).double(), out=cur)
        ub[j] = neg_inf
        fresh.zero_()
    obj = (w_local * cur).sum().reshape(1).to(cdev)
    dist.all_reduce(obj, group=group)
    info = {"optimizer": "greedi", "metric": metric, "graph_round1": graph, "k_requested": k, "n": n, "d": d,
            "world_size": world, "shard_sizes": sizes, "union_size": int(len(U)),
            "round1_seconds": t1 - t0, "objective_graph": "dense",
            "round2_similarities": "in memory" if S is not None else "streamed"}
    return Selection(indices=np.asarray(picks, dtype=np.int64), gains=np.asarray(gains, dtype=np.float64),
                     objective=float(obj.cpu()), backend="torch-distributed", seconds=time.perf_counter() - t0,
                     method="facility_location", info=info)


# --------------------------------------------------------------------------- `metamoe select --distributed`


def cli_check(args) -> None:
    """Reject option combinations that have no sharded implementation (before any work is done)."""
    if args.method == "dpp" and args.kernel != "cosine":
        raise ValueError("--distributed runs the cosine DPP (exact, sharded); --kernel rbf needs a k x N "
                         "workspace on one process: drop --distributed, or use --kernel cosine --ridge > 0")
    if args.method == "dpp" and args.candidates is not None:
        raise ValueError("--distributed with --candidates: the top-M candidates fit one process; "
                         "drop --distributed (or --candidates)")
    if args.method == "facility_location_private" and args.graph != "dense":
        raise ValueError("--distributed --method facility_location_private is the exact sharded greedy on dense "
                         "similarities: pass --graph dense (the kNN graph of the private set is not sharded)")
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {args.timeout}")


def cli_init(args) -> Tuple[int, int]:
    """Join torchrun's process group with the CLI's backend and timeout; (rank, world)."""
    return init_distributed(args.dist_backend, args.timeout)


def cli_rows(n: int) -> Tuple[int, int]:
    """[start, stop) of this rank's rows of an n-row pool under ``metamoe select --distributed`` (pool_shard_range)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    start, stop = pool_shard_range(n, rank, world)
    if stop <= start:
        raise ValueError(f"--distributed with {world} ranks needs at least one public row per rank, got N={n}")
    return start, stop


def cli_select(args, P, X, relevance_shard, rows: Tuple[int, int]) -> Selection:
    """The sharded selection for ``metamoe select --distributed`` over this rank's ``rows`` = :func:`cli_rows`.

    ``X``: the pool, a .npy memmap or a :class:`metamoe.utils.pool_format.PoolEmbeddings` (then only the
    shard files holding ``rows`` are opened: one file when the pool was embedded with this world size);
    ``relevance_shard``: the relevance of ``rows`` only (or None)."""
    start, stop = rows
    if getattr(X, "is_pool_embeddings", False):
        from ..utils.pool_format import open_pool_embeddings

        Xs = open_pool_embeddings(X.path, rows=(start, stop), verify=True)  # hashes only this rank's shard files
    else:
        Xs = X[start:stop]  # a view of the memmap: only this shard's pages are read
    rel = None if relevance_shard is None else np.ascontiguousarray(relevance_shard)
    if rel is not None and len(rel) != stop - start:
        raise ValueError(f"relevance_shard has {len(rel)} rows, the shard {stop - start}")
    with collective_errors(args.timeout):
        if args.method == "dpp":
            return select_dpp_sharded(Xs, args.k, rel, ridge=args.ridge)
        if args.method == "facility_location_private":
            return select_facility_location_private_sharded(Xs, P, args.k)
        return select_facility_location_greedi(Xs, args.k, weights_shard=rel, graph=args.graph,
                                               n_neighbors=args.neighbors, backend=args.backend)


def pool_moments(X: Any, chunk_size: Optional[int] = None, group=None):
    """(mean, E[x^2]) of the whole pool from its shards (collective): the bits of relevance's own moments pass.

    Each rank sums the ``chunk_size``-row chunks of the pool that start in its rows (:func:`pool_shard_range`;
    a chunk that crosses into the next rank's rows is read whole by the rank where it starts), one all_reduce
    (SUM over zero-padded (chunks, 2, D) float64: each entry has one non-zero term, so the sum is exact)
    gives every rank every chunk's sums, and every rank adds them in chunk order from zero, exactly as
    :func:`metamoe.selection.relevance_scores` does in one process. Pass the result to
    ``relevance_scores(..., public_moments=...)`` with the same ``chunk_size``.

    Args:
        X: (N, D) the whole pool as every rank sees it: NumPy array / memmap, CPU torch tensor, or
            :class:`metamoe.utils.pool_format.PoolEmbeddings`; only this rank's chunks are read.
        chunk_size: rows per chunk; must equal relevance_scores' ``chunk_size`` (None in both:
            :func:`metamoe.selection.relevance.default_chunk_rows`).
        group: process group (default: the default group).

    Returns:
        (mean, E[x^2]): two (D,) float64 CPU tensors, identical on every rank.

    Raises:
        ValueError: NaN/inf in the pool (the first chunk holding them is named), on every rank.
    """
    import torch
    import torch.distributed as dist

    from .relevance import PoolRows, chunk_sums, default_chunk_rows

    Xt = PoolRows(X) if getattr(X, "is_pool_embeddings", False) else check_embeddings(
        X, "X", check_finite=False, zero_copy_readonly=True)
    n, d = Xt.shape
    chunk_size = default_chunk_rows(d) if chunk_size is None else int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    start, stop = pool_shard_range(n, dist.get_rank(group), dist.get_world_size(group))
    n_chunks = -(-n // chunk_size)
    sums = torch.zeros(n_chunks, 2, d, dtype=torch.float64)
    for c in range(-(-start // chunk_size), -(-stop // chunk_size) if stop > start else 0):
        sums[c, 0], sums[c, 1] = chunk_sums(Xt, c * chunk_size, chunk_size)
    cdev = comm_device(group)
    red = sums.to(cdev)
    dist.all_reduce(red, group=group)
    sums = red.cpu()
    bad = ~torch.isfinite(sums).reshape(n_chunks, -1).all(dim=1)
    if bool(bad.any()):
        c = int(bad.nonzero()[0, 0])
        raise ValueError(f"the public pool has NaN or inf values in rows {c * chunk_size}:"
                         f"{min(n, (c + 1) * chunk_size)}")
    s = torch.zeros(d, dtype=torch.float64)
    s2 = torch.zeros_like(s)
    for c in range(n_chunks):
        s += sums[c, 0]
        s2 += sums[c, 1]
    return s / n, s2 / n


def cli_moments(args, X):
    """:func:`pool_moments` for ``metamoe select --distributed``, with its collective errors made clear."""
    with collective_errors(args.timeout):
        return pool_moments(X)


__all__ = [
    "init_distributed", "shard_range", "pool_shard_range", "pool_moments", "cli_rows", "cli_moments", "SHARD_ALIGN",
    "select_dpp_sharded", "select_facility_location_private_sharded",
    "select_facility_location_greedi", "DEFAULT_TIMEOUT_S", "cli_check", "cli_init", "cli_select",
]
