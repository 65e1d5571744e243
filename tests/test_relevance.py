"""relevance_scores: the client-side domain classifier (private = 1, public = 0) on embeddings."""

import numpy as np
import pytest
import torch
from references import auc

from metamoe.selection import relevance_scores

D = 12


def _domains(rng, shift, n_private=300, n_in=150, n_out=1000):
    """Private set and a pool whose first n_in rows come from the private domain (mean shifted along e_0)."""
    mu = np.zeros(D)
    mu[0] = shift
    P = (rng.standard_normal((n_private, D)) + mu).astype(np.float32)
    X_in = (rng.standard_normal((n_in, D)) + mu).astype(np.float32)
    X_out = rng.standard_normal((n_out, D)).astype(np.float32)
    return P, np.concatenate([X_in, X_out]), n_in


def test_separable_domains_score_private_like_samples_higher(rng):
    P, X, n_in = _domains(rng, shift=4.0)
    r = relevance_scores(P, X, progress=False)
    assert r.shape == (len(X),) and r.dtype == np.float64
    assert (r > 0).all() and (r < 1).all()
    a = auc(r[:n_in], r[n_in:])
    # Bayes-optimal AUC for a 4-sigma mean shift is Phi(4 / sqrt 2) = 0.9977
    assert a > 0.98, a
    assert r[:n_in].mean() > 0.7 and r[n_in:].mean() < 0.3


def test_overlapping_domains_score_near_chance(rng):
    P, X, n_in = _domains(rng, shift=0.0)  # the same distribution: nothing to learn
    r = relevance_scores(P, X, progress=False)
    assert 0.4 < auc(r[:n_in], r[n_in:]) < 0.6
    assert abs(np.median(r) - 0.5) < 0.1  # balanced classes: no prior towards either label


def test_partial_overlap_orders_between(rng):
    P, X, n_in = _domains(rng, shift=1.0)
    a = auc(*np.split(relevance_scores(P, X, progress=False), [n_in]))
    # Bayes-optimal: Phi(1 / sqrt 2) = 0.760; a fitted linear model gets close
    assert 0.68 < a < 0.82, a


def test_ranking_matches_sklearn_balanced_logistic_regression(rng):
    sklearn = pytest.importorskip("sklearn.linear_model")
    from scipy.stats import spearmanr

    P, X, _ = _domains(rng, shift=1.5)
    offset = (rng.standard_normal(D) * 3).astype(np.float32)  # standardisation must absorb a common offset
    P, X = P + offset, X + offset
    r = relevance_scores(P, X, progress=False, weight_decay=0.0)
    Z = np.concatenate([P, X]).astype(np.float64)
    y = np.concatenate([np.ones(len(P)), np.zeros(len(X))])
    ref = (
        sklearn.LogisticRegression(class_weight="balanced", C=1e6, max_iter=5000)
        .fit(Z, y)
        .predict_proba(X)[:, 1]
    )
    assert spearmanr(r, ref).statistic > 0.995
    np.testing.assert_allclose(r, ref, atol=0.06)


def test_seeded_and_deterministic(rng):
    P, X, _ = _domains(rng, shift=1.0)
    a = relevance_scores(P, X, seed=3, progress=False)
    b = relevance_scores(P, X, seed=3, progress=False)
    c = relevance_scores(P, X, seed=4, progress=False)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_allclose(a, c, atol=0.1)  # another seed: another sample order, nearly the same model


def test_memmap_input_equals_in_memory(tmp_path, rng):
    P, X, _ = _domains(rng, shift=2.0)
    np.save(tmp_path / "p.npy", P.astype(np.float16))
    np.save(tmp_path / "x.npy", X.astype(np.float16))
    Pm = np.load(tmp_path / "p.npy", mmap_mode="r")
    Xm = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert isinstance(Xm, np.memmap) and not Xm.flags.writeable
    ref = relevance_scores(P.astype(np.float16), X.astype(np.float16), progress=False, chunk_size=100)
    got = relevance_scores(Pm, Xm, progress=False, chunk_size=100)  # chunks smaller than the pool: streamed
    np.testing.assert_array_equal(got, ref)


def test_torch_and_half_inputs(rng):
    P, X, n_in = _domains(rng, shift=3.0)
    ref = relevance_scores(P, X, progress=False)
    got = relevance_scores(torch.from_numpy(P), torch.from_numpy(X), progress=False)
    np.testing.assert_array_equal(got, ref)
    bf = relevance_scores(torch.from_numpy(P).bfloat16(), torch.from_numpy(X).bfloat16(), progress=False)
    assert auc(bf[:n_in], bf[n_in:]) > 0.95


def test_scores_stay_strictly_inside_unit_interval(rng):
    P, X, _ = _domains(rng, shift=0.0)
    P[:, :] += 50.0  # every feature separates the domains: logits far beyond float64 sigmoid saturation
    X[0] += 300.0  # one public row far beyond the private set along the separating direction ...
    X[1] -= 300.0  # ... and one far on the other side
    r = relevance_scores(P, X, progress=False, lr=1.0, weight_decay=0.0)
    assert (r > 0).all() and (r < 1).all()
    assert r[0] == 1.0 - 1e-12 and r[1] == 1e-12  # clipped, not rounded to 1 and 0


def test_single_rows_and_tiny_sets(rng):
    P = rng.standard_normal((1, D)).astype(np.float32)
    X = rng.standard_normal((3, D)).astype(np.float32)
    r = relevance_scores(P, X, progress=False)
    assert r.shape == (3,) and np.isfinite(r).all()


@pytest.mark.parametrize(
    "which,bad,exc,match",
    [
        ("private", np.zeros((0, D), np.float32), ValueError, "private must be non-empty"),
        ("public", np.zeros((0, D), np.float32), ValueError, "public must be non-empty"),
        ("public", np.ones((4, D), np.int64), TypeError, "public must have a floating dtype"),
        ("private", np.ones((4, D), np.int32), TypeError, "private must have a floating dtype"),
        (
            "public",
            np.ones((4, D + 1), np.float32),
            ValueError,
            r"same embedding dimension D.*private D=12.*public D=13",
        ),
        (
            "public",
            np.full((4, D), np.nan, np.float32),
            ValueError,
            r"public has NaN or inf values \(first in row 0\)",
        ),
        (
            "private",
            np.concatenate([np.ones((2, D)), [[np.inf] * D]]).astype(np.float32),
            ValueError,
            r"private has NaN or inf values \(first in row 2\)",
        ),
        ("public", np.ones(D, np.float32), ValueError, "public must be 2-D"),
        ("private", [[1.0] * D], TypeError, "private must be a NumPy array"),
    ],
)
def test_bad_inputs(which, bad, exc, match, rng):
    P = rng.standard_normal((5, D)).astype(np.float32)
    X = rng.standard_normal((6, D)).astype(np.float32)
    args = (bad, X) if which == "private" else (P, bad)
    with pytest.raises(exc, match=match):
        relevance_scores(*args, progress=False)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        ({"epochs": 0}, ValueError, "epochs must be >= 1"),
        ({"epochs": 1.5}, TypeError, "epochs must be an integer"),
        ({"lr": 0.0}, ValueError, "lr must be finite and > 0"),
        ({"lr": float("nan")}, ValueError, "lr must be finite"),
        ({"weight_decay": -1.0}, ValueError, "weight_decay must be finite and >= 0"),
        ({"batch_size": 1}, ValueError, "batch_size must be >= 2"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be >= 1"),
        ({"seed": "a"}, TypeError, "seed must be an integer"),
    ],
)
def test_bad_hyperparameters(kw, exc, match, rng):
    P = rng.standard_normal((5, D)).astype(np.float32)
    X = rng.standard_normal((6, D)).astype(np.float32)
    with pytest.raises(exc, match=match):
        relevance_scores(P, X, progress=False, **kw)


@pytest.mark.gpu
def test_cuda_matches_cpu(rng):
    P, X, n_in = _domains(rng, shift=3.0)
    cpu = relevance_scores(P, X, progress=False)
    gpu = relevance_scores(torch.from_numpy(P).cuda(), torch.from_numpy(X).cuda(), progress=False)
    np.testing.assert_allclose(gpu, cpu, atol=1e-3)
