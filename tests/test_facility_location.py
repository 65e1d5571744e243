"""select_facility_location against a naive float64 NumPy greedy, for every CPU backend and optimizer."""

import math

import numpy as np
import pytest
import torch
from conftest import skip_unavailable
from references import csr_to_dense, facility_location_greedy_naive, facility_location_value

import metamoe.selection.facility_location as fl_mod
from metamoe.backends import BackendNotSupportedError
from metamoe.selection import KnnGraph, Selection, build_knn_graph, select_facility_location

CPU_BACKENDS = ["cpp", "torch"]
EXACT = ["lazy", "naive"]


def _cosine(A, B):
    A = np.asarray(A, np.float64)
    B = np.asarray(B, np.float64)
    A = A / np.linalg.norm(A, axis=1, keepdims=True)
    B = B / np.linalg.norm(B, axis=1, keepdims=True)
    return A @ B.T


def _check_against(sel, S, k, weights=None):
    ref_idx, ref_gains, ref_obj = facility_location_greedy_naive(S, k, weights)
    np.testing.assert_array_equal(sel.indices, ref_idx)
    np.testing.assert_allclose(sel.gains, ref_gains, rtol=1e-9, atol=1e-9)
    assert sel.objective == pytest.approx(ref_obj, rel=1e-9, abs=1e-9)
    assert sel.objective == pytest.approx(facility_location_value(S, sel.indices, weights), rel=1e-9, abs=1e-9)
    assert sel.objective == pytest.approx(sel.gains.sum(), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("optimizer", EXACT)
@pytest.mark.parametrize("ground", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_knn_graph_matches_naive_reference(backend, optimizer, ground, weighted, rng):
    skip_unavailable(backend)
    X = rng.standard_normal((173, 8)).astype(np.float32)
    P = rng.standard_normal((61, 8)).astype(np.float32) if ground else None
    m = 61 if ground else 173
    w = rng.uniform(0.0, 2.0, m) if weighted else None
    if weighted:
        w[::7] = 0.0  # zero-weight ground points never count
    g = build_knn_graph(X, 9, queries=P, progress=False)
    sel = select_facility_location(X, 17, ground=P, weights=w, graph=g, optimizer=optimizer, backend=backend,
                                   progress=False)
    assert sel.backend == backend and sel.method == "facility_location" and len(sel) == 17
    S = csr_to_dense(g.indptr, g.indices, g.similarities, 173)  # the graph's own float32 values
    _check_against(sel, S, 17, w)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("optimizer", EXACT)
@pytest.mark.parametrize("ground", [False, True])
def test_dense_graph_matches_float64_reference(backend, optimizer, ground, rng):
    skip_unavailable(backend)
    X = rng.standard_normal((97, 6)).astype(np.float32)
    P = rng.standard_normal((45, 6)).astype(np.float32) if ground else None
    w = rng.uniform(0.5, 1.5, 45 if ground else 97)
    sel = select_facility_location(X, 12, ground=P, weights=w, graph="dense", optimizer=optimizer, backend=backend,
                                   progress=False)
    S = _cosine(X if P is None else P, X)  # independent float64 similarities
    ref_idx, ref_gains, ref_obj = facility_location_greedy_naive(S, 12, w)
    np.testing.assert_array_equal(sel.indices, ref_idx)
    np.testing.assert_allclose(sel.gains, ref_gains, rtol=1e-5, atol=1e-6)
    assert sel.objective == pytest.approx(ref_obj, rel=1e-6)


def test_knn_option_builds_the_same_graph(rng):
    X = rng.standard_normal((150, 7)).astype(np.float32)
    P = rng.standard_normal((40, 7)).astype(np.float32)
    for ground in (None, P):
        g = build_knn_graph(X, 8, queries=ground, progress=False)
        a = select_facility_location(X, 10, ground=ground, graph="knn", n_neighbors=8, progress=False)
        b = select_facility_location(X, 10, ground=ground, graph=g, progress=False)
        np.testing.assert_array_equal(a.indices, b.indices)
        assert a.objective == b.objective
        assert a.info["graph"] == "knn" and a.info["n_neighbors"] == 8


@pytest.mark.parametrize("optimizer", ["lazy", "naive", "stochastic"])
def test_cpp_and_torch_agree_on_larger_pool(optimizer, rng):
    skip_unavailable("cpp")
    X = rng.standard_normal((2500, 16)).astype(np.float32)
    g = build_knn_graph(X, 15, progress=False)
    k = 60
    a = select_facility_location(X, k, graph=g, optimizer=optimizer, backend="cpp", progress=False)
    b = select_facility_location(X, k, graph=g, optimizer=optimizer, backend="torch", progress=False)
    if optimizer == "stochastic":  # different random streams: compare quality, not picks
        assert b.objective == pytest.approx(a.objective, rel=0.05)
    else:
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_allclose(a.gains, b.gains, rtol=1e-12)
        assert a.objective == pytest.approx(b.objective, rel=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("optimizer", EXACT)
@pytest.mark.parametrize("graph", ["dense", "knn"])
def test_ties_go_to_lowest_index_and_k_equals_n(backend, optimizer, graph):
    skip_unavailable(backend)
    # three copies of four orthogonal directions: every step is an exact tie
    X = np.concatenate([np.eye(4, dtype=np.float32)] * 3)
    sel = select_facility_location(X, 12, graph=graph, n_neighbors=3, optimizer=optimizer, backend=backend,
                                   progress=False)
    np.testing.assert_array_equal(sel.indices, np.arange(12))
    np.testing.assert_allclose(sel.gains, [3, 3, 3, 3] + [0] * 8, atol=1e-6)
    assert sel.objective == pytest.approx(12.0, abs=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("optimizer", EXACT)
def test_exact_ties_between_different_candidates(backend, optimizer, rng):
    skip_unavailable(backend)
    # a hand-made graph with dyadic similarities: gains tie exactly in any summation order
    n = 24
    X = rng.standard_normal((n, 3)).astype(np.float32)
    g = build_knn_graph(X, 4, progress=False)
    sims = rng.choice([0.125, 0.25, 0.5, 0.75, 1.0], size=g.nnz).astype(np.float32)
    g2 = KnnGraph(g.indptr, g.indices, sims, g.n_points, g.metric, g.n_neighbors, g.self_included,
                  g.pool_fingerprint, g.query_fingerprint, dict(g.info))
    w = rng.choice([0.5, 1.0, 2.0], size=n)
    sel = select_facility_location(X, n, weights=w, graph=g2, optimizer=optimizer, backend=backend, progress=False)
    S = csr_to_dense(g2.indptr, g2.indices, g2.similarities, n)
    _check_against(sel, S, n, w)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("optimizer", ["lazy", "naive", "stochastic"])
def test_k_equals_n_random(backend, optimizer, rng):
    skip_unavailable(backend)
    X = rng.standard_normal((40, 5)).astype(np.float32)
    g = build_knn_graph(X, 6, progress=False)
    sel = select_facility_location(X, 40, graph=g, optimizer=optimizer, backend=backend, progress=False)
    assert sorted(sel.indices.tolist()) == list(range(40))
    S = csr_to_dense(g.indptr, g.indices, g.similarities, 40)
    assert sel.objective == pytest.approx(facility_location_value(S, range(40)), rel=1e-9)
    if optimizer != "stochastic":
        _check_against(sel, S, 40)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_stochastic_valid_reproducible_and_near_greedy(backend, rng):
    skip_unavailable(backend)
    X = rng.standard_normal((1200, 12)).astype(np.float32)
    g = build_knn_graph(X, 10, progress=False)
    k, eps = 50, 0.01
    a = select_facility_location(X, k, graph=g, optimizer="stochastic", epsilon=eps, seed=3, backend=backend,
                                 progress=False)
    b = select_facility_location(X, k, graph=g, optimizer="stochastic", epsilon=eps, seed=3, backend=backend,
                                 progress=False)
    lazy = select_facility_location(X, k, graph=g, backend=backend, progress=False)
    np.testing.assert_array_equal(a.indices, b.indices)  # seeded
    assert len(set(a.indices.tolist())) == k and a.indices.min() >= 0 and a.indices.max() < 1200
    assert a.info["sample_size"] == math.ceil(1200 / k * math.log(1 / eps))
    S = csr_to_dense(g.indptr, g.indices, g.similarities, 1200)
    # the reported gains are the true marginal gains of the picks, in order
    prefix = [facility_location_value(S, a.indices[:t]) for t in range(k + 1)]
    np.testing.assert_allclose(a.gains, np.diff(prefix), rtol=1e-9, atol=1e-9)
    assert a.objective == pytest.approx(prefix[-1], rel=1e-9)
    # Mirzasoleiman et al.: E f >= (1 - 1/e - eps) OPT >= (1 - 1/e - eps) f(greedy)
    assert a.objective >= (1 - 1 / math.e - eps) * lazy.objective
    assert a.objective <= lazy.objective * 1.05
    other = select_facility_location(X, k, graph=g, optimizer="stochastic", epsilon=0.9, seed=3, backend=backend,
                                     progress=False)
    assert other.info["sample_size"] == math.ceil(1200 / k * math.log(1 / 0.9)) < a.info["sample_size"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_stochastic_with_full_sample_is_exact_greedy(backend, rng):
    skip_unavailable(backend)
    X = rng.standard_normal((300, 6)).astype(np.float32)
    g = build_knn_graph(X, 8, progress=False)
    sel = select_facility_location(X, 20, graph=g, optimizer="stochastic", epsilon=1e-300, backend=backend,
                                   progress=False)
    assert sel.info["sample_size"] == 300
    _check_against(sel, csr_to_dense(g.indptr, g.indices, g.similarities, 300), 20)


def test_inner_product_metric(rng):
    X = rng.standard_normal((80, 5)).astype(np.float32)
    sel = select_facility_location(X, 6, graph="dense", metric="ip", progress=False)
    S = X.astype(np.float64) @ X.T.astype(np.float64)
    ref_idx, _, ref_obj = facility_location_greedy_naive(S, 6)
    np.testing.assert_array_equal(sel.indices, ref_idx)
    assert sel.objective == pytest.approx(ref_obj, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_torch_inputs(dtype, rng):
    X = torch.from_numpy(rng.standard_normal((200, 8)).astype(np.float32)).to(dtype)
    a = select_facility_location(X, 10, progress=False)
    b = select_facility_location(X.float().numpy(), 10, progress=False)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert a.objective == b.objective


def test_memmap_input(tmp_path, rng):
    X = rng.standard_normal((150, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", X)
    a = select_facility_location(np.load(tmp_path / "x.npy", mmap_mode="r"), 8, progress=False)
    b = select_facility_location(X, 8, progress=False)
    np.testing.assert_array_equal(a.indices, b.indices)


def test_selection_json_roundtrip(tmp_path, rng):
    X = rng.standard_normal((60, 5)).astype(np.float32)
    sel = select_facility_location(X, 5, progress=False)
    sel.save(tmp_path / "sel.json")
    back = Selection.load(tmp_path / "sel.json")
    np.testing.assert_array_equal(back.indices, sel.indices)
    np.testing.assert_allclose(back.gains, sel.gains)
    assert back.method == "facility_location" and back.objective == sel.objective


def test_graph_for_other_data_is_rejected(rng):
    X = rng.standard_normal((50, 4)).astype(np.float32)
    P = rng.standard_normal((20, 4)).astype(np.float32)
    g = build_knn_graph(X, 5, progress=False)
    with pytest.raises(ValueError, match="built for other data"):
        select_facility_location(rng.standard_normal((50, 4)).astype(np.float32), 3, graph=g, progress=False)
    with pytest.raises(ValueError, match="built for other data"):
        select_facility_location(X[:40], 3, graph=g, progress=False)
    with pytest.raises(ValueError, match="pool's own kNN graph"):
        select_facility_location(X, 3, ground=P, graph=g, progress=False)
    gp = build_knn_graph(X, 5, queries=P, progress=False)
    with pytest.raises(ValueError, match="built for other queries"):
        select_facility_location(X, 3, ground=P[::-1].copy(), graph=gp, progress=False)
    gl2 = build_knn_graph(X, 5, metric="l2", progress=False)
    with pytest.raises(ValueError, match="needs a similarity graph"):
        select_facility_location(X, 3, graph=gl2, progress=False)
    gip = build_knn_graph(X, 5, metric="ip", progress=False)
    with pytest.raises(ValueError, match="pass metric='ip'"):
        select_facility_location(X, 3, graph=gip, progress=False)


def _X(rng, n=12, d=3):
    return rng.standard_normal((n, d)).astype(np.float32)


@pytest.mark.parametrize(
    "make,kw,exc,match",
    [
        (lambda r: np.array([[1.0, 2.0]] * 4 + [[np.nan, 1.0]], np.float32), {}, ValueError,
         r"X has NaN or inf values \(first in row 4\)"),
        (lambda r: _X(r), {"ground": np.array([[1, 2, 3], [np.inf, 0, 0]], np.float32)}, ValueError,
         r"ground has NaN or inf values \(first in row 1\)"),
        (lambda r: _X(r), {"k": 0}, ValueError, "k must be >= 1"),
        (lambda r: _X(r), {"k": -2}, ValueError, "k must be >= 1"),
        (lambda r: _X(r), {"k": 13}, ValueError, r"k=13 is larger than the pool \(N=12\)"),
        (lambda r: np.zeros((0, 3), np.float32), {"k": 1}, ValueError, "X must be non-empty"),
        (lambda r: _X(r), {"ground": np.zeros((0, 3), np.float32)}, ValueError, "ground must be non-empty"),
        (lambda r: np.ones((12, 3), np.int32), {}, TypeError, "X must have a floating dtype"),
        (lambda r: _X(r), {"ground": np.ones((4, 3), np.int64)}, TypeError, "ground must have a floating dtype"),
        (lambda r: _X(r), {"ground": np.ones((4, 5), np.float32)}, ValueError,
         "ground has dimension D=5, but X has D=3"),
        (lambda r: _X(r), {"n_neighbors": 12}, ValueError, r"n_neighbors=12 must be smaller than the pool size N=12"),
        (lambda r: _X(r), {"n_neighbors": 0}, ValueError, "n_neighbors must be >= 1"),
        (lambda r: _X(r), {"weights": np.ones(11)}, ValueError, r"weights must have shape \(12,\)"),
        (lambda r: _X(r), {"ground": np.ones((4, 3), np.float32), "weights": np.ones(12)}, ValueError,
         r"weights must have shape \(4,\)"),
        (lambda r: _X(r), {"weights": -np.ones(12)}, ValueError, "weights must be >= 0"),
        (lambda r: _X(r), {"weights": np.full(12, np.nan)}, ValueError, "weights has NaN or inf"),
        (lambda r: _X(r), {"optimizer": "greedy"}, ValueError,
         "optimizer must be one of 'lazy', 'stochastic', 'naive'"),
        (lambda r: _X(r), {"graph": "sparse"}, ValueError, "graph must be one of 'knn', 'dense'"),
        (lambda r: _X(r), {"graph": 3}, TypeError, "graph must be 'knn', 'dense' or a KnnGraph"),
        (lambda r: _X(r), {"metric": "l2"}, ValueError, "metric must be one of 'cosine', 'ip'"),
        (lambda r: _X(r), {"optimizer": "stochastic", "epsilon": 0.0}, ValueError,
         r"epsilon must be a number in \(0, 1\)"),
        (lambda r: _X(r), {"epsilon": 1.5}, ValueError, r"epsilon must be a number in \(0, 1\)"),
        (lambda r: np.array([[1.0, 2.0]] * 4 + [[0.0, 0.0]], np.float32), {"graph": "dense"}, ValueError,
         "X row 4 is all zeros"),
        (lambda r: np.array([[1.0, 2.0]] * 4 + [[0.0, 0.0]], np.float32), {"graph": "knn", "n_neighbors": 2},
         ValueError, "X row 4 is all zeros"),
        (lambda r: [[1.0, 2.0]], {}, TypeError, "X must be a NumPy array"),
    ],
)
def test_bad_inputs(make, kw, exc, match, rng):
    kw = dict(kw)
    k = kw.pop("k", 2)
    with pytest.raises(exc, match=match):
        select_facility_location(make(rng), k, progress=False, **kw)


def test_dense_above_materialise_limit_runs_on_the_fly_in_torch(rng, monkeypatch):
    # above DENSE_MATERIALIZE_PAIRS graph="dense" runs on the fly: auto falls to torch, cpp says why
    monkeypatch.setattr(fl_mod, "DENSE_MATERIALIZE_PAIRS", 100)
    X = _X(rng)
    sel = select_facility_location(X, 2, graph="dense", progress=False)
    assert sel.backend == "torch" and sel.info["graph"] == "dense (on the fly)"
    with pytest.raises(BackendNotSupportedError, match=r"M x N = 12 x 12 pairs .*runs in the torch backend"):
        select_facility_location(X, 2, graph="dense", backend="cpp", progress=False)


def test_cuda_backend_without_gpu_says_why(rng):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(BackendNotSupportedError, match="backend 'cuda' cannot run facility_location"):
        select_facility_location(_X(rng), 2, backend="cuda", progress=False)


def test_op_is_registered_with_three_backends():
    from metamoe.backends import get_op

    op = get_op("facility_location")
    assert [i.backend for i in op.ordered()] == ["cuda", "cpp", "torch"]


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer", ["lazy", "naive"])
@pytest.mark.parametrize("ground", [False, True])
def test_cuda_matches_cpp(optimizer, ground, rng):
    skip_unavailable("cuda")
    X = rng.standard_normal((5000, 32)).astype(np.float32)
    P = rng.standard_normal((700, 32)).astype(np.float32) if ground else None
    w = rng.uniform(0, 1, 700 if ground else 5000)
    g = build_knn_graph(X, 20, queries=P, method="torch", progress=False)  # no faiss on a GPU box
    ref = select_facility_location(X, 200, ground=P, weights=w, graph=g, backend="cpp", progress=False)
    Xg = torch.from_numpy(X).cuda()
    Pg = torch.from_numpy(P).cuda() if ground else None
    sel = select_facility_location(Xg, 200, ground=Pg, weights=w, graph=g, optimizer=optimizer, backend="cuda",
                                   progress=False)
    np.testing.assert_array_equal(sel.indices, ref.indices)
    np.testing.assert_allclose(sel.gains, ref.gains, rtol=1e-12)
    assert sel.objective == pytest.approx(ref.objective, rel=1e-12)


@pytest.mark.gpu
def test_torch_on_gpu_matches_cpp(rng):
    skip_unavailable("cpp")
    X = rng.standard_normal((3000, 16)).astype(np.float32)
    g = build_knn_graph(X, 12, method="torch", progress=False)
    ref = select_facility_location(X, 80, graph=g, backend="cpp", progress=False)
    sel = select_facility_location(torch.from_numpy(X).cuda(), 80, graph=g, backend="torch", progress=False)
    np.testing.assert_array_equal(sel.indices, ref.indices)


# --------------------------------------------------------------------------- cpp transpose (built once per graph)


def _synthetic(n, K, cluster_size, seed, int64=False):
    """The clustered synthetic kNN graph of benchmarks/bench_facility_location_transpose.py."""
    from benchmarks.bench_facility_location_transpose import synthetic_graph

    X, g = synthetic_graph(n, K, cluster_size, seed)
    g.similarities[3::11] = -0.25  # entries that never contribute
    g.similarities[5::13] = 0.0
    if int64:
        g = KnnGraph(indptr=g.indptr, indices=g.indices.astype(np.int64), similarities=g.similarities,
                     n_points=g.n_points, metric=g.metric, n_neighbors=g.n_neighbors, self_included=True,
                     pool_fingerprint=g.pool_fingerprint)
    return X, g


@pytest.mark.parametrize("optimizer", EXACT)
def test_cpp_matches_torch_on_large_synthetic_graph(optimizer):
    """N = 60,000, K = 16 (clustered, ids shuffled, some similarities <= 0), weights with zeros: the cpp path
    (parallel transpose, int32 indices) gives torch's picks, gains and objective; int64 indices give the same."""
    skip_unavailable("cpp")
    X, g = _synthetic(60_000, 16, 400, seed=3)
    assert g.indices.dtype == np.int32 and (g.similarities <= 0).any()
    w = np.random.default_rng(4).random(60_000)
    w[::7] = 0.0
    k = 300 if optimizer == "lazy" else 60  # torch's naive greedy recomputes every gain each pick
    a = select_facility_location(X, k, graph=g, weights=w, optimizer=optimizer, backend="cpp", progress=False)
    b = select_facility_location(X, k, graph=g, weights=w, optimizer=optimizer, backend="torch", progress=False)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.gains, b.gains, rtol=1e-12)
    assert a.objective == pytest.approx(b.objective, rel=1e-12)
    X64, g64 = _synthetic(60_000, 16, 400, seed=3, int64=True)
    c = select_facility_location(X64, k, graph=g64, weights=w, optimizer=optimizer, backend="cpp", progress=False)
    np.testing.assert_array_equal(c.indices, a.indices)
    np.testing.assert_array_equal(c.gains, a.gains)
    assert c.objective == a.objective


def test_cpp_transpose_equals_numpy_transpose_and_checks_its_arguments():
    skip_unavailable("cpp")
    from metamoe.backends.availability import require_extension

    _C = require_extension("_C")
    _, g = _synthetic(5000, 8, 100, seed=5)
    p = fl_mod.FacilityLocationProblem(g.indptr, g.indices, g.similarities, np.ones(5000), 5000)
    t = _C.FacilityLocationTranspose(g.indptr, g.indices, g.similarities, 5000)
    for got, want in zip(t.to_numpy(), p.transpose()):
        np.testing.assert_array_equal(got, want)
    assert t.nnz == int((g.similarities > 0).sum()) and t.int32_rows
    with pytest.raises(ValueError, match="indices must be a C-contiguous int32 or int64"):
        _C.FacilityLocationTranspose(g.indptr, g.indices.astype(np.float32), g.similarities, 5000)
    with pytest.raises(ValueError, match="similarities must be a C-contiguous float32"):
        _C.FacilityLocationTranspose(g.indptr, g.indices, g.similarities.astype(np.float64), 5000)
    with pytest.raises(ValueError, match=r"outside \[0, 4000\)"):
        _C.FacilityLocationTranspose(g.indptr, g.indices, g.similarities, 4000)
    bad = g.similarities.copy()
    bad[17] = np.nan
    with pytest.raises(ValueError, match="entry 17 is NaN or inf"):
        _C.FacilityLocationTranspose(g.indptr, g.indices, bad, 5000)


def test_cpp_transpose_is_cached_on_the_graph_and_invalidated():
    skip_unavailable("cpp")
    X, g = _synthetic(20_000, 10, 200, seed=6)
    k = 100

    def run(graph, w=None, backend="cpp"):
        return select_facility_location(X, k, graph=graph, weights=w, backend=backend, progress=False)

    def cached(graph):
        holder = getattr(graph, fl_mod.TRANSPOSE_CACHE_ATTR, None)
        return None if holder is None else holder.transpose

    def same(a, b, exact=True):  # torch sums the objective in another order: equal to rounding
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_allclose(a.gains, b.gains, rtol=0 if exact else 1e-12)
        assert a.objective == b.objective if exact else a.objective == pytest.approx(b.objective, rel=1e-12)

    assert cached(g) is None
    first = run(g)
    t1 = cached(g)
    assert t1 is not None
    same(run(g), first)
    assert cached(g) is t1  # reused
    # other weights: the transpose does not depend on them (reused), the result is the new weights' one
    w = np.random.default_rng(7).random(20_000)
    w[::3] = 0.0
    same(run(g, w), run(g, w, backend="torch"), exact=False)
    assert cached(g) is t1
    # similarities changed in place (same buffer): the checksum differs, a new transpose is built
    g.similarities[::5] *= np.float32(0.5)
    changed = run(g)
    assert cached(g) is not t1
    same(changed, run(g, backend="torch"), exact=False)
    assert not np.array_equal(changed.gains, first.gains)
    # indices replaced by another array (other buffer): rebuilt, and a copy of the graph carries no transpose
    t2 = cached(g)
    g.indices = g.indices.copy()
    same(run(g), changed)
    assert cached(g) is not t2
    import copy
    import pickle

    assert cached(copy.deepcopy(g)) is None
    same(run(copy.copy(g)), changed)  # a shallow copy shares the arrays, so it may share the transpose
    assert cached(pickle.loads(pickle.dumps(g))) is None


@pytest.mark.parametrize("row_order", ["sorted", "shuffled"])
def test_lazy_equals_naive_with_many_equal_gains_on_a_large_graph(row_order):
    """N = 60,000, similarities from 7 values (gains tie within and across the lazy queue's buckets, some
    gains reach 0), rows sorted by similarity (the dirty marking stops early) or not: lazy = naive."""
    skip_unavailable("cpp")
    from metamoe.backends.availability import require_extension

    X, g = _synthetic(60_000, 12, 300, seed=11)
    rng = np.random.default_rng(12)
    sims = np.round(g.similarities * 3) / 3  # -0.333 .. 1 in thirds: entries <= 0 never count
    sims = sims.reshape(-1, 12)
    if row_order == "sorted":
        order = np.argsort(-sims, axis=1, kind="stable")
    else:
        order = np.argsort(rng.random(sims.shape), axis=1)
    cols = np.take_along_axis(g.indices.reshape(-1, 12), order, axis=1).reshape(-1)
    sims = np.ascontiguousarray(np.take_along_axis(sims, order, axis=1).reshape(-1), dtype=np.float32)
    t = require_extension("_C").FacilityLocationTranspose(g.indptr, cols, sims, 60_000)
    assert t.sorted_rows == (row_order == "sorted")
    graph = KnnGraph(indptr=g.indptr, indices=cols, similarities=sims, n_points=60_000, metric="cosine",
                     n_neighbors=12, self_included=True, pool_fingerprint=g.pool_fingerprint)
    k = 2000
    lazy = select_facility_location(X, k, graph=graph, optimizer="lazy", backend="cpp", progress=False)
    naive = select_facility_location(X, k, graph=graph, optimizer="naive", backend="cpp", progress=False)
    np.testing.assert_array_equal(lazy.indices, naive.indices)
    np.testing.assert_array_equal(lazy.gains, naive.gains)
    assert lazy.objective == naive.objective
    assert len(set(lazy.indices.tolist())) == k


def test_torch_backend_reuses_the_cached_transpose_and_falls_back_without_cpp(monkeypatch):
    """The torch (and CUDA) backends take the transpose arrays from the graph's cached C++ transpose (kept
    beside it after the first call); without the extension they build them in NumPy. Same picks either way,
    with weight-0 ground points (their entries stay in the C++ transpose and add +0.0)."""
    skip_unavailable("cpp")
    X, g = _synthetic(8000, 10, 200, seed=13)
    w = np.random.default_rng(14).random(8000)
    w[::5] = 0.0
    a = select_facility_location(X, 150, graph=g, weights=w, backend="torch", progress=False)
    holder = getattr(g, fl_mod.TRANSPOSE_CACHE_ATTR)
    arrays = holder.arrays
    assert arrays is not None and len(arrays[1]) == int((g.similarities > 0).sum())
    b = select_facility_location(X, 150, graph=g, weights=w, backend="torch", progress=False)
    assert holder.arrays is arrays  # reused, not rebuilt
    ref = select_facility_location(X, 150, graph=g, weights=w, backend="cpp", progress=False)
    import metamoe.backends.availability as availability

    real = availability.backend_unavailable_reason
    monkeypatch.setattr(availability, "backend_unavailable_reason",
                        lambda backend: "not built" if backend == "cpp" else real(backend))
    copy = fl_mod.KnnGraph(**{f: getattr(g, f) for f in (
        "indptr", "indices", "similarities", "n_points", "metric", "n_neighbors", "self_included", "pool_fingerprint")})
    c = select_facility_location(X, 150, graph=copy, weights=w, backend="torch", progress=False)
    assert getattr(copy, fl_mod.TRANSPOSE_CACHE_ATTR, None) is None  # NumPy's transpose: nothing cached
    for sel in (a, b, c):
        np.testing.assert_array_equal(sel.indices, ref.indices)
        np.testing.assert_allclose(sel.gains, ref.gains, rtol=1e-12)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_stochastic_with_the_whole_pool_as_sample_is_the_exact_greedy_ties_included(backend):
    """epsilon so small that every pick samples all remaining candidates: the stochastic greedy must then
    be the exact one, ties to the lowest index included (many equal gains: similarities in thirds)."""
    skip_unavailable(backend)
    X, g = _synthetic(3000, 8, 100, seed=21)
    sims = np.ascontiguousarray(np.round(g.similarities * 3) / 3, dtype=np.float32)
    graph = KnnGraph(indptr=g.indptr, indices=g.indices, similarities=sims, n_points=3000, metric="cosine",
                     n_neighbors=8, self_included=True, pool_fingerprint=g.pool_fingerprint)
    k = 200
    assert fl_mod.sample_size(3000, k, 1e-300) == 3000
    stoch = select_facility_location(X, k, graph=graph, optimizer="stochastic", epsilon=1e-300, seed=3,
                                     backend=backend, progress=False)
    naive = select_facility_location(X, k, graph=graph, optimizer="naive", backend="cpp", progress=False)
    np.testing.assert_array_equal(stoch.indices, naive.indices)
    np.testing.assert_allclose(stoch.gains, naive.gains, rtol=1e-12)
