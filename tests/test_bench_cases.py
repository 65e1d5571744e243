"""benchmarks/cases.py is consistent, every bench script's --target parses, and time_fn's CUDA-graph mode
refuses what it cannot do (on a CPU machine)."""

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

from benchmarks import cases  # noqa: E402
from benchmarks import targets as tg  # noqa: E402

TARGET_SCRIPTS = {
    "router_topk": "bench_router_topk",
    "moe": "bench_moe_experts",
    "patch_moe": "bench_patch_moe",
    "dpp": "bench_dpp",
    "facility_location": "bench_facility_location",
    "knn_graph": "bench_knn_graph",
}


def test_every_op_has_shapes_peers_and_a_script():
    assert set(cases.CASES) == set(TARGET_SCRIPTS)
    for op, c in cases.CASES.items():
        assert c.op == op
        assert c.quick and c.gpu and c.target, op
        assert c.reference in c.peers, op
        assert (ROOT / c.script).is_file(), c.script
        names = [t["case"] for t in c.target]
        assert len(names) == len(set(names)), f"{op}: duplicate target case names"


def test_issue_target_shapes_are_defined():
    assert dict(cases.ROUTER.target_case("router-t16k-e128-k8")) == {
        "case": "router-t16k-e128-k8", "T": 16384, "E": 128, "k": 8, "dtype": "bf16"}
    mix = cases.MOE.target_case("moe-mixtral-t16k")
    assert (mix["E"], mix["k"], mix["d"], mix["f"], mix["T"], mix["dtype"]) == (8, 2, 4096, 14336, 16384, "bf16")
    qwen = cases.MOE.target_case("moe-qwen3-t16k")
    assert (qwen["E"], qwen["k"], qwen["d"], qwen["f"], qwen["T"]) == (128, 8, 2048, 768, 16384)
    dpp = cases.DPP.target_case("dpp-n1m-d768-k10000")
    assert (dpp["N"], dpp["D"], dpp["k"]) == (1_000_000, 768, 10_000)
    assert all(0 < k < dpp["k"] for k in dpp["peer_k"].values())
    fl = cases.FACILITY_LOCATION.target_case("fl-n1m-k50-k10000")
    assert (fl["n"], fl["neighbors"], fl["k"]) == (1_000_000, 50, 10_000)
    knn = cases.KNN_GRAPH.target_case("knn-n1m-d768-k50")
    assert (knn["N"], knn["D"], knn["K"]) == (1_000_000, 768, 50)
    for case, (d, f, E, k) in (("patch-moe-mixtral-t16k", (4096, 14336, 8, 2)),
                               ("patch-moe-qwen3-t16k", (2048, 768, 128, 8))):
        pm = cases.PATCH_MOE.target_case(case)
        got = (pm["d"], pm["f"], pm["E"], pm["k"], pm["layers"], pm["T"], pm["dtype"])
        assert got == (d, f, E, k, 2, 16384, "bf16"), case
        assert pm["batch"] * pm["seq"] == pm["T"]
    assert {"hf-eager", "hf-grouped_mm", "metamoe"} <= set(cases.PATCH_MOE.peers)
    for peer in ("hf-eager", "hf-grouped_mm", "torch-grouped_mm", "metamoe-torch", "metamoe-triton"):
        assert peer in cases.MOE.peers
    assert {"torch-eager", "metamoe-torch", "metamoe-triton"} <= set(cases.ROUTER.peers)
    with pytest.raises(KeyError, match="router-t16k-e128-k8"):
        cases.ROUTER.target_case("nope")


def test_every_target_reads_a_target_case_of_cases():
    known = {op.csv: {t["case"] for t in op.target} for op in cases.CASES.values()}
    for t in tg.TARGETS:
        assert t.csv in known, t.name
        assert t.where["target_case"] in known[t.csv], t.name


def test_expand_is_the_grid_product():
    assert cases.expand({"a": [1, 2], "b": [3]}) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]
    assert len(cases.ROUTER.gpu) == 4 * 4 * 2


@pytest.mark.parametrize("op", sorted(TARGET_SCRIPTS))
def test_target_flag_parses(op):
    mod = importlib.import_module(f"benchmarks.{TARGET_SCRIPTS[op]}")
    if hasattr(mod, "build_parser"):
        args = mod.build_parser().parse_args(["--target", "--results-dir", "/tmp/x"])
        assert args.target and str(args.results_dir) == "/tmp/x"
    # every script refuses --target without a CUDA device: exit code 2 and one line naming the flag
    with pytest.raises(SystemExit) as exc:
        mod.main(["--target", "--device", "cpu", "--results-dir", "/tmp/x"])
    assert exc.value.code == 2


def test_target_refusal_names_the_flag(capsys):
    mod = importlib.import_module("benchmarks.bench_router_topk")
    with pytest.raises(SystemExit):
        mod.main(["--target", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--target" in err[0] and "CUDA" in err[0]


@pytest.mark.parametrize("script", sorted(p.stem for p in (ROOT / "benchmarks").glob("bench_*.py")))
def test_every_bench_script_takes_results_dir(script):
    text = (ROOT / "benchmarks" / f"{script}.py").read_text()
    assert "common_parser(" in text or "add_results_dir(" in text, script


def test_time_fn_cuda_graph_refuses_a_cpu_device():
    from benchmarks.utils import time_fn

    with pytest.raises(ValueError, match=r"cuda_graph=True\) needs a CUDA device, got device='cpu'"):
        time_fn(lambda: None, device="cpu", cuda_graph=True)
    with pytest.raises(ValueError, match="takes no setup"):
        time_fn(lambda: None, device="cuda", cuda_graph=True, setup=lambda: None)
    with pytest.raises(ValueError, match="graph_calls must be an int >= 1"):
        time_fn(lambda: None, device="cuda", cuda_graph=True, graph_calls=0)
    # the per-call mode still runs on the CPU
    calls = []
    t = time_fn(lambda: calls.append(1), device="cpu", warmup=2, rep=3)
    assert t.n == 3 and len(calls) == 5


def test_clustered_torch_is_seeded():
    import torch

    a = cases.clustered_torch(50, 8, clusters=4)
    b = cases.clustered_torch(50, 8, clusters=4)
    assert a.shape == (50, 8) and a.dtype == torch.float32 and torch.equal(a, b)
    assert not torch.equal(a, cases.clustered_torch(50, 8, clusters=4, seed=1))
    with pytest.raises(ValueError, match="n >= 1"):
        cases.clustered_torch(0, 8)
