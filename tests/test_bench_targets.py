"""benchmarks/targets.py on synthetic CSV rows: the latest matching row decides, pass/short/not measured/invalid."""

import csv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

from benchmarks import targets as tg  # noqa: E402
from benchmarks.utils import append_csv  # noqa: E402

ENV = {"timestamp": "2026-01-01T00:00:00Z", "device": "NVIDIA H200", "torch": "2.11", "triton": "3.6",
       "metamoe": "0", "commit": "abc"}


def router_row(timing="graph", impl="metamoe-triton", median_us=12.0, vs_eager=4.0, check_ok=True, note=""):
    return {"op": "router_topk", "mode": "fwd", "impl": impl, "timing": timing, "T": 16384, "E": 128, "k": 8,
            "dtype": "bfloat16", "check_ok": check_ok, "note": note, "target_case": "router-t16k-e128-k8",
            "median_us": median_us, "vs_eager": vs_eager}


def by_name(rows):
    return {r["target"]: r for r in rows}


def test_empty_folder_is_not_measured(tmp_path):
    rows = tg.summarize(tmp_path)
    assert len(rows) == len(tg.TARGETS)
    assert {r["status"] for r in rows} == {"not measured"}
    assert all(r["value"] is None for r in rows)


def test_router_pass_short_and_latest_row_wins(tmp_path):
    append_csv("router_topk", [router_row(median_us=40.0, vs_eager=1.5), router_row(timing="call", median_us=5.0)],
               ENV, tmp_path)
    got = by_name(tg.summarize(tmp_path))
    assert got["router fwd, CUDA graph"]["status"] == "short"  # the per-call row is not the graph figure
    assert got["router fwd, CUDA graph"]["value"] == 40.0
    assert got["router fwd vs torch eager, CUDA graph"]["status"] == "short"
    append_csv("router_topk", [router_row(median_us=14.5, vs_eager=3.2)], ENV, tmp_path)
    got = by_name(tg.summarize(tmp_path))
    assert (got["router fwd, CUDA graph"]["status"], got["router fwd, CUDA graph"]["value"]) == ("pass", 14.5)
    assert got["router fwd vs torch eager, CUDA graph"]["status"] == "pass"
    assert got["router fwd, CUDA graph"]["device"] == "NVIDIA H200"


def test_threshold_is_inclusive():
    t = tg.Target("t", 0, "x", {"a": "1"}, "m", "<=", 15.0)
    assert t.meets(15.0) and not t.meets(15.01)
    t = tg.Target("t", 0, "x", {"a": "1"}, "m", ">=", 3.0)
    assert t.meets(3.0) and not t.meets(2.99)


def test_row_without_a_figure_is_not_measured_with_its_note(tmp_path):
    row = router_row(median_us="", vs_eager="", note="not capturable in a CUDA graph: RuntimeError: sync")
    append_csv("router_topk", [row], ENV, tmp_path)
    got = by_name(tg.summarize(tmp_path))["router fwd, CUDA graph"]
    assert got["status"] == "not measured"
    assert "not capturable" in got["note"] and "median_us" in got["note"]


def test_failed_check_is_invalid_whatever_the_speed(tmp_path):
    append_csv("router_topk", [router_row(median_us=1.0, check_ok=False)], ENV, tmp_path)
    got = by_name(tg.summarize(tmp_path))["router fwd, CUDA graph"]
    assert got["status"] == "invalid" and "check_ok" in got["note"]


def test_moe_and_selection_targets(tmp_path):
    base = {"op": "moe_experts", "impl": "metamoe-triton", "check_ok": True}
    append_csv("moe", [
        {**base, "mode": "fwd", "target_case": "moe-mixtral-t16k", "TFLOP/s": 600.0},
        {**base, "mode": "fwd", "target_case": "moe-qwen3-t16k", "TFLOP/s": 300.0},
        {**base, "mode": "fwd+bwd", "target_case": "moe-mixtral-t16k", "vs_torch_grouped_mm": 1.4, "vs_loop": 12.0},
        {**base, "mode": "fwd", "impl": "hf-eager", "target_case": "moe-qwen3-t16k", "TFLOP/s": 999.0},
    ], ENV, tmp_path)
    append_csv("dpp", [{"backend": "cuda", "target_case": "dpp-n1m-d768-k10000", "median_s": 8.0,
                        "picks_identical": True},
                       {"backend": "torch", "target_case": "dpp-n1m-d768-k10000", "median_s": 1.0,
                        "picks_identical": True}], ENV, tmp_path)
    append_csv("facility_location", [{"backend": "cuda", "optimizer": "lazy", "target_case": "fl-n1m-k50-k10000",
                                      "median_s": 1.2, "same_picks_as_torch": True}], ENV, tmp_path)
    append_csv("knn_graph", [{"method": "torch-exact", "target_case": "knn-n1m-d768-k50", "median_s": 45.0,
                              "check_ok": False}], ENV, tmp_path)
    got = by_name(tg.summarize(tmp_path))
    assert got["MoE fwd Mixtral"]["status"] == "pass"
    assert got["MoE fwd Qwen3-30B-A3B"]["status"] == "short"  # the hf-eager row is another impl
    assert got["MoE fwd+bwd Mixtral vs torch._grouped_mm"]["status"] == "pass"
    assert got["MoE fwd+bwd Mixtral vs per-expert loop"]["status"] == "pass"
    assert got["MoE fwd+bwd Qwen3 vs per-expert loop"]["status"] == "not measured"
    assert (got["DPP N=1M D=768 k=10000"]["status"], got["DPP N=1M D=768 k=10000"]["value"]) == ("pass", 8.0)
    assert got["facility location 1M K=50 k=10000"]["status"] == "short"
    assert got["exact kNN graph 1M x 768 K=50"]["status"] == "invalid"


def test_markdown_table(tmp_path):
    append_csv("router_topk", [router_row(median_us=14.0, note="a | b")], ENV, tmp_path)
    text = tg.render_markdown(tg.summarize(tmp_path))
    lines = text.splitlines()
    assert lines[0].startswith("| target |") and lines[1].startswith("|---|")
    assert len([ln for ln in lines if ln.startswith("| ")]) == 1 + len(tg.TARGETS)
    row = next(ln for ln in lines if ln.startswith("| router fwd, CUDA graph |"))
    assert "| 14 |" in row and "| <= 15 us |" in row and "| pass |" in row and "a / b" in row
    assert "2 pass" in text and f"{len(tg.TARGETS) - 2} not measured" in text


def test_reads_a_plain_csv_and_rejects_bad_targets(tmp_path):
    with (tmp_path / "knn_graph.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method", "target_case", "median_s", "check_ok"])
        w.writeheader()
        w.writerow({"method": "torch-exact", "target_case": "knn-n1m-d768-k50", "median_s": "nan", "check_ok": "True"})
    got = by_name(tg.summarize(tmp_path))["exact kNN graph 1M x 768 K=50"]
    assert got["status"] == "not measured"
    with pytest.raises(ValueError, match="comparison"):
        tg.Target("t", 0, "x", {"a": "1"}, "m", "<", 1.0)
    with pytest.raises(ValueError, match="where"):
        tg.Target("t", 0, "x", {}, "m", "<=", 1.0)


def test_cli_prints_the_table(tmp_path, capsys):
    assert tg.main(["--results-dir", str(tmp_path)]) == 0
    assert "| target |" in capsys.readouterr().out
