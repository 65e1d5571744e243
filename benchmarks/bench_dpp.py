"""Benchmark select_dpp: the C++ (OpenMP) and CUDA backends against the plain PyTorch path, same data.

Cases (every backend runs the same inputs; the picks must be identical, asserted before timing):
  cosine   L = diag(r) (Xn Xn^T + ridge I) diag(r), feature space, one N x D pass per pick.
           Storage float32 and float16 (the C++ code reads 16-bit storage in place; torch converts).
  rbf      L = diag(r) (K + ridge I) diag(r), K = exp(-gamma ||xn_i - xn_j||^2): Chen et al.'s
           incremental Cholesky with kernel rows on the fly (O(N D + N t) per pick, k x N workspace).
  paper    the authors' protocol: top-2,000 by relevance, then the cosine DPP on those (candidates=2000).
Peers: torch (metamoe's PyTorch implementation: float64 on the CPU) for every case; cpp; cuda where a GPU
is visible (cosine only; the RBF GPU path is the torch one).

Prints a table (median and 20/80 % quantiles in seconds, effective GB/s of the X stream for the cosine
kernel, speed-up over torch) and appends rows to benchmarks/results/dpp.csv.

  python benchmarks/bench_dpp.py            # N = 200,000, D = 128, k = 500 (cosine); rbf at N = 20,000
  python benchmarks/bench_dpp.py --quick    # small shapes, seconds on a 2-core CPU
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # last: see benchmarks/utils.py

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.utils import append_csv, common_parser, environment, pick_device, print_table, time_fn  # noqa: E402
from metamoe.backends import availability  # noqa: E402
from metamoe.selection import select_dpp  # noqa: E402


def make_data(n, d, seed=0):
    rng = np.random.default_rng(seed)
    # clustered embeddings (closer to real ones than i.i.d. noise), fp16-representable so that the
    # float16 and float32 storages hold the same values and must give the same picks
    centers = rng.standard_normal((64, d))
    X = centers[rng.integers(0, 64, n)] + 0.5 * rng.standard_normal((n, d))
    X = X.astype(np.float16).astype(np.float32)
    r = rng.uniform(0.05, 1.0, n)
    return X, r


def threads():
    """CPU threads of this run (torch's intra-op pool; the C++ module follows OMP_NUM_THREADS too)."""
    return torch.get_num_threads()


def backends_for(kernel, device):
    out = []
    if availability.backend_unavailable_reason("cpp") is None:
        out.append(("cpp", "cpu"))
    if (
        kernel == "cosine"
        and device.startswith("cuda")
        and availability.backend_unavailable_reason("cuda") is None
    ):
        out.append(("cuda", device))
    out.append(("torch", device if device.startswith("cuda") else "cpu"))
    return out


def run_case(name, X, r, k, kw, storage, device, warmup, rep):
    n, d = X.shape
    Xs = X.astype(np.float16) if storage == "float16" else X
    rows, picks = [], {}
    for backend, dev in backends_for(kw.get("kernel", "cosine"), device):
        inp = torch.from_numpy(Xs).to(dev) if dev.startswith("cuda") else Xs

        def fn(inp=inp, backend=backend):
            return select_dpp(inp, k, r, backend=backend, progress=False, **kw)

        sel = fn()
        picks[backend] = sel.indices
        t = time_fn(fn, device=dev, warmup=warmup, rep=rep)
        row = {"case": name, "storage": storage, "N": n, "D": d, "k": k, "backend": backend}
        row["threads"] = threads()
        row.update(t.as_row("s"))
        if kw.get("kernel", "cosine") == "cosine" and "candidates" not in kw:
            row["GB/s"] = round(len(sel) * n * d * Xs.itemsize / t.median / 1e9, 2)
        rows.append(row)
    ref = picks["torch"]
    for backend, idx in picks.items():
        if not np.array_equal(idx, ref):
            first = int(np.flatnonzero(idx[: len(ref)] != ref[: len(idx)])[0]) if len(idx) and len(ref) else 0
            raise AssertionError(f"{name}/{storage}: {backend} picks differ from torch's at pick {first}")
    base = next(rw["median_s"] for rw in rows if rw["backend"] == "torch")
    for rw in rows:
        rw["speedup_vs_torch"] = round(base / rw["median_s"], 2)
        rw["picks_identical"] = True
    return rows


def main():
    p = common_parser(__doc__)
    p.add_argument("--N", type=int, default=None, help="pool size of the cosine and paper cases")
    p.add_argument("--D", type=int, default=None)
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--rbf-N", type=int, default=None, help="pool size of the rbf case")
    p.add_argument("--cases", default="cosine,paper,rbf", help="comma-separated subset of cosine,paper,rbf")
    args = p.parse_args()
    device = pick_device(args.device)
    if args.quick:
        n, d, k, n_rbf, k_rbf = 20000, 64, 100, 3000, 100
        warmup, rep = args.warmup if args.warmup is not None else 0, args.rep or 3
    else:
        n, d, k, n_rbf, k_rbf = 200000, 128, 500, 20000, 500
        warmup, rep = args.warmup if args.warmup is not None else 1, args.rep or 3
    n, d, k = args.N or n, args.D or d, args.k or k
    n_rbf = args.rbf_N or n_rbf
    X, r = make_data(n, d)
    cases = set(args.cases.split(","))
    if cases - {"cosine", "paper", "rbf"}:
        p.error(f"--cases takes cosine, paper, rbf; got {args.cases}")
    rows = []
    for storage in ("float32", "float16") if "cosine" in cases else ():
        rows += run_case("cosine ridge=1e-3", X, r, k, {"ridge": 1e-3}, storage, device, warmup, rep)
    if "paper" in cases:
        kw = {"candidates": min(2000, n), "ridge": 1e-3}
        rows += run_case("paper top-2000", X, r, min(k, 500), kw, "float32", device, warmup, rep)
    if "rbf" in cases:
        Xr, rr = make_data(n_rbf, d, seed=1)
        rows += run_case("rbf", Xr, rr, k_rbf, {"kernel": "rbf"}, "float32", device, warmup, rep)
    cols = [
        "case",
        "storage",
        "N",
        "D",
        "k",
        "backend",
        "threads",
        "median_s",
        "p20_s",
        "p80_s",
        "GB/s",
        "speedup_vs_torch",
    ]
    env = environment(device)
    print_table(
        rows,
        cols,
        title=f"select_dpp on {env['device']} (torch {env['torch']}, {torch.get_num_threads()} threads)",
    )
    if not args.no_csv:
        print(f"appended to {append_csv('dpp', rows, env)}")


if __name__ == "__main__":
    main()
