"""Benchmark greedy facility location (metamoe.selection.select_facility_location) on one kNN graph.

Peers, timed in the same run on the same prebuilt graph (the graph build is timed once, separately):
  cpp     C++/OpenMP: lazy priority queue with dirty flags (exact), naive, stochastic
  torch   the pure-PyTorch fallback: exact gains kept with vectorised segment sums, argmax per pick
  cuda    the CUDA kernels, where a GPU is visible (lazy/naive only)
For the exact optimizers the picks of every backend are asserted identical to the torch fallback's;
the speed-up column is torch's median over the backend's.

Data: Gaussian blobs (``--clusters``) in D dimensions, float32, cosine similarity, ground = pool.

Prints a table (median and 20/80 % quantiles in seconds, objective, speed-up) and appends rows to
benchmarks/results/facility_location.csv.

  python benchmarks/bench_facility_location.py --quick          # small: what CI runs on a CPU
  python benchmarks/bench_facility_location.py                  # N = 100k, K = 20, k = 1000
  python benchmarks/bench_facility_location.py --n 1000000 --neighbors 50 --k 10000 --graph-method ivf

Target (issue 3, 2-core CPU): K = 50 graph, N = 1M, k = 10,000 in <= 10 s, C++ >= 10x the fallback.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.utils import append_csv, common_parser, environment, pick_device, print_table, time_fn  # noqa: E402
from metamoe.backends import availability  # noqa: E402
from metamoe.selection import KnnGraph, build_knn_graph, select_facility_location  # noqa: E402


def blobs(n: int, d: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d)).astype(np.float32) * 3
    labels = rng.integers(0, clusters, n)
    X = centers[labels]
    X += rng.standard_normal((n, d), dtype=np.float32)
    return X


def main() -> None:
    p = common_parser(__doc__)
    p.add_argument("--n", type=int, default=None, help="pool size N (default 100000; --quick 20000)")
    p.add_argument("--d", type=int, default=None, help="embedding dimension (default 64; --quick 32)")
    p.add_argument("--neighbors", type=int, default=20, help="K of the kNN graph")
    p.add_argument("--k", type=int, default=None, help="picks (default 1000; --quick 200)")
    p.add_argument("--clusters", type=int, default=100)
    p.add_argument("--optimizers", default="lazy,stochastic", help="comma-separated: lazy, naive, stochastic")
    p.add_argument("--graph-method", default="auto", help="build_knn_graph method (auto, exact, ivf, torch)")
    p.add_argument("--backends", default=None, help="comma-separated (default: every one available here)")
    p.add_argument("--seed", type=int, default=0)
    if not any("--threads" in a.option_strings for a in p._actions):  # benchmarks.utils may already offer it
        p.add_argument("--threads", type=int, default=None, help="CPU threads (default: leave as is)")
    p.add_argument("--graph-cache", default=None,
                   help="a .npz path: load the kNN graph from it if it exists (checked against the data), else save it")
    args = p.parse_args()
    # The same thread count for torch and the C++ module: on a shared, busy CPU torch's intra-op threads
    # can be many times slower than one thread, so compare the backends at equal counts.
    if args.threads:
        torch.set_num_threads(args.threads)
        from metamoe.backends.availability import extension

        ext, _ = extension("_C")
        if ext is not None:
            ext.set_num_threads(args.threads)

    quick = args.quick
    n = args.n or (20_000 if quick else 100_000)
    d = args.d or (32 if quick else 64)
    k = args.k or (200 if quick else 1000)
    K = args.neighbors
    warmup = args.warmup if args.warmup is not None else 1
    rep = args.rep if args.rep is not None else 3
    device = pick_device(args.device)
    backends = args.backends.split(",") if args.backends else ["torch", "cpp"] + (["cuda"] if device != "cpu" else [])
    for b in list(backends):
        reason = availability.backend_unavailable_reason(b)
        if reason:
            print(f"skipping backend {b}: {reason}")
            backends.remove(b)
    if "torch" not in backends:
        sys.exit("the torch fallback is the reference peer: keep it in --backends")
    optimizers = args.optimizers.split(",")

    X = blobs(n, d, args.clusters, args.seed)
    cache = Path(args.graph_cache) if args.graph_cache else None
    if cache is not None and cache.exists():
        graph = KnnGraph.load(cache)
        graph.check_matches(X)
        if graph.n_neighbors != K:
            sys.exit(f"{cache} holds a K={graph.n_neighbors} graph, asked for K={K}")
        graph_s = float(graph.info["seconds"])
        print(f"graph: loaded from {cache} (built in {graph_s:.2f} s)")
    else:
        t0 = time.perf_counter()
        graph = build_knn_graph(X, K, method=args.graph_method, progress=False)
        graph_s = time.perf_counter() - t0
        if cache is not None:
            graph.save(cache)
    print(f"graph: N={n} D={d} K={K}: {graph_s:.2f} s ({graph.info.get('method')}"
          + (f", recall@K {graph.info['recall']:.3f}" if "recall" in graph.info else "") + ")")
    Xdev = torch.from_numpy(X).to(device) if device != "cpu" else X

    env = environment(device)
    rows = []
    for opt in optimizers:
        ref = None
        results = {}
        for b in backends:
            if b == "cuda" and opt == "stochastic":
                continue
            Xb = X if b == "cpp" else Xdev
            out = {}

            def call(b=b, Xb=Xb, out=out):
                out["sel"] = select_facility_location(Xb, k, graph=graph, optimizer=opt, backend=b, seed=args.seed,
                                                      progress=False)

            t = time_fn(call, device=device if b != "cpp" else "cpu", warmup=warmup, rep=rep)
            sel = out["sel"]
            results[b] = (t, sel)
            if b == "torch":
                ref = sel
        for b, (t, sel) in results.items():
            exact = opt != "stochastic"
            if exact and b != "torch":
                np.testing.assert_array_equal(sel.indices, ref.indices, err_msg=f"{b} picks differ from torch's")
                assert abs(sel.objective - ref.objective) <= 1e-9 * abs(ref.objective), (sel.objective, ref.objective)
            speedup = results["torch"][0].median / t.median
            rows.append({
                "op": "facility_location", "backend": b, "optimizer": opt, "n": n, "d": d, "neighbors": K, "k": k,
                **t.as_row("s"), "objective": round(sel.objective, 6), "speedup_vs_torch": round(speedup, 2),
                "same_picks_as_torch": (bool(np.array_equal(sel.indices, ref.indices)) if exact else "n/a"),
                "graph_method": graph.info.get("method"), "graph_s": round(graph_s, 3),
                "recall": graph.info.get("recall"), "threads": torch.get_num_threads(),
            })
    print_table(rows, ["backend", "optimizer", "n", "neighbors", "k", "median_s", "p20_s", "p80_s", "objective",
                       "speedup_vs_torch", "same_picks_as_torch"],
                title=f"facility location on {env['device']} (graph build {graph_s:.2f} s, not included)")
    if not args.no_csv:
        path = append_csv("facility_location", rows, env)
        print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
