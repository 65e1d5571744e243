"""The paper's selection baselines: similarity only (top-k by relevance, what FlexOlmo does) and random."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..utils.checks import check_int
from .result import Selection
from .validation import check_k, check_relevance


def select_top_relevance(relevance: Any, k: int) -> Selection:
    """The ``k`` most relevant samples: similarity-only proxy selection (FlexOlmo-style), no diversity.

    Args:
        relevance: (N,) relevance r_i in [0, 1] (e.g. from :func:`relevance_scores`); NumPy array,
            torch tensor (any device) or CuPy array, any real dtype; finite.
        k: number of picks, 1 <= k <= N.

    Returns:
        :class:`Selection` with ``indices`` (int64, (k,)) in decreasing relevance, ties to the lower
        index; ``gains`` = the picks' relevance (float64), so ``objective`` = the sum of the selected
        relevance; ``backend`` ``"numpy"``; ``method`` ``"top_relevance"``.
    """
    t0 = time.perf_counter()
    shape = getattr(relevance, "shape", None)
    if shape is None:
        raise TypeError(
            f"relevance must be a NumPy array, torch tensor or CuPy array, got {type(relevance).__name__}"
        )
    if len(shape) != 1:
        raise ValueError(f"relevance must be 1-D (N,), got shape {tuple(shape)}")
    n = int(shape[0])
    if n == 0:
        raise ValueError("relevance must be non-empty, got shape (0,)")
    r = check_relevance(relevance, n)
    k = check_k(k, n)
    order = np.argsort(-r, kind="stable")[:k]  # stable on -r: equal relevance keeps index order
    gains = r[order]
    return Selection(
        indices=order.astype(np.int64),
        gains=gains,
        objective=float(gains.sum()),
        backend="numpy",
        seconds=time.perf_counter() - t0,
        method="top_relevance",
        info={"n": n, "objective": "sum of the selected relevance"},
    )


def select_random(n: int, k: int, seed: int = 0) -> Selection:
    """``k`` distinct samples of ``range(n)`` uniformly at random (the random-proxies baseline).

    Args:
        n: pool size, >= 1.
        k: number of picks, 1 <= k <= n.
        seed: seed of NumPy's ``default_rng`` (the same seed gives the same picks).

    Returns:
        :class:`Selection` with ``indices`` (int64, (k,), distinct, in draw order), ``gains`` all zero
        and ``objective`` 0 (a random draw optimises nothing); ``backend`` ``"numpy"``;
        ``method`` ``"random"``.
    """
    t0 = time.perf_counter()
    n = check_int(n, "n", lo=1)
    k = check_k(k, n)
    seed = check_int(seed, "seed", lo=0)
    idx = np.random.default_rng(seed).choice(n, size=k, replace=False)
    return Selection(
        indices=idx.astype(np.int64),
        gains=np.zeros(k),
        objective=0.0,
        backend="numpy",
        seconds=time.perf_counter() - t0,
        method="random",
        info={"n": n, "seed": seed},
    )


__all__ = ["select_top_relevance", "select_random"]
