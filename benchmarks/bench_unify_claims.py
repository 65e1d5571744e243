"""The paper's claims on the bundled digits, as paired tests over seeds (benchmarks/claims_stats.py).

Runs the digits experiment (every method, same data/seed model/clients per seed) for each seed, prints the
per-seed average accuracies and the paired comparisons of metamoe against flexolmo, random_proxy, model_soup
and btx_oracle (mean difference, std, 95 % CI, wins/losses/ties, one-sided paired t, Wilcoxon and sign tests),
and appends one row per (seed, method) and one per claim to <results-dir>/unify_claims.csv; the whole
console output goes to <results-dir>/unify_claims_<variant>_seeds<first>-<last>.log as well. The designs it
runs (--design, --seed-pool) are in benchmarks/digits_designs.py.

This is an accuracy benchmark, not a timing one: its "peer" is the set of baselines in the same run. The wall
time per seed is recorded (CPU only, 1 torch thread).

  python benchmarks/bench_unify_claims.py --seeds 140-179             # the README's table (default design)
  python benchmarks/bench_unify_claims.py --seeds 100-139 --set router_epochs=10   # routers trained 10 epochs
  python benchmarks/bench_unify_claims.py --design outofdomain --seeds 20-39   # seed pre-trained on the pool
  python benchmarks/bench_unify_claims.py --design balanced --seeds 20-39      # every domain 300 in the pool
  python benchmarks/bench_unify_claims.py --seeds 10-29 --set route_loss=0.0   # one knob changed (ablation)
  python benchmarks/bench_unify_claims.py --design outofdomain --from-csv --seeds 20-79   # re-test CSV rows
  python benchmarks/bench_unify_claims.py --quick                     # tiny settings, seconds (exercise only)
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: import benchmarks.utils

from benchmarks.claims_stats import CLAIMS, evaluate_claims, format_claims, paired_comparison
from benchmarks.digits_designs import DESIGNS, SEED_POOLS, design, design_name, run_seeds
from benchmarks.utils import RESULTS_DIR, add_results_dir, append_csv, environment
from metamoe.unify.experiment import DigitsConfig


def parse_seeds(text: str):
    out = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-")
            out += list(range(int(lo), int(hi) + 1))
        elif part:
            out.append(int(part))
    return out


def _per_run_check(per_seed) -> str:
    """The per-run check, seed by seed: metamoe >= random_proxy and metamoe > model_soup; a failing seed is
    listed with the method(s) it fails against."""
    bad = {}
    for s, r in sorted(per_seed.items()):
        lost = [m for m, ok in (("random_proxy", r["metamoe"] >= r["random_proxy"]),
                                ("model_soup", r["metamoe"] > r["model_soup"])) if not ok]
        if lost:
            bad[s] = lost
    fails = ", ".join(f"{s} (against {' and '.join(m)})" for s, m in bad.items())
    return (f"per-run check (metamoe >= random_proxy and > model_soup): {len(per_seed) - len(bad)} of "
            f"{len(per_seed)} seeds" + (f"; fails on {fails}" if bad else ""))


def _per_seed_from_csv(variant: str, seeds, results_dir=RESULTS_DIR):
    """The rows of ``variant`` for ``seeds`` in unify_claims.csv, as :func:`_results` returns them for a live
    run."""
    import csv

    per_seed, per_domain, seed_alone = {s: {} for s in seeds}, {s: {} for s in seeds}, {}
    with open(Path(results_dir) / "unify_claims.csv", newline="") as fh:
        for row in csv.DictReader(fh):  # in time order: a later row of the same seed and method wins
            if row["kind"] == "accuracy" and row["variant"] == variant and int(row["seed"]) in per_seed:
                s, m = int(row["seed"]), row["method"]
                if m == "(seed alone)":
                    seed_alone[s] = float(row["average"])
                else:
                    per_seed[s][m] = float(row["average"])
                    per_domain[s][m] = {k[4:]: float(v) for k, v in row.items() if k.startswith("acc_") and v}
    missing = [s for s, r in per_seed.items() if not r]
    if missing:
        raise SystemExit(f"no rows of variant {variant!r} for seeds {missing} in unify_claims.csv")
    return per_seed, per_domain, seed_alone


def _results(runs):
    """Per seed and method: the average accuracy, the accuracy per client domain, and the seed alone's average."""
    per_seed = {s: {m: r["average"] for m, r in res["methods"].items()} for s, res in runs.items()}
    per_domain = {s: {m: dict(r["per_domain"]) for m, r in res["methods"].items()} for s, res in runs.items()}
    seed_alone = {s: res["seed_model"]["average"] for s, res in runs.items()}
    return per_seed, per_domain, seed_alone


def _summary(per_seed, per_domain, seed_alone) -> str:
    """The mean accuracy per client domain and method, and metamoe's paired differences against the methods no
    claim is about and against the seed alone (descriptive: no test is applied to them)."""
    seeds = sorted(per_seed)
    methods = list(per_seed[seeds[0]])
    domains = list(per_domain[seeds[0]][methods[0]])
    head = f"{'method':<14}" + "".join(f"{d:>10}" for d in domains) + f"{'average':>10}"
    lines = ["mean accuracy over the seeds, per client domain:", head, "-" * len(head)]
    for m in methods:
        lines.append(f"{m:<14}" + "".join(f"{_mean(per_domain[s][m][d] for s in seeds):>10.3f}" for d in domains)
                     + f"{_mean(per_seed[s][m] for s in seeds):>10.3f}")
    others = {m: [per_seed[s][m] for s in seeds] for m in methods if m != "metamoe" and m not in dict(CLAIMS)}
    if len(seed_alone) == len(seeds):
        others["(seed alone)"] = [seed_alone[s] for s in seeds]
        lines.append(f"{'(seed alone)':<14}" + " " * (10 * len(domains)) + f"{_mean(others['(seed alone)']):>10.3f}")
    lines += ["", "metamoe - other, paired over the seeds (descriptive):"]
    mm = [per_seed[s]["metamoe"] for s in seeds]
    for m, v in others.items():
        c = paired_comparison(mm, v)
        lines.append(f"  {m:<14}{c['mean']:>+8.3f}  [{c['ci95'][0]:+.3f},{c['ci95'][1]:+.3f}]  "
                     f"W/L/T {c['wins']}/{c['losses']}/{c['ties']}")
    return "\n".join(lines)


def _mean(values) -> float:
    v = list(values)
    return sum(v) / len(v)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0-4", help="seeds, e.g. '0-9' or '0,3,7' (default 0-4; at least 2)")
    p.add_argument(
        "--design",
        default="heldoutpool",
        choices=list(DESIGNS),
        help="the design (benchmarks/digits_designs.py): heldoutpool (default, what `metamoe demo` runs: the "
        "seed pre-trained on its own public set, 120 pool samples per client domain, 300 test images per "
        "client, 40 expert epochs, proxies supervise the routers), outofdomain (the seed pre-trained on the "
        "pool itself, 40 per client domain, 150 test images, 10 expert epochs, no routing loss) or balanced "
        "(outofdomain's training with 300 pool samples of every domain, three distractors)",
    )
    p.add_argument(
        "--seed-pool",
        default=None,
        choices=list(SEED_POOLS),
        help="what pre-trains the seed ViT (default: the design's): its own public pre-training set or the "
        "selection pool",
    )
    p.add_argument(
        "--public-per-client-domain",
        type=int,
        default=None,
        help="pool samples of each client domain (default: the design's; 120 in heldoutpool, against 300 per "
        "distractor domain)",
    )
    p.add_argument(
        "--distractors",
        default=None,
        help="comma-separated distractor domains (default: the design's; "
        "mirrored,upside_down,transposed,blurred,shifted)",
    )
    p.add_argument(
        "--no-routed-head",
        action="store_true",
        help="the plain concatenated head instead of the routed head (build_unified_model(routed_head=False))",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any other DigitsConfig field, e.g. --set router_epochs=40 --set router_lr=0.03 (VALUE parsed as "
        "a Python literal); appended to the variant name",
    )
    p.add_argument("--alpha", type=float, default=0.05, help="level of the one-sided tests (default 0.05)")
    p.add_argument(
        "--close-margin",
        type=float,
        default=0.02,
        help="btx_oracle - metamoe gap (upper 95%% bound) still called 'close' (default 0.02)",
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny harness settings: exercises the script in seconds"
    )
    p.add_argument("--no-csv", action="store_true", help="print only; write no CSV/log")
    p.add_argument(
        "--from-csv",
        action="store_true",
        help="run nothing: re-test the claims on this variant's rows already in unify_claims.csv for --seeds "
        "(the latest row per seed and method), e.g. to pool the seeds of several runs",
    )
    add_results_dir(p)
    args = p.parse_args(argv)
    seeds = parse_seeds(args.seeds)
    overrides = {}
    if args.public_per_client_domain is not None:
        overrides["public_per_client_domain"] = args.public_per_client_domain
    if args.distractors:
        overrides["distractor_domains"] = tuple(d.strip() for d in args.distractors.split(",") if d.strip())
    if args.no_routed_head:
        overrides["routed_head"] = False
    extra = {}
    for item in args.set:
        field, sep, value = item.partition("=")
        fields = [f.name for f in dataclasses.fields(DigitsConfig)]
        if not sep or field not in fields:
            p.error(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(fields)}")
        try:
            extra[field] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            extra[field] = value  # a plain string, e.g. --set router_loss=full
    variant = design_name(design(args.design, args.seed_pool, **overrides))
    variant += "".join(f"_{k}{v}" for k, v in extra.items())
    if args.quick:
        from metamoe.demo import QUICK

        overrides.update(QUICK)
        variant += "_quick"
    overrides.update(extra)  # --set wins over --quick
    run_design = design(args.design, args.seed_pool, **overrides)
    log = []

    def say(line: str) -> None:
        print(line, flush=True)
        log.append(line)

    if args.from_csv:
        per_seed, per_domain, seed_alone = _per_seed_from_csv(variant, seeds, args.results_dir)
        claims = evaluate_claims(per_seed, alpha=args.alpha, close_margin=args.close_margin)
        print(f"variant {variant}, seeds {seeds}: rows from {args.results_dir / 'unify_claims.csv'} (nothing rerun)")
        print(format_claims(per_seed, claims))
        print(_per_run_check(per_seed))
        print("")
        print(_summary(per_seed, per_domain, seed_alone))
        return 0
    t0 = time.perf_counter()
    runs = run_seeds(seeds, run_design, progress=say)
    per_seed, per_domain, seed_alone = _results(runs)
    claims = evaluate_claims(per_seed, alpha=args.alpha, close_margin=args.close_margin)
    cmd = "python benchmarks/bench_unify_claims.py " + " ".join(argv if argv is not None else sys.argv[1:])
    say("")
    say(f"command: {cmd}")
    default = DigitsConfig().to_dict()
    changed = {k: v for k, v in run_design.config.to_dict().items() if v != default[k]}
    say(
        f"variant: {variant} (DigitsConfig fields off the defaults: {changed}; "
        f"seed_pool {run_design.seed_pool})"
        f"{' (QUICK settings: not a measurement)' if args.quick else ''}; "
        f"seeds {seeds}; {time.perf_counter() - t0:.0f} s"
    )
    say(
        "seed model alone (average): "
        + " ".join(f"s{s}={runs[s]['seed_model']['average']:.3f}" for s in seeds)
    )
    say(format_claims(per_seed, claims))
    say(_per_run_check(per_seed))
    say("")
    say(_summary(per_seed, per_domain, seed_alone))
    say("")
    say("routing quality: mean routing probability of a test sample to its own client's expert (last MoE layer),")
    say("averaged over the client domains, per seed (MoE methods):")
    for m in next(iter(runs.values()))["methods"]:
        vals = [runs[s]["methods"][m].get("own_expert_weight") for s in seeds]
        if any(v is None for v in vals):
            continue
        per = [sum(v.values()) / len(v) for v in vals]
        say(f"  {m:<14}" + " ".join(f"{x:.3f}" for x in per) + f"   mean {sum(per) / len(per):.3f}")
    say("")
    say("selection diagnostics (the pool's domain labels, which no client sees), mean over clients, per seed:")
    first = next(iter(runs.values()))
    say("  relevance AUC " + " ".join(f"{_mean(runs[s]['relevance_auc'].values()):.3f}" for s in seeds)
        + f"   mean {_mean(_mean(runs[s]['relevance_auc'].values()) for s in seeds):.3f}")
    for sel in first["proxies_from_own_domain"]:
        per = [_mean(runs[s]["proxies_from_own_domain"][sel]) for s in seeds]
        say(f"  own-domain proxies, {sel:<7}" + " ".join(f"{x:.3f}" for x in per) + f"   mean {_mean(per):.3f}")
    for key in first["local_experts"]:
        per = [_mean(runs[s]["local_experts"][key].values()) for s in seeds]
        say(f"  local expert on own domain, {key:<15}" + " ".join(f"{x:.3f}" for x in per)
            + f"   mean {_mean(per):.3f}")
    if args.no_csv:
        return 0
    env = environment("cpu")
    rows = []
    for s, res in runs.items():
        for m, r in res["methods"].items():
            rows.append(
                {
                    "kind": "accuracy",
                    "variant": variant,
                    "seed": s,
                    "method": m,
                    "average": r["average"],
                    **{f"acc_{d}": v for d, v in r["per_domain"].items()},
                    "average_exact": r.get("average_exact"),
                    "wall_s_seed": round(res["total_wall_s"], 1),
                }
            )
        rows.append(
            {
                "kind": "accuracy",
                "variant": variant,
                "seed": s,
                "method": "(seed alone)",
                "average": res["seed_model"]["average"],
            }
        )
    for c in claims:
        rows.append(
            {
                "kind": "claim",
                "variant": variant,
                "seed": ",".join(map(str, seeds)),
                "method": c["other"],
                "mean_diff": c["mean"],
                "std_diff": c["std"],
                "ci95_lo": c["ci95"][0],
                "ci95_hi": c["ci95"][1],
                "wins": c["wins"],
                "losses": c["losses"],
                "ties": c["ties"],
                "t_p": c["t_p_greater"],
                "wilcoxon_p": c["wilcoxon_p_greater"],
                "sign_p": c["sign_p_greater"],
                "verdict": c["verdict"],
            }
        )
    path = append_csv("unify_claims", rows, env, args.results_dir)
    logp = args.results_dir / f"unify_claims_{variant}_seeds{seeds[0]}-{seeds[-1]}.log"
    logp.write_text("\n".join(log) + "\n")
    print(f"appended {len(rows)} rows to {path}; log {logp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
