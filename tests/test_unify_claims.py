"""The claims benchmark: its paired statistics (benchmarks/claims_stats.py) against independent computations,
claim verdicts, its designs (benchmarks/digits_designs.py) and the bench script."""

import csv
import itertools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from benchmarks.claims_stats import evaluate_claims, format_claims, paired_comparison
from benchmarks.digits_designs import DESIGNS, design, design_name
from metamoe.unify.experiment import DigitsConfig, config_domains


def _wilcoxon_exact_greater(d):
    """One-sided exact Wilcoxon signed-rank p by enumerating all 2^n sign patterns (no ties in |d|)."""
    d = np.asarray([v for v in d if v != 0], dtype=np.float64)
    ranks = np.argsort(np.argsort(np.abs(d))) + 1.0
    w = ranks[d > 0].sum()
    count = sum(
        1 for signs in itertools.product((0, 1), repeat=len(d)) if (ranks * np.array(signs)).sum() >= w
    )
    return count / 2 ** len(d)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paired_comparison_matches_reference(seed):
    rng = np.random.default_rng(seed)
    n = 7
    b = rng.uniform(0.5, 0.9, n)
    a = b + rng.normal(0.01, 0.02, n)
    r = paired_comparison(a, b)
    d = a - b
    assert r["diffs"] == pytest.approx(d.tolist())
    assert r["mean"] == pytest.approx(d.mean()) and r["std"] == pytest.approx(d.std(ddof=1))
    from scipy import stats

    half = stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)
    assert r["ci95"] == pytest.approx([d.mean() - half, d.mean() + half])
    tstat = d.mean() / (d.std(ddof=1) / math.sqrt(n))
    assert r["t_p_greater"] == pytest.approx(stats.t.sf(tstat, n - 1))
    assert r["wilcoxon_p_greater"] == pytest.approx(_wilcoxon_exact_greater(d))
    w, l = int((d > 0).sum()), int((d < 0).sum())
    assert (r["wins"], r["losses"], r["ties"]) == (w, l, n - w - l)
    assert r["sign_p_greater"] == pytest.approx(
        sum(math.comb(w + l, k) for k in range(w, w + l + 1)) / 2 ** (w + l)
    )


def test_ties_and_all_equal():
    r = paired_comparison([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert r["ties"] == 3 and r["wilcoxon_p_greater"] == 1.0 and r["sign_p_greater"] == 1.0
    assert math.isnan(r["t_p_greater"])
    r = paired_comparison([0.6, 0.7, 0.8, 0.9, 1.0], [0.5, 0.6, 0.8, 0.8, 0.9])  # one tie dropped
    assert (r["wins"], r["losses"], r["ties"]) == (4, 0, 1)
    assert r["sign_p_greater"] == pytest.approx(1 / 16)


def test_bad_input():
    with pytest.raises(ValueError, match="same length"):
        paired_comparison([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least 2"):
        paired_comparison([1.0], [0.5])
    with pytest.raises(ValueError, match="finite"):
        paired_comparison([1.0, float("nan")], [0.5, 0.5])
    with pytest.raises(ValueError, match="alpha"):
        evaluate_claims({0: {"metamoe": 1}, 1: {"metamoe": 1}}, alpha=0)


def test_verdicts():
    # metamoe wins every seed by 0.02 over random_proxy, loses every seed to flexolmo, is 0.05 below btx_oracle
    per_seed = {}
    rng = np.random.default_rng(0)
    for s in range(6):
        m = 0.7 + 0.01 * rng.standard_normal()
        e = [0.001 * rng.standard_normal() for _ in range(3)]
        per_seed[s] = {
            "metamoe": m,
            "random_proxy": m - 0.02 + e[0],
            "flexolmo": m + 0.02 + e[1],
            "btx_oracle": m + 0.05 + e[2],
        }
    v = {c["other"]: c["verdict"] for c in evaluate_claims(per_seed)}
    assert v == {
        "random_proxy": "holds",
        "flexolmo": "not shown",
        "btx_oracle": "not shown",
    }  # model_soup absent
    v = {c["other"]: c["verdict"] for c in evaluate_claims(per_seed, close_margin=0.06)}
    assert v["btx_oracle"] == "holds"
    text = format_claims(per_seed, evaluate_claims(per_seed))
    assert "random_proxy" in text and "not shown" in text


def test_bench_script_quick():
    # a design with another seed pool runs too: the seed pre-trained on the selection pool
    r = subprocess.run(
        [
            sys.executable,
            "benchmarks/bench_unify_claims.py",
            "--quick",
            "--seeds",
            "0,1",
            "--no-csv",
            "--seed-pool",
            "public",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "metamoe vs" in r.stdout and "btx_oracle" in r.stdout and "QUICK" in r.stdout
    assert "variant: heldoutpool_seedpool-public_quick" in r.stdout and "seed_pool public" in r.stdout
    assert "'pretrain_per_domain': 0" in r.stdout and "'k': 12" in r.stdout  # the --quick settings ran
    assert "per-run check (metamoe >= random_proxy and > model_soup):" in r.stdout
    assert "relevance AUC" in r.stdout and "own-domain proxies, dpp" in r.stdout
    assert "mean accuracy over the seeds, per client domain:" in r.stdout
    assert "metamoe - other, paired over the seeds (descriptive):" in r.stdout and "  (seed alone)  " in r.stdout


def test_bench_from_csv_reproduces_a_live_run():
    # --from-csv re-tests the committed CSV rows; on seeds 20-39 it must print the accuracy table and the claims
    # that the live run printed into its log
    log = (Path(ROOT) / "benchmarks" / "results" / "unify_claims_outofdomain_seeds20-39.log").read_text().splitlines()
    start = next(i for i, line in enumerate(log) if line.startswith("method "))
    stop = next(i for i in range(start, len(log)) if log[i].startswith("btx_oracle ") and "verdict" not in log[i]
                and "holds" in log[i])
    r = subprocess.run(
        [sys.executable, "benchmarks/bench_unify_claims.py", "--from-csv", "--design", "outofdomain",
         "--seeds", "20-39"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout.splitlines()
    assert len(log[start : stop + 1]) > 15
    for line in log[start : stop + 1]:
        assert line in out, line
    assert "per-run check (metamoe >= random_proxy and > model_soup): 13 of 20 seeds" in r.stdout
    assert "fails on 21 (against random_proxy), 23 (against random_proxy)," in r.stdout
    # the per-domain means of the CSV rows, recomputed here
    text = (Path(ROOT) / "benchmarks" / "results" / "unify_claims.csv").read_text().splitlines()
    rows = [row for row in csv.DictReader(text)
            if row["kind"] == "accuracy" and row["variant"] == "outofdomain" and 20 <= int(row["seed"]) <= 39
            and row["method"] == "metamoe"]
    last = {int(row["seed"]): row for row in rows}
    means = [np.mean([float(row[f"acc_{d}"]) for row in last.values()]) for d in ("upright", "rotated", "inverted")]
    line = next(x for x in out if x.startswith("metamoe ") and len(x.split()) == 5)
    assert [float(v) for v in line.split()[1:4]] == pytest.approx(means, abs=6e-4)
    r = subprocess.run(
        [sys.executable, "benchmarks/bench_unify_claims.py", "--from-csv", "--design", "outofdomain", "--seeds",
         "900-901"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert r.returncode != 0 and "no rows of variant 'outofdomain' for seeds [900, 901]" in r.stderr


def test_designs():
    """Each design is a DigitsConfig plus the seed's pool; the public seed pool leaves the split without a
    pre-training set, and the seed then trains on the whole selection pool."""
    assert list(DESIGNS) == ["heldoutpool", "outofdomain", "balanced"] and DESIGNS["heldoutpool"] == {}
    default = design()
    assert default.config == DigitsConfig() and default.seed_pool == "pretrain"
    assert default.seed_training_set() is None  # run_digits_experiment's own default
    ood = design("outofdomain")
    assert ood.seed_pool == "public" and ood.config.route_loss == 0.0 and ood.config.expert_epochs == 10
    d = config_domains(5, ood.config)
    np.testing.assert_array_equal(np.bincount(d.public_domain), [40] * 3 + [300] * 5)
    assert d.pretrain_x is None and [len(c.y_test) for c in d.clients] == [150] * 3
    x, y = ood.seed_training_set()(d)
    assert x is d.public_x and y is d.public_y
    balanced = config_domains(5, design("balanced").config)
    np.testing.assert_array_equal(np.bincount(balanced.public_domain), [300] * 6)
    assert design("outofdomain", seed_pool="pretrain").config.pretrain_per_domain == 300
    assert design("heldoutpool", seed_pool="public", k=7).config.k == 7
    with pytest.raises(ValueError, match="unknown design"):
        design("huge")
    with pytest.raises(ValueError, match="seed_pool"):
        design(seed_pool="clients")
    with pytest.raises(ValueError, match="unknown DigitsConfig field"):
        design(kk=3)


def test_design_names_of_the_bench():
    """Each design gets its own log/CSV name; a changed knob is spelled out, so rows of different designs never
    mix (the names of the rows in unify_claims.csv)."""
    assert design_name(design()) == "heldoutpool"
    assert design_name(design("outofdomain")) == "outofdomain"
    assert design_name(design("balanced")) == "balanced"
    assert design_name(design("outofdomain", routed_head=False)) == "outofdomain_plainhead"
    assert design_name(design("balanced", seed_pool="pretrain", routed_head=False)) == (
        "balanced_seedpool-pretrain_plainhead"
    )
    assert design_name(design(route_loss=0.0)) == "heldoutpool_route_loss0.0"
    assert design_name(design(seed_pool="public")) == "heldoutpool_seedpool-public"
    assert design_name(design(public_per_client_domain=40)) == "heldoutpool_public_per_client_domain40"
    assert design_name(design(selection_features="pooled")) == "heldoutpool_selection_featurespooled"
    # the names these designs make are those of the committed CSV rows (so --from-csv finds them)
    text = (Path(ROOT) / "benchmarks" / "results" / "unify_claims.csv").read_text().splitlines()
    in_csv = {row["variant"] for row in csv.DictReader(text)}
    made = {design_name(design(n, routed_head=h)) for n in DESIGNS for h in (True, False) if n != "heldoutpool" or h}
    made |= {design_name(design(seed_pool="public")), design_name(design(route_loss=0.0))}
    assert made <= in_csv, made - in_csv
