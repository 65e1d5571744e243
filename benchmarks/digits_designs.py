"""The designs of the digits experiment that the claims benchmark (bench_unify_claims.py) runs; their names.

The package's :class:`metamoe.unify.experiment.DigitsConfig` holds one design, ``heldoutpool``: what
``metamoe demo`` runs. :data:`DESIGNS` adds two others, whose rows benchmarks/results/unify_claims.csv holds:

* ``outofdomain``: the seed pre-trained on the selection pool itself (no separate pre-training set), 40 pool
  samples per client domain against 300 per distractor domain, 150 test images of its own per client,
  relevance and DPP on the pooled features alone, experts trained 10 epochs, routers 10 epochs without the
  routing loss;
* ``balanced``: the training of ``outofdomain`` on a pool with 300 samples of every domain, the client domains
  included, and three distractor domains.

A :class:`Design` is a DigitsConfig plus what pre-trains the seed (:data:`SEED_POOLS`): ``pretrain``, the
split's own public pre-training set, or ``public``, the whole selection pool (the split then builds no
pre-training set: ``pretrain_per_domain = pretrain_per_client_domain = 0``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Optional, Sequence

from metamoe.unify.experiment import DigitsConfig, run_digits_experiment

__all__ = ["DESIGNS", "SEED_POOLS", "Design", "design", "design_name", "run_seeds"]

SEED_POOLS = ("pretrain", "public")

#: Per design, the DigitsConfig fields that differ from the defaults (``heldoutpool``), and ``seed_pool``
#: where the seed does not pre-train on the split's own pre-training set.
DESIGNS: Dict[str, Dict[str, Any]] = {
    "heldoutpool": {},
    "outofdomain": dict(
        n_test=150,
        shared_test=False,
        public_per_client_domain=40,
        seed_pool="public",
        selection_features="pooled",
        expert_epochs=10,
        route_loss=0.0,
        router_epochs=10,
    ),
    "balanced": dict(
        n_test=150,
        shared_test=False,
        public_per_client_domain=300,
        distractor_domains=("mirrored", "transposed", "blurred"),
        seed_pool="public",
        selection_features="pooled",
        expert_epochs=10,
        route_loss=0.0,
        router_epochs=10,
    ),
}


def _whole_pool(data):
    """The selection pool with its digit labels: the seed's training set under ``seed_pool="public"``."""
    return data.public_x, data.public_y


@dataclass(frozen=True)
class Design:
    """One run's design: the harness config and what pre-trains the seed (one of :data:`SEED_POOLS`)."""

    config: DigitsConfig
    seed_pool: str = "pretrain"

    def seed_training_set(self) -> Optional[Callable]:
        """The ``seed_training_set`` argument of :func:`~metamoe.unify.experiment.run_digits_experiment`."""
        return None if self.seed_pool == "pretrain" else _whole_pool


def design(name: str = "heldoutpool", seed_pool: Optional[str] = None, **overrides: Any) -> Design:
    """The :class:`Design` ``name`` (:data:`DESIGNS`), with ``overrides`` (DigitsConfig fields) on top and
    ``seed_pool`` (default: the design's) replacing what pre-trains the seed."""
    if name not in DESIGNS:
        raise ValueError(f"unknown design {name!r}; known: {', '.join(DESIGNS)}")
    known = [f.name for f in fields(DigitsConfig)]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"unknown DigitsConfig field(s) {unknown}; known: {', '.join(known)}")
    spec = dict(DESIGNS[name])
    pool = spec.pop("seed_pool", "pretrain")
    pool = pool if seed_pool is None else seed_pool
    if pool not in SEED_POOLS:
        raise ValueError(f"seed_pool must be one of {', '.join(SEED_POOLS)}, got {pool!r}")
    spec.update(overrides)
    if pool == "public":
        spec.update(pretrain_per_domain=0, pretrain_per_client_domain=0)
    return Design(DigitsConfig(**spec), pool)


def design_name(d: Design) -> str:
    """The log/CSV name of a design: the name in :data:`DESIGNS` whose fields ``d.config`` has, else
    ``heldoutpool`` followed by every such field that differs (``_<field><value>``); then
    ``_seedpool-<pool>`` when the seed's pre-training data is not the named design's and ``_plainhead``
    without the routed head."""
    keys = sorted({k for spec in DESIGNS.values() for k in spec} - {"seed_pool"})

    def same(name: str) -> bool:
        ref = design(name).config
        return all(getattr(d.config, k) == getattr(ref, k) for k in keys)

    name = next((n for n in DESIGNS if same(n)), None)
    if name is None:
        ref = DigitsConfig()
        name = "heldoutpool" + "".join(
            f"_{k}{','.join(v) if isinstance(v, tuple) else v}"
            for k in keys
            if (v := getattr(d.config, k)) != getattr(ref, k)
        )
        base_pool = "pretrain"
    else:
        base_pool = design(name).seed_pool
    if d.seed_pool != base_pool:
        name += f"_seedpool-{d.seed_pool}"
    if not d.config.routed_head:
        name += "_plainhead"
    return name


def run_seeds(
    seeds: Sequence[int],
    d: Design,
    methods: Optional[Sequence[str]] = None,
    progress: Callable[[str], None] = print,
) -> Dict[int, Dict[str, Any]]:
    """Run the digits experiment of design ``d`` once per seed; returns ``{seed: results dict}`` (see
    :func:`~metamoe.unify.experiment.run_digits_experiment`)."""
    seeds = [int(s) for s in seeds]
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be at least 2 distinct ints, got {seeds}")
    out = {}
    for s in seeds:
        progress(f"== seed {s}")
        out[s] = run_digits_experiment(
            s, methods=methods, progress=progress, config=d.config, seed_training_set=d.seed_training_set()
        )
    return out
