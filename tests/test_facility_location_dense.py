"""graph="dense" facility location computed on the fly (metamoe.selection.facility_location_dense), against a
float64 NumPy greedy, the materialised path and naive greedy.

DENSE_MATERIALIZE_PAIRS = 0 forces the on-the-fly path at test sizes; DENSE_BLOCKS = 16 x 16 forces several
candidate tiles and ground blocks (and a padded last tile / block) on small problems.
"""

import math

import numpy as np
import pytest
import torch
from conftest import skip_unavailable
from references import facility_location_greedy_naive, facility_location_value

import metamoe.selection.facility_location as fl_mod
import metamoe.selection.facility_location_dense as dense_mod
from metamoe.selection import select_facility_location

CPU_BACKENDS = ["cpp", "torch"]
EXACT = ["lazy", "naive"]


def _cosine(A, B):
    A = np.asarray(A, np.float64)
    B = np.asarray(B, np.float64)
    A = A / np.linalg.norm(A, axis=1, keepdims=True)
    B = B / np.linalg.norm(B, axis=1, keepdims=True)
    return A @ B.T


def _X(rng, n=12, d=3):
    return rng.standard_normal((n, d)).astype(np.float32)



@pytest.fixture
def on_the_fly(monkeypatch):
    monkeypatch.setattr(fl_mod, "DENSE_MATERIALIZE_PAIRS", 0)


@pytest.fixture
def tiny_blocks(monkeypatch):
    monkeypatch.setattr(dense_mod, "DENSE_BLOCKS", {"cpu": (16, 16), "cuda": (16, 16)})


@pytest.mark.parametrize("optimizer", EXACT)
@pytest.mark.parametrize("ground", [False, True])
@pytest.mark.parametrize("blocks", ["default", "tiny"])
def test_dense_on_the_fly_matches_float64_reference(optimizer, ground, blocks, on_the_fly, rng, request):
    if blocks == "tiny":
        request.getfixturevalue("tiny_blocks")
    X = rng.standard_normal((101, 6)).astype(np.float32)
    P = rng.standard_normal((53, 6)).astype(np.float32) if ground else None
    w = rng.uniform(0.0, 2.0, 53 if ground else 101)
    w[::5] = 0.0
    sel = select_facility_location(X, 15, ground=P, weights=w, graph="dense", optimizer=optimizer, progress=False)
    assert sel.backend == "torch" and sel.info["graph"] == "dense (on the fly)"
    if blocks == "tiny":
        assert (sel.info["tile"], sel.info["block"]) == (16, 16)
    S = _cosine(X if P is None else P, X)  # independent float64 similarities
    ref_idx, ref_gains, ref_obj = facility_location_greedy_naive(S, 15, w)
    np.testing.assert_array_equal(sel.indices, ref_idx)
    np.testing.assert_allclose(sel.gains, ref_gains, rtol=1e-5, atol=1e-6)
    assert sel.objective == pytest.approx(ref_obj, rel=1e-6)
    assert sel.objective == pytest.approx(facility_location_value(S, sel.indices, w), rel=1e-6)


@pytest.mark.parametrize("ground", [False, True])
def test_dense_on_the_fly_lazy_is_bitwise_naive(ground, on_the_fly, tiny_blocks, rng):
    # the stale-bound argument is exact in floating point: same picks and the very same float64 gains
    X = rng.standard_normal((150, 7)).astype(np.float32)
    P = rng.standard_normal((70, 7)).astype(np.float32) if ground else None
    w = rng.uniform(0.2, 1.0, 70 if ground else 150)
    a = select_facility_location(X, 40, ground=P, weights=w, graph="dense", optimizer="lazy", progress=False)
    b = select_facility_location(X, 40, ground=P, weights=w, graph="dense", optimizer="naive", progress=False)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.gains, b.gains)
    assert a.objective == b.objective
    # lazy evaluated far fewer candidates than naive's k passes over the pool
    assert a.info["candidate_evaluations"] < b.info["candidate_evaluations"]


@pytest.mark.parametrize("ground", [False, True])
def test_dense_on_the_fly_ties_from_duplicated_rows_and_k_equals_n(ground, on_the_fly, tiny_blocks, rng):
    # 70 pool rows drawn (with repeats) from 20 distinct ones: duplicates sit in different tiles and at
    # different positions; their gains tie exactly and the lowest index must win, down to k = N
    A = rng.standard_normal((20, 6)).astype(np.float32)
    idx = rng.integers(0, 20, 70)
    X = A[idx]
    Sa = _cosine(A, A)
    if ground:
        B = rng.standard_normal((9, 6)).astype(np.float32)
        gi = rng.integers(0, 9, 37)
        P = B[gi]
        S = _cosine(B, A)[np.ix_(gi, idx)]
    else:
        P = None
        S = Sa[np.ix_(idx, idx)]  # duplicated columns are bitwise equal in the reference too
    w = rng.choice([0.5, 1.0, 2.0], size=S.shape[0])
    for optimizer in EXACT:
        sel = select_facility_location(X, 70, ground=P, weights=w, graph="dense", optimizer=optimizer, progress=False)
        ref_idx, ref_gains, ref_obj = facility_location_greedy_naive(S, 70, w)
        np.testing.assert_array_equal(sel.indices, ref_idx)
        np.testing.assert_allclose(sel.gains, ref_gains, rtol=1e-5, atol=1e-5)
        assert sel.objective == pytest.approx(ref_obj, rel=1e-6)


def test_dense_on_the_fly_orthogonal_ties(on_the_fly, tiny_blocks):
    X = np.concatenate([np.eye(4, dtype=np.float32)] * 9)  # 36 rows, exact similarities 0 / 1
    for optimizer in EXACT:
        sel = select_facility_location(X, 36, graph="dense", optimizer=optimizer, progress=False)
        np.testing.assert_array_equal(sel.indices, np.arange(36))
        np.testing.assert_array_equal(sel.gains, [9.0] * 4 + [0.0] * 32)
        assert sel.objective == 36.0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("ground", [False, True])
@pytest.mark.parametrize("blocks", ["default", "tiny"])
def test_dense_on_the_fly_equals_materialised(backend, ground, blocks, rng, monkeypatch, request):
    skip_unavailable(backend)
    if blocks == "tiny":
        request.getfixturevalue("tiny_blocks")
    X = rng.standard_normal((260, 12)).astype(np.float32)
    P = rng.standard_normal((90, 12)).astype(np.float32) if ground else None
    w = rng.uniform(0.0, 1.5, 90 if ground else 260)
    kw = dict(ground=P, weights=w, graph="dense", progress=False)
    mat = select_facility_location(X, 60, backend=backend, **kw)
    assert mat.info["graph"] == "dense" and mat.backend == backend
    monkeypatch.setattr(fl_mod, "DENSE_MATERIALIZE_PAIRS", 0)
    otf = select_facility_location(X, 60, **kw)
    assert otf.info["graph"] == "dense (on the fly)" and otf.backend == "torch"
    np.testing.assert_array_equal(otf.indices, mat.indices)
    # the same float32 similarities on both paths: only the float64 summation order differs
    np.testing.assert_allclose(otf.gains, mat.gains, rtol=1e-12, atol=1e-12)
    assert otf.objective == pytest.approx(mat.objective, rel=1e-12)


def test_dense_on_the_fly_inner_product_and_half_input(on_the_fly, tiny_blocks, rng):
    X = rng.standard_normal((90, 5)).astype(np.float32)
    sel = select_facility_location(X, 8, graph="dense", metric="ip", progress=False)
    S = X.astype(np.float64) @ X.T.astype(np.float64)
    ref_idx, _, ref_obj = facility_location_greedy_naive(S, 8)
    np.testing.assert_array_equal(sel.indices, ref_idx)
    assert sel.objective == pytest.approx(ref_obj, rel=1e-5)
    Xh = torch.from_numpy(X).to(torch.bfloat16)
    a = select_facility_location(Xh, 8, graph="dense", progress=False)
    b = select_facility_location(Xh.float().numpy(), 8, graph="dense", progress=False)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert a.objective == b.objective


def test_dense_on_the_fly_stochastic(on_the_fly, tiny_blocks, rng):
    X = rng.standard_normal((240, 6)).astype(np.float32)
    k = 20
    a = select_facility_location(X, k, graph="dense", optimizer="stochastic", seed=5, progress=False)
    b = select_facility_location(X, k, graph="dense", optimizer="stochastic", seed=5, progress=False)
    lazy = select_facility_location(X, k, graph="dense", progress=False)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert len(set(a.indices.tolist())) == k
    S = _cosine(X, X)
    prefix = [facility_location_value(S, a.indices[:t]) for t in range(k + 1)]
    np.testing.assert_allclose(a.gains, np.diff(prefix), rtol=1e-5, atol=1e-6)  # true marginal gains
    assert (1 - 1 / math.e - 0.01) * lazy.objective <= a.objective <= lazy.objective * 1.05
    full = select_facility_location(X, k, graph="dense", optimizer="stochastic", epsilon=1e-300, progress=False)
    np.testing.assert_array_equal(full.indices, lazy.indices)  # a full sample is exact greedy


def test_dense_memory_checked_up_front(rng, monkeypatch):
    monkeypatch.setattr(dense_mod, "available_bytes", lambda device: (1000, "host memory"))
    X = _X(rng, n=40, d=4)
    P = _X(rng, n=30, d=4)
    for limit in (0, 10**9):  # on the fly, materialised
        monkeypatch.setattr(fl_mod, "DENSE_MATERIALIZE_PAIRS", limit)
        with pytest.raises(MemoryError, match=r"graph='dense' needs about .* \(\d+ bytes\) for N=40 pool rows, "
                                              r"M=30 ground points, D=4 .*only 0.00 GiB \(1000 bytes\).*graph='knn'"):
            select_facility_location(X, 3, ground=P, graph="dense", progress=False)
    # the estimate is what the on-the-fly path allocates, and it is O((N + M) D), not O(N M)
    need = dense_mod.dense_on_the_fly_bytes(100_000, 100_000, 64, 32, 4096)
    assert 50e6 < need < 150e6


def test_dense_blocks_config_is_validated(rng, monkeypatch):
    monkeypatch.setattr(dense_mod, "DENSE_BLOCKS", {"cpu": (24, 16), "cuda": (16, 16)})
    with pytest.raises(ValueError, match=r"DENSE_BLOCKS\['cpu'\] tile must be a positive multiple of 16, got 24"):
        select_facility_location(_X(rng), 2, graph="dense", progress=False)


def test_dense_on_the_fly_clustered_data_many_bound_updates(on_the_fly, tiny_blocks, rng):
    # clustered pool, ground = a separate clustered set with weights: every pick lowers many gains a
    # little (the case the incremental bounds are for); lazy must still equal naive bit for bit and the
    # float64 reference pick for pick
    centers = rng.standard_normal((6, 8)).astype(np.float32) * 2
    X = (centers[rng.integers(0, 6, 300)] + rng.standard_normal((300, 8))).astype(np.float32)
    P = (centers[rng.integers(0, 6, 120)] + rng.standard_normal((120, 8))).astype(np.float32)
    w = rng.uniform(0.1, 1.0, 120)
    a = select_facility_location(X, 45, ground=P, weights=w, graph="dense", progress=False)
    b = select_facility_location(X, 45, ground=P, weights=w, graph="dense", optimizer="naive", progress=False)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.gains, b.gains)
    ref_idx, ref_gains, ref_obj = facility_location_greedy_naive(_cosine(P, X), 45, w)
    np.testing.assert_array_equal(a.indices, ref_idx)
    assert a.objective == pytest.approx(ref_obj, rel=1e-6)
    assert a.info["candidate_evaluations"] < 0.5 * b.info["candidate_evaluations"]
