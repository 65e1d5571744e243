"""benchmarks/gpu_check.py (``make gpu-check``): one line and exit code 2 without a CUDA device; on a device,
the steps in order within the budget, the summary and at most 8 files (checked here with a stand-in runner)."""

import csv
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from benchmarks import gpu_check, targets


def _no_cuda_env():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    return env


def test_without_a_device_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path / "o")], cwd=ROOT,
                          capture_output=True, text=True, env=_no_cuda_env(), timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA device here"), lines
    assert not (tmp_path / "o").exists()


def test_make_gpu_check_exits_2_without_a_device(tmp_path):
    proc = subprocess.run(["make", "-s", "gpu-check", f"OUT={tmp_path / 'o'}", f"PYTHON={sys.executable}"],
                          cwd=ROOT, capture_output=True, text=True, env=_no_cuda_env(), timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "gpu-check: no CUDA device here" in proc.stderr


def test_unknown_step_is_refused():
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", "x", "--steps", "gpu-tests,nope"])


def test_every_bench_csv_a_target_reads_is_written_by_a_step():
    made = {c for c in gpu_check.BENCH_CSVS}
    assert {t.csv for t in targets.TARGETS} <= made
    assert 2 + len(made) <= gpu_check.MAX_FILES
    names = [s.name for s in gpu_check.steps(ROOT, ROOT)]
    assert names[0] == "install" and names.index("bench-knn") < names.index("bench-facility-location")
    assert names.index("bench-patch-moe") == names.index("bench-moe") + 1
    assert 2 + len(made) == gpu_check.MAX_FILES  # summary, log and one CSV per bench step: exactly 8
    install = gpu_check.steps(ROOT, ROOT)[0].argv
    assert "--no-build-isolation" in install and "--no-deps" in install


@pytest.mark.parametrize("text,want", [
    ("....\n==== 12 passed, 3 skipped in 4.1s ====\n", "12 passed, 3 skipped in 4.1s"),
    ("a\nlast line\n\n", "last line"),
    ("", ""),
])
def test_closing_line(text, want):
    assert gpu_check.closing_line(text) == want


def _fake_runner(fail=(), slow=()):
    """Stand-in for run_step: bench steps write a CSV row that meets the router target; the others print."""
    def run(step, timeout, log, env):
        assert "TRITON_INTERPRET" not in env
        log.write(f"{step.name} ran\n")
        if step.name == "bench-router":
            t = next(t for t in targets.TARGETS if t.csv == "router_topk" and t.metric == "median_us")
            out = step.argv[step.argv.index("--results-dir") + 1]
            row = dict(t.where, median_us="9.5", vs_eager="4.0", device="fake", **{c: "true" for c in t.checks})
            with open(os.path.join(out, "router_topk.csv"), "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=list(row))
                w.writeheader()
                w.writerow(row)
        status = "failed" if step.name in fail else "ok"
        return gpu_check.StepResult(step.name, status, 100.0 if step.name in slow else 1.0, 0, f"{step.name} done")
    return run


def test_check_writes_summary_and_few_files(tmp_path):
    out = tmp_path / "out"
    rc = gpu_check.check(out, gpu_check.STEP_NAMES, 470.0, runner=_fake_runner(),
                         env_reader=lambda: {"device": "fake GPU"})
    assert rc == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_check.log", "router_topk.csv", "summary.md"]
    summary = (out / "summary.md").read_text()
    assert "fake GPU" in summary
    for name in gpu_check.STEP_NAMES:
        assert f"| {name} | ok |" in summary
    assert "| pass |" in summary and "not measured" in summary
    assert "bench-dpp ran" in (out / "gpu_check.log").read_text()


def test_check_reports_failures_and_the_budget(tmp_path, monkeypatch):
    clock = iter(range(0, 10_000, 200))  # each step appears to take 200 s
    monkeypatch.setattr(gpu_check.time, "monotonic", lambda: next(clock))
    rc = gpu_check.check(tmp_path / "o", ["gpu-tests", "kernel-configs", "bench-router"], 300.0, install=False,
                         runner=_fake_runner(fail=("gpu-tests",)), env_reader=dict)
    assert rc == 1
    summary = (tmp_path / "o" / "summary.md").read_text()
    assert "| gpu-tests | failed |" in summary
    assert "| bench-router | not run |" in summary
