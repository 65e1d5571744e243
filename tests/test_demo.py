"""`metamoe demo` end to end on the bundled digits: the real command path with --quick (tiny) settings."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

ALL_METHODS = {
    "metamoe",
    "flexolmo",
    "random_proxy",
    "model_soup",
    "btm",
    "btx_oracle",
    "no_alignment",
    "no_context",
}
DOMAINS = {"upright", "rotated", "inverted"}


def _demo(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "metamoe", "demo", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("demo")
    out = _demo("--out", str(out_dir), "--seed", "3", "--quick", "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]
    return out, out_dir


def test_results_json_schema(demo_run):
    _, out_dir = demo_run
    res = json.loads((out_dir / "results.json").read_text())
    assert set(res["methods"]) == ALL_METHODS
    for name, m in res["methods"].items():
        assert set(m["per_domain"]) == DOMAINS
        vals = list(m["per_domain"].values())
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in vals)
        assert m["average"] == pytest.approx(float(np.mean(vals)))
        assert m["breaks_privacy"] is (name == "btx_oracle")
    assert "BREAKS PRIVACY" in res["methods"]["btx_oracle"]["privacy"]
    assert res["seed"] == 3 and res["demo"]["quick"] is True
    assert res["config"]["k"] == 12  # the --quick settings reached the harness
    # expert packages of the clients are left in OUT/packages (one folder per client and expert set)
    manifests = list((out_dir / "packages").rglob("manifest.json"))
    assert len(manifests) >= 3


def test_chart_is_a_png(demo_run):
    _, out_dir = demo_run
    head = (out_dir / "results.png").read_bytes()[:8]
    assert head == b"\x89PNG\r\n\x1a\n"


def test_printed_table_matches_results(demo_run):
    out, out_dir = demo_run
    res = json.loads((out_dir / "results.json").read_text())
    lines = out.stdout.splitlines()
    lines = lines[next(i for i, ln in enumerate(lines) if ln.startswith("method ")) :]
    for name, m in res["methods"].items():
        row = [ln for ln in lines if ln.startswith(name + " ") and ln.split()[1].replace(".", "").isdigit()]
        assert len(row) == 1, (name, out.stdout[-2000:])
        assert f"{m['average']:.3f}" in row[0]
        assert ("(breaks privacy)" in row[0]) is (name == "btx_oracle")


def test_selection_table(demo_run):
    # the selection table runs on the full-size split even under --quick: relevance-weighted selections draw
    # far more proxies from the client's own domain than random ones (6 domains: random ~ 1/6)
    out, out_dir = demo_run
    sel = json.loads((out_dir / "results.json").read_text())["selection"]
    assert set(sel) == DOMAINS
    own = {
        m: np.mean([rows[m]["own_domain"] for rows in sel.values()])
        for m in ("dpp", "facility_location", "random")
    }
    assert own["dpp"] > own["random"] + 0.2, own
    assert own["facility_location"] > own["random"] + 0.2, own
    assert "Proxy selection" in out.stdout


def test_bad_arguments(tmp_path):
    out = _demo("--out", str(tmp_path), "--methods", "metamoe,bogus", timeout=60)
    assert out.returncode == 2 and "bogus" in out.stderr
    out = _demo("--out", str(tmp_path), "--seed", "-1", timeout=60)
    assert out.returncode == 2 and "--seed" in out.stderr
    assert not (tmp_path / "results.json").exists()
