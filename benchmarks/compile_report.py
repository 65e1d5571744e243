"""Static sm_90a compile report of metamoe's GPU kernels, made on a CPU (no device needed).

What it compiles, ahead of time for sm_90a with the installed Triton and its bundled ptxas:
  * every MoE grouped-GEMM kernel of kernels/moe_experts.py x every config of its autotune list
    (``KERNEL_CONFIGS``) x dtype (fp32 with IEEE dots, the default, and with TF32 dots; bf16; fp16) x the
    constexpr variants that change the code: gather_fwd and gather_bwd swiglu / gelu; scatter ``down``
    (weighted rows added atomically, k = 8), ``down-k1`` (plain stores, k = 1) and ``dx`` (unweighted,
    atomic, the transposed weight of the backward); weight_grad ``dw_gate_up`` (right side gathered) and
    ``dw_down`` (left side gathered and weighted). Configs the shared-memory pruning drops
    (``configs_for``) are listed with status ``pruned: ...`` and kept = 0, not compiled;
  * the router kernels of kernels/router_topk.py at the blocks ``_blocks`` picks for E in 8, 64, 128, 512
    and k in 2, 8 (forward with statistics, backward with every gradient, the statistics reduction);
  * the CUDA sources csrc/cuda/*.cu through ``nvcc -arch=sm_90a -Xptxas -v``, one row per kernel function.
Triton kernels are specialised the way the JIT specialises them on real shapes: unit strides are
constants, the other integers and the pointers are 16-divisible; BLOCK_E = 128 (E = 128 experts).

Columns of the CSV (``--out``, default benchmarks/results/compile_report_sm90.csv): kernel, variant, config,
dtype, dot_prec, num_warps, num_stages, registers, spill_bytes (spill stores), spill_loads, stack_bytes,
shared_bytes (what the block needs: Triton's allocation; static shared memory for CUDA, whose dynamic shared
memory is sized at launch), shared_estimate (``shared_memory_estimate``, the pruning's bound), shared_limit,
kept (1 where the autotuner may pick the config), status (ok / pruned: ... / exceeds shared memory: ... /
estimate below actual: ... / error: ... / timeout: ... / skipped: ...), wgmma, cp_async (the PTX uses them),
compile_s, triton, target. The exit code is 1 when a compile fails or times out, a kept config exceeds the
limit or the estimate is below the allocation; the CSV is written in every case.

  python benchmarks/compile_report.py                    # everything (make compile-report)
  python benchmarks/compile_report.py --subset ci        # the fast subset tests/test_compile_report.py runs
  python benchmarks/compile_report.py --kernels scatter,router --out /tmp/r.csv

Compiles run in worker processes (``--jobs``, default one per core), each with a timeout (``--timeout``).
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from contextlib import redirect_stdout
from multiprocessing.connection import wait as wait_connections
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "compile_report_sm90.csv"
TARGET = "sm_90a"
BLOCK_E = 128
ROUTER_SHAPES = [(E, k) for E in (8, 64, 128, 512) for k in (2, 8)]
ROUTER_TOKENS = 65536
DTYPES = [("fp32", "ieee"), ("fp32", "tf32"), ("bf16", "tf32"), ("fp16", "tf32")]
COLUMNS = ["kernel", "variant", "config", "dtype", "dot_prec", "num_warps", "num_stages", "registers",
           "spill_bytes", "spill_loads", "stack_bytes", "shared_bytes", "shared_estimate", "shared_limit", "kept",
           "status", "wgmma", "cp_async", "compile_s", "triton", "target"]
MOE_MODULE = "metamoe.kernels.moe_experts"
ROUTER_MODULE = "metamoe.kernels.router_topk"

# --------------------------------------------------------------------------- compiling one Triton kernel


def bundled_ptxas() -> str | None:
    """Path of the ptxas Triton ships for sm_90, or None when it is missing."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return path if os.path.exists(path) else None


def parse_ptxas_log(log: str) -> list[dict]:
    """Per compiled function of a ``ptxas -v`` log: name, registers, spill_bytes, spill_loads, stack_bytes,
    static_shared (bytes of ``smem``), in the order of the log."""
    funcs: list[dict] = []
    cur = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            cur = {"name": m.group(1), "registers": None, "spill_bytes": 0, "spill_loads": 0, "stack_bytes": 0,
                   "static_shared": 0}
            funcs.append(cur)
            continue
        if cur is None:
            if "Used" in line or "spill" in line:
                cur = {"name": "", "registers": None, "spill_bytes": 0, "spill_loads": 0, "stack_bytes": 0,
                       "static_shared": 0}
                funcs.append(cur)
            else:
                continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack_bytes"], cur["spill_bytes"], cur["spill_loads"] = (int(g) for g in m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["static_shared"] = int(s.group(1)) if s else 0
    return funcs


def _run_ptxas(ptx: str) -> str:
    """``ptxas -v`` of ``ptx`` with the options Triton uses; returns the log."""
    ptxas = bundled_ptxas()
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        Path(src).write_text(ptx)
        proc = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={TARGET}", src,
                               "-o", os.path.join(d, "k.o")], capture_output=True, text=True, check=True)
    return proc.stdout + proc.stderr


def compile_sm90(fn, consts: dict, unit_strides=(), ptr_types=None, num_warps: int = 4, num_stages: int = 3,
                 default_ptr: str = "*bf16") -> dict:
    """Compile the ``@triton.jit`` function ``fn`` ahead of time for sm_90a, specialised as the JIT does on
    real shapes: ``consts`` and the ``unit_strides`` (= 1) are constexprs, the other integers (i32) and the
    pointers (``ptr_types[name]``, else ``default_ptr``) are 16-divisible. Goes through ptxas; needs no GPU,
    but must run without TRITON_INTERPRET (the interpreter replaces jit functions at import).

    Returns ptx, shared_bytes (Triton's allocation), registers, spill_bytes, spill_loads, stack_bytes, wgmma,
    cp_async (whether the PTX uses them) and compile_s."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptr_types = ptr_types or {}
    cx = dict(consts, **{u: 1 for u in unit_strides})
    unknown = sorted(set(cx) - set(fn.arg_names))
    if unknown:
        raise ValueError(f"consts/unit_strides name no argument of {fn.__name__}: {unknown}")
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in cx:
            sig[name] = "constexpr"
        else:
            sig[name] = ptr_types.get(name, default_ptr) if name.endswith("_ptr") else "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in cx.items()},
                    attrs=attrs)
    log = io.StringIO()
    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    t0 = time.perf_counter()
    try:
        with redirect_stdout(log):
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": num_warps, "num_stages": num_stages})
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    seconds = time.perf_counter() - t0
    ptx = k.asm["ptx"]
    funcs = [f for f in parse_ptxas_log(log.getvalue()) if f["registers"] is not None]
    if not funcs:
        funcs = [f for f in parse_ptxas_log(_run_ptxas(ptx)) if f["registers"] is not None]
    stats = funcs[-1] if funcs else {"registers": None, "spill_bytes": None, "spill_loads": None,
                                     "stack_bytes": None}
    return {"ptx": ptx, "shared_bytes": int(k.metadata.shared), "registers": stats["registers"],
            "spill_bytes": stats["spill_bytes"], "spill_loads": stats["spill_loads"],
            "stack_bytes": stats["stack_bytes"], "wgmma": "wgmma.mma_async" in ptx, "cp_async": "cp.async" in ptx,
            "compile_s": round(seconds, 2)}


# --------------------------------------------------------------------------- the jobs

# kernel -> (name of its jit function, {variant: (the variant's constexprs, the strides that are 1)})
_MOE_VARIANTS = {
    "gather_fwd": ("_moe_gather_gemm_fwd_kernel", {
        "swiglu": (dict(TOPK=8, ACT=0, STORE_PRE=True), ["stride_xd", "stride_wd"]),
        "gelu": (dict(TOPK=8, ACT=1, STORE_PRE=True), ["stride_xd", "stride_wd"]),
    }),
    "scatter": ("_moe_scatter_gemm_kernel", {
        "down": (dict(TOPK=8, HAS_SCALE=True, ATOMIC=True), ["stride_ak", "stride_wk"]),
        "down-k1": (dict(TOPK=1, HAS_SCALE=True, ATOMIC=False), ["stride_ak", "stride_wk"]),
        "dx": (dict(TOPK=8, HAS_SCALE=False, ATOMIC=True), ["stride_ak", "stride_wn"]),
    }),
    "gather_bwd": ("_moe_gather_gemm_bwd_kernel", {
        "G": (dict(TOPK=8), ["stride_dyd", "stride_wf"]),
    }),
    "weight_grad": ("_moe_weight_grad_kernel", {
        "dw_gate_up": (dict(TOPK=8, L_GATHER=False, L_SCALE=False, R_GATHER=True, SPLIT=False),
                       ["stride_ln", "stride_rn", "stride_o2"]),
        "dw_down": (dict(TOPK=8, L_GATHER=True, L_SCALE=True, R_GATHER=False, SPLIT=False),
                    ["stride_ln", "stride_rn", "stride_o2"]),
        "dw_down-split": (dict(TOPK=8, L_GATHER=True, L_SCALE=True, R_GATHER=False, SPLIT=True),
                          ["stride_ln", "stride_rn", "stride_o2"]),
    }),
}


def _moe_ptr_types(kernel: str, variant: str, dt: str) -> dict:
    t = "*" + dt
    idx = {"pairs_ptr": "*i64", "offsets_ptr": "*i64"}
    if kernel == "gather_fwd":
        return dict(idx, x_ptr=t, w_ptr=t, pre_ptr=t, h_ptr=t)
    if kernel == "scatter":
        return dict(idx, a_ptr=t, w_ptr=t, scale_ptr=t if variant != "dx" else "*fp32", out_ptr="*fp32")
    if kernel == "gather_bwd":
        return dict(idx, dy_ptr=t, w_ptr=t, g_ptr=t)
    return dict(idx, l_ptr=t, r_ptr=t, scale_ptr=t, out_ptr="*fp32" if variant.endswith("split") else t)


def _config_str(meta: dict, num_warps: int, num_stages: int) -> str:
    return " ".join(f"{k}={v}" for k, v in meta.items()) + f" num_warps={num_warps} num_stages={num_stages}"


def _triton_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("triton")
    except PackageNotFoundError:
        return ""


def _base_row(**kw) -> dict:
    from metamoe.kernels.moe_experts import SHARED_MEMORY_LIMIT

    row = {c: "" for c in COLUMNS}
    row.update(shared_limit=SHARED_MEMORY_LIMIT, triton=_triton_version(), target=TARGET)
    row.update(kw)
    return row


def moe_jobs(dtypes=DTYPES) -> list[dict]:
    """One job per MoE kernel x variant x dtype x autotune config; pruned configs come as finished rows."""
    from metamoe.kernels import moe_experts as K

    jobs = []
    for kernel, (fn_name, variants) in _MOE_VARIANTS.items():
        for variant, (consts, unit) in variants.items():
            for dt, prec in dtypes:
                act = variant if kernel == "gather_fwd" else None
                for cfg, kept, reason in K.configs_for(kernel, dt, act, prec):
                    row = _base_row(kernel=kernel, variant=variant, dtype=dt, dot_prec=prec,
                                    config=_config_str(cfg.kwargs, cfg.num_warps, cfg.num_stages),
                                    num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                    shared_estimate=K.shared_memory_estimate(kernel, cfg, dt, dt, act),
                                    kept=int(kept),
                                    status="" if kept else f"pruned: {reason}")
                    c = dict(consts, DOT_PREC=prec, UPCAST=False, **cfg.kwargs)
                    if kernel != "weight_grad":
                        c["BLOCK_E"] = BLOCK_E
                        c["GROUP_M"] = K.GROUP_M
                    jobs.append({"kind": "triton", "row": row, "module": MOE_MODULE, "fn": fn_name, "consts": c,
                                 "unit": unit, "ptr_types": _moe_ptr_types(kernel, variant, dt),
                                 "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "compile": kept})
    return jobs + act_bwd_jobs(dtypes)


def act_bwd_jobs(dtypes=DTYPES) -> list[dict]:
    """The elementwise activation backward at its fixed blocks, per activation and dtype."""
    from metamoe.kernels import moe_experts as K

    jobs = []
    for variant, act in (("swiglu", 0), ("gelu", 1)):
        for dt in dict(dtypes):
            t = "*" + dt
            row = _base_row(kernel="act_bwd", variant=variant, dtype=dt, dot_prec="",
                            config=_config_str(K.ACT_BWD_BLOCKS, K.ACT_BWD_WARPS, 1), num_warps=K.ACT_BWD_WARPS,
                            num_stages=1, kept=1)
            jobs.append({"kind": "triton", "row": row, "module": MOE_MODULE, "fn": "_moe_act_bwd_kernel",
                         "consts": dict(ACT=act, **K.ACT_BWD_BLOCKS), "unit": [],
                         "ptr_types": dict(da_ptr=t, pre_ptr=t, h_ptr=t, pairs_ptr="*i64", scale_ptr=t,
                                           dw_ptr="*fp32"),
                         "num_warps": K.ACT_BWD_WARPS, "num_stages": 1, "compile": True})
    return jobs


def router_jobs(shapes=ROUTER_SHAPES, dtypes=("fp32", "bf16", "fp16")) -> list[dict]:
    """The router kernels at the blocks ``_blocks`` picks for each (E, k) of ``shapes`` and each dtype."""
    from metamoe.kernels import router_topk as rk

    jobs, stats_blocks = [], []
    for E, k in shapes:
        bt, be, bk, nw = rk._blocks(ROUTER_TOKENS, E, k)
        blocks = dict(BLOCK_T=bt, BLOCK_E=be, BLOCK_K=bk)
        for dt in dtypes:
            t = "*" + dt
            fwd = dict(x_ptr=t, w_ptr="*fp32", idx_ptr="*i64", lse_ptr="*fp32", pcount_ptr="*i32",
                       pprob_ptr="*fp32")
            bwd = dict(x_ptr=t, lse_ptr="*fp32", w_ptr="*fp32", idx_ptr="*i64", gw_ptr="*fp32", glse_ptr="*fp32",
                       gpsum_ptr="*fp32", dx_ptr=t)
            for kernel, variant, fn_name, consts, unit, ptrs in (
                ("router_fwd", "normalize+stats", "_router_topk_fwd_kernel",
                 dict(K=k, NORMALIZE=True, STATS=True, **blocks), ["stride_xe"], fwd),
                ("router_bwd", "all gradients", "_router_topk_bwd_kernel",
                 dict(K=k, NORMALIZE=True, HAS_GW=True, HAS_GLSE=True, HAS_GPSUM=True, NEED_P=True, **blocks),
                 ["stride_xe", "stride_de", "stride_gwk", "stride_glse"], bwd),
            ):
                row = _base_row(kernel=kernel, variant=variant, dtype=dt, dot_prec="",
                                config=f"E={E} k={k} " + _config_str(blocks, nw, 3), num_warps=nw, num_stages=3,
                                kept=1)
                jobs.append({"kind": "triton", "row": row, "module": ROUTER_MODULE, "fn": fn_name, "consts": consts,
                             "unit": unit, "ptr_types": ptrs, "num_warps": nw, "num_stages": 3, "compile": True})
        be_stats = min(128, be)
        if be_stats not in stats_blocks:
            stats_blocks.append(be_stats)
    for be in stats_blocks:
        meta = dict(BLOCK_P=32, BLOCK_E=be)
        row = _base_row(kernel="router_stats", variant="", dtype="fp32/i32", dot_prec="",
                        config=_config_str(meta, 4, 3), num_warps=4, num_stages=3, kept=1)
        jobs.append({"kind": "triton", "row": row, "module": ROUTER_MODULE, "fn": "_router_topk_stats_kernel",
                     "consts": meta, "unit": [], "default_ptr": "*fp32",
                     "ptr_types": dict(pcount_ptr="*i32", pprob_ptr="*fp32", counts_ptr="*i64", psum_ptr="*fp32"),
                     "num_warps": 4, "num_stages": 3, "compile": True})
    return jobs


def cuda_jobs() -> list[dict]:
    """One job per csrc/cuda/*.cu file; each yields one row per kernel function."""
    return [{"kind": "nvcc", "source": src, "row": _base_row(kernel="cuda:" + Path(src).stem, dot_prec="", kept=1),
             "compile": True} for src in sorted(glob.glob(str(ROOT / "csrc" / "cuda" / "*.cu")))]


def ci_jobs() -> list[dict]:
    """The fast subset: the largest kept config (by the estimate) of every MoE kernel variant in bf16 and in
    fp32 with TF32 dots (the compiler allocates all num_stages buffers there, so the estimate is tightest),
    the bf16 router kernels at E = 128, k = 8, and the CUDA sources."""
    chosen = {}
    for job in moe_jobs([("bf16", "tf32"), ("fp32", "tf32")]):
        r = job["row"]
        key = (r["kernel"], r["variant"], r["dtype"])
        if job["compile"] and (key not in chosen or r["shared_estimate"] > chosen[key]["row"]["shared_estimate"]):
            chosen[key] = job
    return list(chosen.values()) + router_jobs([(128, 8)], ("bf16",)) + cuda_jobs()


# --------------------------------------------------------------------------- running the jobs


def _short_cuda_name(mangled: str) -> str:
    filt = shutil.which("cu++filt") or shutil.which("c++filt")
    name = mangled
    if filt:
        proc = subprocess.run([filt, mangled], capture_output=True, text=True, check=False)
        if proc.returncode == 0 and proc.stdout.strip():
            name = proc.stdout.strip()
    name = name.replace("(anonymous namespace)::", "")
    return re.sub(r"_GLOBAL__N__\w+::", "", name)


def _nvcc_rows(job: dict, timeout: float) -> list[dict]:
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    base = job["row"]
    if nvcc is None:
        return [dict(base, status="skipped: nvcc not found")]
    with tempfile.TemporaryDirectory() as d:
        cmd = [nvcc, "-arch=sm_90a", "-std=c++17", "-O3", "--use_fast_math", "-lineinfo", "-Xptxas", "-v",
               "-I", str(ROOT / "csrc" / "include"), "-c", job["source"], "-o", os.path.join(d, "k.o")]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, timeout - 1), check=False)
        seconds = round(time.perf_counter() - t0, 2)
    if proc.returncode != 0:
        return [dict(base, status="error: " + (proc.stderr.strip().splitlines() or ["nvcc failed"])[-1][:300],
                     compile_s=seconds)]
    rows = []
    for f in parse_ptxas_log(proc.stdout + proc.stderr):
        rows.append(dict(base, config=_short_cuda_name(f["name"]), registers=f["registers"],
                         spill_bytes=f["spill_bytes"], spill_loads=f["spill_loads"], stack_bytes=f["stack_bytes"],
                         shared_bytes=f["static_shared"], status="ok", compile_s=seconds, target=TARGET))
    return rows or [dict(base, status="error: no function in the ptxas log", compile_s=seconds)]


def _finish_triton_row(row: dict, res: dict) -> dict:
    """``row`` with the compile results ``res`` and its status: ok, or what exceeds the limit / the estimate."""
    row = dict(row, **{k: res[k] for k in ("registers", "spill_bytes", "spill_loads", "stack_bytes",
                                           "shared_bytes", "compile_s")})
    row["wgmma"], row["cp_async"] = int(res["wgmma"]), int(res["cp_async"])
    problems = []
    if row["shared_estimate"] != "" and res["shared_bytes"] > row["shared_estimate"]:
        problems.append(f"estimate below actual: {row['shared_estimate']} < {res['shared_bytes']}")
    limit = row["shared_limit"]
    if res["shared_bytes"] > limit:
        problems.append(f"exceeds shared memory: {res['shared_bytes']} > {limit}")
    row["status"] = "; ".join(problems) if problems else "ok"
    return row


def run_job(job: dict, timeout: float) -> list[dict]:
    """Rows of one job (run in a worker process)."""
    import importlib

    base = job["row"]
    if not job["compile"]:
        return [base]
    try:
        if job["kind"] == "nvcc":
            return _nvcc_rows(job, timeout)
        fn = getattr(importlib.import_module(job["module"]), job["fn"])
        res = compile_sm90(fn, job["consts"], job["unit"], job["ptr_types"], job["num_warps"], job["num_stages"],
                           job.get("default_ptr", "*bf16"))
        return [_finish_triton_row(base, res)]
    except subprocess.TimeoutExpired:
        return [dict(base, status=f"timeout: over {timeout:g} s")]
    except Exception as e:  # noqa: BLE001 - one failed compile is a row of the report, not the end of it
        msg = " ".join(f"{type(e).__name__}: {e}".split())
        return [dict(base, status="error: " + msg[:300])]


def _worker_main(conn, env: dict, timeout: float) -> None:
    """A compile worker: imports Triton and the kernel modules, says "ready" (or why it cannot start), then
    answers each job with its rows until it receives None."""
    os.environ.update(env)
    os.environ.pop("TRITON_INTERPRET", None)
    try:
        import triton  # noqa: F401

        import metamoe.kernels.moe_experts  # noqa: F401
        import metamoe.kernels.router_topk  # noqa: F401
    except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the remaining jobs with it
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", ""))
    while True:
        job = conn.recv()
        if job is None:
            return
        conn.send(("rows", run_job(job, timeout)))


def run_jobs(jobs: list[dict], n_workers: int, timeout: float, progress: bool = True) -> list[dict]:
    """Run ``jobs`` in ``n_workers`` spawned processes (a fresh Triton cache, removed afterwards); a job
    still running ``timeout`` seconds after it was handed to a ready worker has its worker killed (and
    replaced) and gets a timeout row. Returns the rows in the order of the jobs."""
    from tqdm import tqdm

    ctx = mp.get_context("spawn")
    cache = tempfile.mkdtemp(prefix="metamoe-compile-report-")
    env = {"TRITON_CACHE_DIR": cache}
    results: list[list[dict] | None] = [None] * len(jobs)
    pending = deque(i for i, j in enumerate(jobs) if j["compile"])
    for i, j in enumerate(jobs):
        if not j["compile"]:
            results[i] = [j["row"]]
    bar = tqdm(total=len(pending), desc="compiling for sm_90a", unit="job", disable=not progress, file=sys.stderr)

    def start():
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker_main, args=(child, env, timeout), daemon=True)
        proc.start()
        child.close()
        return {"proc": proc, "conn": parent, "ready": False, "job": None, "t0": 0.0}

    def stop(w):
        if w["proc"].is_alive():
            w["proc"].kill()
        w["proc"].join()
        w["conn"].close()

    def finish(i, rows):
        results[i] = rows
        bar.update(1)

    workers = [start() for _ in range(min(n_workers, len(pending)))]
    try:
        while pending or any(w["job"] is not None for w in workers):
            for w in workers:
                if w["ready"] and w["job"] is None and pending:
                    w["job"], w["t0"] = pending.popleft(), time.monotonic()
                    w["conn"].send(jobs[w["job"]])
            ready = wait_connections([w["conn"] for w in workers], timeout=1.0)
            for k, w in enumerate(workers):
                i = w["job"]
                if w["conn"] in ready:
                    try:
                        kind, payload = w["conn"].recv()
                    except EOFError:
                        kind, payload = "died", f"the worker died (exit code {w['proc'].exitcode})"
                    if kind == "ready":
                        w["ready"] = True
                    elif kind == "rows":
                        finish(i, payload)
                        w["job"] = None
                    elif kind == "failed" or not w["ready"]:
                        while pending:
                            j = pending.popleft()
                            finish(j, [dict(jobs[j]["row"], status=f"error: no worker could start: {payload}")])
                        stop(w)
                        workers[k] = None
                    else:
                        if i is not None:
                            finish(i, [dict(jobs[i]["row"], status=f"error: {payload}")])
                        stop(w)
                        workers[k] = start()
                elif i is not None and time.monotonic() - w["t0"] > timeout:
                    finish(i, [dict(jobs[i]["row"], status=f"timeout: over {timeout:g} s")])
                    stop(w)
                    workers[k] = start()
            workers = [w for w in workers if w is not None]
            if not workers and pending:
                raise RuntimeError("compile_report: every worker is gone with jobs left")
    finally:
        for w in workers:
            if w["proc"].is_alive() and w["job"] is None and w["ready"]:
                try:
                    w["conn"].send(None)
                except (BrokenPipeError, OSError):
                    pass
                w["proc"].join(timeout=5)
            stop(w)
        bar.close()
        shutil.rmtree(cache, ignore_errors=True)
    return [r for rs in results for r in rs]


# --------------------------------------------------------------------------- report


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in COLUMNS})


def problems(rows: list[dict]) -> list[str]:
    """The rows that make the report fail: compile errors and timeouts, kept configs over the shared-memory
    limit, estimates below the allocation."""
    bad = []
    for r in rows:
        s = str(r["status"])
        if s.startswith(("error", "timeout", "exceeds", "estimate below")):
            bad.append(f"{r['kernel']} {r['variant']} {r['dtype']} {r['dot_prec']} [{r['config']}]: {s}")
    return bad


def _num(v):
    return v if isinstance(v, int) else (int(v) if str(v).strip().lstrip("-").isdigit() else None)


def summary(rows: list[dict]) -> str:
    """Per kernel: rows (configs x variants x dtypes) kept / pruned, compile failures, max registers, rows
    that spill, max spill and shared memory of the compiled configs, rows using wgmma; then every pruned
    config and every kept config that spills."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["kernel"], []).append(r)
    head = f"{'kernel':<22}{'rows':>6}{'kept':>6}{'pruned':>8}{'failed':>8}{'max regs':>10}{'spilling':>10}" \
           f"{'max spill B':>12}{'max shared B':>14}{'wgmma rows':>12}"
    lines = [head, "-" * len(head)]
    for kernel, rs in groups.items():
        compiled = [r for r in rs if str(r["status"]) == "ok" or str(r["status"]).startswith(("exceeds", "estim"))]
        regs = [_num(r["registers"]) for r in compiled if _num(r["registers"]) is not None]
        spills = [_num(r["spill_bytes"]) or 0 for r in compiled]
        shared = [_num(r["shared_bytes"]) or 0 for r in compiled]
        failed = sum(str(r["status"]).startswith(("error", "timeout")) for r in rs)
        wg = [r for r in compiled if str(r["wgmma"]) in ("1", "True")]
        lines.append(f"{kernel:<22}{len(rs):>6}{sum(_num(r['kept']) == 1 for r in rs):>6}"
                     f"{sum(_num(r['kept']) == 0 for r in rs):>8}{failed:>8}{max(regs, default=0):>10}"
                     f"{sum(s > 0 for s in spills):>10}{max(spills, default=0):>12}{max(shared, default=0):>14}"
                     f"{len(wg) if not kernel.startswith(('router', 'cuda')) else '-':>12}")
    pruned: dict[tuple, object] = {}
    for r in rows:
        if _num(r["kept"]) == 0:
            pruned[(r["kernel"], r["variant"], r["dtype"], r["config"])] = r["shared_estimate"]
    if pruned:
        lines.append("")
        lines.append(f"pruned configs ({len(pruned)}, either dot precision): estimated shared memory, over "
                     f"{rows[0]['shared_limit']} B")
        for (kernel, variant, dtype, config), need in pruned.items():
            lines.append(f"  {kernel} {variant} {dtype} [{config}]: {need} B")
    spilling = [r for r in rows if _num(r["kept"]) == 1 and (_num(r["spill_bytes"]) or 0) > 0]
    if spilling:
        lines.append("")
        lines.append(f"kept configs that spill ({len(spilling)}): spill stores / loads bytes, registers")
        for r in spilling:
            lines.append(f"  {r['kernel']} {r['variant']} {r['dtype']} {r['dot_prec']} [{r['config']}]: "
                         f"{r['spill_bytes']} / {r['spill_loads']} B, {r['registers']} regs")
    return "\n".join(lines)


def compile_seconds(rows: list[dict]) -> float:
    """Seconds spent compiling, summed over the jobs (the rows of one CUDA source share its nvcc time)."""
    seen, total = set(), 0.0
    for r in rows:
        if r.get("compile_s") in ("", None):
            continue
        key = r["kernel"] if r["kernel"].startswith("cuda:") else id(r)
        if key not in seen:
            seen.add(key)
            total += float(r["compile_s"])
    return total


def _select(jobs: list[dict], kernels: list[str] | None) -> list[dict]:
    if not kernels:
        return jobs
    return [j for j in jobs if any(j["row"]["kernel"] == k or j["row"]["kernel"].startswith(k) for k in kernels)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subset", choices=["all", "ci"], default="all",
                   help="all: every kernel x config x dtype x variant; ci: the fast subset the tests run")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"CSV to write (default {DEFAULT_OUT})")
    p.add_argument("--kernels", default="",
                   help="comma-separated kernel names or prefixes (gather_fwd, scatter, gather_bwd, weight_grad, "
                        "router, router_fwd, cuda, ...); default all")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: one per core)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds allowed for one compile job (default 300); its worker is killed past it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--summary", type=Path, default=None, metavar="CSV",
                   help="compile nothing: print the summary table of an existing report (e.g. an earlier commit's)")
    p.add_argument("--dtypes", default="", help="with --summary: comma-separated dtypes to keep (e.g. bf16,fp16)")
    args = p.parse_args(argv)
    if args.summary is not None:
        dtypes = {d.strip() for d in args.dtypes.split(",") if d.strip()}
        rows = [r for r in _read_csv(args.summary) if not dtypes or r["dtype"] in dtypes]
        if not rows:
            p.error(f"--summary {args.summary}: no rows (dtypes {sorted(dtypes) or 'all'})")
        print(summary(rows))
        return 0
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.timeout <= 0:
        p.error(f"--timeout must be > 0, got {args.timeout}")
    os.environ.pop("TRITON_INTERPRET", None)
    if bundled_ptxas() is None:
        print("compile_report: triton's bundled ptxas is not installed; nothing can be compiled", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    jobs = ci_jobs() if args.subset == "ci" else moe_jobs() + router_jobs() + cuda_jobs()
    jobs = _select(jobs, kernels)
    if not jobs:
        p.error(f"--kernels {args.kernels!r} selects no kernel")
    rows = run_jobs(jobs, args.jobs, args.timeout, progress=not args.no_progress)
    wall = time.perf_counter() - t0
    write_csv(rows, args.out)
    compile_sum = compile_seconds(rows)
    n_compiled = sum(1 for j in jobs if j["compile"])
    print(summary(rows))
    print(f"\n{n_compiled} compile jobs ({len(rows)} rows) for {TARGET} with triton {_triton_version()} on "
          f"{args.jobs} worker(s): {wall:.1f} s wall, {compile_sum:.1f} s of compiling; wrote {args.out}")
    bad = problems(rows)
    if bad:
        print(f"\n{len(bad)} problem(s):", file=sys.stderr)
        for b in bad:
            print("  " + b, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
