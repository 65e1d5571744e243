"""Host overhead of metamoe.ops.router_topk's Triton path: the Python and dispatcher time around the kernels.

At the issue's router shape (T = 16k, E = 128, k = 8) the fused kernel takes microseconds on an H200, so the
time the host spends per call (argument checks, backend choice, torch.library custom-op dispatch, autograd
bookkeeping) can exceed it when calls are not captured in a CUDA graph. This benchmark isolates that time
on any machine: the two Triton launchers are replaced by stubs that return preallocated outputs (no kernel,
no device work), and the same entry points are timed per call (median of --rep calls after --warmup):

  launcher stub                the floor: a Python call returning five tensors
  custom op                    torch.ops.metamoe.router_topk (what torch.compile traces), no autograd
  custom op + autograd         the same on logits that require grad (the registered autograd formula)
  router_topk                  the public entry point, eager, logits without grad
  router_topk + autograd       the public entry point, eager, logits that require grad
  router_topk fwd+bwd          forward and torch.autograd.grad (backward launcher stubbed too), eager

Rows go to benchmarks/results/router_topk_overhead.csv; the overhead of each entry point over the stub is
printed. The numbers are the host's (this CPU's), not the GPU's.

  python benchmarks/bench_router_topk_overhead.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: import benchmarks.utils

import torch  # noqa: E402

from benchmarks.utils import append_csv, common_parser, environment, print_table, time_fn  # noqa: E402


def run(T: int, E: int, k: int, warmup: int, rep: int):
    """Rows (entry point, median us per call, overhead over the stub) with the launchers stubbed."""
    os.environ.setdefault("TRITON_INTERPRET", "1")  # lets the triton backend take CPU tensors; no kernel runs
    from metamoe.kernels import router_topk as K
    from metamoe.ops import router_topk

    logits = torch.randn(T, E)
    outs = (torch.rand(T, k), torch.zeros(T, k, dtype=torch.int64), torch.zeros(T), torch.empty(0),
            torch.empty(0, dtype=torch.int64))
    dx = torch.zeros(T, E)

    def fwd_stub(x, k, normalize=True, stats=False):
        return tuple(outs)

    def bwd_stub(*args, **kwargs):
        return dx

    saved = (K.router_topk_triton, K.router_topk_backward_triton)
    K.router_topk_triton, K.router_topk_backward_triton = fwd_stub, bwd_stub
    try:
        grad = logits.clone().requires_grad_()
        op = torch.ops.metamoe.router_topk

        def fwd_bwd():
            w, _ = router_topk(grad, k, backend="triton")
            torch.autograd.grad(w, grad, outs[0])

        cases = [
            ("launcher stub", lambda: fwd_stub(logits, k)),
            ("custom op", lambda: op(logits, k, True, False)),
            ("custom op + autograd", lambda: op(grad, k, True, False)),
            ("router_topk", lambda: router_topk(logits, k, backend="triton")),
            ("router_topk + autograd", lambda: router_topk(grad, k, backend="triton")),
            ("router_topk fwd+bwd", fwd_bwd),
        ]
        rows = []
        for name, fn in cases:
            rows.append({"op": "router_topk", "entry": name, "T": T, "E": E, "k": k,
                         "median_us": round(time_fn(fn, warmup=warmup, rep=rep).us, 3)})
    finally:
        K.router_topk_triton, K.router_topk_backward_triton = saved
    floor = rows[0]["median_us"]
    for r in rows:
        r["overhead_us"] = round(r["median_us"] - floor, 3)
    return rows


def main(argv=None) -> int:
    p = common_parser(__doc__)
    p.add_argument("--T", type=int, default=16384)
    p.add_argument("--E", type=int, default=128)
    p.add_argument("--k", type=int, default=8)
    args = p.parse_args(argv)
    warmup = 200 if args.warmup is None else args.warmup
    rep = 2000 if args.rep is None else args.rep
    if args.quick:
        warmup, rep = min(warmup, 20), min(rep, 200)
    torch.set_num_threads(1)
    rows = run(args.T, args.E, args.k, warmup, rep)
    print_table(rows, ["entry", "T", "E", "k", "median_us", "overhead_us"])
    if not args.no_csv:
        path = append_csv("router_topk_overhead", rows, environment("cpu"), results_dir=args.results_dir)
        print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
