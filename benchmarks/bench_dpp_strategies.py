"""The cosine DPP's C++ strategies at pool scale, with their peers in the same run.

Default shape (the CPU target): N = 1M, D = 768, k = 768, relevance-weighted (r ~ U(0.05, 1)), ridge 1e-3,
float32 pool (of float16-representable values, so that its float16 copy holds the same ones), on clustered
embeddings (cases.clustered_torch: 64 centres plus noise) and on i.i.d. Gaussian ones (near-uniform
residuals, the lazy greedy's hard case). Per data set, every row on the same pool:

  cpp auto      select_dpp's default (lazy; switches to the sweep where its cost model says so), --rep calls
  cpp sweep     one pass over the pool per pick (the algorithm of the previous implementation)
  cpp auto/sweep on a float16 copy of the pool (read in place: half the bytes per pass; float64 sums)
  torch         metamoe's PyTorch path (float64 on the CPU), --torch-k picks only, scaled to k (``scaled_s``)
  baseline      (--baseline-so PATH) a build of metamoe/_C*.so from before the lazy greedy, sweeping, in a
                subprocess on the same pool (regenerated from the seed)

The picks of every row must equal the first picks of ``cpp auto`` (``picks_identical``); the residual bits
of the C++ rows too (``residuals_identical``). ``updates_per_pick``: candidates the lazy greedy brought up
to date per pick; ``dots_fraction``: row . direction products over the sweep's N k; ``time_over_auto``: the
row's time (``scaled_s`` for torch) over cpp auto's on float32. Rows go to
<results-dir>/dpp_strategies.csv.

  python benchmarks/bench_dpp_strategies.py                                    # the target, ~10 min
  python benchmarks/bench_dpp_strategies.py --baseline-so /tmp/dpp_base/metamoe/_C.cpython-311-x86_64-linux-gnu.so
  python benchmarks/bench_dpp_strategies.py --n 100000 --k 200 --data random   # small
  python benchmarks/bench_dpp_strategies.py --n 200000 --d 32 --k 300 --data random --relevance ones \\
      --storages float32 --lazy --torch-k 0      # where the lazy greedy loses and auto switches
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
import torch  # noqa: E402

from benchmarks.cases import clustered_torch  # noqa: E402
from benchmarks.utils import add_results_dir, append_csv, environment, print_table, time_fn  # noqa: E402


def make_pool(kind: str, n: int, d: int, seed: int, relevance: str = "uniform"):
    """(X float32 (n, d) torch tensor, relevance (n,) float64), the same for the same arguments."""
    if kind == "clustered":
        X = clustered_torch(n, d, seed=seed)
    elif kind == "random":
        X = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    else:
        raise ValueError(f"data must be clustered or random, got {kind!r}")
    r = np.random.default_rng(seed).uniform(0.05, 1.0, n) if relevance == "uniform" else np.ones(n)
    return X.half().float().contiguous(), r  # float16-representable: the float16 copy holds the same values


def baseline_worker(so_path: str, args) -> None:
    """Runs in a subprocess: the sweep of the extension module at ``so_path``; prints JSON."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_C", so_path)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    X, r = make_pool(args.data_kind, args.n, args.d, args.seed, args.relevance)
    arr = X.numpy()
    out = {}

    def call():
        state = old.DppGreedyCosineF32(arr, r, args.ridge, args.k)
        idx, res = [], []
        while state.picked < args.k and not state.exhausted:
            i, v = state.run(min(64, args.k - state.picked), 0.0)
            idx.append(i)
            res.append(v)
        out.update(indices=np.concatenate(idx).tolist(), residuals=np.concatenate(res).tolist())

    t = time_fn(call, warmup=0, rep=1)
    print("BASELINE_JSON " + json.dumps({"median_s": t.median, **out}))


def run_kind(kind: str, args) -> list:
    from metamoe.selection import select_dpp

    n, d, k, ridge = args.n, args.d, args.k, args.ridge
    t0 = time.perf_counter()
    X, r = make_pool(kind, n, d, args.seed, args.relevance)
    print(f"{kind} pool {n} x {d} float32: {time.perf_counter() - t0:.1f} s", flush=True)
    X16 = X.half() if "float16" in args.storages else None
    rows, ref = [], {}

    def cpp_row(storage, strategy, rep):
        inp = X if storage == "float32" else X16
        out = {}

        def fn():
            out["sel"] = select_dpp(inp, k, r, ridge=ridge, backend="cpp", strategy=strategy, progress=False)

        select_dpp(inp, 10, r, ridge=ridge, backend="cpp", strategy=strategy, progress=False)  # warm-up
        t = time_fn(fn, warmup=0, rep=rep)
        sel = out["sel"]
        info = sel.info
        row = {"data": kind, "relevance": args.relevance, "storage": storage, "backend": "cpp", "strategy": strategy,
               "ran": info["strategy"],
               "N": n, "D": d, "k": k, "rep": rep, **t.as_row("s"),
               "updates_per_pick": round(info["row_updates"] / max(len(sel), 1), 1),
               "dots_fraction": round(info["row_dots"] / (n * k), 3)}
        if "indices" not in ref:
            ref.update(indices=sel.indices, gains=sel.gains)
        row["picks_identical"] = bool(np.array_equal(sel.indices, ref["indices"]))
        row["residuals_identical"] = bool(np.array_equal(sel.gains, ref["gains"]))
        if strategy == "sweep":
            row["GB/s"] = round(len(sel) * n * d * inp.element_size() / t.median / 1e9, 1)
        print(f"  cpp {strategy:5s} {storage}: {t.median:.2f} s ({row['ran']}), picks identical "
              f"{row['picks_identical']}", flush=True)
        rows.append(row)

    for storage in args.storages:
        cpp_row(storage, "auto", args.rep if storage == "float32" else 1)
        if args.lazy:
            cpp_row(storage, "lazy", 1)
        cpp_row(storage, "sweep", 1)
    if args.torch_k:
        out = {}

        def tfn():
            out["sel"] = select_dpp(X, args.torch_k, r, ridge=ridge, backend="torch", progress=False)

        t = time_fn(tfn, warmup=0, rep=1)
        same = bool(np.array_equal(out["sel"].indices, ref["indices"][: args.torch_k]))
        rows.append({"data": kind, "relevance": args.relevance, "storage": "float32", "backend": "torch",
                     "strategy": "sweep", "ran": "sweep",
                     "N": n, "D": d, "k": args.torch_k, "rep": 1, **t.as_row("s"),
                     "scaled_s": round(t.median * k / args.torch_k, 2), "picks_identical": same,
                     "note": f"{args.torch_k} of {k} picks, scaled_s = median_s x {k} / {args.torch_k}"})
        print(f"  torch {args.torch_k} picks: {t.median:.2f} s (x{k / args.torch_k:.0f}: {rows[-1]['scaled_s']} s), "
              f"picks identical {same}", flush=True)
    if args.baseline_so:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--baseline-worker", args.baseline_so, "--data-kind",
               kind, "--n", str(n), "--d", str(d), "--k", str(k), "--ridge", str(ridge), "--seed", str(args.seed)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        line = next(ln for ln in res.stdout.splitlines() if ln.startswith("BASELINE_JSON "))
        base = json.loads(line[len("BASELINE_JSON "):])
        same = bool(np.array_equal(np.asarray(base["indices"]), ref["indices"]))
        same_res = bool(np.array_equal(np.log(np.asarray(base["residuals"])), ref["gains"]))
        rows.append({"data": kind, "relevance": args.relevance, "storage": "float32", "backend": "cpp (baseline build)",
                     "strategy": "sweep",
                     "ran": "sweep", "N": n, "D": d, "k": k, "rep": 1, "median_s": round(base["median_s"], 4),
                     "picks_identical": same, "residuals_identical": same_res, "note": args.baseline_so})
        print(f"  baseline sweep: {base['median_s']:.2f} s, picks identical {same}, residuals identical {same_res}",
              flush=True)
    auto = next(rw["median_s"] for rw in rows if rw["strategy"] == "auto" and rw["storage"] == "float32")
    for rw in rows:
        rw["time_over_auto"] = round(rw.get("scaled_s", rw["median_s"]) / auto, 2)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--k", type=int, default=768)
    p.add_argument("--ridge", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="clustered,random", help="comma-separated: clustered, random")
    p.add_argument("--relevance", choices=("uniform", "ones"), default="uniform",
                   help="r ~ U(0.05, 1), or all ones (near-uniform residuals: where the lazy greedy loses)")
    p.add_argument("--storages", default="float32,float16", help="comma-separated: float32, float16")
    p.add_argument("--rep", type=int, default=3, help="timed calls of cpp auto on float32 (the others: 1)")
    p.add_argument("--lazy", action="store_true", help="also time strategy='lazy' (without auto's switch)")
    p.add_argument("--torch-k", type=int, default=16, help="picks of the torch peer (0: skip it)")
    p.add_argument("--baseline-so", default=None, help="a build of metamoe/_C*.so from before the lazy greedy")
    p.add_argument("--baseline-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data-kind", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-csv", action="store_true", help="print only, do not append to the results folder")
    add_results_dir(p)
    args = p.parse_args(argv)
    if args.baseline_worker:
        return baseline_worker(args.baseline_worker, args)
    args.storages = args.storages.split(",")
    rows = []
    for kind in args.data.split(","):
        rows += run_kind(kind, args)
    env = environment("cpu")
    print_table(rows, ["data", "storage", "backend", "strategy", "ran", "k", "median_s", "scaled_s", "updates_per_pick",
                       "dots_fraction", "GB/s", "picks_identical", "residuals_identical", "time_over_auto"],
                title=f"select_dpp, N={args.n} D={args.d} k={args.k} ridge={args.ridge} on {env['device']} "
                      f"({torch.get_num_threads()} threads)")
    if not args.no_csv:
        print(f"appended to {append_csv('dpp_strategies', rows, env, args.results_dir)}")
    if not all(rw["picks_identical"] for rw in rows):
        sys.exit("some row's picks differ from cpp auto's")


if __name__ == "__main__":
    main()
