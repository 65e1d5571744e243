"""Benchmark build_knn_graph (metamoe.selection.knn_graph): the exact torch search against faiss.

Peers, timed in the same run on the same pool (benchmarks/cases.py: KNN_GRAPH), each building the pool's
own cosine K-NN graph (the graph facility location runs on):
  torch-exact     method="torch": blocked matmul + torch.topk on the data's device (the reference; the only
                  one on a GPU without faiss, as on the GPU image)
  faiss-flat      method="exact" on CPU data: faiss IndexFlatIP (where faiss imports)
  faiss-gpu-flat  method="faiss-gpu" on GPU data (where faiss with GPU support imports)
Every graph is checked against the reference's: ``recall_vs_ref`` (fraction of identical neighbour
indices) and ``max_sim_err_vs_ref`` (max difference of the sorted similarities, which ties cannot move);
the reference itself against a brute-force float32 search of ``--check-queries`` random rows:
``sample_max_sim_err``. ``check_ok``: similarities within 1e-3 of the reference's (and the reference's
within 1e-3 of the brute force). Data: Gaussian blobs made on the device (cases.clustered_torch).

Prints a table (median and 20/80 % quantiles in seconds, queries per second) and appends rows to
<results-dir>/knn_graph.csv.

  python benchmarks/bench_knn_graph.py --quick        # N = 20,000, D = 64, K = 20 on the CPU
  python benchmarks/bench_knn_graph.py                # N = 200,000, D = 768, K = 50 (a GPU where there is one)
  python benchmarks/bench_knn_graph.py --target --results-dir OUT [--graph-cache G.npz]   # CUDA only
  python benchmarks/bench_knn_graph.py --target --target-scale tiny --results-dir TMP --graph-cache G
      # the same --target path at the tiny shapes of cases.py target_tiny (a dry run; see benchmarks/utils.py)

--target (issue 17, H200: exact K-NN graph of 1M x 768, K = 50, <= 60 s; rows with target_case
knn-n1m-d768-k50): the peers available on the GPU, one timed build each (--rep) after an untimed build of
a 10,000-row slice (--warmup such builds: cuBLAS and the kernels initialised). ``--graph-cache G.npz`` saves
the reference graph, which bench_facility_location.py --target --graph-cache G.npz then loads (the same
data) instead of building it again.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: import benchmarks.utils

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.cases import KNN_GRAPH, clustered_torch  # noqa: E402
from benchmarks.utils import (  # noqa: E402
    add_target_scale,
    append_csv,
    check_target_args,
    common_parser,
    environment,
    failure_note,
    pick_device,
    print_table,
    recover_cuda,
    time_fn,
)
from metamoe.selection import build_knn_graph  # noqa: E402
from metamoe.selection.knn_graph import faiss_gpu_reason  # noqa: E402

METHOD_OF = {"torch-exact": "torch", "faiss-flat": "exact", "faiss-gpu-flat": "faiss-gpu"}
SIM_TOL = 1e-3


def faiss_reason() -> str:
    """'' when faiss imports, else why not."""
    try:
        import faiss  # noqa: F401
    except Exception as exc:
        return f"faiss not importable ({type(exc).__name__}: {exc})"
    return ""


def peers_for(device: str):
    """[(peer, why skipped or '')] for data on ``device``."""
    if device.startswith("cuda"):
        return [("torch-exact", ""), ("faiss-gpu-flat", faiss_gpu_reason() or "")]
    return [("torch-exact", ""), ("faiss-flat", faiss_reason())]


def brute_force_sims(X, rows: np.ndarray, K: int) -> np.ndarray:
    """Sorted top-K cosine similarities of the given query rows among all of X, one float32 matmul."""
    Xn = torch.nn.functional.normalize(X.float(), dim=1)
    q = Xn[torch.as_tensor(rows, device=X.device)]
    return torch.topk(q @ Xn.T, K, dim=1).values.cpu().numpy()


def graph_sims(graph) -> np.ndarray:
    return graph.similarities.reshape(graph.n_queries, -1)


def run(N: int, D: int, K: int, device: str, warmup: int, rep: int, case: str = "", check_queries: int = 256,
        graph_cache=None):
    X = clustered_torch(N, D, device=device)
    rows, graphs = [], {}
    for peer, why in peers_for(device):
        row = {"op": "knn_graph", "method": peer, "N": N, "D": D, "K": K, "data_device": device,
               "threads": torch.get_num_threads(), "note": why and f"skipped: {why}"}
        if case:
            row["target_case"] = case
        if why:
            rows.append(row)
            continue
        method = METHOD_OF[peer]
        out = {}

        def call(method=method, out=out):
            out["g"] = build_knn_graph(X, K, method=method, progress=False)

        try:  # a failing peer gets its row with the error in note; the others still run
            for _ in range(warmup):  # initialise on a slice (a full build would double the run)
                build_knn_graph(X[: min(N, 10_000)], K, method=method, progress=False)
            t = time_fn(call, device=device, warmup=0, rep=rep)
        except Exception as exc:
            recover_cuda()
            row["note"] = failure_note(exc)
            rows.append(row)
            continue
        graphs[peer] = out["g"]
        row.update(t.as_row("s"))
        row["queries/s"] = round(N / t.median, 1)
        rows.append(row)
    ref = graphs.get(KNN_GRAPH.reference)
    sample_err = None
    if ref is not None:
        qrows = np.sort(np.random.default_rng(0).choice(N, size=min(check_queries, N), replace=False))
        sample_err = float(np.abs(brute_force_sims(X, qrows, K) - graph_sims(ref)[qrows]).max())
        if graph_cache:
            ref.save(graph_cache)
            print(f"saved the {KNN_GRAPH.reference} graph to {graph_cache}")
    for row in rows:
        g = graphs.get(row["method"])
        if g is None or ref is None:
            row["check_ok"] = None
            continue
        row["recall_vs_ref"] = round(float((g.indices.reshape(N, -1) == ref.indices.reshape(N, -1)).mean()), 6)
        row["max_sim_err_vs_ref"] = float(np.abs(graph_sims(g) - graph_sims(ref)).max())
        row["sample_max_sim_err"] = sample_err
        row["check_ok"] = bool(row["max_sim_err_vs_ref"] <= SIM_TOL and sample_err <= SIM_TOL)
    return rows


def build_parser():
    p = common_parser(__doc__)
    p.add_argument("--target", action="store_true",
                   help="run exactly the issue-17 GPU target (cases.KNN_GRAPH.target: N=1M, D=768, K=50) with the "
                        "peers available on a CUDA device; ignores the shape flags")
    add_target_scale(p)
    p.add_argument("--N", type=int, default=None, help="pool rows")
    p.add_argument("--D", type=int, default=None, help="dimension")
    p.add_argument("--K", type=int, default=None, help="neighbours per row")
    p.add_argument("--check-queries", type=int, default=256,
                   help="rows whose neighbours are also found by brute force, to check the reference")
    p.add_argument("--graph-cache", default=None,
                   help="a .npz path: save the reference graph there "
                        "(bench_facility_location.py --graph-cache reads it)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    device = pick_device(args.device, args.threads)
    case = ""
    check_target_args(p, args, device)
    if args.target:
        shape = KNN_GRAPH.target_shapes(args.target_scale)[0]
        case = shape["case"]
        warmup, rep = (args.warmup if args.warmup is not None else 1), args.rep or 1
    else:
        shape = KNN_GRAPH.quick[0] if (args.quick or not device.startswith("cuda")) else KNN_GRAPH.gpu[0]
        shape = {"N": args.N or shape["N"], "D": args.D or shape["D"], "K": args.K or shape["K"]}
        warmup, rep = (args.warmup if args.warmup is not None else 1), args.rep or 3
    rows = run(shape["N"], shape["D"], shape["K"], device, warmup, rep, case, args.check_queries, args.graph_cache)
    env = environment(device)
    print_table(rows, ["method", "N", "D", "K", "data_device", "median_s", "p20_s", "p80_s", "queries/s",
                       "recall_vs_ref", "max_sim_err_vs_ref", "check_ok"],
                title=f"build_knn_graph on {env['device']} (torch {env['torch']}, {torch.get_num_threads()} threads)")
    for r in rows:
        if r.get("note"):
            print(f"{r['method']}: {r['note']}")
    if not args.no_csv:
        print(f"appended {len(rows)} rows to {append_csv('knn_graph', rows, env, args.results_dir)}")


if __name__ == "__main__":
    main()
