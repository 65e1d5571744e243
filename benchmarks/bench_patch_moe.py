"""Benchmark metamoe.integrations.hf.patch_moe end to end: a transformers MoE model, drop-in vs transformers.

Models (benchmarks/cases.py: PATCH_MOE, shapes in PATCH_MOE_MODELS): a Mixtral-shaped (Mixtral-8x7B: d = 4096,
f = 14336, E = 8, top-2) and a Qwen3-MoE-shaped (Qwen3-30B-A3B: d = 2048, f = 768, E = 128, top-8)
``AutoModelForCausalLM`` with 2 decoder layers at the real hidden, attention and expert sizes and a small
vocabulary, built from a config with random weights directly on the device (no hub access), in the bench's
dtype. The routers are re-initialised with N(0, (2 / sqrt(d))^2) weights (router logits of standard deviation
about 2), so that routing is decisive as in a trained model and not a near-tie that rounding flips.

Impls, timed in the same run on the same model (the same Parameter objects) and the same input ids:
  hf-eager       the unpatched model, transformers' "eager" experts implementation (a per-expert Python loop)
  hf-grouped_mm  the unpatched model, transformers' "grouped_mm" experts implementation (sort +
                 torch grouped_mm, transformers' own fallback where that cannot run)
  metamoe        the same model after ``patch_moe(model, backend=--backend)``: metamoe's router_topk and
                 moe_experts in every sparse MoE block (columns router_backend / experts_backend: what ran)
The transformers implementations are switched with ``model.set_experts_implementation(name)`` (transformers
reads it from ``config._experts_implementation`` in each experts module's forward); the model is patched in
place after both have run, so one model per shape is built, and freed before the next.

Modes: fwd (``model(input_ids)`` in eval mode under ``torch.no_grad``) and fwd+bwd, the training step without
the optimizer (``model(input_ids, labels=input_ids).loss.backward()`` in train mode; the gradients are set to
None, untimed, before each call). Medians after warm-up (benchmarks/utils.time_fn: CUDA events, L2 flushed).

Checks, before timing, of each impl against hf-eager (the unpatched model) in the same run: the logits
(``logits_rel_err`` = ||y - y_ref|| / ||y_ref|| over all tokens, ``logits_max_err`` = max |y - y_ref|) and, in
fwd+bwd, the gradients of every parameter together (``grad_rel_err``, the same ratio over the concatenated
gradients). ``check_ok`` when logits_rel_err <= 5e-2 and grad_rel_err <= 1e-1 in 16-bit dtypes (both 1e-3 in
float32). The errors are norm-relative because the second layer's router sees the first layer's output: a
rounding difference can swap a token's k-th and (k+1)-th expert, which changes a few rows by far more than
rounding while leaving the norm-relative error small; a wrong kernel gives errors of order 1. For scale, at
the Qwen3 shape in bf16 (T = 256, CPU) transformers' own grouped_mm differs from its eager loop by 0.010
(logits) and 0.023 (gradients), metamoe's torch backend by 0.017 and 0.041. (tests/test_hf_patch.py checks
the drop-in tightly, in float32: logits, router logits, losses and every gradient.)

Speed-ups: vs_hf_eager, vs_hf_grouped_mm, and vs_hf_best, over the faster of the transformers implementations
(``hf_best_peer`` says which; empty, with the reason in ``note``, when one of them has no figure).
``tokens_per_s`` = T / median; ``peak_mem_gb``: the GPU's peak allocated memory over the timed calls (in
fwd+bwd it includes the copy of hf-eager's gradients that the check keeps, as large as the parameters). Rows
(columns: COLUMNS below, after the environment ones; ``target_case`` in --target rows) are appended to
<results-dir>/patch_moe.csv after each model. An impl that transformers refuses, or that raises in --target,
gets a row with no figures and the reason in ``note``.

  python benchmarks/bench_patch_moe.py                    # GPU sweep (bf16): both models, 1 and 4 x 4096
  python benchmarks/bench_patch_moe.py --quick            # tiny models on the CPU
  python benchmarks/bench_patch_moe.py --target --results-dir OUT   # the issue-15 targets, CUDA only
  python benchmarks/bench_patch_moe.py --target --target-scale tiny --device cpu --results-dir TMP
      # the same --target path at the tiny shapes of cases.py target_tiny (a dry run; see benchmarks/utils.py)

Targets (issue 15, bf16, T = 16k = 4 x 4096; rows with target_case patch-moe-mixtral-t16k /
patch-moe-qwen3-t16k, impl metamoe): the drop-in model faster than transformers' fastest experts
implementation on the same model, forward and training step: vs_hf_best >= 1. --target runs both models,
fwd and fwd+bwd, every impl, --warmup 2 --rep 5 by default.
"""

from __future__ import annotations

import functools
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: import benchmarks.utils

import torch  # noqa: E402

from benchmarks.cases import PATCH_MOE, PATCH_MOE_HF_PEERS, PATCH_MOE_MODELS, PATCH_MOE_MODES  # noqa: E402
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

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ROUTER_LOGIT_STD = 2.0
BACKENDS = ("auto", "triton", "torch")
# the CSV's columns after the environment ones, in this order (then target_case in --target rows)
COLUMNS = ("op", "model", "arch", "mode", "impl", "batch", "seq", "T", "E", "k", "d", "f", "layers", "vocab",
           "dtype", "router_backend", "experts_backend", "median_ms", "p20_ms", "p80_ms", "tokens_per_s",
           "vs_hf_eager", "vs_hf_grouped_mm", "vs_hf_best", "hf_best_peer", "logits_rel_err",
           "logits_max_err", "grad_rel_err", "check_ok", "peak_mem_gb", "note")


def rel_tolerance(dtype, what: str = "logits") -> float:
    """Largest ``logits_rel_err`` (``what="logits"``) or ``grad_rel_err`` (``"grads"``) for ``check_ok``."""
    if dtype in (torch.float32, torch.float64):
        return 1e-3
    return {"logits": 5e-2, "grads": 1e-1}[what]


def build_model(shape, dtype, device, seed=0):
    """A random-init ``AutoModelForCausalLM`` of ``shape`` (cases.PATCH_MOE_MODELS keys), on ``device``."""
    import transformers

    common = dict(vocab_size=shape["vocab"], hidden_size=shape["d"], num_hidden_layers=shape["layers"],
                  num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                  head_dim=shape["head_dim"], max_position_embeddings=max(shape["seq"], 32), pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, use_cache=False, tie_word_embeddings=False)
    if shape["arch"] == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=shape["f"], num_local_experts=shape["E"],
                                         num_experts_per_tok=shape["k"], **common)
    elif shape["arch"] == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(intermediate_size=shape["f"], moe_intermediate_size=shape["f"],
                                          num_experts=shape["E"], num_experts_per_tok=shape["k"],
                                          norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                                          **common)
    else:
        raise ValueError(f"unknown architecture {shape['arch']!r}")
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32)
                        .mul_(ROUTER_LOGIT_STD / shape["d"] ** 0.5))
    return model


def count_moe_blocks(model) -> int:
    from metamoe.integrations import hf

    names = {a.block for a in hf.ARCHITECTURES.values()}
    return sum(type(m).__name__ in names for m in model.modules())


def metamoe_backends(shape, dtype, device, backend):
    """(router backend, experts backend) that patch_moe's ops select for this model's calls."""
    from metamoe.backends import CallSpec
    from metamoe.backends.tensors import dtype_name
    from metamoe.ops.moe_experts import moe_experts_op
    from metamoe.ops.router_topk import router_topk_op

    dev, dt = torch.device(device).type, dtype_name(torch.empty(0, dtype=dtype))
    want = None if backend == "auto" else backend
    r = router_topk_op.select(CallSpec(dev, dt, {"E": shape["E"], "k": shape["k"]}), want).backend
    e = moe_experts_op.select(CallSpec(dev, dt, {"T": shape["T"], "d": shape["d"], "f": shape["f"],
                                                 "E": shape["E"], "k": shape["k"], "activation": "swiglu"}),
                              want).backend
    return r, e


def use_impl(model, name, backend="auto") -> None:
    """Make ``model`` run impl ``name``: transformers' experts implementation (``hf-eager``,
    ``hf-grouped_mm``), or ``metamoe``: ``patch_moe`` in place (for good: the blocks are replaced)."""
    if name == "metamoe":
        from metamoe.integrations.hf import patch_moe

        blocks = count_moe_blocks(model)
        replaced = patch_moe(model, backend=None if backend == "auto" else backend)
        if replaced != blocks or not replaced:
            raise RuntimeError(f"patch_moe replaced {replaced} of the model's {blocks} MoE blocks")
    elif name in PATCH_MOE_HF_PEERS:
        model.set_experts_implementation(name.split("-", 1)[1])
    else:
        raise ValueError(f"unknown impl {name!r}; known: {', '.join(PATCH_MOE.peers)}")


def _clear_grads(model):
    model.zero_grad(set_to_none=True)


def rel_err(y, ref):
    """||y - ref|| / ||ref|| (``ref`` float32)."""
    return (y.float() - ref).norm().item() / max(ref.norm().item(), 1e-30)


def grad_rel_err(model, ref_grads):
    """||g - g_ref|| / ||g_ref|| over every parameter's gradient together (a missing gradient reads as 0)."""
    num = den = 0.0
    for name, p in model.named_parameters():
        ref = ref_grads.get(name)
        g = p.grad
        if ref is None and g is None:
            continue
        if ref is None:
            num += torch.linalg.vector_norm(g, dtype=torch.float32).item() ** 2
            continue
        den += torch.linalg.vector_norm(ref, dtype=torch.float32).item() ** 2
        diff = ref if g is None else g - ref
        num += torch.linalg.vector_norm(diff, dtype=torch.float32).item() ** 2
    return (num ** 0.5) / max(den ** 0.5, 1e-30)


def _peak_reset(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device):
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def run_model(shape, dtype, device, names, modes, warmup, rep, backend, case="", keep_going=False):
    """The rows of one model: per mode, one per impl in ``names`` (checked against hf-eager, timed)."""
    model = build_model(shape, dtype, device)
    g = torch.Generator(device=device).manual_seed(2)
    ids = torch.randint(3, shape["vocab"], (shape["batch"], shape["seq"]), generator=g, device=device)
    dt = str(dtype).replace("torch.", "")
    base = {"op": "patch_moe", "model": shape["model"], "arch": shape["arch"], "batch": shape["batch"],
            "seq": shape["seq"], "T": shape["T"], "E": shape["E"], "k": shape["k"], "d": shape["d"],
            "f": shape["f"], "layers": shape["layers"], "vocab": shape["vocab"], "dtype": dt}
    ref_logits, ref_grads = {}, None  # hf-eager's, per mode
    results = {m: {} for m in modes}  # mode -> impl -> row
    # the transformers implementations first, then the patch (in place, for good), then metamoe
    order = [n for n in PATCH_MOE.peers if n in names]
    for name in order:
        note, extra = "", {}
        try:
            use_impl(model, name, backend)
            if name == "metamoe":
                chosen = metamoe_backends(shape, dtype, device, backend)
                extra["router_backend"], extra["experts_backend"] = chosen
            else:
                extra["experts_backend"] = f"transformers:{model.config._experts_implementation}"
        except Exception as exc:
            if not keep_going:
                raise
            recover_cuda()
            note = failure_note(exc, "failed" if name == "metamoe" else "skipped")
            for mode in modes:
                results[mode][name] = {**base, "mode": mode, "impl": name, "check_ok": None, "note": note}
            continue
        for mode in modes:
            row = {**base, "mode": mode, "impl": name, **extra}
            results[mode][name] = row
            train = mode == "fwd+bwd"
            try:
                if train:
                    model.train()
                    _clear_grads(model)
                    out = model(input_ids=ids, labels=ids, use_cache=False)
                    out.loss.backward()
                    logits = out.logits.detach().float()
                    del out
                    if name == "hf-eager":
                        ref_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                     if p.grad is not None}
                    elif ref_grads is not None:
                        row["grad_rel_err"] = grad_rel_err(model, ref_grads)
                    _clear_grads(model)

                    def step(model=model, ids=ids):
                        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

                    setup = functools.partial(_clear_grads, model)
                else:
                    model.eval()
                    with torch.no_grad():
                        logits = model(input_ids=ids, use_cache=False).logits.float()

                    def step(model=model, ids=ids):
                        with torch.no_grad():
                            model(input_ids=ids, use_cache=False)

                    setup = None
                if name == "hf-eager":
                    ref_logits[mode] = logits
                elif mode in ref_logits:
                    row["logits_rel_err"] = rel_err(logits, ref_logits[mode])
                    row["logits_max_err"] = (logits - ref_logits[mode]).abs().max().item()
                del logits
                _peak_reset(device)
                t = time_fn(step, device=device, warmup=warmup, rep=rep, setup=setup)
                row["peak_mem_gb"] = _peak_gb(device)
                if train:
                    _clear_grads(model)
            except Exception as exc:
                if not keep_going:
                    raise
                _clear_grads(model)
                recover_cuda()
                row.update(check_ok=None, note=failure_note(exc, "failed"))
                continue
            row.update(t.as_row("ms"))
            row["tokens_per_s"] = shape["T"] / t.median
            if name == "hf-eager":
                row["check_ok"] = True  # the reference itself
                row["note"] = "reference"
            elif mode not in ref_logits:
                row["check_ok"] = None
                row["note"] = "unchecked: hf-eager (the reference) has no output"
            else:
                errs = [(row["logits_rel_err"], "logits")]
                if train:
                    errs.append((row.get("grad_rel_err"), "grads"))
                if any(e is None for e, _ in errs):
                    row["check_ok"] = None
                    row["note"] = "unchecked: hf-eager (the reference) has no gradients"
                else:
                    row["check_ok"] = all(e <= rel_tolerance(dtype, what) for e, what in errs)
                    row["note"] = ""
    rows = []
    for mode in modes:
        by_impl = results[mode]
        timed = {n: r for n, r in by_impl.items() if "median_ms" in r}
        hf_missing = [n for n in PATCH_MOE_HF_PEERS if n in names and n not in timed]
        hf_timed = [timed[n] for n in PATCH_MOE_HF_PEERS if n in timed]
        best = min(hf_timed, key=lambda r: r["median_ms"]) if hf_timed and not hf_missing else None
        why = "; ".join(f"vs_hf_best: {n} has no figure ({by_impl[n].get('note', '')})" for n in hf_missing)
        for n in order:
            r = by_impl[n]
            if "median_ms" in r:
                r["vs_hf_eager"] = (timed["hf-eager"]["median_ms"] / r["median_ms"]
                                    if "hf-eager" in timed else None)
                r["vs_hf_grouped_mm"] = (timed["hf-grouped_mm"]["median_ms"] / r["median_ms"]
                                         if "hf-grouped_mm" in timed else None)
                r["vs_hf_best"] = best["median_ms"] / r["median_ms"] if best else None
                r["hf_best_peer"] = best["impl"] if best else None
                if why:
                    r["note"] = "; ".join(filter(None, [r.get("note", ""), why]))
            r = {c: r.get(c) for c in COLUMNS}
            if case:
                r["target_case"] = case
            rows.append(r)
    del model, ids, ref_logits, ref_grads, results
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return rows


def build_parser():
    p = common_parser(__doc__)
    p.add_argument("--target", action="store_true",
                   help="run exactly the issue-15 drop-in targets (cases.PATCH_MOE.target: Mixtral- and "
                        "Qwen3-MoE-shaped models, T = 4 x 4096, bf16), fwd and fwd+bwd, every impl, on CUDA")
    add_target_scale(p)
    p.add_argument("--models", nargs="*", default=None, choices=sorted(PATCH_MOE_MODELS),
                   help="named model shapes (cases.PATCH_MOE_MODELS)")
    p.add_argument("--batch", type=int, default=None, help="sequences per batch (with --models)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (with --models)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--modes", nargs="*", default=None, choices=list(PATCH_MOE_MODES))
    p.add_argument("--impls", nargs="*", default=None, choices=list(PATCH_MOE.peers))
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 with --target-scale tiny, whose tiny matmuls "
                        "gain nothing from threads and crawl when another process holds a core)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="patch_moe's backend for the metamoe impl (default auto: Triton on a GPU, torch on a "
                        "CPU)")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    threads = args.threads
    if threads is None and args.target and args.target_scale == "tiny":
        threads = 1
    device = pick_device(args.device, threads)
    on_gpu = device.startswith("cuda")
    check_target_args(p, args, device)
    if args.target:
        shapes = [dict(s) for s in PATCH_MOE.target_shapes(args.target_scale)]
        warmup, rep = (args.warmup if args.warmup is not None else 2), args.rep or 5
    elif args.quick or not on_gpu:
        shapes = [dict(s) for s in PATCH_MOE.quick]
        warmup, rep = (args.warmup if args.warmup is not None else 1), args.rep or 3
    else:
        shapes = [dict(s) for s in PATCH_MOE.gpu]
        warmup, rep = (args.warmup if args.warmup is not None else 3), args.rep or 10
    if args.models and not args.target:
        batch = args.batch or shapes[0]["batch"]
        seq = args.seq or shapes[0]["seq"]
        shapes = [{"model": n, **PATCH_MOE_MODELS[n], "batch": batch, "seq": seq, "T": batch * seq}
                  for n in args.models]
    if args.target:
        default_dtype = PATCH_MOE.target_shapes(args.target_scale)[0]["dtype"]
    else:
        default_dtype = "bf16"
    dtype = DTYPES[args.dtype or default_dtype]
    modes = args.modes or list(PATCH_MOE_MODES)
    names = args.impls or list(PATCH_MOE.peers)

    env = environment(device)
    import transformers

    print(f"device: {env['device']}  torch {env['torch']}  transformers {transformers.__version__}  "
          f"triton {env['triton']}  commit {env['commit']}")
    rows, path = [], None
    for shape in shapes:
        try:
            batch = run_model(shape, dtype, device, names, modes, warmup, rep, args.backend,
                              case=shape.get("case", ""), keep_going=args.target)
        except Exception as exc:  # building the model failed (with --target; otherwise it propagates)
            if not args.target:
                raise
            gc.collect()
            recover_cuda()
            note = failure_note(exc, "failed")
            batch = [{**{c: None for c in COLUMNS}, "op": "patch_moe", "model": shape["model"],
                      "arch": shape["arch"], "mode": mode, "impl": name, "T": shape["T"], "note": note,
                      "target_case": shape["case"]} for mode in modes for name in names]
        if not args.no_csv:  # each model when it is done: a later crash or timeout keeps these rows
            path = append_csv(PATCH_MOE.csv, batch, env, args.results_dir)
        rows += batch
    for r in rows:
        if r.get("note") and "median_ms" not in r:
            print(f"{r['mode']} {r['impl']} {r['model']} T={r['T']}: {r['note']}")
    print_table(rows, ["mode", "impl", "model", "T", "E", "k", "d", "f", "dtype", "experts_backend",
                       "median_ms", "p20_ms", "p80_ms", "tokens_per_s", "vs_hf_eager", "vs_hf_grouped_mm",
                       "vs_hf_best", "hf_best_peer", "logits_rel_err", "grad_rel_err", "check_ok",
                       "peak_mem_gb"])
    if path is not None:
        print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
