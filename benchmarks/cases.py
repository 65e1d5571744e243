"""The benchmark shapes and peers of every op, defined once for the standalone scripts and the pytest suite.

Per op, :data:`CASES` holds an :class:`OpCases`:

* ``quick``: the CPU shapes (``bench_X.py --quick``, the pytest-benchmark suite's CPU tests, ``make bench-quick``);
* ``gpu``: the default sweep of ``bench_X.py`` without ``--quick`` on a CUDA device (the selection scripts also
  run it on a CPU), and the suite's GPU tests;
* ``target``: the issue targets' shapes (issues 15 and 17), what ``bench_X.py --target`` runs on a CUDA
  device; every target shape has a ``case`` name that the CSV rows carry in their ``target_case`` column
  and that :mod:`benchmarks.targets` selects rows by;
* ``target_tiny``: the same target cases (the same ``case`` names and keys) at scaled-down shapes, what
  ``bench_X.py --target --target-scale tiny`` runs on any device, the CPU included: everything of the
  ``--target`` path (peers, checks, CSV columns, ``target_case`` values) executes, at shapes that take
  seconds (tests/test_bench_target_dryrun.py runs it in CI, so that a lease on a GPU is not spent on a
  broken ``--target`` path). Its figures say nothing about the targets;
* ``peers``: the implementations timed in the same run, ``reference`` the one every other is checked
  against.

``quick`` and ``gpu`` are lists of shapes (dicts); a script that sweeps a grid (router: T x E x k) takes
the grid from ``*_GRID`` below and :func:`expand` turns it into the list.

The module imports nothing heavy (no torch at import time), so tests can read it cheaply.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Sequence, Tuple


def expand(grid: Mapping[str, Sequence[Any]]) -> List[Dict[str, Any]]:
    """The cartesian product of a ``{name: values}`` grid, as a list of dicts, in the grid's order."""
    names = list(grid)
    return [dict(zip(names, vals)) for vals in itertools.product(*(grid[n] for n in names))]


@dataclass(frozen=True)
class OpCases:
    """Shapes and peers of one op. See the module docstring."""

    op: str
    csv: str  # the CSV (benchmarks/results/<csv>.csv) its script appends to
    script: str  # the standalone script, relative to the repository root
    quick: Tuple[Mapping[str, Any], ...]
    gpu: Tuple[Mapping[str, Any], ...]
    target: Tuple[Mapping[str, Any], ...]
    peers: Tuple[str, ...]
    reference: str
    notes: Mapping[str, str] = field(default_factory=dict)
    target_tiny: Tuple[Mapping[str, Any], ...] = ()

    def target_case(self, case: str) -> Mapping[str, Any]:
        """The target shape named ``case``; KeyError naming the known cases otherwise."""
        for shape in self.target:
            if shape["case"] == case:
                return shape
        raise KeyError(f"{self.op}: no target case {case!r}; known: {', '.join(s['case'] for s in self.target)}")

    def target_shapes(self, scale: str = "full") -> Tuple[Mapping[str, Any], ...]:
        """``target`` (``scale="full"``) or ``target_tiny`` (``"tiny"``); ValueError for another scale."""
        if scale == "full":
            return self.target
        if scale == "tiny":
            return self.target_tiny
        raise ValueError(f"{self.op}: target scale must be one of {', '.join(TARGET_SCALES)}, got {scale!r}")


# --target-scale of the bench scripts: "full" (the issue shapes, CUDA only), "tiny" (target_tiny, any device)
TARGET_SCALES = ("full", "tiny")


# --------------------------------------------------------------------------- router_topk

ROUTER_QUICK_GRID = {"T": [256, 1024], "E": [8, 64], "k": [2]}
ROUTER_GPU_GRID = {"T": [1024, 4096, 16384, 65536], "E": [8, 64, 128, 256], "k": [2, 8]}
ROUTER_MODES = ("fwd", "fwd+stats", "fwd+bwd")
# --target: the forward (the target) and the forward with statistics, each per call and under a CUDA graph.
ROUTER_TARGET_MODES = ("fwd", "fwd+stats")

ROUTER = OpCases(
    op="router_topk",
    csv="router_topk",
    script="benchmarks/bench_router_topk.py",
    quick=tuple(expand(ROUTER_QUICK_GRID)),
    gpu=tuple(expand(ROUTER_GPU_GRID)),
    target=({"case": "router-t16k-e128-k8", "T": 16384, "E": 128, "k": 8, "dtype": "bf16"},),
    peers=("torch-eager", "metamoe-torch", "metamoe-triton"),
    reference="torch-eager",
    notes={"timing": "per call (events around one Python call) and CUDA graph (replays of a captured call)"},
    target_tiny=({"case": "router-t16k-e128-k8", "T": 64, "E": 16, "k": 4, "dtype": "bf16"},),
)

# --------------------------------------------------------------------------- moe experts

# name: (E, k, d, f), SwiGLU experts in transformers' MixtralExperts layout
MOE_SHAPES: Dict[str, Tuple[int, int, int, int]] = {
    "mixtral": (8, 2, 4096, 14336),  # Mixtral-8x7B
    "qwen3": (128, 8, 2048, 768),  # Qwen3-30B-A3B
    "olmoe": (64, 8, 2048, 1024),  # OLMoE-1B-7B
    "tiny": (8, 2, 64, 96),
    "tiny-many": (16, 4, 32, 48),
}
MOE_QUICK_T = (128,)
MOE_GPU_T = (4096, 16384)
MOE_MODES = ("fwd", "fwd+bwd")


def _moe_shape(name: str, T: int, **extra) -> Dict[str, Any]:
    E, k, d, f = MOE_SHAPES[name]
    return {"shape": name, "T": T, "E": E, "k": k, "d": d, "f": f, **extra}


MOE = OpCases(
    op="moe",
    csv="moe",
    script="benchmarks/bench_moe_experts.py",
    quick=tuple(_moe_shape(n, T) for n in ("tiny", "tiny-many") for T in MOE_QUICK_T),
    gpu=tuple(_moe_shape(n, T) for n in ("mixtral", "qwen3", "olmoe") for T in MOE_GPU_T),
    target=(
        _moe_shape("mixtral", 16384, case="moe-mixtral-t16k", dtype="bf16"),
        _moe_shape("qwen3", 16384, case="moe-qwen3-t16k", dtype="bf16"),
    ),
    # hf-*: transformers' MixtralExperts with its "eager" (per-expert loop) and "grouped_mm" experts
    # implementations; metamoe-torch: metamoe's per-expert loop; torch-grouped_mm: metamoe's torch path on
    # torch._grouped_mm; liger: liger-kernel's fused MoE where it imports.
    peers=("hf-eager", "hf-grouped_mm", "metamoe-torch", "torch-grouped_mm", "liger", "metamoe-triton"),
    reference="metamoe-torch",
    notes={"loop_peers": "hf-eager, metamoe-torch"},
    target_tiny=(
        _moe_shape("tiny", 64, case="moe-mixtral-t16k", dtype="bf16"),
        _moe_shape("tiny-many", 64, case="moe-qwen3-t16k", dtype="bf16"),
    ),
)
MOE_LOOP_PEERS = ("hf-eager", "metamoe-torch")

# --------------------------------------------------------------------------- patch_moe (drop-in, whole model)

# name: transformers architecture and decoder shape. d: hidden size; f: each expert's intermediate size; E
# experts, top-k; attention heads, key/value heads and head size; layers: decoder layers (every one a
# sparse MoE block); vocab: a small vocabulary (the benchmark is about the MoE blocks, not the LM head).
PATCH_MOE_MODELS: Dict[str, Dict[str, Any]] = {
    "mixtral": dict(arch="mixtral", d=4096, f=14336, E=8, k=2, heads=32, kv_heads=8, head_dim=128, layers=2,
                    vocab=1024),  # Mixtral-8x7B, 2 of its 32 layers
    "qwen3": dict(arch="qwen3_moe", d=2048, f=768, E=128, k=8, heads=32, kv_heads=4, head_dim=128, layers=2,
                  vocab=1024),  # Qwen3-30B-A3B, 2 of its 48 layers
    "tiny-mixtral": dict(arch="mixtral", d=64, f=96, E=8, k=2, heads=4, kv_heads=2, head_dim=16, layers=2,
                         vocab=128),
    "tiny-qwen3": dict(arch="qwen3_moe", d=32, f=48, E=16, k=4, heads=4, kv_heads=2, head_dim=8, layers=2,
                       vocab=128),
}
PATCH_MOE_MODES = ("fwd", "fwd+bwd")  # inference forward; training step (forward, loss, backward)


def _patch_moe_shape(name: str, batch: int, seq: int, **extra) -> Dict[str, Any]:
    return {"model": name, **PATCH_MOE_MODELS[name], "batch": batch, "seq": seq, "T": batch * seq, **extra}


PATCH_MOE = OpCases(
    op="patch_moe",
    csv="patch_moe",
    script="benchmarks/bench_patch_moe.py",
    quick=(_patch_moe_shape("tiny-mixtral", 2, 64), _patch_moe_shape("tiny-qwen3", 2, 64)),
    gpu=tuple(_patch_moe_shape(n, b, 4096) for n in ("mixtral", "qwen3") for b in (1, 4)),
    target=(
        _patch_moe_shape("mixtral", 4, 4096, case="patch-moe-mixtral-t16k", dtype="bf16"),
        _patch_moe_shape("qwen3", 4, 4096, case="patch-moe-qwen3-t16k", dtype="bf16"),
    ),
    # hf-eager / hf-grouped_mm: the unpatched model with transformers' "eager" (per-expert loop) and
    # "grouped_mm" experts implementations (model.set_experts_implementation); metamoe: the same model
    # after metamoe.integrations.hf.patch_moe (metamoe's router and experts ops, default backend).
    peers=("hf-eager", "hf-grouped_mm", "metamoe"),
    reference="hf-eager",
    notes={"check": "logits (and, training step, every parameter's gradient) against the unpatched model's"},
    target_tiny=(
        _patch_moe_shape("tiny-mixtral", 2, 32, case="patch-moe-mixtral-t16k", dtype="bf16"),
        _patch_moe_shape("tiny-qwen3", 2, 32, case="patch-moe-qwen3-t16k", dtype="bf16"),
    ),
)
PATCH_MOE_HF_PEERS = ("hf-eager", "hf-grouped_mm")

# --------------------------------------------------------------------------- dpp

DPP = OpCases(
    op="dpp",
    csv="dpp",
    script="benchmarks/bench_dpp.py",
    quick=({"N": 20000, "D": 64, "k": 100, "rbf_N": 3000, "rbf_k": 100},),
    gpu=({"N": 200000, "D": 128, "k": 500, "rbf_N": 20000, "rbf_k": 500},),
    # peer_k: picks each peer makes at the target (the rest of its time would be k / peer_k times as
    # long: the rows say so in their note and carry the scaled figure in their own column).
    target=({"case": "dpp-n1m-d768-k10000", "N": 1_000_000, "D": 768, "k": 10_000, "ridge": 1e-3,
             "peer_k": {"torch": 500, "cpp": 50}},),
    peers=("cuda", "cpp", "torch"),
    reference="torch",
    notes={"kernel": "cosine, relevance-weighted, ridge 1e-3, float32"},
    target_tiny=({"case": "dpp-n1m-d768-k10000", "N": 2000, "D": 32, "k": 40, "ridge": 1e-3,
                  "peer_k": {"torch": 20, "cpp": 10}},),
)

# --------------------------------------------------------------------------- facility location

FACILITY_LOCATION = OpCases(
    op="facility_location",
    csv="facility_location",
    script="benchmarks/bench_facility_location.py",
    quick=({"n": 20000, "d": 32, "neighbors": 20, "k": 200},),
    gpu=({"n": 100000, "d": 64, "neighbors": 20, "k": 1000},),
    # The graph: exact kNN (torch on the GPU) of the same clustered data as the knn_graph target.
    target=({"case": "fl-n1m-k50-k10000", "n": 1_000_000, "d": 768, "neighbors": 50, "k": 10_000,
             "peer_k": {"torch": 1000}},),
    peers=("cuda", "cpp", "torch"),
    reference="torch",
    notes={"optimizer": "lazy (exact); the torch fallback is the reference"},
    # the same data and graph as the knn_graph tiny target (bench_knn_graph.py --graph-cache hands it over)
    target_tiny=({"case": "fl-n1m-k50-k10000", "n": 2000, "d": 32, "neighbors": 10, "k": 40,
                  "peer_k": {"torch": 20}},),
)
# graph="dense" mode of bench_facility_location.py (no target)
FACILITY_LOCATION_DENSE_QUICK = {"n": 5000, "d": 32, "k": 50}
FACILITY_LOCATION_DENSE_GPU = {"n": 100000, "d": 64, "k": 200}

# --------------------------------------------------------------------------- knn graph

KNN_GRAPH = OpCases(
    op="knn_graph",
    csv="knn_graph",
    script="benchmarks/bench_knn_graph.py",
    quick=({"N": 10000, "D": 64, "K": 20},),
    gpu=({"N": 200000, "D": 768, "K": 50},),
    target=({"case": "knn-n1m-d768-k50", "N": 1_000_000, "D": 768, "K": 50},),
    # torch-exact: blocked matmul + topk on the data's device; faiss-flat (CPU) / faiss-gpu-flat where
    # faiss is importable (the GPU image has no faiss: there only torch-exact runs).
    peers=("torch-exact", "faiss-flat", "faiss-gpu-flat"),
    reference="torch-exact",
    target_tiny=({"case": "knn-n1m-d768-k50", "N": 2000, "D": 32, "K": 10},),
)

CASES: Dict[str, OpCases] = {c.op: c for c in (ROUTER, MOE, PATCH_MOE, DPP, FACILITY_LOCATION, KNN_GRAPH)}

# Data of the selection targets (DPP, facility location, kNN graph): Gaussian blobs, the same for all three.
SELECTION_CLUSTERS = 1000
SELECTION_NOISE = 0.5
SELECTION_SEED = 0


def clustered_torch(n: int, d: int, *, device: Any = "cpu", clusters: int = SELECTION_CLUSTERS,
                    noise: float = SELECTION_NOISE, seed: int = SELECTION_SEED):
    """(n, d) float32 torch tensor on ``device``: ``clusters`` unit-variance centres plus ``noise`` x N(0, I).

    Generated on ``device`` with a seeded torch generator (1M x 768 in well under a second on a GPU), so
    two scripts given the same arguments on the same device build the same pool.
    """
    import torch

    if n < 1 or d < 1:
        raise ValueError(f"clustered_torch needs n >= 1 and d >= 1, got n={n}, d={d}")
    g = torch.Generator(device=device).manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g, device=device)
    labels = torch.randint(0, clusters, (n,), generator=g, device=device)
    X = torch.randn(n, d, generator=g, device=device).mul_(noise)
    X += centres[labels]
    return X
