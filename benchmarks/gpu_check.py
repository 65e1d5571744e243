"""One command that validates and benchmarks every kernel on a GPU: ``make gpu-check OUT=DIR``.

On a machine with a CUDA device, in order, each step in its own subprocess with its own timeout (so one hang
cannot eat the rest) and all of them inside one overall budget (``--budget``, default 470 s):

1. ``install``: ``pip install --no-build-isolation --no-deps -e .`` (offline: no build isolation, no dependency
   resolution; builds the C++/CUDA extension with the installed setuptools, pybind11, cmake and nvcc), then
   ``python -m metamoe.info``.
2. ``gpu-tests``: the ``gpu`` tests with compiled kernels (``TRITON_INTERPRET`` removed from the
   environment), except the config sweep.
3. ``bench-router``, ``bench-moe``, ``bench-patch-moe``: the MoE benchmarks at the issue target shapes, each
   with its peers in the same run (``bench_*.py --target``; the router per call and under a CUDA graph; the
   drop-in on 2-layer Mixtral- and Qwen3-MoE-shaped transformers models against transformers' own experts).
4. ``kernel-configs``: tests/test_kernel_configs.py: every autotune config of every grouped-GEMM kernel
   pinned one at a time against float64 references, forward and backward, fp32/bf16/fp16 (a config the
   pruning drops is reported as skipped, with its reason).
5. ``bench-dpp``, ``bench-knn``, ``bench-facility-location``: the selection benchmarks at N = 1M.

The pytest steps run in parallel processes (pytest-xdist) where it is installed: most of their time is
Triton compiling kernels on the CPU. A step that would start with under 10 s of the budget left is reported
as "not run"; ``--budget`` raises it, ``--steps`` picks steps.

What it writes into ``OUT`` (at most 8 plain files, no sub-folders, so the folder comes back from a remote
GPU box in one piece): ``summary.md`` (the device and versions, each step's status and time, each
benchmark figure against its target: pass / short / not measured / invalid), ``gpu_check.log`` (every
step's raw output) and the benchmark CSVs ``router_topk.csv``, ``moe.csv``, ``patch_moe.csv``, ``dpp.csv``,
``knn_graph.csv``, ``facility_location.csv``.

Without a CUDA device it prints one line and exits with code 2. Exit code 1 when a step failed or timed out,
0 otherwise (a benchmark figure short of its target is reported, not an error).

  make gpu-check OUT=gpu_out
  python benchmarks/gpu_check.py --out gpu_out --steps gpu-tests,bench-router --no-install
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the repository root: import benchmarks
MAX_FILES = 8
SUMMARY = "summary.md"
LOG = "gpu_check.log"
BENCH_CSVS = ("router_topk", "moe", "patch_moe", "dpp", "knn_graph", "facility_location")
NO_DEVICE_EXIT = 2


@dataclass
class Step:
    """One step: ``argv`` run from the repo root with at most ``timeout`` seconds."""

    name: str
    argv: List[str]
    timeout: float
    what: str


@dataclass
class StepResult:
    name: str
    status: str  # ok | failed | timeout | not run
    seconds: float = 0.0
    returncode: Optional[int] = None
    tail: str = ""  # the step's closing line (pytest's counts, a bench's last line)
    extra: Dict[str, str] = field(default_factory=dict)


def steps(out: Path, graph_cache: Path) -> List[Step]:
    """Every step of the check, in the order they run, with their time caps in seconds."""
    py = [sys.executable]
    pytest = py + ["-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs", "--color=no",
                   "--continue-on-collection-errors"]
    # the tests compile a few hundred kernels: in parallel processes where pytest-xdist is installed
    workers = ["-n", str(min(8, os.cpu_count() or 1))] if importlib.util.find_spec("xdist") else []
    bench = ["--target", "--results-dir", str(out)]
    return [
        Step("install", [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."],
             240, "offline editable install, builds the C++/CUDA extension"),
        Step("info", py + ["-m", "metamoe.info"], 60, "what metamoe finds here"),
        Step("gpu-tests", pytest + workers + ["-m", "gpu", "tests", "--ignore", "tests/test_kernel_configs.py"],
             150, "the gpu tests, compiled kernels"),
        Step("bench-router", py + ["benchmarks/bench_router_topk.py"] + bench, 90, "router top-k"),
        Step("bench-moe", py + ["benchmarks/bench_moe_experts.py"] + bench, 180,
             "MoE experts, Mixtral and Qwen3 shapes"),
        Step("bench-patch-moe", py + ["benchmarks/bench_patch_moe.py"] + bench, 150,
             "patch_moe'd Mixtral- and Qwen3-MoE-shaped models vs transformers' experts"),
        Step("kernel-configs", pytest + workers + ["-m", "gpu", "tests/test_kernel_configs.py"], 150,
             "every autotune config pinned, against float64"),
        Step("bench-dpp", py + ["benchmarks/bench_dpp.py"] + bench, 120, "DPP greedy, 1M x 768"),
        Step("bench-knn", py + ["benchmarks/bench_knn_graph.py"] + bench + ["--graph-cache", str(graph_cache)],
             120, "exact kNN graph, 1M x 768, K = 50"),
        Step("bench-facility-location",
             py + ["benchmarks/bench_facility_location.py"] + bench + ["--graph-cache", str(graph_cache)], 120,
             "facility location on the 1M / K = 50 graph"),
    ]


STEP_NAMES = tuple(s.name for s in steps(Path("OUT"), Path("G.npz")))


def cuda_reason() -> Optional[str]:
    """None when torch sees a CUDA device, else why not (one line)."""
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        return f"torch cannot be imported ({exc.__class__.__name__}: {exc})"
    try:
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            return None
    except Exception as exc:  # noqa: BLE001
        return f"the CUDA probe failed ({exc})"
    return "torch sees no CUDA device (torch.cuda.is_available() is False)"


def child_env() -> Dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)  # compiled kernels only
    return env


_COUNTS = re.compile(r"\b\d+ (passed|failed|error|errors|skipped)\b")


def closing_line(text: str) -> str:
    """pytest's counts line when there is one, else the last non-empty line (shortened)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if _COUNTS.search(ln):
            return ln.strip("= ")
    return lines[-1][:200] if lines else ""


def run_step(step: Step, timeout: float, log, env: Dict[str, str]) -> StepResult:
    """Run one step, its output appended to ``log``; a timeout kills the step's whole process group."""
    log.write(f"\n===== {step.name}: {' '.join(step.argv)} (timeout {timeout:.0f} s)\n")
    log.flush()
    t0 = time.monotonic()
    proc = subprocess.Popen(step.argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=timeout)
        status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        import signal

        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        text, _ = proc.communicate()
        status = "timeout"
    seconds = time.monotonic() - t0
    log.write(text or "")
    log.write(f"\n===== {step.name}: {status}, exit {proc.returncode}, {seconds:.1f} s\n")
    log.flush()
    return StepResult(step.name, status, seconds, proc.returncode, closing_line(text or ""))


def environment() -> Dict[str, str]:
    """The benchmark CSVs' environment columns (benchmarks/utils.py), plus what a GPU run needs besides:
    python, CUDA, compute capability, memory, driver, transformers, numpy and faiss versions."""
    import torch

    from benchmarks.utils import _version
    from benchmarks.utils import environment as bench_environment

    cuda = torch.cuda.is_available()
    env = bench_environment("cuda" if cuda else "cpu")
    env.update(python=sys.version.split()[0], cuda=str(torch.version.cuda))
    if cuda:
        cap = torch.cuda.get_device_capability(0)
        env["capability"] = f"sm_{cap[0]}{cap[1]}"
        env["memory"] = f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB"
    for name in ("transformers", "numpy", "faiss"):
        env[name] = _version(name)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        env["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else "?"
    except (OSError, subprocess.SubprocessError):
        env["driver"] = "?"
    return env


def render_summary(env: Dict[str, str], results: Sequence[StepResult], targets_md: str, total: float) -> str:
    lines = ["# metamoe gpu-check", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += [f"- total: {total:.0f} s", "", "## Steps", "", "| step | status | seconds | closing line |",
              "|---|---|---|---|"]
    for r in results:
        tail = r.tail.replace("|", "/")
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.1f} | {tail} |")
    lines += ["", "## Targets", "", targets_md.rstrip(), ""]
    return "\n".join(lines)


def check(out: Path, names: Sequence[str], budget: float, *, install: bool = True,
          runner: Callable[[Step, float, object, Dict[str, str]], StepResult] = run_step,
          env_reader: Callable[[], Dict[str, str]] = environment) -> int:
    """Run the steps named in ``names`` (in the fixed order) within ``budget`` seconds; write the summary."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    results: List[StepResult] = []
    env = child_env()
    with tempfile.TemporaryDirectory(prefix="metamoe-gpu-check-") as tmp, open(out / LOG, "w") as log:
        for step in steps(out, Path(tmp) / "knn_graph.npz"):
            if step.name not in names or (step.name == "install" and not install):
                continue
            left = budget - (time.monotonic() - t0)
            if left < 10:
                results.append(StepResult(step.name, "not run", tail=f"the {budget:.0f} s budget was spent"))
                log.write(f"\n===== {step.name}: not run (budget spent)\n")
                continue
            print(f"gpu-check: {step.name} ({step.what}), at most {min(step.timeout, left):.0f} s", flush=True)
            r = runner(step, min(step.timeout, left), log, env)
            print(f"gpu-check: {step.name}: {r.status} in {r.seconds:.1f} s  {r.tail}", flush=True)
            results.append(r)
    from benchmarks import targets

    targets_md = targets.render_markdown(targets.summarize(out))
    summary = render_summary(env_reader(), results, targets_md, time.monotonic() - t0)
    (out / SUMMARY).write_text(summary)
    print(summary)
    entries = sorted(p.name for p in out.iterdir())
    if len(entries) > MAX_FILES or any((out / n).is_dir() for n in entries):
        print(f"gpu-check: {out} holds {entries}: more than {MAX_FILES} files or a folder", file=sys.stderr)
        return 1
    return 0 if all(r.status == "ok" for r in results) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (created; at most 8 files)")
    p.add_argument("--steps", default=",".join(STEP_NAMES),
                   help=f"comma-separated subset of {','.join(STEP_NAMES)} (default: all)")
    p.add_argument("--no-install", action="store_true", help="skip the pip install step (already installed)")
    p.add_argument("--budget", type=float, default=470.0, help="seconds for all steps together (default 470)")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(names) - set(STEP_NAMES))
    if unknown:
        p.error(f"--steps: unknown {unknown}; choose from {', '.join(STEP_NAMES)}")
    if args.budget <= 0:
        p.error(f"--budget must be positive, got {args.budget}")
    reason = cuda_reason()
    if reason:
        print(f"gpu-check: no CUDA device here: {reason}; run it on a machine with an NVIDIA GPU", file=sys.stderr)
        return NO_DEVICE_EXIT
    out = args.out.resolve()
    if out.exists() and any(out.iterdir()):
        p.error(f"--out {out} is not empty: give an empty or new folder (its files come back in one piece)")
    return check(out, names, args.budget, install=not args.no_install)


if __name__ == "__main__":
    raise SystemExit(main())
