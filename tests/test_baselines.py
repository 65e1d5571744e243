"""Selection baselines: top-k by relevance (similarity only) and random proxies."""

import numpy as np
import pytest
import torch

from metamoe.selection import Selection, select_random, select_top_relevance


def test_top_relevance_matches_sorted_order_with_ties(rng):
    r = np.round(rng.uniform(0, 1, 200), 1)  # 11 distinct values: many ties
    sel = select_top_relevance(r, 37)
    ref = sorted(range(200), key=lambda i: (-r[i], i))[:37]  # descending relevance, ties to lower index
    assert sel.indices.tolist() == ref
    np.testing.assert_array_equal(sel.gains, r[ref])
    assert sel.objective == pytest.approx(r[ref].sum())
    assert sel.method == "top_relevance" and sel.backend == "numpy" and sel.indices.dtype == np.int64


def test_top_relevance_edge_cases(rng):
    r = rng.uniform(0, 1, 10)
    assert select_top_relevance(r, 10).indices.tolist() == list(np.argsort(-r, kind="stable"))
    assert select_top_relevance(np.array([0.3]), 1).indices.tolist() == [0]
    flat = select_top_relevance(np.full(6, 0.5), 3)  # all tied
    assert flat.indices.tolist() == [0, 1, 2]
    t = select_top_relevance(torch.from_numpy(r).float(), 3)  # torch input, float32
    assert t.indices.tolist() == np.argsort(-r.astype(np.float32), kind="stable")[:3].tolist()


def test_random_is_seeded_distinct_and_in_range():
    a = select_random(1000, 50, seed=7)
    b = select_random(1000, 50, seed=7)
    c = select_random(1000, 50, seed=8)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, c.indices)
    assert len(set(a.indices.tolist())) == 50
    assert a.indices.min() >= 0 and a.indices.max() < 1000
    assert a.objective == 0.0 and (a.gains == 0).all() and a.method == "random"
    full = select_random(5, 5, seed=0)
    assert sorted(full.indices.tolist()) == [0, 1, 2, 3, 4]


def test_random_is_roughly_uniform():
    counts = np.zeros(20)
    for s in range(400):
        counts[select_random(20, 5, seed=s).indices] += 1
    # each index is drawn with probability 1/4 per seed: 100 expected, sd ~8.7
    assert counts.min() > 60 and counts.max() < 140


def test_json_roundtrip(tmp_path):
    sel = select_top_relevance(np.array([0.1, 0.9, 0.5]), 2)
    sel.save(tmp_path / "s.json")
    back = Selection.load(tmp_path / "s.json")
    assert back.indices.tolist() == [1, 2] and back.method == "top_relevance"
    assert back.objective == pytest.approx(1.4)


@pytest.mark.parametrize(
    "relevance,k,exc,match",
    [
        (np.array([0.2, 0.4]), 3, ValueError, r"k=3 is larger than the pool \(N=2\)"),
        (np.array([0.2, 0.4]), 0, ValueError, "k must be >= 1"),
        (np.array([0.2, 0.4]), -1, ValueError, "k must be >= 1"),
        (np.array([0.2, 0.4]), 1.0, TypeError, "k must be an integer"),
        (np.zeros(0), 1, ValueError, "relevance must be non-empty"),
        (np.ones((2, 2)), 1, ValueError, "relevance must be 1-D"),
        (np.array([0.2, 1.5]), 1, ValueError, r"relevance must lie in \[0, 1\]"),
        (np.array([-0.1, 0.5]), 1, ValueError, r"relevance must lie in \[0, 1\]"),
        (np.array([np.nan, 0.5]), 1, ValueError, "relevance has NaN or inf"),
        ([0.1, 0.2], 1, TypeError, "relevance must be a NumPy array"),
    ],
)
def test_top_relevance_bad_inputs(relevance, k, exc, match):
    with pytest.raises(exc, match=match):
        select_top_relevance(relevance, k)


@pytest.mark.parametrize(
    "n,k,seed,exc,match",
    [
        (5, 6, 0, ValueError, r"k=6 is larger than the pool \(N=5\)"),
        (5, 0, 0, ValueError, "k must be >= 1"),
        (0, 1, 0, ValueError, "n must be >= 1"),
        (5.0, 1, 0, TypeError, "n must be an integer"),
        (5, 1, -1, ValueError, "seed must be >= 0"),
        (5, 1, 0.5, TypeError, "seed must be an integer"),
    ],
)
def test_random_bad_inputs(n, k, seed, exc, match):
    with pytest.raises(exc, match=match):
        select_random(n, k, seed)
