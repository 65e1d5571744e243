"""``metamoe demo``: the MetaMoE pipeline end to end on data that ships with the dependencies.

1. The environment: which backends run here.
2. Proxy selection at a glance on the bundled digits (three clients with private domains: upright, rotated,
   inverted digits; a public pool that mixes those domains, 120 samples each, with five distractor domains,
   300 samples each). Each client scores
   the pool with its domain classifier and picks proxies with the relevance-weighted DPP, facility location
   over its private set, top-relevance (FlexOlmo-style) and random; the table shows how many proxies come
   from the client's own domain, how many digit classes they cover and how well they cover the private set
   (mean best cosine similarity of a private sample to a proxy). This part uses a fixed PCA embedding, so
   that it shows selection alone.
3. The whole pipeline (:func:`metamoe.unify.run_digits_experiment`): a tiny timm ViT seed pre-trained on a
   separate public pre-training set, per client embeddings, relevance, proxy selection, proxy-aligned LoRA experts
   written as expert packages, then per method the server side (package validation, the LoRA-expert MoE, router
   training on the proxies) and evaluation on every client's test set. Methods: metamoe, flexolmo,
   random_proxy, model_soup, btm, btx_oracle (privacy-breaking upper bound), no_alignment, no_context.

Writes ``OUT/results.json`` (``{"methods": {"<name>": {"per_domain": {...}, "average": float, ...}}, ...}``,
plus ``"selection"`` and ``"backends"``), ``OUT/results.png`` (bar chart) and the expert packages under
``OUT/packages/``. About 70 s on 2 CPU cores (one torch thread; measured 69.5 s for ``--seed 77``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .selection.methods import SELECTION_METHODS

SELECTIONS = SELECTION_METHODS  # the rows of the selection table, canonical names

# --quick: a reduced run for tests and smoke checks (seconds, not a measurement: accuracies are meaningless)
QUICK = dict(
    n_private=20,
    n_test=12,
    public_per_domain=24,
    public_per_client_domain=8,
    pretrain_per_domain=24,
    pretrain_per_client_domain=8,
    embed_dim=16,
    depth=1,
    seed_epochs=2,
    k=12,
    relevance_epochs=1,
    lora_rank=2,
    expert_epochs=1,
    expert_batch_size=16,
    router_epochs=1,
    router_batch_size=32,
)


def _embed_fn(public_x: np.ndarray, dim: int):
    """A fixed embedding for the selection table: PCA of the public pool's pixels (fit once, applied to all)."""
    flat = public_x.reshape(len(public_x), -1).astype(np.float64)
    mean = flat.mean(axis=0)
    _, _, vt = np.linalg.svd(flat - mean, full_matrices=False)
    basis = vt[:dim].T

    def embed(x: np.ndarray) -> np.ndarray:
        return ((x.reshape(len(x), -1) - mean) @ basis).astype(np.float32)

    return embed


def _coverage(private_emb: np.ndarray, proxy_emb: np.ndarray) -> float:
    a = private_emb / np.linalg.norm(private_emb, axis=1, keepdims=True)
    b = proxy_emb / np.linalg.norm(proxy_emb, axis=1, keepdims=True)
    return float((a @ b.T).max(axis=1).mean())


def run_selection(data, k: int, seed: int, dim: int, backend: Optional[str]) -> Dict:
    """Per client and selection method: own-domain fraction, classes covered, coverage, backend, seconds."""
    from .selection import (
        relevance_scores,
        select_dpp,
        select_facility_location,
        select_random,
        select_top_relevance,
    )

    embed = _embed_fn(data.public_x, dim)
    pub = embed(data.public_x)
    out: Dict = {}
    for ci, client in enumerate(data.clients):
        priv = embed(client.x_train)
        rel = relevance_scores(priv, pub, seed=seed, progress=False)
        sels = {
            "dpp": select_dpp(pub, k, rel, ridge=1e-3, backend=backend, progress=False),
            "facility_location": select_facility_location(
                pub, k, ground=priv, backend=backend, progress=False
            ),
            "top_relevance": select_top_relevance(rel, k),
            "random": select_random(len(pub), k, seed=seed + ci),
        }
        rows = {}
        for name, sel in sels.items():
            idx = sel.indices
            rows[name] = {
                "own_domain": float(np.mean(data.public_domain[idx] == ci)),
                "classes": int(len(np.unique(data.public_y[idx]))),
                "coverage": _coverage(priv, pub[idx]),
                "backend": sel.backend,
                "seconds": sel.seconds,
            }
        out[client.domain] = rows
    return out


def _print_selection(sel: Dict, k: int) -> None:
    print(f"\nProxy selection at a glance (PCA embedding, k = {k} of the public pool per client)")
    print(
        f"  {'client':<10} {'method':<18} {'own domain':>10} {'classes':>8} {'coverage':>9} {'backend':>8} {'ms':>7}"
    )
    for client, rows in sel.items():
        for name, r in rows.items():
            print(
                f"  {client:<10} {name:<18} {r['own_domain']:>10.0%} {r['classes']:>8d} {r['coverage']:>9.3f} "
                f"{r['backend']:>8} {1000 * r['seconds']:>7.1f}"
            )


def _print_results(res: Dict) -> None:
    from .unify.experiment import format_table

    print(
        "\nDigit accuracy per client domain and on average (test sets of the clients; 'exact' = the argmax must be "
        "the client's own class)"
    )
    print(format_table(res))
    seed = res["seed_model"]
    print(
        f"{'(seed alone)':<14}"
        + "".join(f"{seed['per_domain'][d]:>10.3f}" for d in res["domains"])
        + f"{seed['average']:>10.3f}"
    )
    if "btx_oracle" in res["methods"]:
        print(
            "btx_oracle trains its router on the clients' PRIVATE data: an upper bound that breaks privacy."
        )
    m = res["methods"]
    if "metamoe" in m:
        for other in ("random_proxy", "model_soup", "flexolmo", "btx_oracle"):
            if other in m:
                print(
                    f"  metamoe - {other:<13} {m['metamoe']['average'] - m[other]['average']:+.3f}"
                    " (average accuracy, this seed)"
                )


def main(argv: Optional[List[str]] = None) -> int:
    from .unify.baselines import METHOD_NAMES

    p = argparse.ArgumentParser(
        prog="metamoe demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out",
        default="demo_out",
        help="output folder for results.json, results.png, packages/ (default: demo_out)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the data split, the seed model, selection and training (default 0)",
    )
    p.add_argument(
        "--methods",
        default=",".join(METHOD_NAMES),
        help=f"comma-separated methods to compare (default: all: {','.join(METHOD_NAMES)})",
    )
    p.add_argument(
        "--k",
        type=int,
        default=None,
        help="proxies per client in the pipeline (default: the harness's, 120; 12 with --quick)",
    )
    p.add_argument(
        "--table-k", type=int, default=60, help="proxies per client in the selection table (default 60)"
    )
    p.add_argument(
        "--dim", type=int, default=32, help="PCA width of the selection-table embedding (default 32)"
    )
    p.add_argument(
        "--backend",
        default=None,
        help="selection backend for the table (auto, torch, cpp, ...); default auto",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for the pipeline (default 1: fastest on small CPUs)",
    )
    p.add_argument("--no-selection-table", action="store_true", help="skip the PCA proxy-selection table")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny data and one epoch everywhere: a smoke run in seconds (tests); its accuracies mean nothing",
    )
    p.add_argument("--quiet", action="store_true", help="do not print each stage's timing")
    args = p.parse_args(argv)
    if args.seed < 0:
        p.error(f"--seed must be >= 0, got {args.seed}")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHOD_NAMES]
    if not methods or bad:
        p.error(f"--methods: unknown {bad or 'empty list'}; known: {', '.join(METHOD_NAMES)}")

    from .info import collect
    from .unify.experiment import RESULTS_FILE, DigitsConfig, config_domains, run_digits_experiment
    from .utils.files import atomic_write_text

    overrides = dict(QUICK) if args.quick else {}
    if args.k is not None:
        if args.k < 1:
            p.error(f"--k must be >= 1, got {args.k}")
        overrides["k"] = args.k
    overrides["num_threads"] = args.threads
    cfg = DigitsConfig(**overrides)

    t0 = time.perf_counter()
    info = collect()
    print("metamoe demo: backends here")
    for b, st in info["backends"].items():
        print(f"  {b:<7} {'available' if st['available'] else 'unavailable':<12} {st['reason']}")
    if args.table_k < 1:
        p.error(f"--table-k must be >= 1, got {args.table_k}")
    data = config_domains(args.seed, cfg)
    print(
        f"\nData: {len(data.clients)} clients ({', '.join(c.domain for c in data.clients)}), "
        f"{len(data.clients[0].x_train)} private samples each; public pool of {len(data.public_x)} samples from "
        f"{len(data.domain_names)} domains ({', '.join(data.domain_names)})"
        + ("" if data.pretrain_x is None else f"; the seed pre-trains on {len(data.pretrain_x)} other public samples")
        + f"; {len(data.clients[0].y_test)} test samples per client domain"
    )
    sel = None
    if not args.no_selection_table:
        # the table always uses the full-size split (cheap: a PCA embedding), also under --quick
        table_data = config_domains(args.seed)
        tk = min(args.table_k, len(table_data.public_x))
        sel = run_selection(table_data, tk, args.seed, min(args.dim, 64), args.backend)
        _print_selection(sel, tk)

    print(f"\nPipeline: seed model, clients, packages, server, {len(methods)} methods (seed {args.seed})")
    out = Path(args.out)
    res = run_digits_experiment(args.seed, methods=methods, out_dir=out, progress=not args.quiet, config=cfg)
    _print_results(res)
    res["demo"] = {"quick": bool(args.quick), "seconds": time.perf_counter() - t0}
    if sel is not None:
        res["selection"] = sel
    res["backends"] = {b: st["available"] for b, st in info["backends"].items()}
    atomic_write_text(out / RESULTS_FILE, json.dumps(res, indent=1, allow_nan=False) + "\n")
    print(
        f"\nwrote {out / RESULTS_FILE}, {out / 'results.png'} and {out / 'packages'}"
        f" ({res['demo']['seconds']:.1f} s in all)"
    )
    return 0
