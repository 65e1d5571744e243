"""Benchmark sharded selection (metamoe.selection.distributed) on 1, 2 and 4 gloo processes of this machine.

Cases, all on one clustered pool saved as .npy and opened by every rank with mmap_mode="r" (each rank
slices its 64-row-aligned shard, as ``metamoe select --distributed`` does):
  dpp         exact sharded cosine DPP (ridge 1e-3); peer: select_dpp(backend="torch") and "cpp" in one
              process; the picks must be identical to torch's (checked, printed).
  fl-private  exact sharded facility location with ground = a private set P (M rows, replicated);
              peer: select_facility_location(X, k, ground=P, graph="dense"); picks must be identical.
  greedi      GreeDi facility location with ground = the pool (round 1: kNN graph on each shard);
              peer: select_facility_location(X, k) (kNN graph, one process). Both selections are scored
              with the same objective, dense cosine coverage of the whole pool, and the ratio is printed.
Every rank runs 1 thread (torch.set_num_threads(1), OMP_NUM_THREADS=1) and so do the one-process peers, so
the columns compare like with like. This machine has 2 cores: 4 processes oversubscribe it, so the
4-process rows measure communication overhead under contention, not scaling.

Times are medians over --rep runs (after --warmup) of the whole sharded call, between two barriers,
measured on rank 0. Appends rows to <results-dir>/distributed_selection.csv.

  python benchmarks/bench_distributed_selection.py            # N = 200,000, D = 128, k = 200, M = 500
  python benchmarks/bench_distributed_selection.py --quick    # N = 20,000, D = 64, k = 50, M = 200
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: import benchmarks.utils
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.utils import append_csv, common_parser, environment, print_table, summarize  # noqa: E402


def make_data(n, d, m, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((64, d)) * 2.0
    X = (centers[rng.integers(0, 64, n)] + rng.standard_normal((n, d))).astype(np.float32)
    P = (centers[rng.integers(0, 8, m)] + rng.standard_normal((m, d))).astype(np.float32)  # a few clusters
    r = rng.uniform(0.05, 1.0, n)
    return X, P, r


def dense_objective(X, A, chunk=65536):
    """f(A) = sum_i max(0, max_{j in A} cos(x_i, x_j)) over the whole pool, float64 (NumPy, in chunks)."""
    XA = X[np.asarray(A)].astype(np.float64)
    XA /= np.linalg.norm(XA, axis=1, keepdims=True)
    total = 0.0
    for a in range(0, X.shape[0], chunk):
        B = X[a : a + chunk].astype(np.float64)
        B /= np.linalg.norm(B, axis=1, keepdims=True)
        total += float(np.maximum(0.0, (B @ XA.T).max(1)).sum())
    return total


def _worker(rank, world, port, path, cfg, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from metamoe.selection.distributed import (
        init_distributed,
        select_dpp_sharded,
        select_facility_location_greedi,
        select_facility_location_private_sharded,
        shard_range,
    )

    init_distributed("gloo", timeout_s=1800)
    X = np.load(path["X"], mmap_mode="r")
    P = np.load(path["P"])
    r = np.load(path["r"])
    a, b = shard_range(X.shape[0], rank, world)
    Xs, rs = X[a:b], r[a:b]
    runs = {
        "dpp": lambda: select_dpp_sharded(Xs, cfg["k"], rs, ridge=1e-3),
        "fl-private": lambda: select_facility_location_private_sharded(Xs, P, cfg["k"]),
        "greedi": lambda: select_facility_location_greedi(Xs, cfg["k"], graph="knn", n_neighbors=20),
    }
    res = {}
    for name in cfg["cases"]:
        times, sel = [], None
        for i in range(cfg["warmup"] + cfg["rep"]):
            dist.barrier()
            t0 = time.perf_counter()
            sel = runs[name]()
            dist.barrier()
            if i >= cfg["warmup"]:
                times.append(time.perf_counter() - t0)
        res[name] = (times, sel.indices, sel.objective)
    if rank == 0:
        torch.save(res, out)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    p = common_parser(__doc__)
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--d", type=int, default=None)
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--m", type=int, default=None, help="rows of the private set (fl-private)")
    p.add_argument("--procs", default="1,2,4", help="process counts (default: 1,2,4)")
    p.add_argument("--cases", default="dpp,fl-private,greedi")
    args = p.parse_args()
    n = args.n or (20_000 if args.quick else 200_000)
    d = args.d or (64 if args.quick else 128)
    k = args.k or (50 if args.quick else 200)
    m = args.m or (200 if args.quick else 500)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    rep = args.rep or (1 if args.quick else 3)
    cases = [c for c in args.cases.split(",") if c]
    procs = [int(x) for x in args.procs.split(",")]
    torch.set_num_threads(1)

    from metamoe.selection import select_dpp, select_facility_location

    X, P, r = make_data(n, d, m)
    tmp = tempfile.mkdtemp(prefix="bench_dist_")
    path = {"X": os.path.join(tmp, "X.npy"), "P": os.path.join(tmp, "P.npy"), "r": os.path.join(tmp, "r.npy")}
    np.save(path["X"], X)
    np.save(path["P"], P)
    np.save(path["r"], r)
    Xm = np.load(path["X"], mmap_mode="r")

    # one-process peers (1 thread)
    peers = {
        "dpp": [("select_dpp torch", lambda: select_dpp(Xm, k, r, ridge=1e-3, backend="torch", progress=False)),
                ("select_dpp cpp", lambda: select_dpp(Xm, k, r, ridge=1e-3, backend="cpp", progress=False))],
        "fl-private": [("select_facility_location dense",
                        lambda: select_facility_location(Xm, k, ground=P, graph="dense", progress=False))],
        "greedi": [("select_facility_location knn", lambda: select_facility_location(Xm, k, progress=False))],
    }
    ref = {}
    rows = []
    for case in cases:
        for label, fn in peers[case]:
            times, sel = [], None
            for i in range(warmup + rep):
                t0 = time.perf_counter()
                sel = fn()
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            obj = dense_objective(X, sel.indices) if case == "greedi" else sel.objective
            ref.setdefault(case, (sel.indices, obj, summarize(times).median))
            t = summarize(times)
            rows.append({"case": case, "impl": label, "procs": 1, "n": n, "d": d, "k": k, "m": m,
                         "median_s": t.median, "p20_s": t.p20, "p80_s": t.p80,
                         "vs_peer": ref[case][2] / t.median, "same_picks": "peer", "objective_ratio": 1.0})
    import torch.multiprocessing as mp

    for world in procs:
        out = os.path.join(tmp, f"res{world}.pt")
        cfg = {"k": k, "cases": cases, "warmup": warmup, "rep": rep}
        mp.spawn(_worker, args=(world, free_port(), path, cfg, out), nprocs=world, join=True)
        res = torch.load(out, weights_only=False)
        for case in cases:
            times, idx, obj = res[case]
            ref_idx, ref_obj, ref_t = ref[case]
            t = summarize(times)
            same = bool(np.array_equal(idx, ref_idx)) if case != "greedi" else "n/a"
            ratio = obj / ref_obj
            rows.append({"case": case, "impl": "sharded", "procs": world, "n": n, "d": d, "k": k, "m": m,
                         "median_s": t.median, "p20_s": t.p20, "p80_s": t.p80, "vs_peer": ref_t / t.median,
                         "same_picks": same, "objective_ratio": ratio})
    cols = ["case", "impl", "procs", "n", "d", "k", "m", "median_s", "p20_s", "p80_s", "vs_peer", "same_picks",
            "objective_ratio"]
    print_table(rows, cols, title=f"sharded selection, gloo on the CPU, 1 thread per process ({os.cpu_count()} cores)")
    print("vs_peer = one-process peer's median / this median (peer: the case's first single-process row); "
          "greedi objective_ratio: both scored by dense coverage of the whole pool")
    if not args.no_csv:
        env = environment("cpu")
        env["threads_per_process"] = 1
        print("appended to", append_csv("distributed_selection", rows, env, args.results_dir))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
