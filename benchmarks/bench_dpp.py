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
kernel, speed-up over torch) and appends rows to <results-dir>/dpp.csv. Shapes: benchmarks/cases.py (DPP).

  python benchmarks/bench_dpp.py            # N = 200,000, D = 128, k = 500 (cosine); rbf at N = 20,000
  python benchmarks/bench_dpp.py --quick    # small shapes, seconds on a 2-core CPU
  python benchmarks/bench_dpp.py --target --results-dir OUT   # the issue-17 GPU target, CUDA only
  python benchmarks/bench_dpp.py --target --target-scale tiny --results-dir TMP
      # the same --target path at the tiny shapes of cases.py target_tiny (a dry run; see benchmarks/utils.py)

--target (issue 17, H200: N = 1M, D = 768, k = 10,000 in <= 10 s; rows with target_case dpp-n1m-d768-k10000):
cosine kernel, relevance-weighted, ridge 1e-3, float32 pool made on the GPU (cases.clustered_torch). The
cuda backend makes all k picks; the peers make fewer (cases DPP.target peer_k: torch 500 on the GPU, cpp 50
on the host's cores), each row saying so in ``note``, with ``k_target`` and ``scaled_s`` = median_s x
k_target / k (a linear extrapolation: the cosine greedy's per-pick cost is constant) beside the measured
``median_s``. Every peer's picks must equal the first picks of the reference (torch): ``picks_identical``
(a mismatch is recorded, not raised, so the other rows survive). One timed call each (--rep), after one
untimed 10-pick call (--warmup calls of 10 picks).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: import benchmarks.utils

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.cases import DPP, clustered_torch  # noqa: E402
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


def run_target(args, device):
    """The issue-17 GPU target with its peers (see the module docstring); returns the rows."""
    c = DPP.target_shapes(args.target_scale)[0]
    n, d, k, ridge = c["N"], c["D"], c["k"], c["ridge"]
    X = clustered_torch(n, d, device=device)
    r = np.random.default_rng(0).uniform(0.05, 1.0, n)
    warmup = args.warmup if args.warmup is not None else 1
    rep = args.rep or 1
    plan = [("cuda", k, device), ("torch", c["peer_k"]["torch"], device), ("cpp", c["peer_k"]["cpp"], "cpu")]
    rows, picks = [], {}
    X_host = None
    for backend, k_run, dev in plan:
        row = {"case": "cosine ridge=1e-3", "storage": "float32", "N": n, "D": d, "k": k_run, "k_target": k,
               "backend": backend, "threads": threads(), "target_case": c["case"], "note": ""}
        why = availability.backend_unavailable_reason(backend)
        if why:
            row["note"] = f"skipped: {why}"
            rows.append(row)
            continue
        if dev == "cpu" and X_host is None:
            X_host = X.cpu().numpy()
        inp = X if dev.startswith("cuda") else X_host
        out = {}

        def fn(inp=inp, backend=backend, kk=k_run, out=out):
            out["sel"] = select_dpp(inp, kk, r, ridge=ridge, backend=backend, progress=False)

        try:  # a failing backend gets its row with the error in note; the others still run
            for _ in range(warmup):
                select_dpp(inp, min(10, k_run), r, ridge=ridge, backend=backend, progress=False)
            t = time_fn(fn, device=dev, warmup=0, rep=rep)
        except Exception as exc:
            recover_cuda()
            row["note"] = failure_note(exc)
            rows.append(row)
            continue
        picks[backend] = out["sel"].indices
        row.update(t.as_row("s"))
        row["scaled_s"] = round(t.median * k / k_run, 4)
        row["GB/s"] = round(len(out["sel"]) * n * d * 4 / t.median / 1e9, 2)
        if k_run < k:
            row["note"] = capped_note(k_run, k)
        rows.append(row)
    compare_picks(rows, picks, "picks_identical")
    base = next((rw for rw in rows if rw["backend"] == "torch" and "median_s" in rw), None)
    for rw in rows:
        if base and "median_s" in rw:
            rw["speedup_vs_torch_scaled"] = round(base["scaled_s"] / rw["scaled_s"], 2)
    return rows


def build_parser():
    p = common_parser(__doc__)
    p.add_argument("--target", action="store_true",
                   help="run exactly the issue-17 GPU target (cases.DPP.target: N=1M, D=768, k=10000) with its peers "
                        "on a CUDA device; ignores the shape flags")
    add_target_scale(p)
    p.add_argument("--N", type=int, default=None, help="pool size of the cosine and paper cases")
    p.add_argument("--D", type=int, default=None)
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--rbf-N", type=int, default=None, help="pool size of the rbf case")
    p.add_argument("--cases", default="cosine,paper,rbf", help="comma-separated subset of cosine,paper,rbf")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    device = pick_device(args.device)
    check_target_args(p, args, device)
    if args.target:
        rows = run_target(args, device)
        env = environment(device)
        print_table(rows, ["backend", "N", "D", "k", "k_target", "median_s", "scaled_s", "GB/s", "picks_identical",
                           "speedup_vs_torch_scaled"], title=f"select_dpp target on {env['device']}")
        for rw in rows:
            if rw.get("note"):
                print(f"{rw['backend']}: {rw['note']}")
        if not args.no_csv:
            print(f"appended to {append_csv('dpp', rows, env, args.results_dir)}")
        return
    shape = DPP.quick[0] if args.quick else DPP.gpu[0]
    n, d, k, n_rbf, k_rbf = shape["N"], shape["D"], shape["k"], shape["rbf_N"], shape["rbf_k"]
    if args.quick:
        warmup, rep = args.warmup if args.warmup is not None else 0, args.rep or 3
    else:
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
        print(f"appended to {append_csv('dpp', rows, env, args.results_dir)}")


if __name__ == "__main__":
    main()
