"""select_dpp against Chen et al.'s fast greedy on an explicit float64 kernel, for every backend here."""

import warnings

import numpy as np
import pytest
import torch

from metamoe.backends import BackendNotSupportedError, availability
from metamoe.selection import DppRankWarning, Selection, select_dpp
from references import dpp_greedy_chen, dpp_kernel, logdet

CPU_BACKENDS = ["torch", "cpp"]


def _skip_unavailable(backend):
    reason = availability.backend_unavailable_reason(backend)
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n,d,k,ridge", [(200, 16, 12, 0.0), (301, 7, 7, 0.0), (150, 5, 40, 0.5), (97, 33, 60, 1e-2)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_chen_reference(backend, n, d, k, ridge, dtype, rng):
    _skip_unavailable(backend)
    X = rng.standard_normal((n, d)).astype(dtype)
    r = rng.uniform(0.05, 1.0, n)
    ref_idx, ref_res = dpp_greedy_chen(dpp_kernel(X, r, ridge), k, eps=1e-9 * r.max() ** 2 * (1 + ridge))
    sel = select_dpp(X, k, r, ridge=ridge, backend=backend, progress=False)
    assert sel.backend == backend
    np.testing.assert_array_equal(sel.indices, ref_idx)
    np.testing.assert_allclose(np.exp(sel.gains), ref_res, rtol=1e-5, atol=1e-9)
    L = dpp_kernel(X, r, ridge)
    assert sel.objective == pytest.approx(logdet(L, sel.indices), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpp_and_torch_agree_on_larger_pool(backend, rng):
    _skip_unavailable(backend)
    X = rng.standard_normal((3000, 24)).astype(np.float32)
    r = rng.uniform(0.0, 1.0, 3000)
    ref = select_dpp(X, 24, r, backend="torch", progress=False)
    sel = select_dpp(X, 24, r, backend=backend, progress=False)
    np.testing.assert_array_equal(sel.indices, ref.indices)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ties_go_to_lowest_index(backend):
    _skip_unavailable(backend)
    # duplicated rows and equal relevance: every step has exact ties
    base = np.eye(4, dtype=np.float32)
    X = np.concatenate([base, base, base])  # rows 0-3, 4-7, 8-11 are the same four directions
    sel = select_dpp(X, 4, backend=backend, progress=False)
    np.testing.assert_array_equal(sel.indices, [0, 1, 2, 3])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rank_exhaustion_stops_and_warns(backend, rng):
    _skip_unavailable(backend)
    X = rng.standard_normal((50, 6)).astype(np.float32)
    with pytest.warns(DppRankWarning, match="ridge > 0"):
        sel = select_dpp(X, 20, backend=backend, progress=False)
    assert len(sel) == 6  # rank of the cosine kernel is D
    assert "stopped_early" in sel.info
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full = select_dpp(X, 20, ridge=1e-2, backend=backend, progress=False)
    assert len(full) == 20


def test_relevance_weights_the_choice():
    # two identical directions; the more relevant copy is picked first
    X = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    sel = select_dpp(X, 2, relevance=np.array([0.2, 0.9, 0.5]), progress=False)
    assert sel.indices.tolist() == [1, 2]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_torch_inputs(dtype, rng):
    X = torch.from_numpy(rng.standard_normal((120, 10)).astype(np.float32))
    ref = select_dpp(X.to(dtype).float(), 8, progress=False, backend="torch")
    sel = select_dpp(X.to(dtype), 8, progress=False)
    np.testing.assert_array_equal(sel.indices, ref.indices)


def test_selection_json_roundtrip(tmp_path, rng):
    X = rng.standard_normal((60, 5)).astype(np.float32)
    sel = select_dpp(X, 5, progress=False)
    sel.save(tmp_path / "sel.json")
    back = Selection.load(tmp_path / "sel.json")
    np.testing.assert_array_equal(back.indices, sel.indices)
    np.testing.assert_allclose(back.gains, sel.gains)
    assert back.backend == sel.backend and back.method == "dpp"


def test_cuda_backend_without_gpu_says_why(monkeypatch, rng):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    X = rng.standard_normal((20, 4)).astype(np.float32)
    monkeypatch.setenv("METAMOE_BACKEND", "cuda")
    with pytest.raises(BackendNotSupportedError) as err:
        select_dpp(X, 3, progress=False)
    msg = str(err.value)
    assert "backend 'cuda' cannot run dpp_greedy" in msg
    assert "CUDA device" in msg or "not built" in msg


@pytest.mark.parametrize(
    "bad,kw,exc,match",
    [
        (np.zeros((0, 4), np.float32), {}, ValueError, "X must be non-empty"),
        (np.ones((5,), np.float32), {}, ValueError, "X must be 2-D"),
        (np.ones((5, 3), np.int32), {}, TypeError, "X must have a floating dtype"),
        (np.array([[1.0, np.nan], [1.0, 2.0]], np.float32), {}, ValueError, r"NaN or inf values \(first in row 0\)"),
        (np.array([[1.0, 2.0], [0.0, 0.0]], np.float32), {}, ValueError, "row 1 is all zeros"),
        ([[1.0, 2.0]], {}, TypeError, "X must be a NumPy array"),
    ],
)
def test_bad_inputs(bad, kw, exc, match):
    with pytest.raises(exc, match=match):
        select_dpp(bad, 1, progress=False, **kw)


def test_bad_k_relevance_ridge(rng):
    X = rng.standard_normal((10, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=r"k=11 is larger than the pool \(N=10\)"):
        select_dpp(X, 11, progress=False)
    with pytest.raises(ValueError, match="k must be >= 1"):
        select_dpp(X, 0, progress=False)
    with pytest.raises(TypeError, match="k must be an integer"):
        select_dpp(X, 2.5, progress=False)
    with pytest.raises(ValueError, match=r"relevance must have shape \(10,\)"):
        select_dpp(X, 2, relevance=np.ones(9), progress=False)
    with pytest.raises(ValueError, match=r"relevance must lie in \[0, 1\]"):
        select_dpp(X, 2, relevance=np.full(10, 1.5), progress=False)
    with pytest.raises(ValueError, match="ridge must be finite and >= 0"):
        select_dpp(X, 2, ridge=-1.0, progress=False)
    with pytest.raises(ValueError, match="kernel must be"):
        select_dpp(X, 2, kernel="poly", progress=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ridge", [0.0, 0.1])
def test_cuda_matches_cpp(dtype, ridge, rng):
    _skip_unavailable("cuda")
    X = rng.standard_normal((5000, 48)).astype(np.float32)
    r = rng.uniform(0.1, 1.0, 5000)
    Xg = torch.from_numpy(X).to("cuda", dtype)
    ref = select_dpp(Xg.float().cpu().numpy(), 40, r, ridge=ridge, backend="cpp", progress=False)
    sel = select_dpp(Xg, 40, r, ridge=ridge, backend="cuda", progress=False)
    np.testing.assert_array_equal(sel.indices, ref.indices)
    np.testing.assert_allclose(sel.gains, ref.gains, rtol=1e-4)
