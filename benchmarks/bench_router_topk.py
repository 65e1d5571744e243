"""Benchmark metamoe.ops.router_topk (fused Triton router) against plain PyTorch eager.

Peers, timed in the same run on the same inputs:
  torch-eager    softmax(float32) + torch.topk + renormalise: transformers' Mixtral router
  metamoe-torch  router_topk(backend="torch"): the reference / fallback (stable sort, ties to lowest index)
  metamoe-triton router_topk(backend="triton"): the fused kernel (GPU; CPU only through TRITON_INTERPRET=1,
                 where the time is the interpreter's and says nothing about the kernel)
Modes: fwd (weights + indices), fwd+stats (also tokens per expert, probability sums, logsumexp; the eager
peer computes the same statistics with torch ops), fwd+bwd (forward then backward of sum(weights * g)).

Prints a table (median and 20/80 % quantiles in microseconds, effective GB/s, fraction of the measured
bandwidth where known, speed-up over torch-eager) and appends rows to benchmarks/results/router_topk.csv.

  python benchmarks/bench_router_topk.py                 # GPU sweep (bf16)
  python benchmarks/bench_router_topk.py --quick         # small shapes: what runs on a CPU
  python benchmarks/bench_router_topk.py --T 16384 --E 128 --k 8   # the issue's target shape

Target (issue 4, H200, bf16): T=16384, E=128, k=8 forward <= 15 us and >= 3x torch-eager.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # last: see benchmarks/utils.py

import torch  # noqa: E402

from benchmarks.utils import (  # noqa: E402
    append_csv, common_parser, environment, measured_peak, pick_device, print_table, time_fn,
)
from metamoe.backends import CallSpec  # noqa: E402
from metamoe.ops import router_topk  # noqa: E402
from metamoe.ops.router_topk import router_topk_op  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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


def run_case(T, E, k, dtype, mode, device, impls, warmup, rep):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T, E, device=device, dtype=torch.float32, generator=g).to(dtype)
    gw = torch.randn(T, k, device=device, generator=g)
    stats = mode == "fwd+stats"
    rows = []

    def fns(name):
        if name == "torch-eager":
            fwd = lambda xx: eager_router(xx, k, stats)  # noqa: E731
        else:
            backend = name.split("-", 1)[1]
            fwd = lambda xx: router_topk(xx, k, return_stats=stats, backend=backend)  # noqa: E731
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
    for name in impls:
        fn, setup = fns(name)
        t = time_fn(fn, device=device, warmup=warmup, rep=rep, setup=setup)
        rows.append({
            "op": "router_topk", "mode": mode, "impl": name, "T": T, "E": E, "k": k,
            "dtype": str(dtype).replace("torch.", ""), **t.as_row("us"),
            "GB/s": bytes_moved / t.median / 1e9,
        })
    base = next((r for r in rows if r["impl"] == "torch-eager"), None)
    for r in rows:
        r["vs_eager"] = base["median_us"] / r["median_us"] if base else None
    return rows


def main(argv=None):
    p = common_parser(__doc__)
    p.add_argument("--T", type=int, nargs="*", default=None, help="tokens")
    p.add_argument("--E", type=int, nargs="*", default=None, help="experts")
    p.add_argument("--k", type=int, nargs="*", default=None, help="experts per token")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--modes", nargs="*", default=None, choices=["fwd", "fwd+stats", "fwd+bwd"])
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 gives steadier numbers on a shared machine")
    args = p.parse_args(argv)
    device = pick_device(args.device, args.threads)
    on_gpu = device.startswith("cuda")
    if args.quick or not on_gpu:
        T_list, E_list, k_list = args.T or [256, 1024], args.E or [8, 64], args.k or [2]
        warmup, rep = args.warmup if args.warmup is not None else 3, args.rep or 20
    else:
        T_list = args.T or [1024, 4096, 16384, 65536]
        E_list = args.E or [8, 64, 128, 256]
        k_list = args.k or [2, 8]
        warmup, rep = args.warmup if args.warmup is not None else 20, args.rep or 100
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    modes = args.modes or (["fwd", "fwd+stats", "fwd+bwd"])

    dname = str(dtype).replace("torch.", "")
    triton_ok = not router_topk_op.impls["triton"].not_supported_reasons(
        CallSpec(torch.device(device).type, dname, {"E": max(E_list), "k": max(k_list)}))
    impls = ["torch-eager", "metamoe-torch"] + (["metamoe-triton"] if triton_ok else [])
    interp = triton_ok and not on_gpu
    if not triton_ok:
        print("metamoe-triton skipped:", "; ".join(router_topk_op.impls["triton"].not_supported_reasons(
            CallSpec(torch.device(device).type, dname, {"E": max(E_list), "k": max(k_list)}))))
    if interp:
        print("note: metamoe-triton runs in the Triton interpreter here; its times are not kernel times")

    env = environment(device)
    peak = args.peak_gbps or measured_peak(device, "gbps")
    rows = []
    for mode in modes:
        for T in T_list:
            for E in E_list:
                for k in k_list:
                    if k > E:
                        continue
                    rows += run_case(T, E, k, dtype, mode, device, impls, warmup, rep)
    for r in rows:
        r["%peak_bw"] = 100 * r["GB/s"] / peak if peak else None
        if interp and r["impl"] == "metamoe-triton":
            r["impl"] = "metamoe-triton(interp)"
    threads = f"  threads {torch.get_num_threads()}" if not on_gpu else ""
    print(f"device: {env['device']}{threads}  torch {env['torch']}  triton {env['triton']}  "
          f"commit {env['commit']}")
    print_table(rows, ["mode", "impl", "T", "E", "k", "dtype", "median_us", "p20_us", "p80_us", "GB/s",
                       "%peak_bw", "vs_eager"])
    target = {r["impl"]: r for r in rows if (r["mode"], r["T"], r["E"], r["k"], r["dtype"])
              == ("fwd", 16384, 128, 8, "bfloat16")}
    if on_gpu and "metamoe-triton" in target and "torch-eager" in target:
        t, ratio = target["metamoe-triton"]["median_us"], target["metamoe-triton"]["vs_eager"]
        print(f"target (T=16384, E=128, k=8, bf16 fwd): {t:.1f} us "
              f"(goal <= 15: {'met' if t <= 15 else 'NOT met'}), {ratio:.2f}x torch-eager "
              f"(goal >= 3: {'met' if ratio >= 3 else 'NOT met'}) on {env['device']}")
    if not args.no_csv:
        path = append_csv("router_topk", rows, env)
        print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
