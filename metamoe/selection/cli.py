"""``metamoe select``: the whole client-side proxy-selection stage (relevance, then selection), .npy in.

    metamoe select --private P.npy --public X.npy --k 500 --method dpp --candidates 2000 --out sel.json

The .npy files are opened with ``mmap_mode="r"`` (pools larger than memory are streamed). Methods
(:mod:`metamoe.selection.methods`; the short spelling in brackets is accepted too):

* ``dpp``: relevance-weighted DPP (:func:`select_dpp`; ``--kernel --ridge --gamma --candidates``)
* ``facility_location`` (``fl``): facility location over the pool, weights = relevance
  (:func:`select_facility_location`)
* ``facility_location_private`` (``fl-private``): facility location covering the private set (ground=P,
  uniform weights; no relevance needed)
* ``top_relevance`` (``topk``): the most relevant samples (similarity only, FlexOlmo-style)
* ``random``: uniform random proxies (``--seed``; no relevance needed)

The JSON is :meth:`Selection.save`'s (``indices``, ``gains``, ``objective``, ``method``, ``backend``,
``seconds``, ``info``); ``method`` is the canonical name of the method run, ``seconds`` the selection step
alone and ``info.relevance_seconds`` / ``info.total_seconds`` the rest. Only the indices need to leave the
client.

``--public`` is a .npy or a pool written by ``metamoe embed-pool`` (``manifest.json`` or its folder;
:mod:`metamoe.utils.pool_format`).

``--distributed`` (under ``torchrun --nproc_per_node=N -m metamoe select --distributed ...``): every rank
opens the .npy as a memmap (or the pool's shards) and takes its contiguous rows
(:func:`metamoe.selection.distributed.pool_shard_range`: with a pool embedded by N ranks, exactly one shard
file); relevance: the pool's feature moments are summed from every rank's chunks (one all_reduce, the
single-process bits), the classifier trains identically on every rank (seeded samples of the whole pool)
and scores only the rank's rows, so no rank reads the whole pool; dpp (cosine) and facility_location_private
(``--graph dense``) give the single-process picks, facility_location runs GreeDi; rank 0 alone writes
``--out``.
``--timeout`` bounds every collective, so a dead rank makes the others exit with code 2.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
import warnings
from typing import List, Optional

import numpy as np

from ..utils.files import open_npy
from ..utils.preflight import check_file_output
from .dpp import DEFAULT_COSINE_RIDGE, STRATEGIES
from .methods import FACILITY_LOCATION_PRIVATE, METHOD_ALIASES, SELECT_COMMAND_METHODS, canonical_method

NEEDS_RELEVANCE = ("dpp", "facility_location", "top_relevance")
SHARDED_METHODS = ("dpp", "facility_location", FACILITY_LOCATION_PRIVATE)


def _method_arg(value: str) -> str:
    """``--method``: a canonical name or a short spelling, returned canonical."""
    try:
        return canonical_method(value, "--method", SELECT_COMMAND_METHODS)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="metamoe select",
        description="Client-side proxy selection: relevance scores on the public pool, then k proxies.",
    )
    p.add_argument("--private", required=True, help="(M, D) private embeddings, .npy (float32/float16)")
    p.add_argument(
        "--public", required=True,
        help="(N, D) public pool embeddings: a .npy (opened as a memmap) or a pool from `metamoe embed-pool` "
        "(its manifest.json or folder; shards memmapped, sha256-checked)",
    )
    p.add_argument("--k", required=True, type=int, help="number of proxies to select")
    p.add_argument(
        "--method", default="dpp", type=_method_arg, metavar="METHOD",
        help=f"selection criterion: {', '.join(SELECT_COMMAND_METHODS)} (short spellings: "
        f"{', '.join(f'{a} = {c}' for a, c in METHOD_ALIASES.items())}; default: dpp)",
    )
    p.add_argument(
        "--candidates",
        type=int,
        default=None,
        help="dpp only: keep the top-M by relevance first (the paper: 2000)",
    )
    p.add_argument(
        "--neighbors", type=int, default=20, help="facility_location(_private): kNN graph neighbours (default: 20)"
    )
    p.add_argument(
        "--ridge",
        type=float,
        default=None,
        help=f"dpp: ridge of the kernel (default: {DEFAULT_COSINE_RIDGE} with the cosine kernel, full rank so that "
        "k > D picks stay diverse; 0 with rbf)",
    )
    p.add_argument(
        "--strategy",
        default=None,
        choices=STRATEGIES,
        help="dpp, cosine kernel: how the cpp backend finds each pick (default: auto; every strategy gives the "
        "same picks)",
    )
    p.add_argument(
        "--kernel", default="cosine", choices=("cosine", "rbf"), help="dpp kernel (default: cosine)"
    )
    p.add_argument("--gamma", type=float, default=None, help="dpp rbf bandwidth (default: median heuristic)")
    p.add_argument(
        "--backend", default=None, help="auto (default, or METAMOE_BACKEND), torch, cpp, cuda, triton"
    )
    p.add_argument("--device", default=None, help="device of the relevance classifier (default: cpu)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the relevance classifier and of random (default: 0)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--graph", default="knn", choices=("knn", "dense"),
        help="facility_location(_private): similarity graph, kNN (--neighbors) or dense (default: knn)",
    )
    p.add_argument(
        "--distributed", action="store_true",
        help="sharded over torch.distributed: run under `torchrun --nproc_per_node=N -m metamoe select ...`; "
        "each rank slices its shard of --public; dpp (cosine, exact), facility_location_private (--graph dense, "
        "exact), facility_location (GreeDi); rank 0 writes --out",
    )
    p.add_argument(
        "--timeout", type=float, default=600.0,
        help="--distributed: collective timeout in seconds; a dead peer makes the others fail (default: 600)",
    )
    p.add_argument(
        "--dist-backend", default=None, choices=("gloo", "nccl"),
        help="--distributed: process-group backend (default: nccl with a GPU per rank, else gloo)",
    )
    p.add_argument("--out", required=True, help="where to write the selection JSON")
    return p


def _load(path: str, name: str) -> np.ndarray:
    if not os.path.exists(path):
        raise FileNotFoundError(f"--{name}: no such file: {path}")
    if not path.endswith(".npy"):
        raise ValueError(f"--{name} must be a .npy file, got {path}")
    return open_npy(path, f"--{name}")


def _load_public(path: str, distributed: bool):
    """--public: a .npy memmap, or a sharded pool (manifest.json or its folder, from `metamoe embed-pool`).

    A pool under --distributed stays a lazy view (relevance reads it row by row; each rank then opens and
    sha256-checks only the shard files of its own rows); in one process a one-shard pool is that shard's
    memmap and a multi-shard pool is concatenated, after every shard file's sha256 is checked: in memory
    when it takes at most half of the memory available, else streamed into a temporary .npy in the pool
    folder that is memmapped and unlinked at once (its disk space is freed when the process exits)."""
    if os.path.isdir(path) or path.endswith(".json"):
        from ..utils import memory
        from ..utils.pool_format import open_pool_embeddings

        pool = open_pool_embeddings(path, verify=not distributed)
        if distributed or len(pool.shard_ranges) == 1:
            return pool if distributed else pool.to_array()
        nbytes = pool.nbytes
        if nbytes <= memory.available_bytes("cpu")[0] // 2:
            return pool.to_array()
        import tempfile

        folder = os.path.dirname(os.path.abspath(path)) if path.endswith(".json") else path
        fd, tmp = tempfile.mkstemp(prefix=".select-concat-", suffix=".npy", dir=folder)
        os.close(fd)
        print(f"--public: {len(pool.shard_ranges)} shards, {nbytes / 2**30:.1f} GiB: more than half of the free "
              f"memory, concatenated on disk ({tmp}, removed at exit)")
        try:
            return pool.to_array(out=tmp)
        finally:
            os.unlink(tmp)  # the memmap keeps the file's pages until the process ends
    return _load(path, "public")


def _facility_location(X, k, ground, weights, args, progress):
    try:
        from . import select_facility_location
    except ImportError as exc:
        raise RuntimeError(
            f"--method {args.method} needs metamoe.selection.select_facility_location: {exc}"
        ) from None
    kw = dict(ground=ground, n_neighbors=args.neighbors, backend=args.backend)
    if getattr(args, "graph", "knn") != "knn":
        kw["graph"] = args.graph
    if weights is not None:
        kw["weights"] = weights
    params = inspect.signature(select_facility_location).parameters
    if "progress" in params:
        kw["progress"] = progress
    if "seed" in params:
        kw["seed"] = args.seed
    return select_facility_location(X, k, **kw)


def run(args: argparse.Namespace):
    """The selection for parsed ``args`` (also used by the tests); returns the Selection."""
    from .baselines import select_random, select_top_relevance
    from .dpp import select_dpp
    from .relevance import relevance_scores
    from .validation import check_k

    t0 = time.perf_counter()
    args.method = canonical_method(args.method, "--method", SELECT_COMMAND_METHODS)
    progress = not args.no_progress
    check_file_output(args.out, "--out")  # before any work: a selection is not lost to an unwritable path
    P = _load(args.private, "private")
    X = _load_public(args.public, getattr(args, "distributed", False))
    if X.ndim != 2:
        raise ValueError(f"--public must hold a 2-D (N, D) array, got shape {X.shape}")
    check_k(args.k, X.shape[0])  # fail before the relevance step, not after
    if args.method != "dpp":
        unused = [
            flag
            for flag, val, default in (
                ("--candidates", args.candidates, None),
                ("--ridge", args.ridge, None),
                ("--strategy", args.strategy, None),
                ("--kernel", args.kernel, "cosine"),
                ("--gamma", args.gamma, None),
            )
            if val != default
        ]
        if unused:
            raise ValueError(f"{', '.join(unused)} only apply to --method dpp, not {args.method}")
    else:
        args.ridge = dpp_ridge(args)
    if getattr(args, "distributed", False):
        from .distributed import cli_check, cli_init

        cli_check(args)  # unsupported combinations fail before the relevance step
        cli_init(args)
    sharded = getattr(args, "distributed", False) and args.method in SHARDED_METHODS
    rows = None
    if sharded:  # this rank's rows. Relevance: the pool's moments are gathered from the ranks' chunks, the
        # classifier trains on seeded samples of the whole pool (identically on every rank), scores these rows
        from .distributed import cli_rows

        rows = cli_rows(X.shape[0])
    relevance, rel_seconds = None, 0.0
    if args.method in NEEDS_RELEVANCE:
        t = time.perf_counter()
        moments = None
        if sharded:  # the pool's moments from every rank's chunks (one all_reduce): no rank reads the whole pool
            from .distributed import cli_moments

            moments = cli_moments(args, X)
        relevance = relevance_scores(P, X, seed=args.seed, device=args.device, progress=progress, score_rows=rows,
                                     public_moments=moments)
        rel_seconds = time.perf_counter() - t
        where = "" if rows is None else f" (rows {rows[0]}:{rows[1]} of {X.shape[0]}, this rank's shard)"
        print(
            f"relevance: {len(relevance)} public samples scored{where} in {rel_seconds:.2f} s "
            f"(mean {relevance.mean():.3f}, max {relevance.max():.3f})"
        )
    if sharded:
        from .distributed import cli_select

        sel = cli_select(args, P, X, relevance, rows)
    elif args.method == "dpp":
        sel = select_dpp(
            X,
            args.k,
            relevance,
            kernel=args.kernel,
            ridge=args.ridge,
            gamma=args.gamma,
            candidates=args.candidates,
            backend=args.backend,
            progress=progress,
            strategy=args.strategy or "auto",
        )
    elif args.method == "facility_location":
        sel = _facility_location(X, args.k, None, relevance, args, progress)
    elif args.method == FACILITY_LOCATION_PRIVATE:
        if P.ndim != 2 or P.shape[1:] != X.shape[1:]:
            raise ValueError(f"--private must be (M, D) with the pool's D={X.shape[1]}, got shape {P.shape}")
        sel = _facility_location(X, args.k, P, None, args, progress)
    elif args.method == "top_relevance":
        sel = select_top_relevance(relevance, args.k)
    else:
        sel = select_random(X.shape[0], args.k, seed=args.seed)
    sel.info = dict(sel.info)
    sel.info.update(
        selector=sel.method,
        private=os.path.abspath(args.private),
        public=os.path.abspath(args.public),
        relevance_seconds=rel_seconds,
        total_seconds=time.perf_counter() - t0,
        seed=args.seed,
    )
    sel.method = args.method
    return sel


def dpp_ridge(args) -> float:
    """--ridge, or its default: DEFAULT_COSINE_RIDGE with the cosine kernel (a linear kernel has rank <= D, and
    without a ridge the greedy stops after D picks), 0 with the full-rank RBF kernel."""
    if args.ridge is not None:
        return args.ridge
    return DEFAULT_COSINE_RIDGE if args.kernel == "cosine" else 0.0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sel = run(args)
        rank = 0
        if args.distributed:
            import torch.distributed as dist

            rank = dist.get_rank() if dist.is_initialized() else 0
        if rank != 0:  # every rank holds the same selection; rank 0 alone reports and writes it
            return 0
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        sel.save(args.out)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        where = ""
        if args.distributed:
            where = f" (rank {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')})"
        print(f"metamoe select{where}: error: {exc}", file=sys.stderr)
        if args.distributed:
            from ..utils.distributed import finish

            finish(failed=True)
        return 2
    finally:
        if args.distributed:
            from ..utils.distributed import finish

            finish()
    print(
        f"selection: {len(sel)} proxies (of k={args.k}) by {args.method}, backend {sel.backend}, "
        f"in {sel.seconds:.2f} s; objective {sel.objective:.6g}; total {sel.info['total_seconds']:.2f} s"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
