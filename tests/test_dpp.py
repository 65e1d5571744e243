"""select_dpp against Chen et al.'s fast greedy on an explicit float64 kernel, for every backend here."""

import warnings

import numpy as np
import pytest
import torch
from conftest import skip_unavailable
from references import dpp_greedy_chen, dpp_greedy_features, dpp_kernel, dpp_kernel_rbf, logdet

from metamoe.backends import BackendNotSupportedError
from metamoe.selection import DppRankWarning, Selection, select_dpp
from metamoe.selection.dpp import _cpp_storage, default_rbf_gamma, rbf_workspace_bytes, top_candidates

CPU_BACKENDS = ["torch", "cpp"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "n,d,k,ridge", [(200, 16, 12, 0.0), (301, 7, 7, 0.0), (150, 5, 40, 0.5), (97, 33, 60, 1e-2)]
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_chen_reference(backend, n, d, k, ridge, dtype, rng):
    skip_unavailable(backend)
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
def test_matches_the_feature_space_reference_on_a_larger_pool(backend, rng):
    skip_unavailable(backend)
    # N x D above the C++ code's threshold for OpenMP (2^19 row-elements): the threaded path runs; the
    # reference is NumPy's float64 feature-space greedy (an N x N kernel would not fit)
    X = rng.standard_normal((9001, 64)).astype(np.float32)
    r = rng.uniform(0.0, 1.0, 9001)
    ref_idx, ref_res = dpp_greedy_features(X, r, 40, ridge=0.01)
    sel = select_dpp(X, 40, r, ridge=0.01, backend=backend, progress=False)
    np.testing.assert_array_equal(sel.indices, ref_idx)
    np.testing.assert_allclose(np.exp(sel.gains), ref_res, rtol=1e-9)


def test_feature_space_reference_equals_chen_on_the_explicit_kernel(rng):
    X = rng.standard_normal((300, 12))
    r = rng.uniform(0.05, 1.0, 300)
    for ridge in (0.0, 0.3):
        a = dpp_greedy_features(X, r, 40, ridge=ridge, eps=1e-9)
        b = dpp_greedy_chen(dpp_kernel(X, r, ridge), 40, eps=1e-9)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_allclose(a[1], b[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_candidate_cut_inside_a_tie_keeps_the_lowest_indices(backend):
    skip_unavailable(backend)
    rng = np.random.default_rng(5)
    X = rng.standard_normal((200, 8)).astype(np.float32)
    r = np.full(200, 0.5)
    r[[5, 50, 120]] = 0.9  # three above the tie; the cut at M = 10 falls inside the 0.5 group
    want = [0, 1, 2, 3, 4, 5, 6, 7, 50, 120]
    np.testing.assert_array_equal(top_candidates(r, 10), want)
    sel = select_dpp(X, 10, r, ridge=0.1, candidates=10, backend=backend, progress=False)
    assert sorted(sel.indices.tolist()) == want  # k = M with a ridge: every candidate is picked


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ties_go_to_lowest_index(backend):
    skip_unavailable(backend)
    # duplicated rows and equal relevance: every step has exact ties
    base = np.eye(4, dtype=np.float32)
    X = np.concatenate([base, base, base])  # rows 0-3, 4-7, 8-11 are the same four directions
    sel = select_dpp(X, 4, backend=backend, progress=False)
    np.testing.assert_array_equal(sel.indices, [0, 1, 2, 3])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rank_exhaustion_stops_and_warns(backend, rng):
    skip_unavailable(backend)
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
    assert "backend 'cuda' cannot run dpp_greedy: cuda is not available here" in msg
    assert "CUDA device" in msg or "NVIDIA driver" in msg or "not built" in msg


@pytest.mark.parametrize(
    "bad,kw,exc,match",
    [
        (np.zeros((0, 4), np.float32), {}, ValueError, "X must be non-empty"),
        (np.ones((5,), np.float32), {}, ValueError, "X must be 2-D"),
        (np.ones((5, 3), np.int32), {}, TypeError, "X must have a floating dtype"),
        (
            np.array([[1.0, np.nan], [1.0, 2.0]], np.float32),
            {},
            ValueError,
            r"NaN or inf values \(first in row 0\)",
        ),
        (np.array([[1.0, 2.0], [0.0, 0.0]], np.float32), {}, ValueError, "row 1 is all zeros"),
        (
            np.array([[1.0, 2.0], [1.0, 2.0], [np.inf, 1.0]], np.float16),
            {},
            ValueError,
            r"NaN or inf values \(first in row 2\)",
        ),
        (
            np.array([[1.0, 2.0], [0.0, 0.0]], np.float32),
            {"kernel": "rbf"},
            ValueError,
            "row 1 is all zeros; the rbf kernel",
        ),
        (np.ones((5, 3), np.int64), {"kernel": "rbf"}, TypeError, "X must have a floating dtype"),
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
    skip_unavailable("cuda")
    X = rng.standard_normal((5000, 48)).astype(np.float32)
    r = rng.uniform(0.1, 1.0, 5000)
    Xg = torch.from_numpy(X).to("cuda", dtype)
    ref = select_dpp(Xg.float().cpu().numpy(), 40, r, ridge=ridge, backend="cpp", progress=False)
    sel = select_dpp(Xg, 40, r, ridge=ridge, backend="cuda", progress=False)
    np.testing.assert_array_equal(sel.indices, ref.indices)
    np.testing.assert_allclose(sel.gains, ref.gains, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d,aligned", [(64, True), (37, True), (64, False)])
def test_cuda_vector_and_scalar_loads_and_many_picks(dtype, d, aligned, rng):
    """16-byte loads (aligned rows, D a multiple of the pack) and the element-wise fallback (odd D, or X
    starting off a 16-byte boundary) against the cpp sweep; k > D and more than one 64-direction chunk."""
    skip_unavailable("cuda")
    n, k = 20_000, 300
    centers = rng.standard_normal((16, d))
    X = (centers[rng.integers(0, 16, n)] + 0.4 * rng.standard_normal((n, d))).astype(np.float32)
    r = rng.uniform(0.05, 1.0, n)
    buf = torch.empty(n * d + 1, dtype=dtype, device="cuda")
    Xg = (buf[:-1] if aligned else buf[1:]).view(n, d)
    Xg.copy_(torch.from_numpy(X).to(dtype))
    assert (Xg.data_ptr() % 16 == 0) == aligned
    ref = select_dpp(Xg.float().cpu().numpy(), k, r, ridge=1e-2, backend="cpp", strategy="sweep", progress=False)
    sel = select_dpp(Xg, k, r, ridge=1e-2, backend="cuda", progress=False)
    np.testing.assert_array_equal(sel.indices, ref.indices)
    np.testing.assert_allclose(sel.gains, ref.gains, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- rbf kernel


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "n,d,k,gamma,ridge", [(180, 8, 40, 1.0, 0.0), (97, 3, 60, 2.5, 0.0), (64, 12, 64, 0.3, 0.1)]
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rbf_matches_chen_reference(backend, n, d, k, gamma, ridge, dtype, rng):
    skip_unavailable(backend)
    X = rng.standard_normal((n, d)).astype(dtype)
    r = rng.uniform(0.05, 1.0, n)
    L = dpp_kernel_rbf(X, r, gamma=gamma, ridge=ridge)
    ref_idx, ref_res = dpp_greedy_chen(L, k, eps=1e-9 * r.max() ** 2 * (1 + ridge))
    assert len(ref_idx) == k  # full rank: k > D picks without running out
    sel = select_dpp(
        X, k, r, kernel="rbf", gamma=gamma, ridge=ridge, backend=backend, progress=False, chunk_rows=50
    )
    assert sel.backend == backend
    np.testing.assert_array_equal(sel.indices, ref_idx)
    np.testing.assert_allclose(np.exp(sel.gains), ref_res, rtol=1e-6, atol=1e-12)
    assert sel.objective == pytest.approx(logdet(L, sel.indices), rel=1e-6, abs=1e-6)
    assert sel.info["gamma"] == gamma


def test_rbf_default_gamma_is_median_heuristic(rng):
    X = rng.standard_normal((70, 5)).astype(np.float32)
    Xn = X.astype(np.float64) / np.linalg.norm(X.astype(np.float64), axis=1, keepdims=True)
    sq = ((Xn[:, None] - Xn[None]) ** 2).sum(-1)[np.triu_indices(70, 1)]
    assert default_rbf_gamma(torch.from_numpy(X)) == pytest.approx(1.0 / np.median(sq), rel=1e-12)
    sel = select_dpp(X, 10, kernel="rbf", progress=False, backend="torch")
    assert sel.info["gamma"] == pytest.approx(1.0 / np.median(sq), rel=1e-12)
    ref_idx, _ = dpp_greedy_chen(dpp_kernel_rbf(X, gamma=sel.info["gamma"]), 10)
    np.testing.assert_array_equal(sel.indices, ref_idx)


def test_rbf_cpp_and_torch_agree_on_larger_pool(rng):
    skip_unavailable("cpp")
    # threaded C++ path (N x D >= 2^19) with several candidate blocks (N > 2 x 2048)
    X = rng.standard_normal((9001, 64)).astype(np.float32)
    r = rng.uniform(0.0, 1.0, 9001)
    a = select_dpp(X, 50, r, kernel="rbf", backend="torch", progress=False, chunk_rows=1000)
    b = select_dpp(X, 50, r, kernel="rbf", backend="cpp", progress=False)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.gains, b.gains, rtol=1e-9)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rbf_duplicates_stop_and_warn(backend):
    skip_unavailable(backend)
    X = np.concatenate([np.eye(3, dtype=np.float32)] * 4)  # 3 distinct directions, 4 copies each
    with pytest.warns(DppRankWarning, match="duplicates"):
        sel = select_dpp(X, 5, kernel="rbf", gamma=1.0, backend=backend, progress=False)
    np.testing.assert_array_equal(sel.indices, [0, 1, 2])


def test_rbf_memory_checked_up_front(rng):
    X = rng.standard_normal((1000, 4)).astype(np.float32)
    need = rbf_workspace_bytes(1000, 100)
    with pytest.raises(ValueError, match=r"k=100 x N=1000 x 8 bytes.*candidates=M"):
        select_dpp(X, 100, kernel="rbf", max_workspace_bytes=need - 1, progress=False)
    sel = select_dpp(X, 100, kernel="rbf", max_workspace_bytes=need, progress=False)
    assert len(sel) == 100
    # with candidates the workspace is k x M: fits where k x N does not
    r = rng.uniform(size=1000)
    sel = select_dpp(X, 100, r, kernel="rbf", candidates=200, max_workspace_bytes=need // 4, progress=False)
    assert len(sel) == 100 and sel.info["candidates"] == 200


def test_gamma_validation(rng):
    X = rng.standard_normal((10, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="gamma is only used by kernel='rbf'"):
        select_dpp(X, 2, gamma=1.0, progress=False)
    with pytest.raises(ValueError, match="gamma must be > 0"):
        select_dpp(X, 2, kernel="rbf", gamma=0.0, progress=False)
    with pytest.raises(ValueError, match="gamma must be finite"):
        select_dpp(X, 2, kernel="rbf", gamma=float("inf"), progress=False)


# ------------------------------------------------------------------- candidates (the paper's protocol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kernel,ridge", [("cosine", 0.0), ("cosine", 0.05), ("rbf", 0.0)])
def test_candidates_match_chen_on_top_m(backend, kernel, ridge, rng):
    skip_unavailable(backend)
    n, d, m, k = 400, 10, 60, 10
    X = rng.standard_normal((n, d)).astype(np.float32)
    r = np.round(rng.uniform(0.0, 1.0, n), 2)  # rounded: many ties in relevance
    # reference: top-M by relevance, ties to the lower index, without argsort
    order = sorted(range(n), key=lambda i: (-r[i], i))[:m]
    cand = np.sort(np.array(order))
    L = (
        dpp_kernel(X[cand], r[cand], ridge)
        if kernel == "cosine"
        else dpp_kernel_rbf(X[cand], r[cand], 0.7, ridge)
    )
    ref_idx, ref_res = dpp_greedy_chen(L, k, eps=1e-9 * r[cand].max() ** 2 * (1 + ridge))
    kw = {"gamma": 0.7} if kernel == "rbf" else {}
    sel = select_dpp(X, k, r, kernel=kernel, ridge=ridge, candidates=m, backend=backend, progress=False, **kw)
    np.testing.assert_array_equal(sel.indices, cand[ref_idx])
    np.testing.assert_allclose(np.exp(sel.gains), ref_res, rtol=1e-6)
    assert set(sel.indices.tolist()) <= set(cand.tolist())
    assert sel.info["candidates"] == m


def test_candidates_equal_to_pool_is_the_plain_dpp(rng):
    X = rng.standard_normal((50, 6)).astype(np.float32)
    r = rng.uniform(size=50)
    a = select_dpp(X, 6, r, progress=False)
    b = select_dpp(X, 6, r, candidates=50, progress=False)
    np.testing.assert_array_equal(a.indices, b.indices)


def test_bad_candidates(rng):
    X = rng.standard_normal((20, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=r"candidates must satisfy k=5 <= candidates <= N=20, got 4"):
        select_dpp(X, 5, candidates=4, progress=False)
    with pytest.raises(ValueError, match=r"candidates <= N=20, got 21"):
        select_dpp(X, 5, candidates=21, progress=False)
    with pytest.raises(TypeError, match="candidates must be an integer"):
        select_dpp(X, 5, candidates=10.0, progress=False)


# --------------------------------------------------------------------------- 16-bit storage read in place


@pytest.mark.parametrize("kernel", ["cosine", "rbf"])
def test_fp16_memmap_through_cpp_is_read_in_place(kernel, tmp_path, rng):
    skip_unavailable("cpp")
    X32 = rng.standard_normal((500, 24)).astype(np.float16).astype(np.float32)  # fp16-representable
    r = rng.uniform(0.1, 1.0, 500)
    np.save(tmp_path / "x.npy", X32.astype(np.float16))
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert mm.dtype == np.float16 and not mm.flags.writeable
    ref = select_dpp(X32, 30, r, kernel=kernel, ridge=0.01, backend="cpp", progress=False)
    sel = select_dpp(mm, 30, r, kernel=kernel, ridge=0.01, backend="cpp", progress=False)
    np.testing.assert_array_equal(sel.indices, ref.indices)
    np.testing.assert_array_equal(sel.gains, ref.gains)  # same float64 arithmetic on the same values
    # what the C++ module receives is a uint16 view of the memmap itself, not a copy
    from metamoe.selection.validation import check_embeddings

    arr, suffix = _cpp_storage(check_embeddings(mm, zero_copy_readonly=True))
    assert suffix == "F16" and arr.dtype == np.uint16 and np.shares_memory(arr, mm)


def test_bfloat16_through_cpp_equals_float32(rng):
    skip_unavailable("cpp")
    Xb = torch.from_numpy(rng.standard_normal((300, 20)).astype(np.float32)).to(torch.bfloat16)
    r = rng.uniform(0.1, 1.0, 300)
    for kernel in ("cosine", "rbf"):
        ref = select_dpp(Xb.float().numpy(), 25, r, kernel=kernel, ridge=0.01, backend="cpp", progress=False)
        sel = select_dpp(Xb, 25, r, kernel=kernel, ridge=0.01, backend="cpp", progress=False)
        np.testing.assert_array_equal(sel.indices, ref.indices)
        np.testing.assert_array_equal(sel.gains, ref.gains)


def test_fp16_subnormals_and_specials_convert_exactly():
    skip_unavailable("cpp")
    # float16 bit patterns (normals, subnormals, negatives) converted by the C++ table must equal
    # NumPy's conversion: rows [v, 1] (never zero norm), every row picked (ridge > 0: full rank),
    # so every row's value enters the residuals, which must match the float32 path bit for bit
    pos = np.concatenate([np.arange(1, 0x400, 37), np.arange(0x400, 0x7C00, 97), [1, 2, 3, 0x3FF, 0x7BFF]])
    bits = np.unique(np.concatenate([pos, pos[::3] | 0x8000])).astype(np.uint16)
    vals = bits.view(np.float16)
    X = np.stack([vals, np.ones_like(vals)], axis=1)
    k = len(X)
    sel16 = select_dpp(X, k, backend="cpp", progress=False, ridge=0.5)
    sel32 = select_dpp(X.astype(np.float32), k, backend="cpp", progress=False, ridge=0.5)
    assert len(sel16) == k
    np.testing.assert_array_equal(sel16.indices, sel32.indices)
    np.testing.assert_array_equal(sel16.gains, sel32.gains)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rbf_torch_on_gpu_matches_cpp(dtype, rng):
    skip_unavailable("cpp")
    X = rng.standard_normal((3000, 32)).astype(np.float16).astype(np.float32)
    r = rng.uniform(0.1, 1.0, 3000)
    ref = select_dpp(X, 40, r, kernel="rbf", gamma=1.0, backend="cpp", progress=False)
    sel = select_dpp(torch.from_numpy(X).to("cuda", dtype), 40, r, kernel="rbf", gamma=1.0, progress=False)
    assert sel.backend == "torch"
    np.testing.assert_array_equal(sel.indices, ref.indices)
    np.testing.assert_allclose(sel.gains, ref.gains, rtol=1e-4)


@pytest.mark.gpu
def test_candidates_and_cupy_on_gpu(rng):
    cupy = pytest.importorskip("cupy")
    X = rng.standard_normal((2000, 24)).astype(np.float32)
    r = rng.uniform(0.0, 1.0, 2000)
    ref = select_dpp(X, 20, r, ridge=0.01, candidates=300, backend="torch", progress=False)
    sel = select_dpp(cupy.asarray(X), 20, r, ridge=0.01, candidates=300, progress=False)
    np.testing.assert_array_equal(sel.indices, ref.indices)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_torch_blocked_products_match_one_block(rng, dtype):
    """The torch greedy reads X in 64-row-aligned blocks (a memmap is never converted whole); the picks and
    residuals do not depend on the block size, which the sharded greedy (64-row-aligned shards) relies on."""
    from metamoe.selection.dpp import dpp_greedy_torch, matvec_rows

    X = torch.from_numpy(rng.standard_normal((1000, 24))).to(dtype)
    X[700] = X[3]  # an exact tie in the residuals
    rel = rng.uniform(0.2, 1.0, 1000)
    one = dpp_greedy_torch(X, rel, 40, 1e-3, 1e-10, chunk_rows=4096)
    for rows in (64, 128, 192):
        got = dpp_greedy_torch(X, rel, 40, 1e-3, 1e-10, chunk_rows=rows)
        np.testing.assert_array_equal(got[0], one[0])
        np.testing.assert_array_equal(got[1], one[1])
    assert matvec_rows(768) % 64 == 0 and matvec_rows(768) * 768 * 8 <= 1 << 24
    assert matvec_rows(10**6) == 64  # very wide rows: still whole 64-row groups


def test_candidates_check_only_the_candidate_rows(rng):
    X = rng.standard_normal((400, 8)).astype(np.float32)
    r = rng.uniform(0.05, 0.2, 400)
    r[[7, 11, 250]] = [0.9, 0.8, 0.7]
    bad = X.copy()
    bad[7, 2] = np.nan  # a candidate: a clear error naming its row in the pool
    with pytest.raises(ValueError, match="row 7"):
        select_dpp(bad, 5, r, candidates=20, progress=False)
    far = X.copy()
    low = int(np.argmin(r))
    far[low, 0] = np.inf  # never a candidate: the pool outside the top-M is not read
    got = select_dpp(far, 5, r, candidates=20, progress=False)
    want = select_dpp(X, 5, r, candidates=20, progress=False)
    np.testing.assert_array_equal(got.indices, want.indices)
    assert low not in got.indices
    with pytest.raises(ValueError, match="NaN or inf"):
        select_dpp(far, 5, r, progress=False)  # without candidates the whole pool is checked


def test_cuda_dpp_bindings_take_the_workspace_dpp_greedy_cuda_builds():
    """Without a GPU the kernels cannot run, but the module's entry points must accept the arguments that
    dpp_greedy_cuda passes (11 workspace pointers) and fail with CUDA's own error, not a TypeError."""
    try:
        from metamoe import _C_cuda as ext
    except ImportError:
        pytest.skip("the CUDA module was not built here")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the gpu tests run the kernels")
    assert [ext.dpp_partial_chunks(k) for k in (1, 2, 65, 66, 10_000)] == [1, 1, 1, 2, 157]
    with pytest.raises(RuntimeError, match="dpp_picks failed: "):
        ext.dpp_picks(0, 0, 10, 8, 5, 1e-9, 0, 1, [0] * 11, 1, 0, 0, 0)
    with pytest.raises(RuntimeError, match="dpp_init failed: "):
        ext.dpp_init(0, 0, 10, 8, 0, 1e-3, [0] * 11, 1, 0)
    with pytest.raises(ValueError, match="workspace must hold 11 device pointers, got 12"):
        ext.dpp_picks(0, 0, 10, 8, 5, 1e-9, 0, 1, [0] * 12, 1, 0, 0, 0)
