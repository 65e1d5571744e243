"""The cosine DPP's C++ strategies (sweep, lazy, auto): the same picks and residual bits as each other, as
the float64 torch path and as Chen et al.'s reference, on every storage type and SIMD path."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import skip_unavailable
from references import dpp_greedy_chen, dpp_kernel

from metamoe.selection import select_dpp
from metamoe.selection.dpp import STRATEGIES, dpp_greedy_cpp

pytestmark = pytest.mark.usefixtures("_needs_cpp")


@pytest.fixture
def _needs_cpp():
    skip_unavailable("cpp")


def clustered(rng, n, d, centers=8, spread=0.3):
    c = rng.standard_normal((centers, d))
    return (c[rng.integers(0, centers, n)] + spread * rng.standard_normal((n, d))).astype(np.float32)


def run(X, r, k, ridge, strategy, eps=1e-12):
    stats = {}
    idx, res = dpp_greedy_cpp(torch.as_tensor(X), r, k, ridge, eps, strategy=strategy, stats=stats)
    return idx, res, stats


@pytest.mark.parametrize(
    "n,d,k,ridge",
    [(300, 16, 40, 1e-3), (257, 37, 60, 0.0), (400, 5, 90, 0.2), (1000, 64, 150, 1e-3), (120, 1, 30, 0.5)],
)
@pytest.mark.parametrize("data", ["random", "clustered"])
def test_strategies_match_chen_and_each_other_bit_for_bit(n, d, k, ridge, data, rng):
    X = rng.standard_normal((n, d)).astype(np.float32) if data == "random" else clustered(rng, n, d)
    r = rng.uniform(0.05, 1.0, n)
    eps = 1e-9 * (1 + ridge)
    ref_idx, ref_res = dpp_greedy_chen(dpp_kernel(X, r, ridge), k, eps=eps)
    out = {s: run(X, r, k, ridge, s, eps) for s in STRATEGIES}
    for s, (idx, res, _) in out.items():
        np.testing.assert_array_equal(idx, ref_idx, err_msg=s)
        np.testing.assert_allclose(res, ref_res, rtol=1e-6, atol=1e-12, err_msg=s)
        np.testing.assert_array_equal(res, out["sweep"][1], err_msg=f"{s} residual bits differ from the sweep")


@pytest.mark.parametrize("storage", ["float16", "bfloat16", "float64"])
def test_lazy_equals_sweep_on_every_storage(storage, rng):
    X = torch.from_numpy(clustered(rng, 3000, 45)).to(getattr(torch, storage))
    r = rng.uniform(0.0, 1.0, 3000)
    sweep = run(X, r, 120, 1e-3, "sweep")
    lazy = run(X, r, 120, 1e-3, "lazy")
    np.testing.assert_array_equal(lazy[0], sweep[0])
    np.testing.assert_array_equal(lazy[1], sweep[1])
    # the same values stored as float32 give the same bits
    f32 = run(X.float(), r, 120, 1e-3, "lazy")
    np.testing.assert_array_equal(f32[0], sweep[0])
    np.testing.assert_array_equal(f32[1], sweep[1])


def test_ties_duplicates_and_equal_relevance_go_to_the_lowest_index(rng):
    base = rng.standard_normal((6, 9)).astype(np.float32)
    X = np.concatenate([base] * 5)  # rows i, i + 6, i + 12, ... are identical
    r = np.ones(len(X))
    for ridge in (0.0, 0.3):
        want = run(X, r, 6, ridge, "sweep")[0]
        assert sorted(want) == list(range(6))  # the first copy of every direction, never a later one
        for s in ("lazy", "auto"):
            np.testing.assert_array_equal(run(X, r, 6, ridge, s)[0], want)
    # with ridge > 0 the copies remain pickable after their directions are used: all strategies agree
    for s in ("lazy", "auto"):
        np.testing.assert_array_equal(run(X, r, 20, 0.3, s)[0], run(X, r, 20, 0.3, "sweep")[0])


def test_zero_relevance_single_candidate_and_rank_exhaustion(rng):
    X = rng.standard_normal((50, 4)).astype(np.float32)
    r = np.zeros(50)
    r[17] = 0.5
    for s in STRATEGIES:
        idx, _, _ = run(X, r, 3, 0.0, s, eps=1e-12)
        np.testing.assert_array_equal(idx, [17])  # everything else has residual 0
    r = rng.uniform(0.1, 1.0, 50)
    for s in STRATEGIES:  # ridge 0: the kernel has rank 4, the greedy stops at 4 picks
        idx, _, _ = run(X, r, 10, 0.0, s, eps=1e-9)
        assert len(idx) == 4
        np.testing.assert_array_equal(idx, run(X, r, 10, 0.0, "sweep", eps=1e-9)[0])


def test_one_row_pool_and_k_equal_n(rng):
    X = rng.standard_normal((1, 7)).astype(np.float32)
    for s in STRATEGIES:
        np.testing.assert_array_equal(run(X, np.ones(1), 1, 0.0, s)[0], [0])
    X = rng.standard_normal((64, 3)).astype(np.float32)
    r = rng.uniform(0.1, 1, 64)
    want = run(X, r, 64, 0.1, "sweep")
    for s in ("lazy", "auto"):
        got = run(X, r, 64, 0.1, s)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        assert sorted(got[0]) == list(range(64))


@pytest.mark.parametrize("data", ["random", "clustered"])
def test_large_pool_lazy_equals_sweep_and_torch_with_less_work(data, rng):
    n, d, k = 60_000, 48, 150
    X = rng.standard_normal((n, d)).astype(np.float32) if data == "random" else clustered(rng, n, d, centers=32)
    r = rng.uniform(0.05, 1.0, n)
    ref = select_dpp(X, k, r, ridge=1e-3, backend="torch", progress=False)  # float64 torch, its own code
    sweep = run(X, r, k, 1e-3, "sweep")
    lazy = run(X, r, k, 1e-3, "lazy")
    np.testing.assert_array_equal(sweep[0], ref.indices)
    np.testing.assert_array_equal(lazy[0], ref.indices)
    np.testing.assert_array_equal(lazy[1], sweep[1])
    np.testing.assert_allclose(np.log(lazy[1]), ref.gains, rtol=1e-9, atol=1e-12)
    # the point of the lazy greedy: spread relevance keeps most candidates below the best residual
    assert sweep[2]["row_dots"] == sum(n - t - 1 for t in range(k))  # one pass after every pick
    assert lazy[2]["row_dots"] < 0.7 * sweep[2]["row_dots"]
    assert lazy[2]["switched_at"] == -1


def test_auto_switches_to_the_sweep_where_lazy_loses_and_keeps_the_picks(rng):
    # small D and equal relevance: near-uniform residuals, every candidate updated on most picks
    X = rng.standard_normal((40_000, 8)).astype(np.float32)
    r = np.ones(40_000)
    sweep = run(X, r, 40, 1e-3, "sweep")
    auto = run(X, r, 40, 1e-3, "auto")
    assert auto[2]["switched_at"] >= 4
    np.testing.assert_array_equal(auto[0], sweep[0])
    np.testing.assert_array_equal(auto[1], sweep[1])


def test_select_dpp_reports_the_strategy(rng):
    X = clustered(rng, 2000, 24)
    r = rng.uniform(0.05, 1, 2000)
    sels = {s: select_dpp(X, 50, r, ridge=1e-3, backend="cpp", strategy=s, progress=False) for s in STRATEGIES}
    assert sels["sweep"].info["strategy"] == "sweep"
    assert sels["lazy"].info["strategy"] == "lazy"
    assert sels["lazy"].info["row_updates"] > 0
    for s in STRATEGIES:
        np.testing.assert_array_equal(sels[s].indices, sels["sweep"].indices)
        json.dumps(sels[s].info)  # the stats stay JSON-writable


def test_strategy_errors_name_the_argument(rng):
    X = rng.standard_normal((50, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="strategy must be one of 'auto', 'lazy', 'sweep', got 'fast'"):
        select_dpp(X, 3, strategy="fast", progress=False)
    with pytest.raises(ValueError, match="strategy='lazy' needs the cpp backend"):
        select_dpp(X, 3, strategy="lazy", backend="torch", progress=False)
    with pytest.raises(ValueError, match="the rbf kernel takes 'auto'"):
        select_dpp(X, 3, kernel="rbf", strategy="sweep", progress=False)
    with pytest.raises(ValueError, match="strategy must be 'auto', 'lazy' or 'sweep', got 'x'"):
        dpp_greedy_cpp(torch.from_numpy(X), np.ones(50), 3, 0.0, 0.0, strategy="x")
    # the torch backend sweeps: 'sweep' and 'auto' are accepted there
    a = select_dpp(X, 3, strategy="sweep", backend="torch", progress=False)
    b = select_dpp(X, 3, strategy="auto", backend="cpp", progress=False)
    np.testing.assert_array_equal(a.indices, b.indices)


_SIMD_SCRIPT = """
import sys, numpy as np, torch
from metamoe import _C
from metamoe.selection.dpp import dpp_greedy_cpp
data = np.load(sys.argv[1])
out = {"simd": np.array(_C.dpp_simd())}
for name in ("f32", "f16", "bf16", "f64"):
    X = torch.from_numpy(data["X"][: data["n"]])
    X = {"f32": X, "f16": X.half(), "bf16": X.bfloat16(), "f64": X.double()}[name]
    for s in ("sweep", "lazy"):
        idx, res = dpp_greedy_cpp(X, data["r"], int(data["k"]), 1e-3, 1e-12, strategy=s)
        out[name + s + "_idx"], out[name + s + "_res"] = idx, res
np.savez(sys.argv[2], **out)
"""


def test_every_simd_path_gives_the_same_bits(tmp_path, rng):
    # D = 61: blocks of 8 plus a tail of 5; each path (AVX-512 when the CPU has it, AVX, portable C++)
    n, d, k = 2500, 61, 70
    X = clustered(rng, n, d)
    np.savez(tmp_path / "in.npz", X=X, r=rng.uniform(0.05, 1, n), n=n, k=k)
    results = {}
    for cap in ("", "avx", "generic"):
        env = dict(os.environ, METAMOE_CPU_SIMD=cap)
        out = tmp_path / f"out_{cap or 'native'}.npz"
        subprocess.run([sys.executable, "-c", _SIMD_SCRIPT, str(tmp_path / "in.npz"), str(out)], env=env, check=True)
        results[cap] = dict(np.load(out))
    assert str(results["generic"]["simd"]) == "generic"
    native = results[""]
    for cap, res in results.items():
        for key, val in native.items():
            if key != "simd":
                np.testing.assert_array_equal(res[key], val, err_msg=f"{cap or 'native'}: {key}")
    for name in ("f16", "bf16", "f64"):  # and the storages agree on the picks
        np.testing.assert_array_equal(native[name + "lazy_idx"], native[name + "sweep_idx"])


def test_auto_sweeps_a_memmap_larger_than_free_memory(tmp_path, rng, monkeypatch):
    import metamoe.selection.dpp as dpp_mod

    X = clustered(rng, 3000, 16).astype(np.float16)
    np.save(tmp_path / "x.npy", X)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    r = rng.uniform(0.05, 1, 3000)
    roomy = select_dpp(mm, 40, r, ridge=1e-3, backend="cpp", progress=False)
    assert roomy.info["strategy"].startswith("lazy")
    monkeypatch.setattr(dpp_mod, "available_bytes", lambda device: (X.nbytes // 2, "test"))
    tight = select_dpp(mm, 40, r, ridge=1e-3, backend="cpp", progress=False)
    assert tight.info["strategy"] == "sweep" and "memmap larger than the free memory" in tight.info["strategy_note"]
    in_memory = select_dpp(np.array(mm), 40, r, ridge=1e-3, backend="cpp", progress=False)
    assert in_memory.info["strategy"].startswith("lazy")
    np.testing.assert_array_equal(tight.indices, roomy.indices)
    np.testing.assert_array_equal(tight.gains, roomy.gains)
