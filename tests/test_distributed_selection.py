"""Sharded selection on torch.distributed (2 gloo processes on the CPU) against the single-process selectors.

One ``torch.multiprocessing.spawn`` of 2 ranks runs every sharded case (module fixture); the tests compare
its outputs with select_dpp / select_facility_location in this process. The CLI is run under torchrun,
and the dead-rank tests start two ranks by hand (RANK/WORLD_SIZE/MASTER_PORT) so that no launcher can
tear the survivor down for us: the survivor must fail by itself, within its --timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from conftest import free_port, rank_env, run_beside_dead_peer  # noqa: E402

from metamoe.selection import DppRankWarning, select_dpp, select_facility_location  # noqa: E402
from metamoe.selection.distributed import shard_range  # noqa: E402

PY = sys.executable
WORLD = 2


# --------------------------------------------------------------------------- data (same on every rank)


def dpp_cases():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((301, 16)).astype(np.float32)
    r_ties = np.round(rng.random(301), 1)  # many exact ties in relevance
    Xd = X.copy()
    Xd[150] = Xd[10]  # a duplicate in the other shard
    r_cross = np.full(301, 0.5)
    r_cross[[10, 150]] = 1.0  # the best start value is tied between rank 0 (10) and rank 1 (150)
    return {
        # name: (X, relevance, cut, ridge, k)
        "ridge0_unaligned": (X, r_ties, 121, 0.0, 24),  # rank <= D = 16: stops early, warns
        "ridge_aligned": (X, r_ties, 128, 0.05, 60),  # k > D, 64-row boundary: bit-identical residuals
        "ridge_unaligned": (X, r_ties, 121, 0.05, 60),
        "tie_across_ranks": (Xd, r_cross, 100, 0.01, 30),
        "float16_shard": (X.astype(np.float16), None, 77, 0.02, 40),
    }


def fl_private_case():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((301, 16)).astype(np.float32)
    X[250] = X[20]  # exact duplicate across the shards: a tie to the lowest global index
    P = (rng.standard_normal((37, 16)) + 0.3).astype(np.float32)
    w = rng.random(37)
    return X, P, w, 121, 25


def clustered_case():
    rng = np.random.default_rng(2)
    centers = rng.standard_normal((12, 16)) * 3.0
    lab = rng.integers(0, 12, 1200)
    X = (centers[lab] + rng.standard_normal((1200, 16))).astype(np.float32)
    return X, 600, 20


# --------------------------------------------------------------------------- the 2-rank run


def _worker(rank: int, port: int, out_dir: str):
    os.environ.update(rank_env(rank, port, WORLD))
    torch.set_num_threads(1)
    from metamoe.selection.distributed import (
        init_distributed,
        select_dpp_sharded,
        select_facility_location_greedi,
        select_facility_location_private_sharded,
    )

    init_distributed(timeout_s=60)
    res = {}
    for name, (X, r, cut, ridge, k) in dpp_cases().items():
        a, b = (0, cut) if rank == 0 else (cut, X.shape[0])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sel = select_dpp_sharded(X[a:b], k, None if r is None else r[a:b], ridge=ridge)
        res[name] = (sel.indices, sel.gains, [w.category.__name__ for w in caught])
    X, P, w, cut, k = fl_private_case()
    a, b = (0, cut) if rank == 0 else (cut, X.shape[0])
    sel = select_facility_location_private_sharded(X[a:b], P, k, weights=w)
    res["fl_private"] = (sel.indices, sel.gains, sel.objective)
    X, cut, k = clustered_case()
    a, b = (0, cut) if rank == 0 else (cut, X.shape[0])
    for graph in ("dense", "knn"):
        sel = select_facility_location_greedi(X[a:b], k, graph=graph, n_neighbors=20)
        res[f"greedi_{graph}"] = (sel.indices, sel.gains, sel.objective)
    sel = select_facility_location_greedi(X[a:b], k, graph="dense", max_dense_bytes=0)  # round 2 streamed
    res["greedi_dense_streamed"] = (sel.indices, sel.gains, sel.objective, sel.info["round2_similarities"])
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    import torch.multiprocessing as mp

    out = str(tmp_path_factory.mktemp("dist"))
    mp.spawn(_worker, args=(free_port(), out), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def _single_dpp(X, r, ridge, k, backend):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sel = select_dpp(X, k, r, ridge=ridge, backend=backend, progress=False)
    return sel, [w.category.__name__ for w in caught]


# --------------------------------------------------------------------------- DPP


@pytest.mark.parametrize("name", list(dpp_cases()))
def test_sharded_dpp_picks_equal_single_process(sharded, name):
    X, r, cut, ridge, k = dpp_cases()[name]
    idx0, gains0, warn0 = sharded[0][name]
    idx1, gains1, warn1 = sharded[1][name]
    np.testing.assert_array_equal(idx0, idx1)  # every rank returns the same selection
    np.testing.assert_array_equal(gains0, gains1)
    ref, ref_warn = _single_dpp(X, r, ridge, k, "torch")
    np.testing.assert_array_equal(idx0, ref.indices, err_msg=f"{name}: picks differ from select_dpp(torch)")
    np.testing.assert_allclose(gains0, ref.gains, rtol=0, atol=1e-12)
    assert (DppRankWarning.__name__ in warn0) == (DppRankWarning.__name__ in ref_warn)
    cpp, _ = _single_dpp(X, r, ridge, k, "cpp")
    np.testing.assert_array_equal(idx0, cpp.indices, err_msg=f"{name}: picks differ from select_dpp(cpp)")
    if ridge > 0:
        assert len(idx0) == k
        assert (idx0 < cut).any() and (idx0 >= cut).any(), "the picks should span both shards"


def test_sharded_dpp_stops_at_rank_and_warns(sharded):
    idx, _, warn = sharded[0]["ridge0_unaligned"]
    assert len(idx) == 16  # cosine kernel with ridge 0: rank <= D = 16
    assert DppRankWarning.__name__ in warn
    assert DppRankWarning.__name__ in sharded[1]["ridge0_unaligned"][2]


def test_sharded_dpp_aligned_shards_are_bit_identical(sharded):
    X, r, cut, ridge, k = dpp_cases()["ridge_aligned"]
    assert cut % 64 == 0
    ref, _ = _single_dpp(X, r, ridge, k, "torch")
    np.testing.assert_array_equal(sharded[0]["ridge_aligned"][1], ref.gains)  # exact, not allclose


def test_tie_across_ranks_goes_to_lowest_global_index(sharded):
    idx, _, _ = sharded[0]["tie_across_ranks"]
    assert idx[0] == 10  # index 150 (rank 1) has the same value; the duplicate is never picked second
    assert 150 not in idx[:2].tolist()


# --------------------------------------------------------------------------- facility location


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_fl_private_sharded_equals_single_process(sharded, backend):
    X, P, w, cut, k = fl_private_case()
    idx0, g0, obj0 = sharded[0]["fl_private"]
    idx1, g1, obj1 = sharded[1]["fl_private"]
    np.testing.assert_array_equal(idx0, idx1)
    ref = select_facility_location(X, k, ground=P, weights=w, graph="dense", backend=backend, progress=False)
    np.testing.assert_array_equal(idx0, ref.indices)
    if backend == "cpp":  # same terms, same order (increasing ground index), no FMA: the same bits
        np.testing.assert_array_equal(g0, ref.gains)
    else:
        np.testing.assert_allclose(g0, ref.gains, rtol=1e-12)
    assert obj0 == pytest.approx(ref.objective, rel=1e-12)
    assert (idx0 < cut).any() and (idx0 >= cut).any()
    # independent float64 check of the objective of the sharded picks
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    Pn = P / np.linalg.norm(P, axis=1, keepdims=True)
    cov = np.maximum(0.0, (Pn.astype(np.float64) @ Xn[idx0].T.astype(np.float64)).max(1))
    assert obj0 == pytest.approx(float(w @ cov), rel=1e-5)


@pytest.mark.parametrize("graph", ["dense", "knn"])
def test_greedi_objective_close_to_single_process(sharded, graph):
    X, cut, k = clustered_case()
    idx0, _, obj0 = sharded[0][f"greedi_{graph}"]
    np.testing.assert_array_equal(idx0, sharded[1][f"greedi_{graph}"][0])
    assert len(idx0) == k and len(set(idx0.tolist())) == k
    ref = select_facility_location(X, k, graph="dense", progress=False)
    Xn = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float64)
    f = lambda A: float(np.maximum(0.0, (Xn @ Xn[A].T).max(1)).sum())  # noqa: E731
    assert obj0 == pytest.approx(f(idx0), rel=1e-5)  # the reported objective is on the whole pool
    ratio = obj0 / ref.objective
    assert ratio >= 0.98, f"GreeDi ({graph}) reached {ratio:.4f} of the single-process objective"


def test_greedi_streamed_round_two_equals_in_memory(sharded):
    """Round 2 without the N_rank x |U| matrix (recomputed from the shard block by block) picks the same."""
    idx, gains, obj = sharded[0]["greedi_dense"]
    for r in range(WORLD):
        s_idx, s_gains, s_obj, mode = sharded[r]["greedi_dense_streamed"]
        assert mode == "streamed"
        np.testing.assert_array_equal(s_idx, idx)
        # the float32 similarities come from differently shaped products (float32 rounding, ~1e-7 relative)
        np.testing.assert_allclose(s_gains, gains, rtol=1e-5, atol=0)
        assert s_obj == pytest.approx(obj, rel=1e-5)


# --------------------------------------------------------------------------- shards


def test_shard_range_covers_and_aligns():
    for n, world in ((501, 2), (200_000, 4), (64, 3), (1, 2)):
        ranges = [shard_range(n, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(ranges[i][1] == ranges[i + 1][0] for i in range(world - 1))
        assert all(a % 64 == 0 or a == n for a, _ in ranges)
    with pytest.raises(ValueError, match="rank"):
        shard_range(10, 2, 2)


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def npy(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(3)
    np.save(d / "P.npy", (rng.standard_normal((40, 16)) + 0.5).astype(np.float32))
    np.save(d / "X.npy", rng.standard_normal((501, 16)).astype(np.float32))
    return d


@pytest.mark.parametrize("method,extra", [("dpp", ["--ridge", "0.01", "--backend", "torch"]),
                                          ("fl-private", ["--graph", "dense"])])
def test_cli_torchrun_writes_the_single_process_json(npy, method, extra):
    from metamoe.selection.cli import main

    common = ["--private", str(npy / "P.npy"), "--public", str(npy / "X.npy"), "--k", "30", "--method", method,
              "--no-progress", *extra]
    single = npy / f"single_{method}.json"
    assert main([*common, "--out", str(single)]) == 0
    out = npy / f"dist_{method}.json"
    env = rank_env(0, 0, WORLD)
    for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(v)
    proc = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
                           "-m", "metamoe", "select", "--distributed", "--timeout", "60", *common, "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = json.loads(single.read_text()), json.loads(out.read_text())
    assert a["indices"] == b["indices"]
    np.testing.assert_allclose(b["gains"], a["gains"], rtol=0, atol=1e-12)
    assert b["objective"] == pytest.approx(a["objective"], rel=1e-12, abs=1e-12)
    assert (a["method"], a["k"]) == (b["method"], b["k"])
    assert b["backend"] == "torch-distributed" and b["info"]["world_size"] == WORLD
    assert proc.stdout.count("wrote ") == 1  # rank 0 alone writes


def test_cli_distributed_rejects_unsharded_options(npy):
    from metamoe.selection.cli import main

    base = ["--private", str(npy / "P.npy"), "--public", str(npy / "X.npy"), "--k", "5", "--distributed",
            "--out", str(npy / "x.json")]
    assert main([*base, "--method", "fl-private"]) == 2  # needs --graph dense
    assert main([*base, "--kernel", "rbf"]) == 2


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names are read from /proc")
def test_finish_joins_the_gloo_threads_after_an_optimizer_was_imported():
    """A torch.optim import after init_distributed (the relevance classifier trains with Adam) must not keep the
    default group alive past finish(): its gloo threads would race the interpreter's exit (rank aborts)."""
    code = ("import os, torch; from metamoe.utils.distributed import init_distributed, finish; init_distributed(); "
            "import torch._dynamo; torch.optim.Adam([torch.zeros(2, requires_grad=True)]); "
            "tasks = lambda: os.listdir('/proc/self/task'); "
            "names = lambda: [open(f'/proc/self/task/{t}/comm').read().strip() for t in tasks()]; "
            "before = names(); finish(); print(before, names())")
    proc = subprocess.run([PY, "-c", code], env=rank_env(0, free_port(), 1), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = proc.stdout.strip().split("] [")
    assert "gloo" in before  # the group had its threads
    assert "gloo" not in after, proc.stdout


# --------------------------------------------------------------------------- a dead rank


@pytest.mark.parametrize("fate", ["exits", "hangs"])
def test_dead_rank_makes_the_survivor_exit_with_an_error(npy, fate):
    peer = ("import os, sys, time; from metamoe.selection.distributed import init_distributed; "
            f"init_distributed(timeout_s=5); {'sys.exit(3)' if fate == 'exits' else 'time.sleep(120)'}")
    code, err, took = run_beside_dead_peer(
        [PY, "-m", "metamoe", "select", "--distributed", "--timeout", "5", "--private", str(npy / "P.npy"),
         "--public", str(npy / "X.npy"), "--k", "10", "--ridge", "0.01", "--no-progress",
         "--out", str(npy / f"dead_{fate}.json")],
        peer)
    assert code == 2, err[-3000:]
    assert "metamoe select (rank 0 of 2): error: a collective failed: another rank died" in err
    assert took < 45
    assert not (npy / f"dead_{fate}.json").exists()
