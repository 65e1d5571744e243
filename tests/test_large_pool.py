"""Pools larger than memory (issue 6, item 5): every selector works from a read-only ``np.memmap``.

Two kinds of checks:

* Same picks: a clustered pool stored as a float16 ``.npy`` and opened with ``mmap_mode="r"`` gives the
  picks of the same data held in memory (float16, and float32: the float16 -> float32 cast is exact, so a
  blockwise conversion must not change the arithmetic), for every method and backend here.
* Bounded memory: in a fresh process, each method runs on a memmapped pool (100k x 512 float16) whose float32 copy is
  195 MiB and the peak resident memory it adds (VmHWM, reset before each method through /proc/self/clear_refs,
  with the memmap's pages made resident first so that only new memory counts) must stay below a quarter
  of that. A deliberate float32 copy of the pool is measured the same way and must exceed the bound, so
  the assertion can fail (it does on the old torch DPP path, which cast the whole pool to float64).
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import skip_unavailable
from references import knn_brute_force

from metamoe.backends import availability
from metamoe.selection import (
    relevance_scores,
    select_dpp,
    select_facility_location,
    select_random,
    select_top_relevance,
)
from metamoe.selection.knn_graph import build_knn_graph
from metamoe.selection.validation import check_embeddings

N, D, M = 10_000, 64, 200

# small problems: one intra-op thread (conftest), far faster on a shared CPU than OpenMP spin-waits
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _clustered(n, d, m, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((50, d))
    X = centres[rng.integers(0, 50, n)] + 0.5 * rng.standard_normal((n, d))
    P = centres[rng.integers(0, 3, m)] + 0.5 * rng.standard_normal((m, d))
    return X.astype(np.float16), P.astype(np.float32)


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    X16, P = _clustered(N, D, M)
    path = tmp_path_factory.mktemp("pool") / "pool.npy"
    np.save(path, X16)
    mm = np.load(path, mmap_mode="r")
    assert isinstance(mm, np.memmap) and not mm.flags.writeable
    r = relevance_scores(P, X16, epochs=1, seed=0, progress=False)
    return {"mm": mm, "mem16": np.load(path), "mem32": X16.astype(np.float32), "P": P, "r": r}


def _same(a, b, what):
    np.testing.assert_array_equal(a.indices, b.indices, err_msg=f"{what}: picks differ")
    np.testing.assert_allclose(a.gains, b.gains, rtol=1e-12, atol=0, err_msg=f"{what}: gains differ")


def test_relevance_from_memmap_equals_in_memory(pools):
    a = relevance_scores(pools["P"], pools["mm"], epochs=1, seed=0, progress=False)
    np.testing.assert_array_equal(a, pools["r"])
    b = relevance_scores(pools["P"], pools["mem32"], epochs=1, seed=0, progress=False)
    np.testing.assert_array_equal(b, pools["r"])
    # the scores mean something on this data: the private clusters rank first
    assert a.min() > 0 and a.max() < 1


def test_baselines_from_memmap(pools):
    top = select_top_relevance(pools["r"], 500)  # relevance from the memmap: see the test above
    np.testing.assert_array_equal(top.indices, np.argsort(-pools["r"], kind="stable")[:500])
    _same(select_random(pools["mm"].shape[0], 500, seed=3), select_random(N, 500, seed=3), "random")


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("kernel", ["cosine", "rbf"])
def test_dpp_from_memmap_equals_in_memory(pools, backend, kernel):
    skip_unavailable(backend)
    k = 25 if kernel == "cosine" else 10
    kw = dict(kernel=kernel, ridge=1e-3, backend=backend, progress=False)
    ref = select_dpp(pools["mem16"], k, pools["r"], **kw)
    _same(select_dpp(pools["mm"], k, pools["r"], **kw), ref, f"dpp {kernel} {backend} memmap")
    # small blocks: the streaming must not change the arithmetic (each row's product is its own)
    _same(select_dpp(pools["mm"], k, pools["r"], chunk_rows=777, **kw), ref, f"dpp {kernel} {backend} blocks")
    if backend == "torch":  # float16 -> float32 is exact: the float32 pool gives the same picks
        _same(select_dpp(pools["mem32"], k, pools["r"], **kw), ref, f"dpp {kernel} torch float32")


def test_dpp_candidates_from_memmap(pools):
    backend = "cpp" if availability.backend_unavailable_reason("cpp") is None else "torch"
    a = select_dpp(pools["mm"], 60, pools["r"], candidates=2000, ridge=1e-3, backend=backend, progress=False)
    b = select_dpp(pools["mem16"], 60, pools["r"], candidates=2000, ridge=1e-3, backend=backend, progress=False)
    _same(a, b, "dpp candidates")
    top = set(np.argsort(-pools["r"], kind="stable")[:2000].tolist())
    assert set(a.indices.tolist()) <= top


def test_exact_knn_slices_equal_one_index(pools):
    """A pool larger than max_index_bytes is searched slice by slice: the same neighbours as one Flat index."""
    mm, P = pools["mm"], pools["P"]
    one = build_knn_graph(pools["mem16"], 10, queries=P, method="exact", progress=False)
    sliced = build_knn_graph(mm, 10, queries=P, method="exact", max_index_bytes=4 * D * 3001, block_rows=1000,
                             progress=False)
    assert sliced.info["slices"] == -(-N // 3001) and "slices" not in one.info
    np.testing.assert_array_equal(sliced.indptr, one.indptr)
    # the same neighbour sets (float16 data: equal similarities may come in either order), same values
    a, b = sliced.indices.reshape(-1, 10), one.indices.reshape(-1, 10)
    assert all(set(x) == set(y) for x, y in zip(a, b))
    np.testing.assert_allclose(sliced.similarities, one.similarities, rtol=0, atol=1e-6)
    # and against an independent float64 reference
    _, ref = knn_brute_force(pools["mem32"], P, 10)
    agree = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(sliced.indices.reshape(-1, 10), ref)])
    assert agree > 0.999, agree
    sliced.check_matches(mm, P)  # fingerprinting a read-only memmap reads 64 rows, no copy


@pytest.mark.parametrize("storage", ["float32", "float16", "int8"])
def test_ivf_graph_from_memmap(pools, storage):
    kw = dict(method="ivf", nlist=64, nprobe=8, recall_sample=300, storage=storage, progress=False)
    a = build_knn_graph(pools["mm"], 10, **kw)
    b = build_knn_graph(pools["mem16"], 10, **kw)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert a.info["storage"] == storage and a.info["recall"] > 0.8, a.info


def test_ivf_storage_rejects_unknown(pools):
    with pytest.raises(ValueError, match="storage"):
        build_knn_graph(pools["mm"], 5, method="ivf", storage="bf16", progress=False)


@pytest.mark.parametrize("graph", ["knn", "dense"])
def test_facility_location_private_ground_from_memmap(pools, graph):
    kw = dict(ground=pools["P"], graph=graph, progress=False)
    _same(select_facility_location(pools["mm"], 30, **kw), select_facility_location(pools["mem16"], 30, **kw),
          f"fl private {graph}")


def test_facility_location_pool_ground_from_memmap(pools):
    mm = pools["mm"][:2101]  # a memmap slice is still a memmap (ground = pool: 2101^2 pairs, on the fly)
    for graph in ("knn", "dense"):
        a = select_facility_location(mm, 10, graph=graph, progress=False)
        b = select_facility_location(pools["mem16"][:2101], 10, graph=graph, progress=False)
        _same(a, b, f"fl pool {graph}")


def test_finite_check_streams_and_names_the_row(tmp_path):
    X = np.ones((5000, 8), dtype=np.float16)
    X[4321, 3] = np.inf
    np.save(tmp_path / "bad.npy", X)
    mm = np.load(tmp_path / "bad.npy", mmap_mode="r")
    with pytest.raises(ValueError, match="row 4321"):
        check_embeddings(mm, chunk_rows=1000, zero_copy_readonly=True)
    with pytest.raises(ValueError, match="row 4321"):
        select_dpp(mm, 3, progress=False)
    t = check_embeddings(np.load(tmp_path / "bad.npy", mmap_mode="r")[:4000], zero_copy_readonly=True)
    assert t.shape == (4000, 8)


# --------------------------------------------------------------------------- bounded memory

_CHILD = textwrap.dedent(
    r'''
    import json, sys
    import numpy as np

    path, n, d, m = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    have_cpp = sys.argv[5] == "1"

    def status(field):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    from metamoe.selection import (relevance_scores, select_dpp, select_facility_location,
                                   select_top_relevance)
    from metamoe.selection.knn_graph import build_knn_graph
    import metamoe.selection.facility_location_dense as dense_mod

    # graph="dense" keeps pools up to DENSE_POOL_COPY_BYTES (256 MiB) as one float32 copy; this pool
    # stands in for a larger one, so lower the limit to what it is relative to the real one
    dense_mod.DENSE_POOL_COPY_BYTES = 1 << 26
    rng = np.random.default_rng(0)
    X = np.load(path, mmap_mode="r")
    P = (np.asarray(X[:m], dtype=np.float32) + 0.1 * rng.standard_normal((m, d))).astype(np.float32)
    r = rng.uniform(0.1, 1.0, n)
    KNN = dict(max_index_bytes=1 << 24)

    def methods(X, r, P):
        return {
            "relevance": lambda: relevance_scores(P, X, epochs=1, seed=0, chunk_size=4096, progress=False),
            "top_relevance": lambda: select_top_relevance(r, 1000),
            "dpp_torch": lambda: select_dpp(X, 2, r, backend="torch", progress=False),
            "dpp_cpp": lambda: select_dpp(X, 20, r, backend="cpp", progress=False),
            "dpp_rbf_torch": lambda: select_dpp(X, 2, r, kernel="rbf", backend="torch", progress=False),
            "dpp_candidates": lambda: select_dpp(X, 50, r, candidates=3000, ridge=1e-3, progress=False),
            "fl_private_knn": lambda: select_facility_location(
                X, 50, ground=P, graph=build_knn_graph(X, 10, queries=P, method="exact", progress=False, **KNN),
                progress=False),
            "fl_private_dense": lambda: select_facility_location(X, 5, ground=P, graph="dense", progress=False),
            "fl_pool_ivf_int8": lambda: select_facility_location(
                X, 50, graph=build_knn_graph(X, 5, method="ivf", nlist=128, nprobe=1, storage="int8",
                                             recall_sample=0, progress=False), progress=False),
            "CONTROL_float32_copy": lambda: np.asarray(X, dtype=np.float32).sum(),
        }

    small = np.load(path, mmap_mode="r")[:3000]  # warm-up: lazy imports, thread pools, BLAS buffers
    for name, fn in methods(small, r[:3000], P[:50]).items():
        if name == "dpp_cpp" and not have_cpp:
            continue
        fn()
    for a in range(0, n, 65536):  # make the memmap's pages resident: only new memory counts below
        float(np.asarray(X[a : a + 65536, 0], dtype=np.float64).sum())
    out = {}
    for name, fn in methods(X, r, P).items():
        if name == "dpp_cpp" and not have_cpp:
            continue
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current VmRSS
        base = status("VmRSS")
        fn()
        out[name] = status("VmHWM") - base
    print("RESULT " + json.dumps(out))
    '''
)


def test_peak_memory_stays_far_below_the_pool(tmp_path):
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    n, d, m = 100_000, 512, 200
    rng = np.random.default_rng(1)
    path = tmp_path / "big.npy"
    X = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, d))
    centres = rng.standard_normal((100, d)).astype(np.float32)
    for a in range(0, n, 20_000):
        X[a : a + 20_000] = (
            centres[rng.integers(0, 100, 20_000)] + 0.5 * rng.standard_normal((20_000, d), dtype=np.float32)
        )
    X.flush()
    del X
    f32_bytes = n * d * 4  # 195 MiB
    bound = f32_bytes // 4
    have_cpp = availability.backend_unavailable_reason("cpp") is None
    # glibc's dynamic mmap threshold keeps freed blocks below 32 MiB in the heap, where fragmentation then
    # holds on to them; a fixed threshold makes the peak measure what the code allocates.
    # one thread: OpenMP spin-waits make tiny ops crawl on a shared 2-core box (memory does not depend on it)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(n), str(d), str(m), "1" if have_cpp else "0"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    peaks = json.loads(line[len("RESULT "):])
    mib = {k: round(v / 2**20, 1) for k, v in peaks.items()}
    # the control proves the measurement can fail: a float32 copy of the pool alone exceeds the bound
    assert peaks.pop("CONTROL_float32_copy") > 3 * bound, mib
    # the int8 IVF lists hold N x D bytes (a quarter of the float32 pool) by design, plus faiss's training
    # sample (64 rows per list) and list growth: allowed 3/4 of the float32 pool, less than a copy would add
    limits = {name: (3 * bound if name == "fl_pool_ivf_int8" else bound) for name in peaks}
    over = {name: mib[name] for name in peaks if peaks[name] >= limits[name]}
    assert not over, f"peak memory added (MiB) over the bound ({bound / 2**20:.0f} MiB): {over}; all: {mib}"
    assert len(peaks) >= 8, mib


@pytest.mark.parametrize("optimizer", ["lazy", "stochastic"])
def test_dense_streamed_pool_equals_copied_pool(pools, monkeypatch, optimizer):
    """graph='dense' reading the pool tile by tile (as for a pool above DENSE_POOL_COPY_BYTES) gives the
    picks and gains of the float32 copy, bit for bit (the same float32 rows reach the same fixed-shape calls)."""
    import metamoe.selection.facility_location_dense as dense_mod

    kw = dict(ground=pools["P"], graph="dense", optimizer=optimizer, progress=False)
    copied = select_facility_location(pools["mm"][:5003], 25, **kw)
    monkeypatch.setattr(dense_mod, "DENSE_POOL_COPY_BYTES", 0)
    streamed = select_facility_location(pools["mm"][:5003], 25, **kw)
    np.testing.assert_array_equal(streamed.indices, copied.indices)
    np.testing.assert_array_equal(streamed.gains, copied.gains)
    assert streamed.objective == copied.objective
