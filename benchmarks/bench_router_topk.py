"""Benchmark metamoe.ops.router_topk (fused Triton router) against plain PyTorch eager.

Peers, timed in the same run on the same inputs (benchmarks/cases.py: ROUTER):
  torch-eager    softmax(float32) + torch.topk + renormalise: transformers' Mixtral router
  metamoe-torch  router_topk(backend="torch"): the reference / fallback (stable sort, ties to lowest index)
  metamoe-triton router_topk(backend="triton"): the fused kernel (GPU; CPU only through TRITON_INTERPRET=1,
                 where the time is the interpreter's and says nothing about the kernel)
Modes: fwd (weights + indices), fwd+stats (also tokens per expert, probability sums, logsumexp; the eager
peer computes the same statistics with torch ops), fwd+bwd (forward then backward of sum(weights * g)).
Timings (column ``timing``): ``call`` brackets each Python call with CUDA events (what a caller that
launches the op from Python pays, host overhead included); ``graph`` (CUDA only, ``--graph``, always with
``--target``) times replays of the call captured into a CUDA graph (the device time alone; see
benchmarks/utils.py time_fn). fwd+bwd is timed per call only (its gradients are cleared between calls).
An impl whose call cannot be captured gets a graph row with no time and the reason in ``note``.

Before timing, every impl's output is checked against torch-eager's (the same top-k set, weights within
tolerance): ``check_ok`` in each row.

Prints a table (median and 20/80 % quantiles in microseconds, effective GB/s, fraction of the measured
bandwidth where known, speed-up over torch-eager in the same mode and timing) and appends rows to
<results-dir>/router_topk.csv.

  python benchmarks/bench_router_topk.py                 # GPU sweep (bf16)
  python benchmarks/bench_router_topk.py --quick         # small shapes: what runs on a CPU
  python benchmarks/bench_router_topk.py --target --results-dir OUT   # the issue-15 target shape, CUDA only
  TRITON_INTERPRET=1 python benchmarks/bench_router_topk.py --target --target-scale tiny --results-dir TMP
      # the same --target path at the tiny shapes of cases.py target_tiny (a dry run; see benchmarks/utils.py)

Target (issue 15, H200, bf16): T=16384, E=128, k=8 forward <= 15 us under a CUDA graph and >= 3x torch-eager
(benchmarks/targets.py reads the rows with target_case=router-t16k-e128-k8).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: import benchmarks.utils

import torch  # noqa: E402

from benchmarks.cases import ROUTER, ROUTER_GPU_GRID, ROUTER_MODES, ROUTER_QUICK_GRID, ROUTER_TARGET_MODES  # noqa: E402
from benchmarks.utils import (  # noqa: E402
    add_target_scale,
    append_csv,
    check_target_args,
    common_parser,
    environment,
    failure_note,
    measured_peak,
    pick_device,
    print_table,
    recover_cuda,
    time_fn,
)
from metamoe.backends import CallSpec  # noqa: E402
from metamoe.ops import router_topk  # noqa: E402
from metamoe.ops.router_topk import router_topk_op  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INTERP_NOTE = "Triton interpreter: not a kernel time"


def eager_router(x, k, stats=False):
    """transformers' Mixtral routing in eager PyTorch (+ the statistics with plain torch ops)."""
    p = torch.softmax(x, dim=-1, dtype=torch.float32)
    w, idx = torch.topk(p, k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    if not stats:
        return w, idx
    counts = torch.zeros(x.shape[1], dtype=torch.int64, device=x.device)
    counts.scatter_add_(0, idx.reshape(-1), torch.ones_like(idx.reshape(-1)))
    return w, idx, counts, p.sum(0), torch.logsumexp(x.float(), dim=-1)


def check_against_eager(out, x, k):
    """'' if ``out`` = (weights, indices, ...) picks a top-k set of softmax(x) with weights matching
    torch-eager's (ties may pick other indices of equal probability), else what differs."""
    p = torch.softmax(x.float(), dim=-1)
    w_ref, _ = eager_router(x, k)
    w, idx = out[0].float(), out[1].long()
    top = torch.topk(p, k, dim=-1).values
    picked = torch.gather(p, 1, idx).sort(dim=-1, descending=True).values
    if not torch.allclose(picked, top, rtol=1e-5, atol=1e-6):
        return f"indices are not a top-{k} set (max prob gap {float((picked - top).abs().max()):.3g})"
    err = float((w.sort(dim=-1, descending=True).values - w_ref.float()).abs().max())
    if err > 1e-4:
        return f"weights differ from torch-eager by {err:.3g}"
    return ""


def run_case(T, E, k, dtype, mode, device, impls, warmup, rep, timings=("call",), case="", keep_going=False):
    """One row per impl and timing. A capture that fails gives a graph row with no time and the reason in
    ``note``; with ``keep_going`` (--target) so does any other failure of an impl (its rows say why), so that
    one failing impl does not cost the others' rows."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T, E, device=device, dtype=torch.float32, generator=g).to(dtype)
    gw = torch.randn(T, k, device=device, generator=g)
    stats = mode == "fwd+stats"
    rows = []

    def forward(name):
        if name == "torch-eager":
            return lambda xx: eager_router(xx, k, stats)
        backend = name.split("-", 1)[1]
        return lambda xx: router_topk(xx, k, return_stats=stats, backend=backend)

    def fns(name):
        fwd = forward(name)
        if mode != "fwd+bwd":
            return (lambda: fwd(x)), None
        xg = x.detach().clone().requires_grad_()

        def step():
            out = fwd(xg)
            (out[0] * gw).sum().backward()

        def clear():
            xg.grad = None

        return step, clear

    bytes_moved = T * E * x.element_size() + T * k * (4 + 8)  # read logits, write weights + indices
    if stats:
        bytes_moved += T * 4 + E * 12
    if mode == "fwd+bwd":
        bytes_moved += 2 * T * E * x.element_size() + T * k * 12 + T * k * 4  # + read logits, write dx, ...
    def new_row(name, timing, check_ok, note):
        row = {"op": "router_topk", "mode": mode, "impl": name, "timing": timing, "T": T, "E": E, "k": k,
               "dtype": str(dtype).replace("torch.", ""), "check_ok": check_ok, "note": note}
        if case:
            row["target_case"] = case
        return row

    for name in impls:
        try:
            with torch.no_grad():
                problem = check_against_eager(forward(name)(x), x, k)
            fn, setup = fns(name)
        except Exception as exc:
            if not keep_going:
                raise
            recover_cuda()
            rows += [new_row(name, timing, None, failure_note(exc)) for timing in timings]
            continue
        for timing in timings:
            row = new_row(name, timing, not problem, problem)
            if timing == "graph" and setup is not None:
                row["note"] = "; ".join(filter(None, [problem, "fwd+bwd is timed per call only"]))
                rows.append(row)
                continue
            try:
                t = time_fn(fn, device=device, warmup=warmup, rep=rep, setup=setup, cuda_graph=timing == "graph")
            except Exception as exc:  # not capturable (with keep_going: any failure): say why, keep the rest
                if timing != "graph" and not keep_going:
                    raise
                recover_cuda()  # let a failed capture's stream drain before the next impl
                what = "not capturable in a CUDA graph" if timing == "graph" else "failed"
                row["note"] = "; ".join(filter(None, [problem, failure_note(exc, what)]))
                rows.append(row)
                continue
            row.update(t.as_row("us"))
            row["GB/s"] = bytes_moved / t.median / 1e9
            rows.append(row)
    for r in rows:
        base = next((b for b in rows if b["impl"] == "torch-eager" and b["timing"] == r["timing"]
                     and "median_us" in b), None)
        r["vs_eager"] = base["median_us"] / r["median_us"] if base and "median_us" in r else None
    return rows


def main(argv=None):
    p = common_parser(__doc__)
    p.add_argument("--target", action="store_true",
                   help="run exactly the issue-15 target shape (cases.ROUTER.target) with every peer, per call "
                        "and under a CUDA graph, on a CUDA device; ignores the shape flags")
    add_target_scale(p)
    p.add_argument("--graph", action="store_true", help="also time CUDA-graph replays (CUDA only)")
    p.add_argument("--T", type=int, nargs="*", default=None, help="tokens")
    p.add_argument("--E", type=int, nargs="*", default=None, help="experts")
    p.add_argument("--k", type=int, nargs="*", default=None, help="experts per token")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--modes", nargs="*", default=None, choices=list(ROUTER_MODES))
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 gives steadier numbers on a shared machine")
    args = p.parse_args(argv)
    device = pick_device(args.device, args.threads)
    on_gpu = device.startswith("cuda")
    check_target_args(p, args, device)
    if args.graph and not on_gpu:
        p.error(f"--graph needs a CUDA device, got --device {device}")
    cases = []  # (T, E, k, target_case)
    if args.target:
        shapes = ROUTER.target_shapes(args.target_scale)
        cases = [(c["T"], c["E"], c["k"], c["case"]) for c in shapes]
        warmup, rep = args.warmup if args.warmup is not None else 20, args.rep or 200
        dtype = DTYPES[args.dtype or shapes[0]["dtype"]]
        modes = args.modes or list(ROUTER_TARGET_MODES)
        timings = ("call", "graph")
    else:
        if args.quick or not on_gpu:
            grid = dict(ROUTER_QUICK_GRID)
            warmup, rep = args.warmup if args.warmup is not None else 3, args.rep or 20
        else:
            grid = dict(ROUTER_GPU_GRID)
            warmup, rep = args.warmup if args.warmup is not None else 20, args.rep or 100
        T_list, E_list, k_list = args.T or grid["T"], args.E or grid["E"], args.k or grid["k"]
        cases = [(T, E, k, "") for T in T_list for E in E_list for k in k_list if k <= E]
        dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
        modes = args.modes or list(ROUTER_MODES)
        timings = ("call", "graph") if args.graph else ("call",)

    dname = str(dtype).replace("torch.", "")
    E_max, k_max = max(c[1] for c in cases), max(c[2] for c in cases)
    reasons = router_topk_op.impls["triton"].not_supported_reasons(
        CallSpec(torch.device(device).type, dname, {"E": E_max, "k": k_max}))
    impls = [n for n in ROUTER.peers if n != "metamoe-triton" or not reasons]
    interp = not reasons and not on_gpu
    if reasons:
        print("metamoe-triton skipped:", "; ".join(reasons))
    if interp:
        print("note: metamoe-triton runs in the Triton interpreter here; its times are not kernel times")

    env = environment(device)
    peak = args.peak_gbps or measured_peak(device, "gbps")
    rows, path = [], None
    for mode in modes:
        for T, E, k, case in cases:
            batch = run_case(T, E, k, dtype, mode, device, impls, warmup, rep, timings, case,
                             keep_going=args.target)
            for r in batch:
                r["%peak_bw"] = 100 * r["GB/s"] / peak if peak and r.get("GB/s") else None
                if interp and r["impl"] == "metamoe-triton":
                    if args.target:  # the target rows keep the impl name the targets select by
                        r["note"] = "; ".join(filter(None, [r.get("note"), INTERP_NOTE]))
                    else:
                        r["impl"] = "metamoe-triton(interp)"
            if not args.no_csv:  # each case as soon as it is done: a later crash or timeout keeps these rows
                path = append_csv("router_topk", batch, env, args.results_dir)
            rows += batch
    threads = f"  threads {torch.get_num_threads()}" if not on_gpu else ""
    print(f"device: {env['device']}{threads}  torch {env['torch']}  triton {env['triton']}  "
          f"commit {env['commit']}")
    print_table(rows, ["mode", "impl", "timing", "T", "E", "k", "dtype", "median_us", "p20_us", "p80_us", "GB/s",
                       "%peak_bw", "vs_eager", "check_ok"])
    for r in rows:
        if r.get("note"):
            print(f"{r['mode']} {r['impl']} {r['timing']} T={r['T']} E={r['E']} k={r['k']}: {r['note']}")
    for timing in timings:
        target = {r["impl"]: r for r in rows if (r["mode"], r["T"], r["E"], r["k"], r["dtype"], r["timing"])
                  == ("fwd", 16384, 128, 8, "bfloat16", timing)}
        tri, eager = target.get("metamoe-triton"), target.get("torch-eager")
        if on_gpu and tri and eager and tri.get("median_us") and eager.get("median_us"):
            t, ratio = tri["median_us"], tri["vs_eager"]
            print(f"target (T=16384, E=128, k=8, bf16 fwd, {timing}): {t:.1f} us "
                  f"(goal <= 15 under a CUDA graph: {'met' if t <= 15 else 'NOT met'}), {ratio:.2f}x torch-eager "
                  f"(goal >= 3: {'met' if ratio >= 3 else 'NOT met'}) on {env['device']}")
    if path is not None:
        print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
