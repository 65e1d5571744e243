"""The shared-memory pruning of the MoE kernels' autotune configs and the static sm_90a compile report.

kernels/moe_experts.py drops, before anything compiles, the configs whose shared memory cannot fit an
H200 block (232,448 bytes); benchmarks/compile_report.py compiles the kernels ahead of time for sm_90a on the
CPU. Here: the pruning rule (``configs_for``, the autotuners' ``early_config_prune``, pinned configs), the CI
subset of the compile (in a subprocess without TRITON_INTERPRET, which replaces jit functions at import) and
the committed full report (benchmarks/results/compile_report_sm90.csv, written by ``make compile-report``).
"""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

from benchmarks import compile_report as CR  # noqa: E402

K = pytest.importorskip("metamoe.kernels.moe_experts")
LIMIT = 232448
MOE_KERNELS = ("gather_fwd", "scatter", "gather_bwd", "weight_grad")


def _cfg(num_warps, num_stages, **tiles):
    import triton

    return triton.Config(tiles, num_warps=num_warps, num_stages=num_stages)


def _find(kernel, **meta):
    for cfg in K.KERNEL_CONFIGS[kernel]:
        if all(cfg.kwargs.get(k, getattr(cfg, k, None)) == v for k, v in meta.items()):
            return cfg
    raise AssertionError(f"no config {meta} in KERNEL_CONFIGS[{kernel!r}]")


# --------------------------------------------------------------------------- the pruning rule


def test_limit_and_kernel_names():
    assert K.SHARED_MEMORY_LIMIT == LIMIT
    assert sorted(K.KERNEL_CONFIGS) == sorted(MOE_KERNELS)
    for kernel in MOE_KERNELS:
        assert len(K.KERNEL_CONFIGS[kernel]) > 1


def test_configs_for_prunes_a_config_over_the_limit_with_a_reason(monkeypatch):
    big = _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64)
    monkeypatch.setitem(K.KERNEL_CONFIGS, "gather_fwd", list(K.KERNEL_CONFIGS["gather_fwd"]) + [big])
    # SwiGLU: 3 stages x (x tile 128x64 + gate and up tiles 64x256) x 2 bytes
    need = 3 * (128 * 64 * 2 + 2 * 64 * 256 * 2)
    assert need == 245760 > LIMIT
    assert K.shared_memory_estimate("gather_fwd", big, torch.bfloat16, activation="swiglu") == need
    rows = {id(c): (kept, reason) for c, kept, reason in K.configs_for("gather_fwd", torch.bfloat16, "swiglu")}
    assert len(rows) == len(K.KERNEL_CONFIGS["gather_fwd"])
    kept, reason = rows[id(big)]
    assert not kept
    for part in ("gather_fwd", "245760", "232448", "BLOCK_N=256"):
        assert part in reason, reason
    # one weight tile with GELU: 3 x (16 KiB + 32 KiB) fits the shared memory, but 128 x 256 float32
    # accumulator values over 256 threads are 128 per thread: dropped by the register rule
    kept, reason = {id(c): (k, r) for c, k, r in K.configs_for("gather_fwd", "bf16", "gelu")}[id(big)]
    assert not kept and "128 float32 accumulator values per thread" in reason, reason
    assert not dict((id(c), k) for c, k, _ in K.configs_for("gather_fwd", "bf16"))[id(big)]


def test_register_and_ieee_rules():
    half = _cfg(8, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64)  # SwiGLU: 2 x 128 x 64 / 256 = 64 per thread
    full = _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)  # SwiGLU: 128 per thread; GELU: 64
    assert K.acc_per_thread("gather_fwd", half, "swiglu") == K.ACC_REGISTERS_PER_THREAD
    assert K.acc_per_thread("gather_fwd", full, "swiglu") == 2 * K.ACC_REGISTERS_PER_THREAD
    assert K.acc_per_thread("gather_fwd", full, "gelu") == K.ACC_REGISTERS_PER_THREAD
    assert K.acc_per_thread("scatter", full, "swiglu") == K.ACC_REGISTERS_PER_THREAD
    assert any("IEEE" in reason for _, _, reason in K.configs_for("scatter", "fp32", dot_prec="ieee"))
    for kernel in MOE_KERNELS:
        out = K.configs_for(kernel, "fp32", dot_prec="ieee")
        assert any(kept for _, kept, _ in out)
        for cfg, kept, reason in out:
            (rows, _, cols), _, _ = K.DOT_TILES[kernel]
            if kept:
                assert cfg.kwargs[rows] * cfg.kwargs[cols] <= K.IEEE_MAX_TILE
            elif "IEEE" in reason:
                assert cfg.kwargs[rows] * cfg.kwargs[cols] > K.IEEE_MAX_TILE


@pytest.mark.parametrize("kernel", MOE_KERNELS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_configs_for_agrees_with_the_estimate(kernel, dtype):
    out = K.configs_for(kernel, dtype)
    assert [c for c, _, _ in out] == list(K.KERNEL_CONFIGS[kernel])
    assert any(kept for _, kept, _ in out), "every kernel keeps at least one config"
    for cfg, kept, reason in out:
        need = K.shared_memory_estimate(kernel, cfg, dtype)
        acc = K.acc_per_thread(kernel, cfg, None)
        assert kept == (need <= LIMIT and acc <= K.ACC_REGISTERS_PER_THREAD)
        assert (reason == "") == kept
        if need > LIMIT:
            assert str(need) in reason and str(LIMIT) in reason
        elif not kept:
            assert f"{acc} float32 accumulator values per thread" in reason


def test_fp32_prunes_more_than_bf16():
    kept = {dt: sum(k for _, k, _ in K.configs_for("gather_fwd", dt, "swiglu")) for dt in ("fp32", "bf16", "fp16")}
    assert kept["fp32"] < kept["bf16"] == kept["fp16"]


def test_configs_for_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kernel must be one of"):
        K.configs_for("gemm", "bf16")
    with pytest.raises(ValueError, match="dtype must be"):
        K.configs_for("scatter", torch.int8)
    with pytest.raises(ValueError, match="activation must be one of"):
        K.configs_for("gather_fwd", "bf16", "relu")


@pytest.mark.parametrize("kernel,tuned,a_arg,b_arg", [
    ("gather_fwd", "_gather_fwd_tuned", "x_ptr", "w_ptr"),
    ("scatter", "_scatter_tuned", "a_ptr", "w_ptr"),
    ("gather_bwd", "_gather_bwd_tuned", "dy_ptr", "w_ptr"),
    ("weight_grad", "_wgrad_tuned", "l_ptr", "r_ptr"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autotuners_prune_before_compiling_with_the_same_rule(kernel, tuned, a_arg, b_arg, dtype):
    tuner = getattr(K, tuned)
    assert tuner.early_config_prune is not None
    args = {a_arg: torch.empty(1, dtype=dtype), b_arg: torch.empty(1, dtype=dtype)}
    for act, name in ((K.ACT_SWIGLU, "swiglu"), (K.ACT_GELU, "gelu")):
        got = tuner.early_config_prune(tuner.configs, args, ACT=act)
        want = [c for c, kept, _ in K.configs_for(kernel, dtype, name if kernel == "gather_fwd" else None) if kept]
        assert got == want
        if kernel == "gather_fwd" and dtype == torch.float32 and name == "swiglu":
            assert len(got) < len(tuner.configs)


# --------------------------------------------------------------------------- pinned configs


def _small_problem(dtype=torch.float32, T=8, E=4, k=2, d=32, f=32, seed=0):
    from metamoe.ops import moe_routing

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    tw = torch.rand(T, k, generator=g).to(dtype)
    wgu = (torch.randn(E, 2 * f, d, generator=g) / 8).to(dtype)
    wd = (torch.randn(E, d, f, generator=g) / 8).to(dtype)
    r = moe_routing(ids, E)
    return x, tw.reshape(-1), wgu, wd, r.sorted_pairs, r.offsets, k, T, f


def test_pinning_a_pruned_config_raises_naming_kernel_config_and_bytes():
    x, tw, wgu, wd, sp, off, k, T, f = _small_problem(torch.bfloat16)
    big = _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64)
    with pytest.raises(ValueError) as ei:
        K.moe_gather_gemm_fwd(x, wgu, sp, off, k, f, "swiglu", True, config=big)
    msg = str(ei.value)
    for part in ("moe_gather_gemm_fwd", "gather_fwd", "BLOCK_M=128 BLOCK_N=256 BLOCK_K=64", "245760", "232448"):
        assert part in msg, msg
    fat = _cfg(8, 4, BLOCK_M=128, BLOCK_N1=256, BLOCK_N2=256)  # 4 x (256x128 + 128x256) x 2 bytes
    with pytest.raises(ValueError, match=r"moe_weight_grad: config pruned: .*weight_grad.* 524288 bytes"):
        K.moe_weight_grad(x, True, x, True, sp, off, k, (4, 32, 32), torch.float32, config=fat)
    fp32 = _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64)  # 3 x (32 KiB + 64 KiB) in float32
    h = torch.randn(sp.shape[0], f)
    with pytest.raises(ValueError, match="moe_scatter_gemm: config pruned"):
        K.moe_scatter_gemm(h, wd.float(), False, sp, off, k, T, config=fp32)
    with pytest.raises(ValueError, match="moe_gather_gemm_bwd: config pruned"):
        K.moe_gather_gemm_bwd(torch.randn(T, x.shape[1]), wd.float(), sp, off, tw.float(),
                              torch.randn(sp.shape[0], 2 * f), k, "swiglu", config=fp32)


def test_pinned_config_must_be_a_config_with_the_kernels_tiles():
    x, tw, wgu, wd, sp, off, k, T, f = _small_problem()
    with pytest.raises(TypeError, match="config must be a triton.Config"):
        K.moe_gather_gemm_fwd(x, wgu, sp, off, k, f, "gelu", True, config={"BLOCK_M": 16})
    wrong = _cfg(4, 3, BLOCK_M=16, BLOCK_N1=64, BLOCK_N2=64)
    with pytest.raises(ValueError, match=r"config must set exactly \['BLOCK_K', 'BLOCK_M', 'BLOCK_N'\]"):
        K.moe_gather_gemm_fwd(x, wgu, sp, off, k, f, "gelu", True, config=wrong)


def _need_interpreter():
    from metamoe.backends import availability

    if not availability.triton_interpret():
        pytest.skip("runs the kernels through the Triton interpreter (TRITON_INTERPRET=1)")


def test_a_pinned_config_runs_with_its_tiles(monkeypatch):
    """A pinned kept config replaces the interpreter's default blocks: same results, and its tile sizes
    reach the kernel (a pinned launch ignores INTERPRET_BLOCKS even when those are unusable)."""
    _need_interpreter()
    x, tw, wgu, wd, sp, off, k, T, f = _small_problem()
    h0, pre0 = K.moe_gather_gemm_fwd(x, wgu, sp, off, k, f, "swiglu", True)
    y0 = K.moe_scatter_gemm(h0, wd, False, sp, off, k, T, scale=tw)
    da0, hb0, dw0 = K.moe_gather_gemm_bwd(y0, wd, sp, off, tw, pre0, k, "swiglu")
    g0 = K.moe_weight_grad(y0, True, hb0, False, sp, off, k, tuple(wd.shape), wd.dtype, scale=tw)
    monkeypatch.setattr(K, "INTERPRET_BLOCKS", {"BLOCK_M": 3, "BLOCK_N": 3, "BLOCK_K": 3})
    monkeypatch.setattr(K, "INTERPRET_WGRAD_BLOCKS", {"BLOCK_M": 3, "BLOCK_N1": 3, "BLOCK_N2": 3})
    gemm = _find("gather_fwd", BLOCK_M=16, BLOCK_N=64, BLOCK_K=64)
    wgrad = _find("weight_grad", BLOCK_M=16, BLOCK_N1=64, BLOCK_N2=64)
    h1, pre1 = K.moe_gather_gemm_fwd(x, wgu, sp, off, k, f, "swiglu", True, config=gemm)
    y1 = K.moe_scatter_gemm(h1, wd, False, sp, off, k, T, scale=tw, config=gemm)
    da1, hb1, dw1 = K.moe_gather_gemm_bwd(y1, wd, sp, off, tw, pre1, k, "swiglu", config=gemm)
    g1 = K.moe_weight_grad(y1, True, hb1, False, sp, off, k, tuple(wd.shape), wd.dtype, scale=tw, config=wgrad)
    for name, a, b in (("h", h0, h1), ("pre", pre0, pre1), ("y", y0, y1), ("dA", da0, da1), ("dw", dw0, dw1),
                       ("dW_down", g0, g1)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=name)
    with pytest.raises(Exception):  # noqa: B017 - the unpinned launch does use the (unusable) interpreter blocks; the error type is the Triton version's
        K.moe_gather_gemm_fwd(x, wgu, sp, off, k, f, "swiglu", True)


# --------------------------------------------------------------------------- the report's own checks


def test_parse_ptxas_log():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'kern_a' for 'sm_90a'
ptxas info    : Function properties for kern_a
    352 bytes stack frame, 384 bytes spill stores, 572 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 352 bytes cumulative stack size
ptxas info    : Compiling entry function 'kern_b' for 'sm_90a'
ptxas info    : Function properties for kern_b
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 18 registers, used 1 barriers, 512 bytes smem
"""
    a, b = CR.parse_ptxas_log(log)
    assert (a["name"], a["registers"], a["spill_bytes"], a["spill_loads"], a["stack_bytes"], a["static_shared"]) == (
        "kern_a", 255, 384, 572, 352, 0)
    assert (b["name"], b["registers"], b["spill_bytes"], b["static_shared"]) == ("kern_b", 18, 0, 512)


def test_report_flags_shared_memory_over_the_limit_and_a_low_estimate():
    row = dict(kernel="scatter", variant="down", config="c", dtype="bf16", dot_prec="tf32", kept=1,
               shared_estimate=200000, shared_limit=LIMIT)
    res = dict(registers=100, spill_bytes=0, spill_loads=0, stack_bytes=0, compile_s=1.0, wgmma=True,
               cp_async=True)
    assert CR._finish_triton_row(row, dict(res, shared_bytes=150000))["status"] == "ok"
    low = CR._finish_triton_row(row, dict(res, shared_bytes=210000))
    assert low["status"] == "estimate below actual: 200000 < 210000"
    over = CR._finish_triton_row(dict(row, shared_estimate=300000), dict(res, shared_bytes=240000))
    assert over["status"] == f"exceeds shared memory: 240000 > {LIMIT}"
    assert len(CR.problems([low, over, CR._finish_triton_row(row, dict(res, shared_bytes=1))])) == 2


# --------------------------------------------------------------------------- compiling (no GPU needed)


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _check_compiled_rows(rows, where):
    """Every compiled Triton row: status ok, shared memory within the limit and within the estimate."""
    for r in rows:
        label = f"{where}: {r['kernel']} {r['variant']} {r['dtype']} {r['dot_prec']} [{r['config']}]"
        if r["kept"] != "1" or r["kernel"].startswith("cuda:"):
            continue
        assert r["status"] == "ok", f"{label}: {r['status']}"
        shared = int(r["shared_bytes"])
        assert shared <= LIMIT, f"{label}: a kept config needs {shared} B of shared memory > {LIMIT}"
        if r["shared_estimate"]:
            assert int(r["shared_estimate"]) >= shared, (
                f"{label}: the pruning's estimate {r['shared_estimate']} B is below the compiler's {shared} B")


def test_ci_subset_compiles_for_sm90_within_shared_memory(tmp_path):
    """The CI subset of the compile report: the largest kept config of each MoE kernel variant in bf16 and in
    fp32 (TF32 dots), a router block choice and the CUDA sources, compiled for sm_90a through ptxas. Each MoE
    kernel uses wgmma with multi-stage cp.async loads."""
    pytest.importorskip("triton")
    if CR.bundled_ptxas() is None:
        pytest.skip("triton's bundled ptxas is not installed")
    out = tmp_path / "ci.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_report.py"), "--subset", "ci",
                           "--out", str(out), "--no-progress", "--timeout", "150"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=280, check=False)
    assert out.exists(), proc.stderr[-3000:]
    rows = _read(out)
    _check_compiled_rows(rows, "ci subset")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    by_kernel = {}
    for r in rows:
        by_kernel.setdefault(r["kernel"], []).append(r)
    for kernel in MOE_KERNELS:
        assert {r["dtype"] for r in by_kernel.get(kernel, [])} == {"bf16", "fp32"}, f"{kernel} was not compiled"
        for r in by_kernel[kernel]:
            if r["dtype"] == "bf16":  # tiles of 64+ rows; the largest kept fp32 SwiGLU one has 32 (mma.sync)
                assert r["wgmma"] == "1", f"{kernel} {r['variant']}: no wgmma"
            assert r["cp_async"] == "1", f"{kernel} {r['variant']}: loads are not asynchronous (no pipelining)"
            assert int(r["shared_bytes"]) > 32768, f"{kernel}: {r['shared_bytes']} B, expected multi-stage buffers"
    for kernel in ("router_fwd", "router_bwd", "router_stats"):
        assert by_kernel.get(kernel) and all(r["status"] == "ok" for r in by_kernel[kernel]), kernel
    cuda = [r for r in rows if r["kernel"].startswith("cuda:")]
    assert cuda and all(r["status"] == "ok" or r["status"].startswith("skipped: nvcc") for r in cuda), cuda


def test_committed_report_covers_every_config_and_passes():
    """benchmarks/results/compile_report_sm90.csv (``make compile-report``) lists every autotune config of
    every MoE kernel variant and dtype with the pruning's current decision, and no kept config exceeds the
    shared memory or its estimate. Rerun ``make compile-report`` after changing the configs or the rule."""
    path = ROOT / "benchmarks" / "results" / "compile_report_sm90.csv"
    assert path.exists(), f"{path} is missing: run make compile-report"
    rows = _read(path)
    _check_compiled_rows(rows, path.name)
    bad = [r for r in rows if r["status"].startswith(("error", "timeout"))]
    assert not bad, bad
    for kernel, (_, variants) in CR._MOE_VARIANTS.items():
        for variant in variants:
            for dt, prec in CR.DTYPES:
                act = variant if kernel == "gather_fwd" else None
                want = {CR._config_str(c.kwargs, c.num_warps, c.num_stages): int(kept)
                        for c, kept, _ in K.configs_for(kernel, dt, act, prec)}
                got = {r["config"]: int(r["kept"]) for r in rows
                       if (r["kernel"], r["variant"], r["dtype"], r["dot_prec"]) == (kernel, variant, dt, prec)}
                assert got == want, f"{kernel} {variant} {dt} {prec}: the report is stale; run make compile-report"
    for kernel in ("router_fwd", "router_bwd", "router_stats", "act_bwd"):
        assert any(r["kernel"] == kernel for r in rows), kernel
    spills = [(r["kernel"], r["variant"], r["dtype"], r["config"], r["spill_bytes"]) for r in rows
              if r["kept"] == "1" and r["dtype"] in ("bf16", "fp16") and r["spill_bytes"] not in ("", "0")]
    assert not spills, f"kept bf16/fp16 configs that spill: {spills}"
