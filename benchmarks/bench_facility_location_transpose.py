"""Facility location on a prebuilt 1M-point kNN graph: the whole ``select_facility_location`` call (cpp backend).

Target: N = 1M, K = 50, k = 10,000, lazy greedy, on a 2-core CPU, <= 1.5 s for the whole call on a
prebuilt graph. Building an exact kNN graph of 1M points takes long on 2 cores, so the graph here is made
synthetically with the shape of a clustered kNN graph: the points fall into clusters of ``--cluster-size``
consecutive positions on a line; each point lists itself (similarity 1) and K - 1 distinct points of its
cluster within a window around it, with a similarity that falls with the distance on the line (plus noise),
rows sorted by decreasing similarity; point ids are then shuffled, so a row's neighbours are scattered over
the id range as in a real pool. The pool embeddings X are small random (N, 4) rows: only the graph's
fingerprint check reads them.

What is timed (median of ``--rep`` calls after ``--warmup``):
  first    ``select_facility_location(X, k, graph=G)`` on a graph that has not been used yet (builds the
           candidate -> ground transpose), each repetition on a fresh copy of the graph
  reuse    the same call again on the same graph (the transpose cached on the graph is reused)
  apricot  (``--apricot``) apricot-select's FacilityLocationSelection (metric="precomputed", the lazy
           optimizer) on the same graph: it reads a sparse matrix whose rows are candidates, so it gets the
           transpose of the graph (scipy CSR, float64, built before the clock starts); its numba code is
           compiled on a small graph first. Its picks, gains and objective must equal this call's; the
           ratios apricot / first and apricot / reuse are printed. (pip install apricot-select, or the
           ``bench`` extra.)
  baseline (``--baseline-so PATH``) a reference cpp path without the cached parallel transpose, run in a
           subprocess with the extension module at PATH (a build of metamoe/_C*.so whose
           ``_C.FacilityLocationGreedy`` takes the graph arrays and builds a serial int64/float64 transpose):
           int64 copy of the indices, that constructor, the picks. Its picks, gains and objective are
           compared with this call's (they must be identical) and the ratio baseline / first is printed.

  python benchmarks/bench_facility_location_transpose.py                       # N = 1M, K = 50, k = 10,000
  python benchmarks/bench_facility_location_transpose.py --apricot             # and apricot, same graph
  python benchmarks/bench_facility_location_transpose.py \\
      --baseline-so /tmp/fl_baseline/_C.cpython-311-x86_64-linux-gnu.so
  python benchmarks/bench_facility_location_transpose.py --n 100000 --k 1000 --rep 3   # small
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: import benchmarks.utils

import numpy as np  # noqa: E402

from benchmarks.utils import add_results_dir, append_csv, environment, time_fn  # noqa: E402


def synthetic_graph(n: int, K: int, cluster_size: int, seed: int):
    """(X, KnnGraph): the clustered synthetic kNN graph described in the module docstring."""
    from metamoe.selection import KnnGraph
    from metamoe.selection.knn_graph import fingerprint

    if not 1 <= K <= cluster_size <= n:
        raise ValueError(f"need 1 <= K={K} <= cluster_size={cluster_size} <= n={n}")
    rng = np.random.default_rng(seed)
    pos = np.arange(n, dtype=np.int64)
    start = (pos // cluster_size) * cluster_size
    size = np.minimum(cluster_size, n - start)  # the last cluster may be smaller
    # K - 1 increasing offsets per row (random steps of 1 or 2), each with a random sign, wrapped around the
    # cluster: distinct neighbours while 2 * 2 (K - 1) < cluster_size
    steps = rng.integers(1, 3, size=(n, K - 1), dtype=np.int64)
    offs = np.cumsum(steps, axis=1)
    offs = offs % size[:, None]
    offs[offs == 0] = 1  # only reachable in a cluster smaller than 2 (K - 1); keeps the row free of self
    sign = np.where(rng.random((n, K - 1)) < 0.5, -1, 1)
    nb = start[:, None] + (pos[:, None] - start[:, None] + sign * offs) % size[:, None]
    dist = np.minimum(offs, size[:, None] - offs).astype(np.float32)
    sim = np.exp(-dist / (2.0 * K)) * (0.6 + 0.4 * rng.random((n, K - 1), dtype=np.float32))
    sim = sim.astype(np.float32) - np.float32(0.15)  # some entries <= 0: they never contribute
    cols = np.concatenate([pos[:, None], nb], axis=1)
    sims = np.concatenate([np.ones((n, 1), dtype=np.float32), sim], axis=1)
    order = np.argsort(-sims, axis=1, kind="stable")
    cols = np.take_along_axis(cols, order, axis=1)
    sims = np.take_along_axis(sims, order, axis=1)
    perm = rng.permutation(n)  # position -> id
    inv = np.empty(n, dtype=np.int64)
    inv[perm] = pos
    cols = perm[cols][inv]  # row id r is position inv[r]
    sims = sims[inv]
    X = rng.standard_normal((n, 4), dtype=np.float32)
    graph = KnnGraph(
        indptr=np.arange(0, n * K + 1, K, dtype=np.int64), indices=cols.reshape(-1).astype(np.int32),
        similarities=np.ascontiguousarray(sims.reshape(-1)), n_points=n, metric="cosine", n_neighbors=K,
        self_included=True, pool_fingerprint=fingerprint(X), info={"method": "synthetic"},
    )
    return X, graph


def fresh_copy(graph):
    from metamoe.selection import KnnGraph

    return KnnGraph(indptr=graph.indptr.copy(), indices=graph.indices.copy(), similarities=graph.similarities.copy(),
                    n_points=graph.n_points, metric=graph.metric, n_neighbors=graph.n_neighbors,
                    self_included=graph.self_included, pool_fingerprint=graph.pool_fingerprint, info=dict(graph.info))


def baseline_worker(so_path: str, args) -> None:
    """Runs in a subprocess: the reference cpp path with the extension module at ``so_path``; prints JSON."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_C", so_path)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    if args.threads:
        old.set_num_threads(args.threads)
    X, graph = synthetic_graph(args.n, args.neighbors, args.cluster_size, args.seed)
    k = args.k
    out = {}

    def call():
        indices = graph.indices.astype(np.int64)  # the int64 indices that constructor takes
        w = np.ones(graph.n_queries, dtype=np.float64)
        state = old.FacilityLocationGreedy(graph.indptr, indices, graph.similarities, w, int(graph.n_points), k, 1,
                                           int(graph.n_points), 0)
        idx, gn = [], []
        chunk = int(min(1024, max(16, k // 50)))
        while state.picked < k:
            i, g = state.run(min(chunk, k - state.picked))
            idx.append(i)
            gn.append(g)
        out.update(indices=np.concatenate(idx).tolist(), gains=np.concatenate(gn).tolist(),
                   objective=float(state.objective()))

    t = time_fn(call, warmup=args.warmup, rep=args.rep)
    print("BASELINE_JSON " + json.dumps({"median_s": t.median, "p20_s": t.p20, "p80_s": t.p80, **out}))


def _apricot_version() -> str:
    from importlib.metadata import version

    return version("apricot-select")


def run_apricot(graph, k: int, rep: int):
    """apricot's lazy facility location on the transpose of ``graph``: (timing, selector)."""
    import scipy.sparse as sp
    from apricot import FacilityLocationSelection

    n = graph.n_points

    def transpose(g):
        m = sp.csr_matrix((g.similarities.astype(np.float64), g.indices.astype(np.int64), g.indptr), shape=(n, n))
        return m.T.tocsr()  # rows: candidates, columns: the ground points they cover

    small = sp.random(500, 500, density=0.05, format="csr", random_state=0)
    FacilityLocationSelection(10, metric="precomputed", optimizer="lazy").fit(small)  # numba compiles here
    Mt = transpose(graph)
    out = {}

    def call():
        out["fl"] = FacilityLocationSelection(k, metric="precomputed", optimizer="lazy", verbose=False).fit(Mt)

    return time_fn(call, warmup=0, rep=rep), out["fl"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--neighbors", type=int, default=50, help="K")
    p.add_argument("--k", type=int, default=10_000, help="picks")
    p.add_argument("--cluster-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--rep", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="OpenMP threads of the extension (default: as is)")
    p.add_argument("--apricot", action="store_true", help="also time apricot-select on the same graph")
    p.add_argument("--apricot-rep", type=int, default=1, help="timed apricot calls (each takes about a minute)")
    p.add_argument("--baseline-so", default=None, help="path of a reference build of metamoe/_C*.so to compare with")
    p.add_argument("--baseline-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-csv", action="store_true", help="print only, do not append to the results folder")
    add_results_dir(p)
    args = p.parse_args(argv)
    if args.baseline_worker:
        return baseline_worker(args.baseline_worker, args)

    from metamoe.backends.availability import require_extension
    from metamoe.selection import select_facility_location

    _C = require_extension("_C")
    if args.threads:
        _C.set_num_threads(args.threads)
    t0 = time.perf_counter()
    X, graph = synthetic_graph(args.n, args.neighbors, args.cluster_size, args.seed)
    print(f"synthetic graph: N={args.n} K={args.neighbors} nnz={graph.nnz} clusters of {args.cluster_size}: "
          f"{time.perf_counter() - t0:.1f} s; extension threads: {_C.num_threads()}")
    k = args.k
    holder = {}
    out = {}

    def new_graph():
        holder["g"] = fresh_copy(graph)

    def call():
        out["sel"] = select_facility_location(X, k, graph=holder["g"], backend="cpp", progress=False)

    t_first = time_fn(call, warmup=args.warmup, rep=args.rep, setup=new_graph)
    t_reuse = time_fn(call, warmup=0, rep=args.rep)
    first, reuse = t_first.median, t_reuse.median
    sel = out["sel"]
    print(f"first call (transpose built): median {first:.3f} s  (p20 {t_first.p20:.3f}, p80 {t_first.p80:.3f})")
    print(f"reuse (transpose cached):     median {reuse:.3f} s  (p20 {t_reuse.p20:.3f}, p80 {t_reuse.p80:.3f})")
    print(f"objective {sel.objective:.6f}, last gain {sel.gains[-1]:.6g}")
    row = {"op": "facility_location", "backend": "cpp", "N": args.n, "K": args.neighbors, "k": k,
           "cluster_size": args.cluster_size, "first_call_s": round(first, 4), "cached_call_s": round(reuse, 4),
           "objective": round(float(sel.objective), 6)}
    if args.apricot:
        t_ap, fl = run_apricot(graph, k, args.apricot_rep)
        ap_idx, ap_gains = np.asarray(fl.ranking), np.asarray(fl.gains, dtype=np.float64)
        same = bool(np.array_equal(ap_idx, sel.indices))
        gain_err = float(np.abs(ap_gains - sel.gains).max()) if same else float("nan")
        obj_err = abs(float(ap_gains.sum()) - float(sel.objective))
        print(f"apricot {_apricot_version()} (lazy, precomputed sparse): median {t_ap.median:.3f} s over "
              f"{args.apricot_rep} call(s); same picks {same}, max |gain difference| {gain_err:.3g}, "
              f"|objective difference| {obj_err:.3g}")
        print(f"speed-up apricot / first call: {t_ap.median / first:.1f}x; apricot / reuse: {t_ap.median / reuse:.1f}x")
        row.update(apricot_s=round(t_ap.median, 3), same_as_apricot=same and gain_err <= 1e-9 and obj_err <= 1e-6,
                   speedup_vs_apricot_first=round(t_ap.median / first, 1),
                   speedup_vs_apricot_cached=round(t_ap.median / reuse, 1))
    if args.baseline_so:
        del holder["g"], out["sel"]
        cmd = [sys.executable, str(Path(__file__).resolve()), "--baseline-worker", args.baseline_so,
               "--n", str(args.n), "--neighbors", str(args.neighbors), "--k", str(k), "--cluster-size",
               str(args.cluster_size), "--seed", str(args.seed), "--warmup", str(args.warmup), "--rep", str(args.rep)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        line = next(ln for ln in res.stdout.splitlines() if ln.startswith("BASELINE_JSON "))
        base = json.loads(line[len("BASELINE_JSON "):])
        same_picks = bool(np.array_equal(np.asarray(base["indices"]), sel.indices))
        same_gains = bool(np.array_equal(np.asarray(base["gains"]), sel.gains))
        same_obj = base["objective"] == sel.objective
        print(f"baseline ({args.baseline_so}): median {base['median_s']:.3f} s  "
              f"(p20 {base['p20_s']:.3f}, p80 {base['p80_s']:.3f})")
        print(f"same picks {same_picks}, same gains {same_gains}, same objective {same_obj}")
        print(f"speed-up baseline / first call: {base['median_s'] / first:.2f}x; baseline / reuse: "
              f"{base['median_s'] / reuse:.2f}x")
        row.update(baseline_s=round(base["median_s"], 4), same_as_baseline=same_picks and same_gains and same_obj,
                   speedup_first=round(base["median_s"] / first, 2), speedup_cached=round(base["median_s"] / reuse, 2))
    if not args.no_csv:
        print("appended 1 row to "
              f"{append_csv('facility_location_transpose', [row], environment('cpu'), args.results_dir)}")
    if args.apricot and not row["same_as_apricot"]:
        sys.exit("apricot's picks, gains or objective differ from this call's")
    if args.baseline_so and not row["same_as_baseline"]:
        sys.exit("the current call's picks, gains or objective differ from the baseline's")


if __name__ == "__main__":
    main()
