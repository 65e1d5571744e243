"""The paper's claims as paired statistical tests over seeds, for the digits claims benchmark.

Per seed, the benchmark (``benchmarks/bench_unify_claims.py``) runs every method on the same data split, seed
model and clients (:func:`metamoe.unify.experiment.run_digits_experiment`), so methods are compared *paired*:
per seed, ``d_s = acc(metamoe) - acc(other)`` (average digit accuracy over the client domains). For each
comparison :func:`paired_comparison` reports the per-seed differences, their mean and sample standard
deviation, a 95 % t confidence interval of the mean, a one-sided paired t-test (H1: mean difference > 0), a
one-sided Wilcoxon signed-rank test (exact for small n, zero differences dropped) and a one-sided sign test
(wins vs losses, ties dropped). The claims (:data:`CLAIMS`; the method is described in docs/design.md):

* ``metamoe > flexolmo``, ``metamoe > random_proxy``, ``metamoe > model_soup``: "holds" when the mean difference is
  positive and the one-sided Wilcoxon p-value is below ``alpha``; "not shown" otherwise (with 5 seeds the smallest
  possible Wilcoxon / sign p-value is 1/32 = 0.031, so 5/5 wins are needed at alpha = 0.05).
* ``metamoe ~ btx_oracle`` ("comes close"): the gap ``btx_oracle - metamoe`` is reported with its 95 % interval;
  "holds" when the interval's upper end is at most ``close_margin`` (default 0.02 = two points of accuracy).
  This margin is a choice, stated in the output, not something the paper fixes.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence

import numpy as np

__all__ = ["CLAIMS", "paired_comparison", "evaluate_claims", "format_claims"]

# (other method, kind): "beats" = metamoe's mean accuracy is higher; "close" = within close_margin of it
CLAIMS = (
    ("flexolmo", "beats"),
    ("random_proxy", "beats"),
    ("model_soup", "beats"),
    ("btx_oracle", "close"),
)


def paired_comparison(a: Sequence[float], b: Sequence[float]) -> Dict[str, Any]:
    """Paired comparison of two methods' per-seed scores.

    Args:
        a: (n,) floats, method A's score per seed (n >= 2).
        b: (n,) floats, method B's score on the same seeds, same order.

    Returns:
        dict with ``diffs`` (list, a - b per seed), ``n``, ``mean``, ``std`` (sample, ddof=1), ``ci95`` ([lo, hi],
        t interval of the mean), ``wins``/``losses``/``ties`` (a > b, a < b, equal), ``t_p_greater`` (one-sided
        paired t-test, H1 mean(a - b) > 0; nan when every difference is equal), ``wilcoxon_p_greater`` (one-sided
        Wilcoxon signed-rank, zero differences dropped; 1.0 when all differences are zero) and ``sign_p_greater``
        (one-sided binomial sign test on wins vs losses; 1.0 when there are none).
    """
    from scipy import stats

    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or y.shape != x.shape:
        raise ValueError(f"a and b must be 1-D of the same length, got shapes {x.shape} and {y.shape}")
    if len(x) < 2:
        raise ValueError(f"a paired comparison needs at least 2 seeds, got {len(x)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("a and b must be finite")
    d = x - y
    n = len(d)
    mean = float(d.mean())
    std = float(d.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    if std > 0:
        t_p = float(stats.ttest_rel(x, y, alternative="greater").pvalue)
    else:
        t_p = float("nan")
    nz = d[d != 0]
    wil_p = float(stats.wilcoxon(nz, alternative="greater").pvalue) if len(nz) else 1.0
    sign_p = (
        float(stats.binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue)
        if wins + losses
        else 1.0
    )
    return {
        "diffs": d.tolist(),
        "n": n,
        "mean": mean,
        "std": std,
        "ci95": [mean - half, mean + half],
        "wins": wins,
        "losses": losses,
        "ties": n - wins - losses,
        "t_p_greater": t_p,
        "wilcoxon_p_greater": wil_p,
        "sign_p_greater": sign_p,
    }


def evaluate_claims(
    per_seed: Dict[int, Dict[str, float]], alpha: float = 0.05, close_margin: float = 0.02
) -> List[Dict[str, Any]]:
    """The claims of :data:`CLAIMS` on per-seed average accuracies.

    Args:
        per_seed: ``{seed: {method: average accuracy}}``; every seed must hold ``metamoe`` and the compared methods.
        alpha: significance level of the one-sided Wilcoxon test for the "beats" claims.
        close_margin: largest tolerated upper 95 % bound of ``btx_oracle - metamoe`` for the "close" claim.

    Returns:
        one dict per claim present in the data: ``other``, ``kind``, ``claim`` (text), ``verdict`` ("holds" /
        "not shown"), and the fields of :func:`paired_comparison` for ``metamoe - other``.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if not close_margin >= 0:
        raise ValueError(f"close_margin must be >= 0, got {close_margin!r}")
    seeds = sorted(per_seed)
    out = []
    for other, kind in CLAIMS:
        if not all(other in per_seed[s] and "metamoe" in per_seed[s] for s in seeds):
            continue
        cmp = paired_comparison([per_seed[s]["metamoe"] for s in seeds], [per_seed[s][other] for s in seeds])
        if kind == "beats":
            ok = cmp["mean"] > 0 and cmp["wilcoxon_p_greater"] < alpha
            claim = f"metamoe > {other} (one-sided Wilcoxon p < {alpha})"
        else:
            ok = (
                -cmp["ci95"][0] <= close_margin
            )  # gap = other - metamoe; its upper bound = -(lower bound of d)
            claim = f"{other} - metamoe <= {close_margin} (upper end of the 95% interval)"
        out.append(
            {"other": other, "kind": kind, "claim": claim, "verdict": "holds" if ok else "not shown", **cmp}
        )
    return out


def format_claims(per_seed: Dict[int, Dict[str, float]], claims: List[Dict[str, Any]]) -> str:
    """Two fixed-width tables: average accuracy per seed and method (with mean ± std), and the claims."""
    seeds = sorted(per_seed)
    methods = list(per_seed[seeds[0]])
    head = f"{'method':<14}" + "".join(f"{'s' + str(s):>7}" for s in seeds) + f"{'mean':>8}{'std':>7}"
    lines = [head, "-" * len(head)]
    for m in methods:
        v = np.array([per_seed[s][m] for s in seeds])
        lines.append(f"{m:<14}" + "".join(f"{x:>7.3f}" for x in v) + f"{v.mean():>8.3f}{v.std(ddof=1):>7.3f}")
    lines.append("")
    h2 = (
        f"{'metamoe vs':<14}{'mean diff':>10}{'std':>7}{'95% CI':>18}{'W/L/T':>8}{'t p':>8}{'Wilc p':>8}"
        f"{'sign p':>8}  verdict"
    )
    lines += [h2, "-" * len(h2)]
    for c in claims:
        ci = f"[{c['ci95'][0]:+.3f},{c['ci95'][1]:+.3f}]"
        lines.append(
            f"{c['other']:<14}{c['mean']:>+10.3f}{c['std']:>7.3f}{ci:>18}"
            f"{str(c['wins']) + '/' + str(c['losses']) + '/' + str(c['ties']):>8}"
            f"{c['t_p_greater']:>8.3f}{c['wilcoxon_p_greater']:>8.3f}{c['sign_p_greater']:>8.3f}  "
            f"{c['verdict']}: {c['claim']}"
        )
    return "\n".join(lines)
