"""A dry run of ``make gpu-check``'s benchmark steps on the CPU: every ``bench_X.py --target`` path executes.

``benchmarks/gpu_check.py`` runs the six ``--target`` benchmarks on a short GPU lease, and
``benchmarks/targets.py`` then reads their CSVs. Here :func:`gpu_check.check` runs the very same steps (the
same argv: ``--target --results-dir OUT``, the kNN graph handed to facility location through
``--graph-cache``), each with ``--target-scale tiny --device cpu`` added: the target path with its peers,
checks, CSV columns and ``target_case`` values at the small shapes of ``cases.*.target_tiny``. The children
run with Triton's interpreter (``TRITON_INTERPRET=1``), no visible CUDA device and faiss hidden (a
``sitecustomize`` that makes ``import faiss`` fail, as on the GPU image, which has no faiss).

Every target must then be measured (pass or short: the figures of a CPU say nothing about the targets) or
not measured for a reason that only a CUDA device removes (a CUDA backend, a CUDA graph, torch._grouped_mm),
never ``invalid`` and never without a row, and every column a target reads must exist.
"""

import csv
import dataclasses
import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

from benchmarks import cases, gpu_check  # noqa: E402
from benchmarks import targets as tg  # noqa: E402

BENCH_STEPS = ("bench-router", "bench-moe", "bench-patch-moe", "bench-dpp", "bench-knn",
               "bench-facility-location")
TINY = ["--target-scale", "tiny", "--device", "cpu", "--warmup", "0", "--rep", "1"]
# a sitecustomize for the children: `import faiss` raises ImportError, as where faiss is missing
NO_FAISS = "import sys\nsys.modules['faiss'] = None\n"
STEP_TIMEOUT = 240.0


@pytest.fixture(scope="module")
def dryrun(tmp_path_factory):
    """(out folder, check()'s exit code, {step: StepResult}, seconds) of the dry run, run once."""
    base = tmp_path_factory.mktemp("target-dryrun")
    site = base / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_FAISS)
    out = base / "out"
    results = {}

    def runner(step, timeout, log, env):
        env = dict(env, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")])))
        r = gpu_check.run_step(dataclasses.replace(step, argv=step.argv + TINY), min(timeout, STEP_TIMEOUT),
                               log, env)
        results[step.name] = r
        return r

    t0 = time.monotonic()
    rc = gpu_check.check(out, BENCH_STEPS, budget=1000.0, install=False, runner=runner,
                         env_reader=lambda: {"device": "dry run on the CPU"})
    return out, rc, results, time.monotonic() - t0


def _log(out: Path) -> str:
    return (out / gpu_check.LOG).read_text()


def test_every_step_runs_and_writes_its_csv(dryrun):
    out, rc, results, _ = dryrun
    assert set(results) == set(BENCH_STEPS)
    failed = {n: (r.status, r.returncode, r.tail) for n, r in results.items() if r.status != "ok"}
    assert not failed, f"{failed}\n{_log(out)[-6000:]}"
    assert rc == 0, _log(out)[-6000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([gpu_check.SUMMARY, gpu_check.LOG] + [f"{c}.csv" for c in gpu_check.BENCH_CSVS])
    assert "## Targets" in (out / gpu_check.SUMMARY).read_text()


def test_the_children_ran_without_faiss_and_facility_location_loaded_the_knn_graph(dryrun):
    out, _, _, _ = dryrun
    knn = tg.read_rows(out / "knn_graph.csv")
    faiss_rows = [r for r in knn if r["method"].startswith("faiss")]
    assert faiss_rows and all("faiss not importable" in r["note"] for r in faiss_rows), faiss_rows
    assert "loaded from" in _log(out)  # bench_facility_location.py read bench_knn_graph.py's --graph-cache


def test_every_target_is_measured_or_not_measured_for_a_cuda_reason(dryrun):
    out, _, _, _ = dryrun
    for row in tg.summarize(out):
        assert row["status"] != "invalid", row
        if row["status"] == "not measured":
            assert "no row with" not in row["note"], row  # the bench wrote no row the target selects
            assert "failed:" not in row["note"], row  # an impl or peer raised (the bench kept going)
            assert "cuda" in row["note"].lower(), row  # only a CUDA device would give it a figure
        else:
            assert row["status"] in ("pass", "short") and row["value"] is not None, row


def test_every_column_a_target_reads_exists(dryrun):
    out, _, _, _ = dryrun
    for t in tg.TARGETS:
        with (out / f"{t.csv}.csv").open(newline="") as f:
            header = next(csv.reader(f))
        needed = set(t.where) | {t.metric, "note", "device"} | set(t.checks)
        assert needed <= set(header), (t.name, sorted(needed - set(header)))
        rows = [r for r in tg.read_rows(out / f"{t.csv}.csv") if t.matches(r)]
        assert rows, t.name


def test_every_target_case_has_rows(dryrun):
    out, _, _, _ = dryrun
    for c in cases.CASES.values():
        written = {r.get("target_case") for r in tg.read_rows(out / f"{c.csv}.csv")}
        assert {s["case"] for s in c.target} <= written, c.op
    for csv_name in gpu_check.BENCH_CSVS:  # no impl or peer raised anywhere, target rows or not
        failed = [r for r in tg.read_rows(out / f"{csv_name}.csv") if "failed:" in (r.get("note") or "")]
        assert not failed, failed


def test_the_dry_run_is_quick(dryrun):
    _, _, results, seconds = dryrun
    assert seconds < 150, {n: round(r.seconds, 1) for n, r in results.items()}


def test_tiny_cases_mirror_the_target_cases():
    for op, c in cases.CASES.items():
        assert c.target_shapes("full") == c.target
        tiny = c.target_shapes("tiny")
        assert [s["case"] for s in tiny] == [s["case"] for s in c.target], op
        for full, small in zip(c.target, tiny):
            assert set(full) == set(small), op
    fl, knn = cases.FACILITY_LOCATION.target_tiny[0], cases.KNN_GRAPH.target_tiny[0]
    assert (fl["n"], fl["d"], fl["neighbors"]) == (knn["N"], knn["D"], knn["K"])  # one graph for both
    with pytest.raises(ValueError, match="target scale"):
        cases.DPP.target_shapes("huge")


@pytest.mark.parametrize("module", ["bench_router_topk", "bench_moe_experts", "bench_patch_moe", "bench_dpp",
                                    "bench_knn_graph", "bench_facility_location"])
def test_target_scale_flag_is_checked(module, capsys):
    import importlib

    mod = importlib.import_module(f"benchmarks.{module}")
    with pytest.raises(SystemExit) as exc:  # only with --target
        mod.main(["--target-scale", "tiny", "--device", "cpu", "--no-csv"])
    assert exc.value.code == 2 and "goes with --target" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # never into benchmarks/results
        mod.main(["--target", "--target-scale", "tiny", "--device", "cpu"])
    assert exc.value.code == 2 and "--results-dir" in capsys.readouterr().err
