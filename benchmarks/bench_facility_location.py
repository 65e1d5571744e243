"""Benchmark greedy facility location (metamoe.selection.select_facility_location) on one kNN graph.

Peers, timed in the same run on the same prebuilt graph (the graph build is timed once, separately):
  cpp     C++/OpenMP: lazy priority queue with dirty flags (exact), naive, stochastic
  torch   the pure-PyTorch fallback: exact gains kept with vectorised segment sums, argmax per pick
  cuda    the CUDA kernels, where a GPU is visible (lazy/naive only)
For the exact optimizers the picks of every backend are asserted identical to the torch fallback's;
the speed-up column is torch's median over the backend's.

Data: Gaussian blobs (``--clusters``) in D dimensions, float32, cosine similarity, ground = pool.

Prints a table (median and 20/80 % quantiles in seconds, objective, speed-up) and appends rows to
<results-dir>/facility_location.csv. Shapes: benchmarks/cases.py (FACILITY_LOCATION).

  python benchmarks/bench_facility_location.py --quick          # small: what CI runs on a CPU
  python benchmarks/bench_facility_location.py                  # N = 100k, K = 20, k = 1000
  python benchmarks/bench_facility_location.py --n 1000000 --neighbors 50 --k 10000 --graph-method ivf
  python benchmarks/bench_facility_location.py --target --results-dir OUT [--graph-cache G.npz]   # CUDA only
  python benchmarks/bench_facility_location.py --target --target-scale tiny --results-dir TMP --graph-cache G
      # the same --target path at the tiny shapes of cases.py target_tiny (a dry run; see benchmarks/utils.py)

--target (issue 17, H200: facility location on a 1M-point K = 50 kNN graph, k = 10,000, <= 1 s; rows with
target_case fl-n1m-k50-k10000): the pool is cases.clustered_torch(1M, 768) made on the GPU, the graph its
exact kNN graph (build_knn_graph method="torch" on the GPU, timed once, separately: ``graph_s``), or the
graph in ``--graph-cache`` when that file holds the graph of the same data (bench_knn_graph.py --target
--graph-cache G.npz writes it). Lazy greedy on cuda (all k picks; one untimed call, then --rep 3 timed),
cpp (all k picks on the host's cores, one timed call) and the torch fallback on the GPU (cases peer_k:
1,000 picks, one timed call; ``scaled_s`` = median_s x k_target / k is a linear extrapolation, so said in
``note``). Picks are compared with the torch fallback's (its first picks: exact greedy picks the same
prefix whatever k): ``same_picks_as_torch``, recorded, not raised.

``--dense``: graph="dense" with the similarities computed on the fly (torch backend, exact lazy greedy;
defaults N = 100k, D = 64, k = 200, one timed run). Peers in the same run: the kNN path (graph build +
lazy greedy on the K-NN graph, both timed) and, where N^2 pairs fit in memory (N <= --materialise-max),
the materialised dense path (CSR, cpp or torch backend) whose picks must be identical, and the external
peer apricot (``pip install apricot-select``; its lazy greedy on the precomputed max(0, cos) matrix, the
same objective, so the same picks). Every selection's
objective is also evaluated on the dense similarities (float64), so the table shows how much coverage
the kNN sparsification gives away (``dense_obj_vs_knn``: dense greedy's f over kNN greedy's f, both
measured densely).

  python benchmarks/bench_facility_location.py --dense --quick --threads 1
  python benchmarks/bench_facility_location.py --dense --n 100000 --k 200 --threads 1
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: import benchmarks.utils

import numpy as np  # noqa: E402
import torch  # noqa: E402

import metamoe.selection.facility_location as fl_mod  # noqa: E402
from benchmarks.cases import (  # noqa: E402
    FACILITY_LOCATION,
    FACILITY_LOCATION_DENSE_GPU,
    FACILITY_LOCATION_DENSE_QUICK,
    clustered_torch,  # noqa: E402
)
from benchmarks.utils import (  # noqa: E402
    add_target_scale,
    append_csv,
    capped_note,
    check_target_args,
    common_parser,
    compare_picks,
    environment,
    failure_note,
    pick_device,
    print_table,
    recover_cuda,
    time_fn,
)
from metamoe.backends import availability  # noqa: E402
from metamoe.selection import KnnGraph, build_knn_graph, select_facility_location  # noqa: E402


def blobs(n: int, d: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d)).astype(np.float32) * 3
    labels = rng.integers(0, clusters, n)
    X = centers[labels]
    X += rng.standard_normal((n, d), dtype=np.float32)
    return X


def dense_objective(X: np.ndarray, picks: np.ndarray, device: str, block: int = 8192) -> float:
    """f(A) = sum_i max(0, max_{j in A} cos(x_i, x_j)) over the whole pool, blockwise, float64 sums."""
    Xt = torch.nn.functional.normalize(torch.from_numpy(X).to(device).float(), dim=1)
    A = Xt[torch.as_tensor(picks, device=device)]
    total = 0.0
    for s in range(0, Xt.shape[0], block):
        total += float((Xt[s : s + block] @ A.T).amax(dim=1).clamp(min=0).double().sum())
    return total


def run_dense(args, device: str) -> None:
    quick = args.quick
    dense = FACILITY_LOCATION_DENSE_QUICK if quick else FACILITY_LOCATION_DENSE_GPU
    n = args.n or dense["n"]
    d = args.d or dense["d"]
    k = args.k or dense["k"]
    K = args.neighbors if args.neighbors is not None else 20
    warmup = args.warmup if args.warmup is not None else 0
    rep = args.rep if args.rep is not None else 1
    X = blobs(n, d, args.clusters, args.seed)
    Xdev = torch.from_numpy(X).to(device) if device != "cpu" else X
    cpp_ok = availability.backend_unavailable_reason("cpp") is None
    knn_backend = "cpp" if (cpp_ok and device == "cpu") else "torch"
    env = environment(device)
    threads = torch.get_num_threads()  # read now: importing apricot (numba) later resets OpenMP's count
    runs = {}

    def timed(name, fn):
        out = {}
        t = time_fn(lambda: out.__setitem__("sel", fn()), device=device, warmup=warmup, rep=rep)
        runs[name] = (t, out["sel"])

    saved = fl_mod.DENSE_MATERIALIZE_PAIRS
    try:
        fl_mod.DENSE_MATERIALIZE_PAIRS = 0  # on the fly at every size
        timed("dense-on-the-fly", lambda: select_facility_location(Xdev, k, graph="dense", progress=False))
        if n <= args.materialise_max:
            fl_mod.DENSE_MATERIALIZE_PAIRS = n * n
            timed("dense-materialised", lambda: select_facility_location(X if knn_backend == "cpp" else Xdev, k,
                                                                         graph="dense", backend=knn_backend,
                                                                         progress=False))
    finally:
        fl_mod.DENSE_MATERIALIZE_PAIRS = saved
    timed("knn", lambda: select_facility_location(X if knn_backend == "cpp" else Xdev, k, graph="knn",
                                                  n_neighbors=K, backend=knn_backend, progress=False))
    apricot_run = run_apricot(X, k, warmup, rep) if n <= args.materialise_max else None

    otf = runs["dense-on-the-fly"][1]
    knn_f = dense_objective(X, runs["knn"][1].indices, device)
    rows = []
    for name, (t, sel) in runs.items():
        f_dense = dense_objective(X, sel.indices, device)
        same = bool(np.array_equal(sel.indices, otf.indices))
        if name == "dense-materialised":
            np.testing.assert_array_equal(sel.indices, otf.indices, err_msg="materialised picks differ from on-the-fly")
        rows.append({
            "op": "facility_location_dense", "variant": name, "backend": sel.backend, "n": n, "d": d, "k": k,
            "neighbors": K if name == "knn" else "", **t.as_row("s"),
            "graph_s": round(sel.info.get("graph_seconds", 0.0), 3),
            "objective": round(sel.objective, 6), "dense_objective": round(f_dense, 6),
            "dense_obj_vs_knn": round(f_dense / knn_f, 6), "same_picks_as_on_the_fly": same,
            "time_vs_on_the_fly": round(t.median / runs["dense-on-the-fly"][0].median, 3),
            "candidate_evaluations": sel.info.get("candidate_evaluations", ""),
            "threads": threads,
        })
    if apricot_run is not None:
        t, picks, version = apricot_run
        rows.append({
            "op": "facility_location_dense", "variant": f"apricot {version} (precomputed max(0, cos))",
            "backend": "apricot", "n": n, "d": d, "k": k, "neighbors": "", **t.as_row("s"), "graph_s": "",
            "objective": "", "dense_objective": round(dense_objective(X, picks, device), 6),
            "dense_obj_vs_knn": round(dense_objective(X, picks, device) / knn_f, 6),
            "same_picks_as_on_the_fly": bool(np.array_equal(picks, otf.indices)),
            "time_vs_on_the_fly": round(t.median / runs["dense-on-the-fly"][0].median, 3),
            "candidate_evaluations": "", "threads": threads,
        })
    print_table(rows, ["variant", "backend", "n", "d", "k", "median_s", "graph_s", "dense_objective",
                       "dense_obj_vs_knn", "same_picks_as_on_the_fly", "time_vs_on_the_fly", "threads"],
                title=f"facility location, graph='dense' on {env['device']} ({threads} torch threads; "
                      f"median of {rep} run(s); knn includes its graph build)")
    if not args.no_csv:
        path = append_csv("facility_location_dense", rows, env, args.results_dir)
        print(f"appended {len(rows)} rows to {path}")


def run_apricot(X: np.ndarray, k: int, warmup: int, rep: int):
    """The external peer: apricot's lazy greedy on the same objective, given max(0, cosine) precomputed.

    Only its selection is timed (the N x N float64 matrix is built beforehand); None when apricot is not
    installed (``pip install apricot-select``). apricot's own kNN (sparse) path fails with current SciPy's
    int64 sparse indices, so the dense path is the comparable one.
    """
    try:
        import apricot
        from apricot import FacilityLocationSelection
    except Exception as exc:  # not installed or broken: say so, run the rest
        print(f"apricot peer skipped: {type(exc).__name__}: {exc}")
        return None
    Xn = X.astype(np.float64)
    Xn /= np.linalg.norm(Xn, axis=1, keepdims=True)
    S = np.maximum(Xn @ Xn.T, 0.0)
    out = {}

    def call():
        out["sel"] = FacilityLocationSelection(k, metric="precomputed", optimizer="lazy", verbose=False).fit(S)

    t = time_fn(call, device="cpu", warmup=warmup, rep=rep)
    return t, np.asarray(out["sel"].ranking[:k], dtype=np.int64), apricot.__version__


def load_or_build_graph(X, K: int, cache, method: str = "auto"):
    """(graph, seconds it took to build, where it came from): from ``cache`` (a .npz) when that holds the graph
    of X with this K, else built (and saved to ``cache`` when given)."""
    cache = Path(cache) if cache else None
    if cache is not None and cache.exists():
        graph = KnnGraph.load(cache)
        graph.check_matches(X)
        if graph.n_neighbors != K:
            sys.exit(f"{cache} holds a K={graph.n_neighbors} graph, asked for K={K}")
        return graph, float(graph.info["seconds"]), f"loaded from {cache}"
    t0 = time.perf_counter()
    graph = build_knn_graph(X, K, method=method, progress=False)
    seconds = time.perf_counter() - t0
    if cache is not None:
        graph.save(cache)
    return graph, seconds, "built"


def run_target(args, device: str):
    """The issue-17 GPU target with its peers (see the module docstring); returns the rows."""
    c = FACILITY_LOCATION.target_shapes(args.target_scale)[0]
    n, d, K, k = c["n"], c["d"], c["neighbors"], c["k"]
    X = clustered_torch(n, d, device=device)
    graph, graph_s, origin = load_or_build_graph(X, K, args.graph_cache, method="torch")
    print(f"graph: N={n} D={d} K={K} ({graph.info.get('method')}): {graph_s:.2f} s, {origin}")
    rep = args.rep or 3
    warmup = args.warmup if args.warmup is not None else 1
    plan = [("cuda", k, device, warmup, rep), ("cpp", k, "cpu", 0, 1),
            ("torch", c["peer_k"]["torch"], device, 0, 1)]
    rows, picks = [], {}
    X_host = None
    for backend, k_run, dev, w, r in plan:
        row = {"op": "facility_location", "backend": backend, "optimizer": "lazy", "n": n, "d": d, "neighbors": K,
               "k": k_run, "k_target": k, "graph_method": graph.info.get("method"), "graph_s": round(graph_s, 3),
               "threads": torch.get_num_threads(), "target_case": c["case"], "note": ""}
        why = availability.backend_unavailable_reason(backend)
        if why:
            row["note"] = f"skipped: {why}"
            rows.append(row)
            continue
        if dev == "cpu" and X_host is None:
            X_host = X.cpu().numpy()
        Xb = X_host if dev == "cpu" else X
        out = {}

        def call(Xb=Xb, backend=backend, kk=k_run, out=out):
            out["sel"] = select_facility_location(Xb, kk, graph=graph, optimizer="lazy", backend=backend,
                                                  progress=False)

        try:  # a failing backend gets its row with the error in note; the others still run
            t = time_fn(call, device=dev, warmup=w, rep=r)
        except Exception as exc:
            recover_cuda()
            row["note"] = failure_note(exc)
            rows.append(row)
            continue
        sel = out["sel"]
        picks[backend] = sel.indices
        row.update(t.as_row("s"))
        row["scaled_s"] = round(t.median * k / k_run, 4)
        row["objective"] = round(sel.objective, 6)
        if k_run < k:
            row["note"] = capped_note(k_run, k)
        rows.append(row)
    compare_picks(rows, picks, "same_picks_as_torch")
    if "cuda" in picks and "cpp" in picks:
        same = bool(np.array_equal(picks["cuda"], picks["cpp"]))
        for row in rows:
            if row["backend"] in ("cuda", "cpp"):
                row["same_picks_cuda_cpp"] = same
    base = next((rw for rw in rows if rw["backend"] == "torch" and "median_s" in rw), None)
    for rw in rows:
        if base and "median_s" in rw:
            rw["speedup_vs_torch_scaled"] = round(base["scaled_s"] / rw["scaled_s"], 2)
    return rows


def build_parser():
    p = common_parser(__doc__)
    p.add_argument("--target", action="store_true",
                   help="run exactly the issue-17 GPU target (cases.FACILITY_LOCATION.target: N=1M, K=50, k=10000) "
                        "with its peers on a CUDA device; ignores the shape flags")
    add_target_scale(p)
    p.add_argument("--n", type=int, default=None, help="pool size N (default 100000; --quick 20000)")
    p.add_argument("--d", type=int, default=None, help="embedding dimension (default 64; --quick 32)")
    p.add_argument("--neighbors", type=int, default=None, help="K of the kNN graph (default 20; --dense: 20)")
    p.add_argument("--k", type=int, default=None, help="picks (default 1000; --quick 200)")
    p.add_argument("--clusters", type=int, default=100)
    p.add_argument("--optimizers", default="lazy,stochastic", help="comma-separated: lazy, naive, stochastic")
    p.add_argument("--graph-method", default="auto", help="build_knn_graph method (auto, exact, ivf, torch)")
    p.add_argument("--backends", default=None, help="comma-separated (default: every one available here)")
    p.add_argument("--seed", type=int, default=0)
    if not any("--threads" in a.option_strings for a in p._actions):  # benchmarks.utils may already offer it
        p.add_argument("--threads", type=int, default=None, help="CPU threads (default: leave as is)")
    p.add_argument("--dense", action="store_true",
                   help="graph='dense' on the fly vs the kNN path (and the materialised dense path when small)")
    p.add_argument("--materialise-max", type=int, default=12_000,
                   help="--dense: also run the materialised dense path up to this N (N^2 pairs in memory)")
    p.add_argument("--graph-cache", default=None,
                   help="a .npz path: load the kNN graph from it if it exists (checked against the data), else save it")
    return p


def main(argv=None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    # The same thread count for torch and the C++ module: on a shared, busy CPU torch's intra-op threads
    # can be many times slower than one thread, so compare the backends at equal counts.
    if args.threads:
        torch.set_num_threads(args.threads)
        from metamoe.backends.availability import extension

        ext, _ = extension("_C")
        if ext is not None:
            ext.set_num_threads(args.threads)

    check_target_args(p, args, pick_device(args.device))
    if args.target:
        device = pick_device(args.device)
        rows = run_target(args, device)
        env = environment(device)
        print_table(rows, ["backend", "n", "neighbors", "k", "k_target", "median_s", "scaled_s", "objective",
                           "same_picks_as_torch", "speedup_vs_torch_scaled"],
                    title=f"facility location target on {env['device']} (graph build not included)")
        for rw in rows:
            if rw.get("note"):
                print(f"{rw['backend']}: {rw['note']}")
        if not args.no_csv:
            print(f"appended {len(rows)} rows to {append_csv('facility_location', rows, env, args.results_dir)}")
        return
    if args.dense:
        return run_dense(args, pick_device(args.device))
    quick = args.quick
    shape = FACILITY_LOCATION.quick[0] if quick else FACILITY_LOCATION.gpu[0]
    n = args.n or shape["n"]
    d = args.d or shape["d"]
    k = args.k or shape["k"]
    K = args.neighbors if args.neighbors is not None else shape["neighbors"]
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
    graph, graph_s, origin = load_or_build_graph(X, K, args.graph_cache, method=args.graph_method)
    if origin != "built":
        print(f"graph: {origin} (built in {graph_s:.2f} s)")
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

            def call(b=b, Xb=Xb, out=out, opt=opt):
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
        path = append_csv("facility_location", rows, env, args.results_dir)
        print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
