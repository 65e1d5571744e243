"""The digits experiment that ``metamoe demo`` runs: the MetaMoE pipeline and its baselines on
scikit-learn's bundled digits, on the CPU.

:func:`run_digits_experiment` runs, with every stage timed (wall and CPU seconds):

1. data: :func:`metamoe.data.digits.make_digits_domains` (three client domains; a public selection pool
   mixing them with five distractor domains, mostly distractors: 120 samples per client domain, 300 per
   distractor; a separate public pre-training set from disjoint source images, 40 per client domain and 300
   per distractor; digit labels everywhere; 300 test images per client domain);
2. seed: a tiny timm ViT (8x8 images, patch 2, one channel) built from its config and pre-trained on the
   public pre-training set's digit labels, so that it is a meaningful seed (a random ViT's features barely
   vary);
3. client side, per client: embeddings of the private set and the public pool with the frozen seed (the
   pooled head input and every FFN layer's mean input), relevance scores, proxy selection (DPP with an RBF
   kernel, top-k relevance, random: only what the requested methods need), proxy-aligned expert training, an
   expert package written to disk;
4. server side, per method (:mod:`metamoe.unify.baselines`): package validation, the unified model, router
   training on the union of the proxies (the oracle: on the private data) with the task loss, the
   load-balancing loss and the routing loss that sends each proxy towards its client's expert, evaluation
   on every client's test set.

Work is shared where methods agree: one seed, one set of embeddings and relevance scores, and one set of
experts per (proxies, aligned) pair (the DPP experts serve metamoe, model_soup, btm, btx_oracle and
no_context). Accuracy is digit accuracy without knowing the test sample's domain: the probabilities over
the unified label space (every client's private classes ``"<domain>:<digit>"`` and the public classes
``"<digit>"``) are summed per digit (:func:`metamoe.unify.evaluate.marginalize`).
``per_domain_exact`` is the stricter score: the argmax over the unified space must be the client's own
class ``"<domain>:<digit>"``.

The result is the dict written to ``results.json``::

    {"methods": {"<name>": {"per_domain": {"<domain>": acc, ...}, "average": acc, "per_domain_exact": {...},
                            "average_exact": acc, "breaks_privacy": bool, "privacy": str, "description": str,
                            "router": {...} or None}},
     "seed": 0, "config": {...}, "timing": {"<stage>": {"wall_s": ., "cpu_s": .}}, "total_wall_s": .,
     "total_cpu_s": ., "seed_model": {"per_domain": ..., "average": ., "loss_per_epoch": [...]},
     "local_experts": {"<set>": {"<domain>": acc}}, "relevance_auc": {"<domain>": auc},
     "proxies_from_own_domain": {"<selection>": [share per client]},
     "sizes": {"public_pool": N, "pretrain": N_pre or None, "seed_training_set": N_seed,
               "test_per_domain": {...}}, "versions": {...}}

MoE methods also report ``routing`` (per layer, the fraction of token slots each expert receives) and
``own_expert_weight`` (per client domain, the test samples' mean routing probability to that client's expert
in the last MoE layer: routing quality). ``seed_model`` is the seed alone with its 10-digit head,
``local_experts`` each client's expert on its own domain (both references, not methods). ``relevance_auc``
(the ROC AUC of each client's relevance scores for "public sample from the client's own domain") and
``proxies_from_own_domain`` measure selection with the pool's domain labels, which no client sees.

Other designs of this experiment (other pools, other seed pre-training) live with the claims benchmark in
``benchmarks/``, not here.
"""

from __future__ import annotations

import json
import math
import os
import resource
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..utils.files import atomic_write, atomic_write_text
from .router_training import RouterTraining, train_router

__all__ = ["DigitsConfig", "config_domains", "RESULTS_FILE", "CHART_FILE", "format_table", "plot_results",
           "pretrain_seed", "run_digits_experiment"]

RESULTS_FILE = "results.json"
CHART_FILE = "results.png"
_TRAINING = RouterTraining()  # the router training defaults, one set: train_router's, server.yaml's, the demo's


@dataclass(frozen=True)
class DigitsConfig:
    """Every knob of the digits experiment. The defaults are the run ``metamoe demo`` makes (under 5 minutes
    on 2 CPU cores)."""

    # data (make_digits_domains)
    n_private: int = 120
    # 300 test images per client domain, the same 300 source digits under each client's transform
    # (shared_test): two methods that disagree on a quarter of 450 test samples differ by about 2.4 points
    # (binomial sd) from test sampling alone, as much as the effects the claims are about
    n_test: int = 300
    shared_test: bool = True
    # The selection pool is mostly out-of-domain: 300 samples of each of five distractor domains, 120 of each
    # client domain (1,860 samples, 15.5x a client's private set, 81 % distractors). A client's domain holds
    # as many pool samples as it picks proxies (k), so that relevant proxies exist to be found.
    public_per_domain: int = 300
    public_per_client_domain: Optional[int] = 120  # None: public_per_domain
    distractor_domains: tuple = ("mirrored", "upside_down", "transposed", "blurred", "shifted")
    # The seed's own public pre-training set: 40 per client domain, 300 per distractor, drawn from source
    # images disjoint from the selection pool's, so that the pool is not the data the seed was fitted to (a
    # relevant proxy the seed has already learned with its label tells an expert nothing new)
    pretrain_per_domain: int = 300
    pretrain_per_client_domain: int = 40
    # seed model: timm ViT from its config, pre-trained on public data
    embed_dim: int = 32
    depth: int = 2
    num_heads: int = 2
    seed_epochs: int = 80  # 20 leave the seed at 0.5-0.67 test accuracy; 80 reach 0.77-0.85 (seed 0)
    seed_lr: float = 2e-3
    seed_batch_size: int = 32
    # client side
    k: int = 120
    relevance_epochs: int = 5
    # what relevance and DPP see (client.embed's ``features``): the pooled head input plus every FFN layer's
    # mean input ("pooled+context"), or the pooled head input alone ("pooled"). The seed's head is trained on
    # digit labels, so its input hardly says which transform a digit is under
    selection_features: str = "pooled+context"
    lora_rank: int = 4
    expert_epochs: int = 40  # 10 leave the experts a few points above the seed
    expert_lr: float = 3e-3
    expert_batch_size: int = 32
    # server side
    top_k: Optional[int] = None
    router_epochs: int = _TRAINING.epochs  # router training: RouterTraining's defaults (its docstring says why)
    router_lr: float = _TRAINING.lr
    router_batch_size: int = _TRAINING.batch_size
    router_init_scale: float = 4.0
    context_lambda_init: float = 0.5  # the context routers' initial lambda (build_unified_model)
    routed_head: bool = True  # UnifiedModel.routed_head (build_unified_model); False: the plain concatenated head
    # "block": the router's cross-entropy runs over the label block its data is labelled in (public classes
    # for proxies, private classes for the oracle's private data); "full": over the whole unified label space
    router_loss: str = "block"
    # > 0: train_router(route_targets=...) with this route_loss_coef: each proxy is sent towards the expert of the
    # client(s) that picked it (server.proxy_owners), an oracle's private sample to its own client's. 0: no routing loss
    route_loss: float = _TRAINING.route_loss_coef
    # runtime: torch intra-op threads for the run (the previous value is restored afterwards);
    # None leaves torch's setting alone. 1 by default: these models are tiny, and on a shared 2-core machine
    # torch's default (2 threads) takes 562 s wall / 425 s CPU instead of 39 s / 38 s (seed 0)
    num_threads: Optional[int] = 1

    def router_training(self, seed: int = 0) -> RouterTraining:
        """The demo routers' :class:`RouterTraining` (route_loss 0: no route_targets, the coefficient's default)."""
        return RouterTraining(epochs=self.router_epochs, lr=self.router_lr, batch_size=self.router_batch_size,
                              seed=seed, route_loss_coef=self.route_loss or _TRAINING.route_loss_coef)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["distractor_domains"] = list(self.distractor_domains)  # as JSON holds it
        return d


# --------------------------------------------------------------------------- timing


class _Clock:
    """Wall and CPU (user + system, this process) seconds per stage."""

    def __init__(self, report: Callable[[str], None]):
        self.report = report
        self.stages: Dict[str, Dict[str, float]] = {}
        self.t0 = time.perf_counter()
        self.c0 = self._cpu()

    @staticmethod
    def _cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def stage(self, name: str):
        clock = self

        class _S:
            def __enter__(self):
                self.w, self.c = time.perf_counter(), clock._cpu()

            def __exit__(self, *exc):
                if exc[0] is not None:
                    return False
                w, c = time.perf_counter() - self.w, clock._cpu() - self.c
                prev = clock.stages.get(name, {"wall_s": 0.0, "cpu_s": 0.0})
                clock.stages[name] = {"wall_s": prev["wall_s"] + w, "cpu_s": prev["cpu_s"] + c}
                clock.report(
                    f"[{time.perf_counter() - clock.t0:7.1f}s] {name:<32} wall {w:6.2f}s  cpu {c:6.2f}s"
                )
                return False

        return _S()

    def totals(self) -> Dict[str, float]:
        return {"total_wall_s": time.perf_counter() - self.t0, "total_cpu_s": self._cpu() - self.c0}


def _reporter(progress: Union[bool, Callable[[str], None]]) -> Callable[[str], None]:
    if callable(progress):
        return progress
    if progress:
        return lambda s: print(s, flush=True)
    return lambda s: None


# --------------------------------------------------------------------------- pieces


def pretrain_seed(
    seed_model: Any, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float, batch_size: int, seed: int
) -> List[float]:
    """Full fine-tuning of ``seed_model`` (in place, all parameters) on ``(x, y)``; returns epoch losses.

    x: (n, H, W) float32 images, y: (n,) int64 labels in ``[0, seed_model.num_classes)``. AdamW with a cosine
    schedule, shuffling from ``torch.Generator().manual_seed(seed)``. The model is left in eval mode.
    """
    from ..models.registry import seeded

    n = len(x)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.asarray(y, dtype=np.int64))
    params = [p for p in seed_model.net.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    gen = torch.Generator().manual_seed(int(seed))
    losses = []
    seed_model.train()
    with seeded(int(seed)):
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            tot = 0.0
            for s in range(0, n, batch_size):
                idx = perm[s : s + batch_size]
                logits = seed_model(seed_model.prepare(xt[idx]))
                loss = torch.nn.functional.cross_entropy(logits, yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                tot += float(loss.detach()) * len(idx)
            losses.append(tot / n)
    seed_model.eval()
    for p in params:
        p.requires_grad_(False)
    return losses


def _digit_accuracy_local(expert_model: Any, x: np.ndarray, y: np.ndarray, n_private: int) -> float:
    """A client's own expert on its own test set: digit accuracy, classes summed per digit."""
    from .evaluate import accuracy

    with torch.no_grad():
        p = torch.softmax(expert_model(expert_model.prepare(torch.from_numpy(x))).double(), -1).numpy()
    C = p.shape[1]
    targets = np.concatenate([np.arange(n_private), np.arange(C - n_private)]) % 10
    return accuracy(p, y, targets)


def plot_results(results: Dict[str, Any], path: Union[str, os.PathLike]) -> Path:
    """A grouped bar chart (a group per method, a bar per domain and the average): PNG, matplotlib Agg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results["methods"])
    domains = list(next(iter(results["methods"].values()))["per_domain"])
    series = domains + ["average"]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(methods)), 4.0))
    for j, s in enumerate(series):
        vals = [
            results["methods"][m]["average"] if s == "average" else results["methods"][m]["per_domain"][s]
            for m in methods
        ]
        ax.bar(np.arange(len(methods)) + (j - (len(series) - 1) / 2) * width, vals, width, label=s)
    labels = [
        m + ("\n(breaks privacy)" if results["methods"][m].get("breaks_privacy") else "") for m in methods
    ]
    ax.set_xticks(np.arange(len(methods)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("digit accuracy")
    ax.set_title(f"MetaMoE digits harness, seed {results.get('seed')}")
    ax.legend(fontsize=7, ncol=len(series))
    fig.tight_layout()
    path = Path(path)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path


def format_table(results: Dict[str, Any]) -> str:
    """The accuracy table of a results dict as fixed-width text."""
    methods = results["methods"]
    domains = list(next(iter(methods.values()))["per_domain"])
    head = f"{'method':<14}" + "".join(f"{d:>10}" for d in domains) + f"{'average':>10}{'exact':>8}"
    lines = [head, "-" * len(head)]
    for name, r in methods.items():
        mark = "  (breaks privacy)" if r.get("breaks_privacy") else ""
        lines.append(
            f"{name:<14}"
            + "".join(f"{r['per_domain'][d]:>10.3f}" for d in domains)
            + f"{r['average']:>10.3f}{r.get('average_exact', float('nan')):>8.3f}{mark}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- the harness


def run_digits_experiment(
    seed: int = 0,
    methods: Optional[Sequence[str]] = None,
    out_dir: Optional[Union[str, os.PathLike]] = None,
    progress: Union[bool, Callable[[str], None]] = True,
    config: Optional[DigitsConfig] = None,
    *,
    seed_training_set: Optional[Callable[[Any], Tuple[np.ndarray, np.ndarray]]] = None,
    **overrides: Any,
) -> Dict[str, Any]:
    """Run the digits benchmark for ``methods`` and return the results dict (module docstring).

    Args:
        seed: seeds the data split, the seed model, selection, expert and router training.
        methods: names from :data:`metamoe.unify.baselines.METHOD_NAMES` (default: all eight).
        out_dir: if given, ``results.json``, ``results.png`` and the expert packages (``packages/``) go there;
            otherwise packages go to a temporary folder that is removed afterwards.
        progress: True prints each stage's wall and CPU seconds; a callable receives those lines; False:
            silent.
        config: a :class:`DigitsConfig`; ``overrides`` replace single fields of it (``k=40``, ...). Its
            ``num_threads`` (default 1) sets torch's intra-op threads for the run, restored afterwards.
        seed_training_set: what pre-trains the seed: a function of the data split (the
            :class:`~metamoe.data.digits.DigitsDomains` of :func:`config_domains`) returning ``(x, y)``,
            (n, 8, 8) float32 images and (n,) digit labels. Default: the split's public pre-training set,
            which then must not be empty (``pretrain_per_domain`` or ``pretrain_per_client_domain`` > 0).

    Returns:
        The results dict, also written to ``out_dir/results.json`` when ``out_dir`` is given.
    """
    from .baselines import METHOD_NAMES, check_methods, method_spec

    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    methods = check_methods(METHOD_NAMES if methods is None else methods)
    cfg = config if config is not None else DigitsConfig()
    if not isinstance(cfg, DigitsConfig):
        raise TypeError(f"config must be a DigitsConfig, got {type(cfg).__name__}")
    unknown = sorted(set(overrides) - set(cfg.to_dict()))
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; known: {', '.join(cfg.to_dict())}")
    cfg = replace(cfg, **overrides)
    nt = cfg.num_threads
    if nt is not None and (isinstance(nt, bool) or not isinstance(nt, int) or nt < 1):
        raise ValueError(f"num_threads must be a positive int or None, got {nt!r}")
    if seed_training_set is None and cfg.pretrain_per_domain == 0 and cfg.pretrain_per_client_domain == 0:
        raise ValueError(
            "pretrain_per_domain and pretrain_per_client_domain are both 0: the split has no pre-training "
            "set for the seed; pass seed_training_set"
        )
    if seed_training_set is not None and not callable(seed_training_set):
        raise TypeError(f"seed_training_set must be callable, got {type(seed_training_set).__name__}")
    from .client import EMBED_FEATURES

    if cfg.selection_features not in EMBED_FEATURES:
        raise ValueError(
            f"selection_features must be one of {', '.join(EMBED_FEATURES)}, got {cfg.selection_features!r}"
        )
    if cfg.router_loss not in ("block", "full"):
        raise ValueError(f"router_loss must be 'block' or 'full', got {cfg.router_loss!r}")
    if not (isinstance(cfg.route_loss, (int, float)) and math.isfinite(cfg.route_loss) and cfg.route_loss >= 0):
        raise ValueError(f"route_loss must be a finite number >= 0, got {cfg.route_loss!r}")
    cfg.router_training(int(seed))  # router_epochs, router_lr, router_batch_size: checked before the run
    specs = [method_spec(m) for m in methods]
    report = _reporter(progress)
    prev_threads = torch.get_num_threads()
    if cfg.num_threads is not None:
        torch.set_num_threads(int(cfg.num_threads))
    tmp_ctx = None
    try:
        if out_dir is None:
            tmp_ctx = tempfile.TemporaryDirectory(prefix="metamoe-digits-")
            work = Path(tmp_ctx.name)
        else:
            work = Path(out_dir)
            work.mkdir(parents=True, exist_ok=True)
        results = _run(int(seed), specs, cfg, work, report, out_dir is not None, seed_training_set)
    finally:
        torch.set_num_threads(prev_threads)
        if tmp_ctx is not None:
            tmp_ctx.cleanup()
    if out_dir is not None:
        atomic_write_text(Path(out_dir) / RESULTS_FILE, json.dumps(results, indent=1, allow_nan=False) + "\n")
        plot_results(results, Path(out_dir) / CHART_FILE)
    return results


def config_domains(seed: int, cfg: Optional[DigitsConfig] = None):
    """The data split of ``cfg`` (default: :class:`DigitsConfig`) for ``seed``: a
    :class:`~metamoe.data.digits.DigitsDomains` from :func:`~metamoe.data.digits.make_digits_domains`."""
    from ..data.digits import make_digits_domains

    cfg = DigitsConfig() if cfg is None else cfg
    return make_digits_domains(
        seed,
        distractor_domains=tuple(cfg.distractor_domains),
        n_private=cfg.n_private,
        n_test=cfg.n_test,
        public_per_domain=cfg.public_per_domain,
        public_per_client_domain=cfg.public_per_client_domain,
        shared_test=cfg.shared_test,
        pretrain_per_domain=cfg.pretrain_per_domain,
        pretrain_per_client_domain=cfg.pretrain_per_client_domain,
    )


def _run(seed: int, specs, cfg: DigitsConfig, work: Path, report, keep: bool, seed_set) -> Dict[str, Any]:
    import shutil

    from sklearn.metrics import roc_auc_score

    from ..models import create_seed_model
    from ..selection import relevance_scores, select_dpp, select_random, select_top_relevance
    from .baselines import expert_set_key
    from .client import embed, train_expert
    from .package import write_expert_package

    clock = _Clock(report)
    with clock.stage("data"):
        data = config_domains(seed, cfg)
        N = len(data.public_x)
        if cfg.k > N:
            raise ValueError(f"k={cfg.k} exceeds the public pool ({N} samples)")
        domains = [c.domain for c in data.clients]
    with clock.stage("seed: build + pretrain on public data"):
        seed_model = create_seed_model(
            "timm:vit_tiny_patch16_224", seed=seed, img_size=8, patch_size=2, in_chans=1,
            embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, num_classes=10,
        )
        seed_x, seed_y = (data.pretrain_x, data.pretrain_y) if seed_set is None else seed_set(data)
        seed_losses = pretrain_seed(
            seed_model, seed_x, seed_y, epochs=cfg.seed_epochs, lr=cfg.seed_lr,
            batch_size=cfg.seed_batch_size, seed=seed,
        )
    with clock.stage("client: embed (frozen seed)"):
        feats = cfg.selection_features
        pub_emb = embed(seed_model, data.public_x, progress=False, features=feats)
        priv_emb = [embed(seed_model, c.x_train, progress=False, features=feats) for c in data.clients]
    with clock.stage("client: relevance"):
        relevance = [
            relevance_scores(p, pub_emb, epochs=cfg.relevance_epochs, seed=seed + i, progress=False)
            for i, p in enumerate(priv_emb)
        ]
    selections: Dict[str, List[Any]] = {}
    for sel in sorted({s.selection for s in specs}):
        with clock.stage(f"client: select ({sel})"):
            if sel == "dpp":
                selections[sel] = [select_dpp(pub_emb, cfg.k, r, kernel="rbf", progress=False)
                                   for r in relevance]
            elif sel == "top_relevance":
                selections[sel] = [select_top_relevance(r, cfg.k) for r in relevance]
            elif sel == "random":
                selections[sel] = [select_random(N, cfg.k, seed=seed * 100 + i) for i in range(len(domains))]
            else:
                raise ValueError(f"the digits experiment has no proxy selection {sel!r}")
    # selection quality as only the pool's domain labels tell it (no client sees them): the relevance ROC AUC
    # for "public sample from my own domain" and the share of proxies drawn from the client's own domain
    relevance_auc = {
        d: float(roc_auc_score(data.public_domain == i, r)) for i, (d, r) in enumerate(zip(domains, relevance))
    }
    own_domain = {
        sel: [float(np.mean(data.public_domain[s.indices] == i)) for i, s in enumerate(ss)]
        for sel, ss in selections.items()
    }
    digits = [str(j) for j in range(10)]
    spaces = [{"private": [f"{d}:{j}" for j in digits], "public": digits} for d in domains]
    package_sets: Dict[str, List[Path]] = {}
    local: Dict[str, Dict[str, float]] = {}
    for key, (sel, aligned) in sorted({expert_set_key(s): (s.selection, s.aligned) for s in specs}.items()):
        with clock.stage(f"client: train experts ({key})"):
            package_sets[key], local[key] = [], {}
            for i, c in enumerate(data.clients):
                picked = selections[sel][i].indices
                proxies = (data.public_x[picked], data.public_y[picked]) if aligned else None
                ex = train_expert(
                    seed_model, (c.x_train, c.y_train), proxies, spaces[i], lora_rank=cfg.lora_rank,
                    epochs=cfg.expert_epochs, lr=cfg.expert_lr, batch_size=cfg.expert_batch_size,
                    seed=seed * 100 + i,
                )
                local[key][c.domain] = _digit_accuracy_local(ex.model, c.x_test, c.y_test, 10)
                package_sets[key].append(
                    write_expert_package(
                        work / "packages" / key / c.domain, ex, proxy_indices=picked, public_pool_size=N,
                        public_x=data.public_x, public_y=data.public_y, method=sel, k=cfg.k, overwrite=True,
                    )
                )

    tests = {c.domain: (c.x_test, c.y_test) for c in data.clients}
    with torch.no_grad():  # the seed alone (its own 10-digit head): the floor every method starts from
        seed_acc = {
            d: float((seed_model(seed_model.prepare(torch.from_numpy(x))).argmax(1).numpy() == y).mean())
            for d, (x, y) in tests.items()
        }
    out_methods: Dict[str, Any] = {}
    for spec in specs:
        out_methods[spec.name] = _server_side(
            spec, cfg, seed, seed_model, package_sets[expert_set_key(spec)], data, tests, clock
        )
    if not keep:
        shutil.rmtree(work / "packages", ignore_errors=True)
    totals = clock.totals()
    import platform

    import timm

    from ..version import __version__

    return {
        "methods": out_methods,
        "seed": seed,
        "domains": domains,
        "config": cfg.to_dict(),
        "timing": clock.stages,
        **totals,
        "seed_model": {
            "loss_per_epoch": seed_losses,
            "per_domain": seed_acc,
            "average": float(np.mean(list(seed_acc.values()))),
        },
        "local_experts": local,
        "relevance_auc": relevance_auc,
        "proxies_from_own_domain": own_domain,
        "sizes": {
            "public_pool": N,
            "pretrain": None if data.pretrain_x is None else len(data.pretrain_x),
            "seed_training_set": len(seed_x),
            "test_per_domain": {c.domain: len(c.y_test) for c in data.clients},
        },
        "versions": {
            "metamoe": __version__,
            "torch": torch.__version__,
            "timm": timm.__version__,
            "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(),
        },
    }


def _server_side(spec, cfg: DigitsConfig, seed: int, seed_model, package_paths, data, tests, clock) -> Dict:
    """One method on the server: package validation, the model, router training (when the method has one),
    then evaluation on every client's test set; returns the method's entry of the results dict."""
    from .baselines import build_method
    from .evaluate import evaluate_domains
    from .server import proxy_owners, proxy_training_set, validate_packages

    with clock.stage(f"server: {spec.name}"):
        pkgs = validate_packages(package_paths, seed_model=seed_model, public_x=data.public_x, public_y=data.public_y)
        moe_kw = dict(
            top_k=cfg.top_k, router_init_scale=cfg.router_init_scale, routed_head=cfg.routed_head,
            context_lambda_init=cfg.context_lambda_init,
        )
        model = build_method(spec, seed_model, pkgs, **(moe_kw if spec.combine == "moe" else {}))
        space = model.label_space
        router = None
        if spec.router_data is not None:
            if spec.router_data == "proxies":
                x, y, picked = proxy_training_set(pkgs, data.public_x, data.public_y, space)
                owners = proxy_owners(pkgs, picked)
            else:  # the oracle: every client's private data, labelled with its own classes
                x = np.concatenate([c.x_train for c in data.clients])
                y = np.concatenate(
                    [c.y_train + space.private_slices[i][0] for i, c in enumerate(data.clients)]
                )
                owners = np.repeat(np.eye(len(data.clients)), [len(c.y_train) for c in data.clients], axis=0)
            block = None
            if cfg.router_loss == "block":
                block = space.public_slice if spec.router_data == "proxies" else (0, space.public_slice[0])
            router = train_router(model, x, y, training=cfg.router_training(seed), label_block=block,
                                  route_targets=owners if cfg.route_loss > 0 else None)
            router = {**{k: v for k, v in router.items() if k != "trained"}, "n_train": int(len(y))}
    with clock.stage(f"eval: {spec.name}"):
        targets = np.array([int(nm.rsplit(":", 1)[-1]) for nm in space.names], dtype=np.int64)
        exact = {c.domain: c.y_test + space.private_slices[i][0] for i, c in enumerate(data.clients)}
        ev = evaluate_domains(model, tests, targets, exact)
        entry: Dict[str, Any] = {
            "per_domain": ev["per_domain"],
            "average": float(np.mean(list(ev["per_domain"].values()))),
            "per_domain_exact": ev["per_domain_exact"],
            "average_exact": float(np.mean(list(ev["per_domain_exact"].values()))),
        }
        entry.update(spec.to_dict())
        entry.pop("name")
        entry["router"] = router
        if spec.combine == "moe":
            # per client domain: the fraction of token slots each expert receives (per layer) and the
            # routing quality, a test sample's mean routing probability to its own client's expert
            stats = {d: model.routing_stats(x_te) for d, (x_te, _) in tests.items()}
            entry["routing"] = {d: frac.round(4).tolist() for d, (frac, _) in stats.items()}
            entry["own_expert_weight"] = {d: float(stats[d][1][:, i].mean()) for i, d in enumerate(tests)}
    return entry
