"""Benchmark metamoe.ops.moe_experts (grouped dispatch: gather-fused and scatter-fused grouped GEMMs).

Peers, timed in the same run on the same inputs (same weights, transformers' MixtralExperts layout;
shapes and peers from benchmarks/cases.py: MOE):
  hf-eager        transformers' MixtralExperts.forward: the per-expert Python loop (the paper's pattern)
  hf-grouped_mm   transformers' "grouped_mm" experts implementation (sort + torch._grouped_mm, its own
                  fallback where _grouped_mm cannot run)
  metamoe-torch   moe_experts(backend="torch") with the per-expert loop: the reference / fallback
  torch-grouped_mm  metamoe's torch path on torch's fused grouped_mm (only where it runs: sm90/sm100, bf16)
  liger           liger-kernel's LigerFusedMoEFunction, if liger_kernel imports
  metamoe-triton  moe_experts(backend="triton"): the Triton kernels (GPU; on the CPU only through
                  TRITON_INTERPRET=1, where the time is the interpreter's and says nothing about the kernel)
Modes: fwd (inference, no autograd graph) and fwd+bwd (forward, then backward of <y, g> into x, both weights
and the routing weights).

FLOPs counted: forward 2*T*k*d*(rows of w_gate_up + f) (SwiGLU: 6*T*k*d*f), fwd+bwd 3x forward. TFLOP/s,
fraction of --peak-tflops (default: the measured ceiling of this GPU if known, else the H200 bf16 dense 790),
and the speed-ups are printed: vs_hf_eager, vs_grouped_mm (over torch-grouped_mm, else hf-grouped_mm:
``grouped_mm_peer`` says which), vs_torch_grouped_mm (over torch-grouped_mm only) and vs_loop (over the
faster of the per-expert loops hf-eager and metamoe-torch: ``loop_peer`` says which). Each impl's forward
is checked against metamoe-torch's in the same run, before timing: ``max_err_vs_torch``, ``max_rel_err``
(over max |y|) and ``check_ok`` (max_rel_err <= 3e-2 in 16-bit dtypes, 1e-3 in float32).
Rows are appended to <results-dir>/moe.csv.

  python benchmarks/bench_moe_experts.py                 # GPU sweep (bf16): Mixtral, Qwen3-30B-A3B, OLMoE
  python benchmarks/bench_moe_experts.py --quick         # tiny CPU shapes (what runs without a GPU)
  python benchmarks/bench_moe_experts.py --shapes mixtral --T 16384
  python benchmarks/bench_moe_experts.py --target --results-dir OUT  # the issue-15 target shapes, CUDA only
  TRITON_INTERPRET=1 python benchmarks/bench_moe_experts.py --target --target-scale tiny --results-dir TMP
      # the same --target path at the tiny shapes of cases.py target_tiny (a dry run; see benchmarks/utils.py)

Targets (issue 15, H200, bf16, T = 16k; rows with target_case moe-mixtral-t16k / moe-qwen3-t16k): forward
>= 550 TFLOP/s (Mixtral) and >= 350 (Qwen3-30B-A3B); fwd+bwd >= 1.3x the torch._grouped_mm path and >= 10x
the per-expert loop. --target runs both shapes, fwd and fwd+bwd, every peer, --warmup 3 --rep 10 by default.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: import benchmarks.utils

import torch  # noqa: E402

from benchmarks.cases import MOE, MOE_GPU_T, MOE_LOOP_PEERS, MOE_MODES, MOE_QUICK_T, MOE_SHAPES  # noqa: E402
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
from metamoe.backends import CallSpec, grouped_mm_reasons  # noqa: E402
from metamoe.ops import moe_experts, moe_routing  # noqa: E402
from metamoe.ops.moe_experts import moe_experts_op, moe_experts_ref  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
H200_BF16_TFLOPS = 790.0
INTERP_NOTE = "Triton interpreter: not a kernel time"

# name: (E, k, d, f)
SHAPES = MOE_SHAPES
GPU_SHAPES = tuple(dict.fromkeys(c["shape"] for c in MOE.gpu))
QUICK_SHAPES = tuple(dict.fromkeys(c["shape"] for c in MOE.quick))


def hf_experts(wgu, wd, implementation):
    """transformers' MixtralExperts sharing (not copying) our weights, with the given experts implementation."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    E, two_f, d = wgu.shape
    cfg = MixtralConfig(hidden_size=d, intermediate_size=two_f // 2, num_local_experts=E, hidden_act="silu")
    cfg._experts_implementation = implementation
    with torch.device("meta"):
        mod = MixtralExperts(cfg)
    mod.gate_up_proj = torch.nn.Parameter(wgu, requires_grad=wgu.requires_grad)
    mod.down_proj = torch.nn.Parameter(wd, requires_grad=wd.requires_grad)
    return mod


def liger_fn():
    try:
        from liger_kernel.ops import LigerFusedMoEFunction
    except Exception as exc:  # not installed, or no GPU build
        return None, f"liger_kernel not importable ({type(exc).__name__}: {exc})"
    return LigerFusedMoEFunction, None


def make_impls(names, x_dev, d, f, dtype):
    """name -> factory(w_gate_up, w_down) -> callable(x, tw, ids) -> y (modules built once per weights),
    plus {name: why skipped}."""
    impls, skipped = {}, {}
    for name in names:
        if name in ("hf-eager", "hf-grouped_mm"):
            hf_impl = name.split("-", 1)[1]

            def factory(wgu, wd, impl=hf_impl):
                mod = hf_experts(wgu, wd, impl)

                def call(x, tw, ids):
                    return mod(x, ids, tw)

                # the module's Parameters share the weights' storage but hold their own gradients
                call.grad_holders = tuple(mod.parameters())
                return call

            impls[name] = factory
        elif name == "metamoe-torch":
            impls[name] = lambda wgu, wd: (lambda x, tw, ids: moe_experts_ref(x, tw, ids, wgu, wd, grouped_mm=False))
        elif name == "torch-grouped_mm":
            why = "; ".join(grouped_mm_reasons(x_dev, dtype, {"d": d, "f": f}, fused=True))
            if not why:
                impls[name] = lambda wgu, wd: (lambda x, tw, ids: moe_experts_ref(x, tw, ids, wgu, wd,
                                                                                   grouped_mm=True))
            else:
                skipped[name] = why
        elif name == "liger":
            fn, why = liger_fn()
            if fn is None or x_dev.type != "cuda":
                skipped[name] = why or "liger's fused MoE needs a CUDA device"
            else:
                impls[name] = lambda wgu, wd, fn=fn: (lambda x, tw, ids: fn.apply(x, wgu, wd, ids.to(torch.int32), tw))
        elif name == "metamoe-triton":
            spec = CallSpec(x_dev.type, str(dtype).replace("torch.", ""), {"E": 1})
            reasons = moe_experts_op.impls["triton"].not_supported_reasons(spec)
            if reasons:
                skipped[name] = "; ".join(reasons)
            else:
                impls[name] = lambda wgu, wd: (lambda x, tw, ids: moe_experts(x, tw, ids, wgu, wd, backend="triton"))
        else:
            raise ValueError(f"unknown impl {name!r}")
    return impls, skipped


def rel_tolerance(dtype) -> float:
    """max |y - y_ref| / max |y_ref| accepted for ``check_ok``."""
    return 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2


def run_case(shape_name, T, E, k, d, f, dtype, mode, device, impls, warmup, rep, peak, case="", skipped=None,
             keep_going=False):
    """The rows of one shape and mode: one per impl in ``impls`` (timed, checked) and one per impl in
    ``skipped`` ({name: why}: no figures, ``note`` says why); each timed row's speed-ups over its peers, and
    in ``note`` why a speed-up is missing when its peer was skipped. With ``keep_going`` (--target) an impl
    that fails gets a row with no figures and the error in ``note`` instead of ending the run."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T, d, device=device, dtype=dtype, generator=g)
    logits = torch.randn(T, E, device=device, dtype=torch.float32, generator=g)
    tw, ids = logits.softmax(-1).topk(k, dim=-1)
    tw = (tw / tw.sum(-1, keepdim=True)).to(dtype)
    wgu = (torch.randn(E, 2 * f, d, device=device, dtype=torch.float32, generator=g) / d**0.5).to(dtype)
    wd = (torch.randn(E, d, f, device=device, dtype=torch.float32, generator=g) / f**0.5).to(dtype)
    gy = torch.randn(T, d, device=device, dtype=dtype, generator=g)
    counts = moe_routing(ids, E).counts
    flops = 2.0 * T * k * d * (2 * f + f) * (3 if mode == "fwd+bwd" else 1)
    train = mode == "fwd+bwd"
    leaves = [t.detach().clone().requires_grad_(train) for t in (x, tw, wgu, wd)]

    skipped = dict(skipped or {})
    y_ref = None
    if "metamoe-torch" in impls:
        try:
            with torch.no_grad():
                y_ref = impls["metamoe-torch"](wgu, wd)(x, tw, ids).float()
        except Exception as exc:
            if not keep_going:
                raise
            recover_cuda()
            skipped["metamoe-torch"] = failure_note(exc, "the reference failed")
    rows = []
    for name, factory in impls.items():
        if name in skipped:
            continue
        try:
            fn = factory(wgu, wd)
            if train:
                fn_train = factory(leaves[2], leaves[3])
                grads = list(leaves) + list(getattr(fn_train, "grad_holders", ()))

                def step(fn_train=fn_train):
                    fn_train(leaves[0], leaves[1], ids).backward(gy)

                def clear(grads=grads):
                    for t in grads:
                        t.grad = None
            else:
                def step(fn=fn):
                    with torch.no_grad():
                        fn(x, tw, ids)

                clear = None
            with torch.no_grad():
                y = fn(x, tw, ids).float()
            err = (y - y_ref).abs().max().item() if y_ref is not None and T else None
            rel = err / max(y_ref.abs().max().item(), 1e-30) if err is not None else None
            del y
            interp = name == "metamoe-triton" and torch.device(device).type == "cpu"
            # the interpreter takes seconds per call: fewer repeats (its time is not a kernel time anyway)
            t = time_fn(step, device=device, warmup=min(warmup, 1) if interp else warmup,
                        rep=min(rep, 3) if interp else rep, setup=clear)
            if clear is not None:
                clear()
        except Exception as exc:
            if not keep_going:
                raise
            recover_cuda()
            skipped[name] = failure_note(exc, "failed")
            continue
        tflops = flops / t.median / 1e12
        if rel is not None:
            check_ok = rel <= rel_tolerance(dtype)
        else:  # nothing to compare with: unchecked unless there is nothing to compute (T = 0)
            check_ok = True if (y_ref is not None or not T) else None
        rows.append({
            "op": "moe_experts", "mode": mode, "impl": name, "shape": shape_name, "T": T, "E": E, "k": k, "d": d,
            "f": f, "dtype": str(dtype).replace("torch.", ""), **t.as_row("ms"), "TFLOP/s": tflops,
            "%peak": 100.0 * tflops / peak, "peak_tflops": peak, "max_err_vs_torch": err,
            "max_rel_err": rel, "check_ok": check_ok,
            "max_tokens_per_expert": int(counts.max()) if T else 0, "note": "",
        })
        if case:
            rows[-1]["target_case"] = case
    for name, why in skipped.items():
        failed = why.startswith(("failed", "the reference failed"))
        rows.append({"op": "moe_experts", "mode": mode, "impl": name, "shape": shape_name, "T": T, "E": E,
                     "k": k, "d": d, "f": f, "dtype": str(dtype).replace("torch.", ""), "check_ok": None,
                     "note": why if failed else f"skipped: {why}"})
        if case:
            rows[-1]["target_case"] = case
    timed = [r for r in rows if "median_ms" in r]
    base = next((r for r in timed if r["impl"] == "hf-eager"), None)
    gmm = next((r for r in timed if r["impl"] == "torch-grouped_mm"), None) or next(
        (r for r in timed if r["impl"] == "hf-grouped_mm"), None)
    tgmm = next((r for r in timed if r["impl"] == "torch-grouped_mm"), None)
    loops = [r for r in timed if r["impl"] in MOE_LOOP_PEERS]
    loop = min(loops, key=lambda r: r["median_ms"]) if loops else None
    missing = []  # why a speed-up column is empty: its peer was skipped or failed
    if tgmm is None and "torch-grouped_mm" in skipped:
        missing.append(f"vs_torch_grouped_mm: torch-grouped_mm {skipped['torch-grouped_mm']}")
    for r in timed:
        r["vs_hf_eager"] = base["median_ms"] / r["median_ms"] if base else None
        r["vs_grouped_mm"] = gmm["median_ms"] / r["median_ms"] if gmm else None
        r["grouped_mm_peer"] = gmm["impl"] if gmm else None
        r["vs_torch_grouped_mm"] = tgmm["median_ms"] / r["median_ms"] if tgmm else None
        r["vs_loop"] = loop["median_ms"] / r["median_ms"] if loop else None
        r["loop_peer"] = loop["impl"] if loop else None
        r["note"] = "; ".join(filter(None, [r["note"]] + missing))
    return rows


def main(argv=None):
    p = common_parser(__doc__)
    p.add_argument("--target", action="store_true",
                   help="run exactly the issue-15 target shapes (cases.MOE.target: Mixtral and Qwen3-30B-A3B at "
                        "T=16384, bf16), fwd and fwd+bwd, with every peer, on a CUDA device")
    add_target_scale(p)
    p.add_argument("--T", type=int, nargs="*", default=None, help="tokens")
    p.add_argument("--shapes", nargs="*", default=None, choices=sorted(SHAPES), help="named (E, k, d, f) presets")
    p.add_argument("--E", type=int, default=None, help="custom shape: experts (with --k, --d, --f)")
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--d", type=int, default=None)
    p.add_argument("--f", type=int, default=None)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--modes", nargs="*", default=None, choices=list(MOE_MODES))
    p.add_argument("--impls", nargs="*", default=None, choices=list(MOE.peers))
    args = p.parse_args(argv)
    device = pick_device(args.device)
    on_gpu = device.startswith("cuda")
    quick = args.quick or not on_gpu
    cases = {}  # shape name -> [(T, target_case)]
    check_target_args(p, args, device)
    if args.target:
        for c in MOE.target_shapes(args.target_scale):
            cases.setdefault(c["shape"], []).append((c["T"], c["case"]))
        warmup, rep = (args.warmup if args.warmup is not None else 3), args.rep or 10
    elif quick:
        T_list = args.T or list(MOE_QUICK_T)
        cases = {n: [(T, "") for T in T_list] for n in (args.shapes or list(QUICK_SHAPES))}
        warmup, rep = (args.warmup if args.warmup is not None else 2), args.rep or 5
    else:
        T_list = args.T or list(MOE_GPU_T)
        cases = {n: [(T, "") for T in T_list] for n in (args.shapes or list(GPU_SHAPES))}
        warmup, rep = (args.warmup if args.warmup is not None else 5), args.rep or 20
    shapes = {n: SHAPES[n] for n in cases}
    if args.E is not None and not args.target:
        if None in (args.k, args.d, args.f):
            p.error("--E needs --k, --d and --f")
        name = f"E{args.E}k{args.k}d{args.d}f{args.f}"
        shapes = {name: (args.E, args.k, args.d, args.f)}
        cases = {name: [(T, "") for T in T_list]}
    if args.target:
        default_dtype = MOE.target_shapes(args.target_scale)[0]["dtype"]
    else:
        default_dtype = "bf16" if on_gpu else "fp32"
    dtype = DTYPES[args.dtype or default_dtype]
    modes = args.modes or list(MOE_MODES)
    peak = args.peak_tflops or measured_peak(device, "tflops_bf16") or H200_BF16_TFLOPS
    names = args.impls or list(MOE.peers)

    env = environment(device)
    dev = torch.device(device)
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}  "
          f"peak for %peak: {peak} TFLOP/s")
    rows, skipped_all, path = [], {}, None
    interp = not on_gpu
    for mode in modes:
        for sname, (E, k, d, f) in shapes.items():
            impls, skipped = make_impls(names, dev, d, f, dtype)
            skipped_all.update(skipped)
            for T, case in cases[sname]:
                batch = run_case(sname, T, E, k, d, f, dtype, mode, device, impls, warmup, rep, peak, case,
                                 skipped, keep_going=args.target)
                for r in batch:
                    if interp and r["impl"] == "metamoe-triton" and "median_ms" in r:
                        if args.target:  # the target rows keep the impl name the targets select by
                            r["note"] = "; ".join(filter(None, [r["note"], INTERP_NOTE]))
                        else:
                            r["impl"] = "metamoe-triton(interp)"
                if not args.no_csv:  # each case when it is done: a later crash or timeout keeps these rows
                    path = append_csv("moe", batch, env, args.results_dir)
                rows += batch
    for name, why in skipped_all.items():
        print(f"{name} skipped: {why}")
    for r in rows:
        if r.get("note") and "median_ms" not in r and r["impl"] not in skipped_all:
            print(f"{r['mode']} {r['impl']} {r['shape']} T={r['T']}: {r['note']}")
    if interp and any(r["impl"].startswith("metamoe-triton") and "median_ms" in r for r in rows):
        print("note: metamoe-triton runs in the Triton interpreter here; its times are not kernel times")
    print_table(rows, ["mode", "impl", "shape", "T", "E", "k", "d", "f", "dtype", "median_ms", "p20_ms", "p80_ms",
                       "TFLOP/s", "%peak", "vs_hf_eager", "vs_grouped_mm", "grouped_mm_peer", "vs_loop", "loop_peer",
                       "max_rel_err", "check_ok"])
    if path is not None:
        print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
