"""build_knn_graph against float64 NumPy brute force: exact methods, IVF recall, CSR layout, persistence, bad input."""

import numpy as np
import pytest
import torch
from references import knn_brute_force

from metamoe.selection import KnnGraph, build_knn_graph

EXACT_METHODS = ["exact", "torch"]


def _rows(g):
    return [
        (g.indices[g.indptr[q] : g.indptr[q + 1]], g.similarities[g.indptr[q] : g.indptr[q + 1]])
        for q in range(g.n_queries)
    ]


def _assert_matches_brute_force(g, ref_s, ref_i, tol=1e-5):
    """Similarities equal (to float32 rounding); neighbour sets equal wherever the K-th place is not a near-tie."""
    rows = _rows(g)
    K = ref_i.shape[1]
    for q, (idx, sims) in enumerate(rows):
        assert len(idx) == K
        np.testing.assert_allclose(sims, ref_s[q], rtol=tol, atol=tol, err_msg=f"row {q}")
        assert np.all(np.diff(sims) <= 1e-6), f"row {q} is not sorted by decreasing similarity"
        assert set(idx.tolist()) == set(ref_i[q].tolist()), f"row {q}: {sorted(idx)} != {sorted(ref_i[q])}"


@pytest.mark.parametrize("method", EXACT_METHODS)
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_pool_graph_is_exact(method, metric, rng):
    X = rng.standard_normal((211, 9)).astype(np.float32)
    g = build_knn_graph(X, 7, metric=metric, method=method, progress=False)
    ref_s, ref_i = knn_brute_force(X, X, 7, metric)
    assert (ref_i[:, 0] == np.arange(211)).all()  # self is the nearest under cosine and l2
    _assert_matches_brute_force(g, ref_s, ref_i, tol=2e-5 if metric == "cosine" else 1e-4)
    assert g.self_included and g.query_fingerprint is None and g.shape == (211, 211)


@pytest.mark.parametrize("method", EXACT_METHODS)
@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_query_graph_is_exact(method, metric, rng):
    X = rng.standard_normal((300, 12)).astype(np.float32)
    P = rng.standard_normal((57, 12)).astype(np.float32)
    g = build_knn_graph(X, 10, queries=P, metric=metric, method=method, progress=False)
    assert g.shape == (57, 300) and not g.self_included and g.query_fingerprint["n"] == 57
    ref_s, ref_i = knn_brute_force(X, P, 10, metric)
    _assert_matches_brute_force(g, ref_s, ref_i, tol=1e-4)


@pytest.mark.parametrize("method", EXACT_METHODS)
def test_exclude_self(method, rng):
    X = rng.standard_normal((120, 6)).astype(np.float32)
    g = build_knn_graph(X, 5, include_self=False, method=method, progress=False)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    full = Xn.astype(np.float64) @ Xn.T.astype(np.float64)
    np.fill_diagonal(full, -np.inf)
    ref_i = np.argsort(-full, axis=1, kind="stable")[:, :5]
    ref_s = np.take_along_axis(full, ref_i, axis=1)
    for q, (idx, sims) in enumerate(_rows(g)):
        assert q not in idx.tolist()
        assert set(idx.tolist()) == set(ref_i[q].tolist())
        np.testing.assert_allclose(sims, ref_s[q], rtol=1e-5, atol=1e-5)
    assert not g.self_included


def test_inner_product_pool_graph_lists_self(rng):
    # under "ip" another row can beat x.x; include_self=True still lists the point itself
    X = rng.standard_normal((90, 4)).astype(np.float32) * rng.uniform(0.1, 3.0, (90, 1)).astype(np.float32)
    g = build_knn_graph(X, 4, metric="ip", progress=False)
    for q, (idx, sims) in enumerate(_rows(g)):
        assert q in idx.tolist()
        pos = idx.tolist().index(q)
        assert sims[pos] == pytest.approx(float(X[q].astype(np.float64) @ X[q]), rel=1e-5)
        assert np.all(np.diff(sims) <= 1e-6)


def test_self_included_with_many_duplicates():
    # 6 copies of each of 3 directions, K = 3: the search alone may not list the point itself
    X = np.repeat(np.eye(3, dtype=np.float32), 6, axis=0)
    for method in EXACT_METHODS:
        g = build_knn_graph(X, 3, method=method, progress=False)
        for q, (idx, sims) in enumerate(_rows(g)):
            assert q in idx.tolist(), (method, q, idx)
            np.testing.assert_allclose(sims, 1.0, atol=1e-6)
            assert set((idx // 6).tolist()) == {q // 6}  # neighbours are copies of q


def test_csr_layout_and_dtypes(rng):
    X = rng.standard_normal((50, 5)).astype(np.float32)
    g = build_knn_graph(X, 4, progress=False)
    assert g.indptr.dtype == np.int64 and g.indptr.shape == (51,)
    np.testing.assert_array_equal(g.indptr, np.arange(51) * 4)
    assert g.indices.dtype == np.int32 and g.similarities.dtype == np.float32
    assert g.nnz == 200 and g.metric == "cosine" and g.n_neighbors == 4
    assert g.info["method"] == "faiss-flat" and g.info["seconds"] >= 0


def test_torch_and_faiss_agree(rng):
    X = rng.standard_normal((500, 16)).astype(np.float32)
    a = build_knn_graph(X, 8, method="exact", progress=False)
    b = build_knn_graph(X, 8, method="torch", progress=False)
    np.testing.assert_allclose(a.similarities, b.similarities, rtol=1e-5, atol=1e-6)
    assert (a.indices == b.indices).mean() > 0.99


def _blobs(rng, n, d, centers):
    C = rng.standard_normal((centers, d)) * 4
    lab = rng.integers(0, centers, n)
    return (C[lab] + rng.standard_normal((n, d))).astype(np.float32)


def test_ivf_recall_is_measured_and_high_on_clustered_data(rng):
    X = _blobs(rng, 4000, 16, 20)
    g = build_knn_graph(X, 10, method="ivf", recall_sample=400, progress=False)
    info = g.info
    assert info["method"] == "faiss-ivf"
    assert info["nlist"] == min(4000 // 39, round(4 * np.sqrt(4000))) and 1 <= info["nprobe"] <= info["nlist"]
    assert info["recall_sample"] == 400
    # the reported recall is an estimate of the true recall@K over all queries
    _, ref_i = knn_brute_force(X, X, 10)
    true = np.mean([len(set(idx.tolist()) & set(ref_i[q].tolist())) / 10 for q, (idx, _) in enumerate(_rows(g))])
    assert info["recall"] >= 0.9 and true >= 0.9
    assert abs(info["recall"] - true) < 0.05


def test_ivf_low_nprobe_reports_lower_recall(rng):
    X = rng.standard_normal((3000, 24)).astype(np.float32)  # no structure: IVF with 1 probe misses neighbours
    g = build_knn_graph(X, 10, method="ivf", nprobe=1, progress=False)
    _, ref_i = knn_brute_force(X, X, 10)
    true = np.mean([len(set(idx.tolist()) & set(ref_i[q].tolist())) / 10 for q, (idx, _) in enumerate(_rows(g))])
    assert g.info["recall"] < 0.9
    assert abs(g.info["recall"] - true) < 0.06


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_ivf_hnsw_quantizer_finds_the_same_lists_as_flat(rng, metric):
    # an HNSW graph over the centroids replaces the exhaustive centroid scan; on clustered data it should
    # find the same nprobe lists, so the graph's neighbours match the flat quantizer's almost everywhere
    X = _blobs(rng, 3000, 16, 12)
    kw = dict(method="ivf", nlist=40, nprobe=4, metric=metric, recall_sample=300, progress=False)
    flat = build_knn_graph(X, 8, quantizer="flat", **kw)
    hnsw = build_knn_graph(X, 8, quantizer="hnsw", **kw)
    assert flat.info["quantizer"] == "flat" and hnsw.info["quantizer"] == "hnsw"
    same = np.mean([len(set(a.tolist()) & set(b.tolist())) / 8 for (a, _), (b, _) in zip(_rows(flat), _rows(hnsw))])
    assert same > 0.97
    _, ref_i = knn_brute_force(X, X, 8, metric=metric)
    true = np.mean([len(set(idx.tolist()) & set(ref_i[q].tolist())) / 8 for q, (idx, _) in enumerate(_rows(hnsw))])
    assert hnsw.info["recall"] > 0.9 and abs(hnsw.info["recall"] - true) < 0.05


def test_ivf_quantizer_auto_switches_to_hnsw_at_many_lists(rng, monkeypatch):
    import metamoe.selection.knn_graph as kg

    X = _blobs(rng, 2000, 8, 10)
    assert build_knn_graph(X, 5, method="ivf", nlist=20, progress=False).info["quantizer"] == "flat"
    monkeypatch.setattr(kg, "AUTO_HNSW_MIN_NLIST", 16)
    assert build_knn_graph(X, 5, method="ivf", nlist=20, progress=False).info["quantizer"] == "hnsw"
    with pytest.raises(ValueError, match="quantizer must be one of"):
        build_knn_graph(X, 5, method="ivf", quantizer="ivf", progress=False)


def test_auto_uses_ivf_above_threshold(rng, monkeypatch):
    import metamoe.selection.knn_graph as kg

    X = rng.standard_normal((400, 8)).astype(np.float32)
    assert build_knn_graph(X, 5, progress=False).info["method"] == "faiss-flat"
    monkeypatch.setattr(kg, "AUTO_IVF_MIN_PAIRS", 1000)
    g = build_knn_graph(X, 5, progress=False)
    assert g.info["method"] == "faiss-ivf" and "recall" in g.info


def test_save_load_roundtrip(tmp_path, rng):
    X = rng.standard_normal((80, 6)).astype(np.float32)
    P = rng.standard_normal((20, 6)).astype(np.float32)
    g = build_knn_graph(X, 5, queries=P, progress=False)
    g.save(tmp_path / "g.npz")
    with np.load(tmp_path / "g.npz", allow_pickle=False) as z:  # no pickle needed
        assert set(z.files) == {"indptr", "indices", "similarities", "meta"}
    h = KnnGraph.load(tmp_path / "g.npz")
    np.testing.assert_array_equal(h.indptr, g.indptr)
    np.testing.assert_array_equal(h.indices, g.indices)
    np.testing.assert_array_equal(h.similarities, g.similarities)
    assert h.shape == g.shape and h.metric == g.metric and h.info == g.info
    assert h.pool_fingerprint == g.pool_fingerprint and h.query_fingerprint == g.query_fingerprint
    h.check_matches(X, P)


def test_fingerprint_rejects_other_data(rng):
    X = rng.standard_normal((60, 4)).astype(np.float32)
    P = rng.standard_normal((10, 4)).astype(np.float32)
    g = build_knn_graph(X, 3, progress=False)
    g.check_matches(X)
    g.check_matches(torch.from_numpy(X))  # same data as a tensor
    with pytest.raises(ValueError, match="built for other data"):
        g.check_matches(rng.standard_normal((60, 4)).astype(np.float32))
    with pytest.raises(ValueError, match="built for other data"):
        g.check_matches(X[:59])
    with pytest.raises(ValueError, match="pool's own kNN graph"):
        g.check_matches(X, P)
    gp = build_knn_graph(X, 3, queries=P, progress=False)
    with pytest.raises(ValueError, match="built for other queries"):
        gp.check_matches(X, P + 1)
    with pytest.raises(ValueError, match="separate queries"):
        gp.check_matches(X)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_torch_low_precision_inputs(dtype, rng):
    X = torch.from_numpy(rng.standard_normal((150, 8)).astype(np.float32)).to(dtype)
    a = build_knn_graph(X, 6, progress=False)
    b = build_knn_graph(X.float().numpy(), 6, progress=False)
    np.testing.assert_allclose(a.similarities, b.similarities, rtol=1e-6, atol=1e-6)
    assert (a.indices == b.indices).mean() > 0.99
    assert a.pool_fingerprint == b.pool_fingerprint  # fingerprint hashes float32-cast rows


def test_memmap_input(tmp_path, rng):
    X = rng.standard_normal((200, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", X)
    Xm = np.load(tmp_path / "x.npy", mmap_mode="r")
    a = build_knn_graph(Xm, 6, block_rows=64, progress=False)
    b = build_knn_graph(X, 6, progress=False)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.similarities, b.similarities)


def test_n_neighbors_must_be_below_n(rng):
    X = rng.standard_normal((10, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=r"n_neighbors=10 must be smaller than the pool size N=10"):
        build_knn_graph(X, 10, progress=False)
    with pytest.raises(ValueError, match=r"n_neighbors=12 must be smaller than the pool size N=10"):
        build_knn_graph(X, 12, queries=X[:3], progress=False)
    with pytest.raises(ValueError, match="n_neighbors must be >= 1"):
        build_knn_graph(X, 0, progress=False)
    with pytest.raises(TypeError, match="n_neighbors must be an integer"):
        build_knn_graph(X, 2.0, progress=False)


@pytest.mark.parametrize(
    "X,kw,exc,match",
    [
        (np.zeros((0, 3), np.float32), {}, ValueError, "X must be non-empty"),
        (np.ones((6, 3), np.int64), {}, TypeError, "X must have a floating dtype"),
        (np.array([[1.0, 2.0]] * 5 + [[np.inf, 0.0]], np.float32), {}, ValueError,
         r"X has NaN or inf values \(first in row 5\)"),
        (np.array([[1.0, 2.0]] * 5 + [[0.0, 0.0]], np.float32), {}, ValueError, "X row 5 is all zeros"),
        (np.ones((6, 3), np.float32), {"queries": np.ones((2, 4), np.float32)}, ValueError,
         "queries have dimension D=4, but X has D=3"),
        (np.ones((6, 3), np.float32), {"queries": np.array([[np.nan, 1, 1]], np.float32)}, ValueError,
         "queries has NaN or inf"),
        (np.ones((6, 3), np.float32), {"metric": "hamming"}, ValueError, "metric must be one of"),
        (np.ones((6, 3), np.float32), {"method": "hnsw"}, ValueError, "method must be one of"),
    ],
)
def test_bad_inputs(X, kw, exc, match):
    with pytest.raises(exc, match=match):
        build_knn_graph(X, 2, progress=False, **kw)


def test_faiss_gpu_without_gpu_says_why(rng):
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("faiss sees a GPU")
    X = rng.standard_normal((20, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="method='faiss-gpu' is not available"):
        build_knn_graph(X, 2, method="faiss-gpu", progress=False)


@pytest.mark.gpu
def test_gpu_torch_graph_matches_cpu(rng):
    X = rng.standard_normal((3000, 32)).astype(np.float32)
    a = build_knn_graph(torch.from_numpy(X).cuda(), 10, method="torch", progress=False)
    want_s, want_i = knn_brute_force(X, X, 10)
    np.testing.assert_allclose(a.similarities.reshape(-1, 10), want_s, rtol=1e-4, atol=1e-5)
    assert (a.indices.reshape(-1, 10) == want_i).mean() > 0.99


def test_without_faiss_cpu_auto_uses_torch_and_faiss_methods_say_why(rng, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    X = rng.standard_normal((300, 8)).astype(np.float32)
    g = build_knn_graph(X, 5, progress=False)
    assert g.info["method"] == "torch-exact"
    want_s, want_i = knn_brute_force(X, X, 5)
    np.testing.assert_allclose(g.similarities.reshape(-1, 5), want_s, rtol=1e-5, atol=1e-6)
    assert (g.indices.reshape(-1, 5) == want_i).mean() > 0.99
    for method in ("exact", "ivf"):
        with pytest.raises(ValueError, match=f"method='{method}' on CPU data needs faiss.*pip install faiss-cpu"):
            build_knn_graph(X, 5, method=method, progress=False)
