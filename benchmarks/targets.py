"""The issue targets as data, and each measured figure against its target.

Every :class:`Target` names the CSV its figure comes from (``<results_dir>/<csv>.csv``, written by a
``bench_X.py --target`` run), the rows (``where``: column -> required value; every ``--target`` row
carries ``target_case``, the case name of benchmarks/cases.py), the column holding the figure
(``metric``), the comparison (``<=`` or ``>=``) and the threshold. ``checks`` are columns that must read
true in the same row (the bench's own correctness check of the timed implementation against its peer):
a figure whose check failed is ``invalid``, whatever its speed.

:func:`summarize` reads a results folder and gives one row per target, the latest matching CSV row (the
last in the file) deciding; :func:`render_markdown` makes a table of them. Status:

* ``pass``: the figure meets the target;
* ``short``: measured, and it does not;
* ``not measured``: no matching row, or the matching row has no figure (e.g. the implementation was
  skipped or could not be captured in a CUDA graph: the row's ``note`` says why);
* ``invalid``: measured, but a check column of the row is false (a wrong result).

  python benchmarks/targets.py --results-dir OUT     # prints the markdown table
"""

from __future__ import annotations

import argparse
import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

RESULTS_DIR = Path(__file__).resolve().parent / "results"
COMPARISONS = ("<=", ">=")
STATUSES = ("pass", "short", "not measured", "invalid")
TRUE_STRINGS = ("true", "1", "yes")


@dataclass(frozen=True)
class Target:
    """One figure an issue asks for. See the module docstring."""

    name: str
    issue: int
    csv: str
    where: Mapping[str, str]
    metric: str
    comparison: str
    threshold: float
    unit: str = ""
    checks: Tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self):
        if self.comparison not in COMPARISONS:
            raise ValueError(f"Target {self.name!r}: comparison must be one of {COMPARISONS}, got {self.comparison!r}")
        if not self.where:
            raise ValueError(f"Target {self.name!r}: where must select rows (at least one column)")

    def matches(self, row: Mapping[str, Any]) -> bool:
        return all(str(row.get(col, "")) == str(val) for col, val in self.where.items())

    def meets(self, value: float) -> bool:
        return value <= self.threshold if self.comparison == "<=" else value >= self.threshold


def _router(name, metric, comparison, threshold, unit, description):
    return Target(name, 15, "router_topk",
                  {"target_case": "router-t16k-e128-k8", "mode": "fwd", "impl": "metamoe-triton", "timing": "graph"},
                  metric, comparison, threshold, unit, ("check_ok",), description)


def _moe(name, case, mode, metric, comparison, threshold, unit, description):
    return Target(name, 15, "moe", {"target_case": case, "mode": mode, "impl": "metamoe-triton"},
                  metric, comparison, threshold, unit, ("check_ok",), description)


def _patch_moe(name, case, mode, description):
    return Target(name, 15, "patch_moe", {"target_case": case, "mode": mode, "impl": "metamoe"},
                  "vs_hf_best", ">=", 1.0, "x", ("check_ok",), description)


TARGETS: Tuple[Target, ...] = (
    _router("router fwd, CUDA graph", "median_us", "<=", 15.0, "us",
            "router top-k T=16384 E=128 k=8 bf16, forward under a CUDA graph (median)"),
    _router("router fwd vs torch eager, CUDA graph", "vs_eager", ">=", 3.0, "x",
            "speed-up over torch eager (softmax + topk + renormalise), both under a CUDA graph"),
    _moe("MoE fwd Mixtral", "moe-mixtral-t16k", "fwd", "TFLOP/s", ">=", 550.0, "TFLOP/s",
         "E=8 k=2 d=4096 f=14336 SwiGLU, T=16384, bf16 forward"),
    _moe("MoE fwd Qwen3-30B-A3B", "moe-qwen3-t16k", "fwd", "TFLOP/s", ">=", 350.0, "TFLOP/s",
         "E=128 k=8 d=2048 f=768 SwiGLU, T=16384, bf16 forward"),
    _moe("MoE fwd+bwd Mixtral vs torch._grouped_mm", "moe-mixtral-t16k", "fwd+bwd", "vs_torch_grouped_mm", ">=", 1.3,
         "x", "speed-up over metamoe's torch path on torch._grouped_mm"),
    _moe("MoE fwd+bwd Qwen3 vs torch._grouped_mm", "moe-qwen3-t16k", "fwd+bwd", "vs_torch_grouped_mm", ">=", 1.3,
         "x", "speed-up over metamoe's torch path on torch._grouped_mm"),
    _moe("MoE fwd+bwd Mixtral vs per-expert loop", "moe-mixtral-t16k", "fwd+bwd", "vs_loop", ">=", 10.0, "x",
         "speed-up over the faster per-expert loop (transformers eager, metamoe torch)"),
    _moe("MoE fwd+bwd Qwen3 vs per-expert loop", "moe-qwen3-t16k", "fwd+bwd", "vs_loop", ">=", 10.0, "x",
         "speed-up over the faster per-expert loop (transformers eager, metamoe torch)"),
    _patch_moe("drop-in Mixtral fwd vs transformers' fastest", "patch-moe-mixtral-t16k", "fwd",
               "patch_moe'd 2-layer Mixtral-8x7B-shaped model, T=4x4096, bf16 forward: speed-up over the "
               "faster of transformers' eager and grouped_mm experts on the same model"),
    _patch_moe("drop-in Mixtral train step vs transformers' fastest", "patch-moe-mixtral-t16k", "fwd+bwd",
               "the same, forward + loss + backward"),
    _patch_moe("drop-in Qwen3 fwd vs transformers' fastest", "patch-moe-qwen3-t16k", "fwd",
               "patch_moe'd 2-layer Qwen3-30B-A3B-shaped model, T=4x4096, bf16 forward: speed-up over the "
               "faster of transformers' eager and grouped_mm experts on the same model"),
    _patch_moe("drop-in Qwen3 train step vs transformers' fastest", "patch-moe-qwen3-t16k", "fwd+bwd",
               "the same, forward + loss + backward"),
    Target("DPP N=1M D=768 k=10000", 17, "dpp", {"target_case": "dpp-n1m-d768-k10000", "backend": "cuda"},
           "median_s", "<=", 10.0, "s", ("picks_identical",),
           "select_dpp cosine, ridge 1e-3, relevance-weighted, float32, cuda backend (whole call)"),
    Target("facility location 1M K=50 k=10000", 17, "facility_location",
           {"target_case": "fl-n1m-k50-k10000", "backend": "cuda", "optimizer": "lazy"},
           "median_s", "<=", 1.0, "s", ("same_picks_as_torch",),
           "lazy greedy on a prebuilt 1M-point K=50 kNN graph, cuda backend"),
    Target("exact kNN graph 1M x 768 K=50", 17, "knn_graph",
           {"target_case": "knn-n1m-d768-k50", "method": "torch-exact"},
           "median_s", "<=", 60.0, "s", ("check_ok",), "build_knn_graph method='torch' on the GPU"),
)


def read_rows(path: Path) -> List[Dict[str, str]]:
    """The rows of one CSV (an empty list when the file does not exist)."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _number(text: Any) -> Optional[float]:
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def evaluate(target: Target, rows: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """One summary row for ``target`` from the rows of its CSV (the last matching row decides)."""
    out: Dict[str, Any] = {
        "target": target.name, "issue": target.issue, "csv": f"{target.csv}.csv", "metric": target.metric,
        "goal": f"{target.comparison} {target.threshold:g}{(' ' + target.unit) if target.unit else ''}",
        "value": None, "status": "not measured", "device": "", "timestamp": "", "commit": "", "note": "",
    }
    matching = [r for r in rows if target.matches(r)]
    if not matching:
        out["note"] = "no row with " + ", ".join(f"{c}={v}" for c, v in target.where.items())
        return out
    row = matching[-1]
    out.update(device=row.get("device", ""), timestamp=row.get("timestamp", ""), commit=row.get("commit", ""))
    notes = [str(row.get("note") or "")]
    value = _number(row.get(target.metric))
    if value is None:
        out["note"] = "; ".join(filter(None, notes + [f"no value in column {target.metric!r}"]))
        return out
    out["value"] = value
    failed = [c for c in target.checks if str(row.get(c, "")).strip().lower() not in TRUE_STRINGS]
    if failed:
        out["status"] = "invalid"
        notes.append("check failed: " + ", ".join(f"{c}={row.get(c, '')!r}" for c in failed))
    else:
        out["status"] = "pass" if target.meets(value) else "short"
    out["note"] = "; ".join(filter(None, notes))
    return out


def summarize(results_dir: Any = RESULTS_DIR, targets: Sequence[Target] = TARGETS) -> List[Dict[str, Any]]:
    """One row per target (see :func:`evaluate`) from the CSVs in ``results_dir``."""
    results_dir = Path(results_dir)
    cache: Dict[str, List[Dict[str, str]]] = {}
    out = []
    for t in targets:
        if t.csv not in cache:
            cache[t.csv] = read_rows(results_dir / f"{t.csv}.csv")
        out.append(evaluate(t, cache[t.csv]))
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "/")


def render_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table: each figure against its target, with its status, device and note."""
    cols = ("target", "issue", "value", "goal", "status", "device", "note")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    counts = {s: sum(1 for r in rows if r.get("status") == s) for s in STATUSES}
    lines.append("")
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no targets")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, metavar="DIR",
                   help="folder with the bench CSVs (default: benchmarks/results)")
    args = p.parse_args(argv)
    print(render_markdown(summarize(args.results_dir)), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
