"""Shared helpers for the benchmark scripts (``benchmarks/bench_*.py``).

What every benchmark here does with them:

1. ``args = common_parser(__doc__).parse_args()``: the shared flags (``--quick``, ``--device``, ``--warmup``,
   ``--rep``, ``--no-csv``, ``--peak-gbps``, ``--peak-tflops``).
2. ``t = time_fn(fn, device=dev, warmup=..., rep=...)``: median and 20/80 % quantiles over ``rep`` timed
   calls after ``warmup`` untimed ones. On a GPU each call is timed with its own pair of CUDA events, the L2
   cache is flushed before each call (``flush_l2=True``, as ``triton.testing.do_bench`` does) and the host
   synchronises once at the end; on the CPU each call is timed with ``time.perf_counter``.
   ``time_fn(fn, device="cuda", cuda_graph=True)`` captures ``fn`` into a CUDA graph and times its
   replays instead: the figure without the host's launch overhead (see :func:`time_fn`).
3. ``print_table(rows, columns)`` for the terminal, ``append_csv(name, rows, env, results_dir)`` for
   ``<results_dir>/<name>.csv`` (``--results-dir``, default ``benchmarks/results``): every row gets the
   environment columns of :func:`environment` (time, device name, torch/triton/metamoe versions, git
   commit) in front.

The scripts with ``--target`` (the issue target shapes, CUDA only) also take ``--target-scale tiny``
(:func:`add_target_scale`, :func:`check_target_args`): the same target path at the small shapes of
``benchmarks/cases.py`` (``target_tiny``) on any device, a dry run that tests/test_bench_target_dryrun.py
runs on the CPU. In the target path an impl or peer that raises gets its row with the error in ``note``
(:func:`failure_note`) and the others still run.

Always time a peer (at least the plain PyTorch path) in the same run and print the ratio; never write a
number for a device the script did not run on.

Each script puts the repository root on ``sys.path`` so that ``benchmarks.utils`` imports when it is run
as ``python benchmarks/bench_x.py``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import functools
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent

# Measured device ceilings (docs/gpu.md, "GPU targets"). Only measured numbers belong here: a device that is not
# listed gets no "fraction of peak" column unless --peak-gbps / --peak-tflops are given.
MEASURED_PEAKS: Dict[str, Dict[str, float]] = {
    "H200": {"gbps": 4300.0, "tflops_bf16": 790.0},
}

ENV_COLUMNS = ("timestamp", "device", "torch", "triton", "metamoe", "commit")


@dataclass(frozen=True)
class Timing:
    """Seconds per call: ``median``, ``p20``, ``p80`` over ``n`` timed calls."""

    median: float
    p20: float
    p80: float
    n: int

    @property
    def us(self) -> float:
        return self.median * 1e6

    def as_row(self, unit: str = "us") -> Dict[str, float]:
        """``{"median_<unit>", "p20_<unit>", "p80_<unit>"}`` with ``unit`` in us/ms/s."""
        scale = {"us": 1e6, "ms": 1e3, "s": 1.0}[unit]
        return {
            f"median_{unit}": round(self.median * scale, 4),
            f"p20_{unit}": round(self.p20 * scale, 4),
            f"p80_{unit}": round(self.p80 * scale, 4),
        }


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def summarize(samples: Iterable[float]) -> Timing:
    """Median and 20/80 % quantiles (linear interpolation) of per-call times in seconds."""
    vals = sorted(float(s) for s in samples)
    if not vals:
        raise ValueError("summarize needs at least one sample")
    return Timing(statistics.median(vals), _quantile(vals, 0.2), _quantile(vals, 0.8), len(vals))


@functools.lru_cache(maxsize=None)
def _l2_flush_buffer(device_index: int):
    import torch

    # 256 MiB: larger than any current GPU's L2 (H100/H200: 50 MiB), so a memset evicts the inputs.
    return torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=f"cuda:{device_index}")


def time_fn(
    fn: Callable[[], Any],
    *,
    device: Any = "cpu",
    warmup: int = 10,
    rep: int = 50,
    flush_l2: bool = True,
    setup: Optional[Callable[[], Any]] = None,
    cuda_graph: bool = False,
    graph_calls: int = 1,
) -> Timing:
    """Time ``fn()`` (no arguments; close over the inputs).

    Args:
        fn: the call to time. Its result is discarded.
        device: where ``fn`` runs (``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``). CUDA: CUDA
            events around each call on the current stream; CPU: ``time.perf_counter``.
        warmup: untimed calls first (compilation, autotuning, caches).
        rep: timed calls (with ``cuda_graph``: timed replays); the result summarises these.
        flush_l2: GPU only: overwrite a 256 MiB buffer (more than any GPU's L2) before each timed call, or
            before each replay with ``cuda_graph``, so that inputs come from HBM. With ``graph_calls > 1``
            only the first call of a replay starts from a flushed L2; the later ones find what the earlier
            ones left there.
        setup: called (untimed) before each timed call, e.g. to clear gradients. Not with ``cuda_graph``
            (nothing can run between captured calls).
        cuda_graph: time CUDA-graph replays instead of Python calls (CUDA devices only). After ``warmup``
            calls (at least one) on a side stream, ``graph_calls`` consecutive calls of ``fn`` are captured
            into one ``torch.cuda.CUDAGraph`` on that stream; each timed replay is bracketed by CUDA events,
            and the time per call is the replay's time divided by ``graph_calls``. This removes the host's
            launch overhead, which can exceed a microsecond-scale kernel's time when one Python call is
            bracketed by events. ``fn`` must be capturable: no host synchronisation (``.item()``,
            ``.cpu()``, data-dependent shapes), no CPU tensors, everything compiled or autotuned during
            the warm-up; otherwise the capture raises (a RuntimeError from torch) and the caller reports
            the implementation as not capturable.
        graph_calls: calls of ``fn`` per captured graph (``cuda_graph`` only), >= 1.

    Returns:
        :class:`Timing` in seconds per call.

    Raises:
        ValueError: ``warmup < 0``, ``rep < 1``, ``graph_calls < 1``, or ``cuda_graph`` with a non-CUDA
            ``device`` or with ``setup``.
    """
    import torch

    dev = torch.device(device)
    if warmup < 0 or rep < 1:
        raise ValueError(f"need warmup >= 0 and rep >= 1, got warmup={warmup}, rep={rep}")
    if cuda_graph:
        return _time_cuda_graph(fn, dev, warmup=warmup, rep=rep, flush_l2=flush_l2, setup=setup,
                                graph_calls=graph_calls)
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        cache = _l2_flush_buffer(index) if flush_l2 else None
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        torch.cuda.synchronize(index)
        for i in range(rep):
            if setup is not None:
                setup()
            if cache is not None:
                cache.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(index)
        return summarize(s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends))
    samples = []
    for _ in range(rep):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return summarize(samples)


def _time_cuda_graph(fn, dev, *, warmup: int, rep: int, flush_l2: bool, setup, graph_calls: int) -> Timing:
    """:func:`time_fn` with ``cuda_graph=True`` (arguments already checked there, except these)."""
    import torch

    if dev.type != "cuda":
        raise ValueError(f"time_fn(cuda_graph=True) needs a CUDA device, got device={str(dev)!r}: "
                         "CUDA graphs capture GPU work only; time CPU calls with cuda_graph=False")
    if setup is not None:
        raise ValueError("time_fn(cuda_graph=True) takes no setup: nothing runs between the captured calls")
    if isinstance(graph_calls, bool) or not isinstance(graph_calls, int) or graph_calls < 1:
        raise ValueError(f"graph_calls must be an int >= 1, got {graph_calls!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"time_fn(cuda_graph=True) needs a CUDA device; torch sees none (device={str(dev)!r})")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    with torch.cuda.device(index):
        # Warm-up and capture on the same side stream (the documented pattern: lazily created handles,
        # e.g. cuBLAS workspaces, then exist on the capture stream before the capture begins).
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(max(1, warmup)):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        caller_stream = torch.cuda.current_stream()
        try:
            with torch.cuda.graph(graph, stream=stream):
                for _ in range(graph_calls):
                    fn()
        except BaseException:
            # torch.cuda.graph's __exit__ leaves the capture stream current when capture_end raises (a
            # capture that an uncapturable call invalidated): give the caller its stream back
            torch.cuda.set_stream(caller_stream)
            raise
        graph.replay()  # one untimed replay: first-launch costs of the instantiated graph
        cache = _l2_flush_buffer(index) if flush_l2 else None
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        torch.cuda.synchronize()
        for i in range(rep):
            if cache is not None:
                cache.zero_()
            starts[i].record()
            graph.replay()
            ends[i].record()
        torch.cuda.synchronize()
        samples = [s.elapsed_time(e) * 1e-3 / graph_calls for s, e in zip(starts, ends)]
        del graph
    return summarize(samples)


# --------------------------------------------------------------------------- environment


def device_name(device: Any = "cpu") -> str:
    """The GPU's name (``torch.cuda.get_device_name``) or the CPU's model name, with its core count."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    """Short hash of HEAD (with ``+dirty`` when tracked files differ from it), or ``unknown``."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=REPO_ROOT, capture_output=True,
                               timeout=10).returncode
        return sha + ("+dirty" if dirty == 1 else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(name: str) -> str:
    try:
        mod = __import__(name)
    except Exception:
        return "not installed"
    return str(getattr(mod, "__version__", "unknown"))


def environment(device: Any = "cpu") -> Dict[str, str]:
    """The columns every CSV row starts with: timestamp (UTC), device, torch, triton, metamoe, commit."""
    return {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device_name(device),
        "torch": _version("torch"),
        "triton": _version("triton"),
        "metamoe": _version("metamoe"),
        "commit": git_commit(),
    }


def measured_peak(device: Any, key: str) -> Optional[float]:
    """A measured ceiling (``"gbps"`` or ``"tflops_bf16"``) for this device from :data:`MEASURED_PEAKS`."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    for tag, peaks in MEASURED_PEAKS.items():
        if tag in name:
            return peaks.get(key)
    return None


# --------------------------------------------------------------------------- output


def append_csv(name: str, rows: Sequence[Mapping[str, Any]], env: Mapping[str, Any],
               results_dir: Any = RESULTS_DIR) -> Path:
    """Append ``rows`` to ``<results_dir>/<name>.csv``, each prefixed with the ``env`` columns.

    A new column (one that the file's header lacks) rewrites the file once with the union of the columns,
    so older rows keep their values and get blanks in the new ones. Returns the path.
    """
    if not rows:
        raise ValueError("append_csv needs at least one row")
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.csv"
    full = [{**env, **r} for r in rows]
    columns: List[str] = list(env)
    for r in full:
        columns += [c for c in r if c not in columns]
    old_rows: List[Dict[str, str]] = []
    old_cols: List[str] = []
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            old_cols = list(reader.fieldnames or [])
            if [c for c in columns if c not in old_cols]:
                old_rows = list(reader)
    if old_cols and not [c for c in columns if c not in old_cols]:
        with path.open("a", newline="") as f:  # same columns (or a subset): plain append
            w = csv.DictWriter(f, fieldnames=old_cols)
            w.writerows(full)
        return path
    merged = old_cols + [c for c in columns if c not in old_cols]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=merged)
        w.writeheader()
        w.writerows(old_rows)
        w.writerows(full)
    return path


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0 or 0.01 <= abs(v) < 1e5:
            return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
        return f"{v:.3e}"
    return str(v)


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], title: str = "") -> None:
    """Fixed-width table of ``rows`` (dicts) with the given ``columns``; missing cells print ``-``."""
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    if title:
        print(title)
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def common_parser(description: Optional[str] = None) -> argparse.ArgumentParser:
    """argparse with the flags every benchmark takes."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats (what runs on a CPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing")
    p.add_argument("--rep", type=int, default=None, help="timed calls (the median is over these)")
    p.add_argument("--no-csv", action="store_true", help="print only, do not append to the results folder")
    add_results_dir(p)
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="measured memory bandwidth, GB/s, for the %%peak column")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="measured dense TFLOP/s, for the %%peak column")
    return p


def add_results_dir(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--results-dir DIR`` (default ``benchmarks/results``): the folder the CSV rows (and logs) go to."""
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, metavar="DIR",
                   help="folder for the CSV rows and logs (default: benchmarks/results; created if missing)")
    return p


def require_cuda(device: str, flag: str = "--target") -> None:
    """Exit (SystemExit, code 2) with one line unless ``device`` is a CUDA device torch can use."""
    import torch

    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        print(f"{flag} runs the issue targets' GPU shapes and needs a CUDA device; device={device!r}"
              f"{'' if torch.cuda.is_available() else ' and torch sees no CUDA device'}", file=sys.stderr)
        raise SystemExit(2)


def capped_note(k_run: int, k: int) -> str:
    """``note`` of a peer that made ``k_run`` of the target's ``k`` picks ("" when it made them all)."""
    if k_run >= k:
        return ""
    return (f"{k_run} of the target's {k} picks (a capped peer); scaled_s = median_s x {k}/{k_run} "
            "is a linear extrapolation, not a measurement")


def compare_picks(rows, picks, column: str, ref: str = "torch") -> None:
    """Set ``row[column]`` (True / False / None) to whether each row's picks (``picks[row["backend"]]``) equal
    ``picks[ref]`` over their common length, ``row["picks_compared"]`` to that length, and add the first
    differing pick to the row's ``note``."""
    import numpy as np

    want = picks.get(ref)
    for row in rows:
        got = picks.get(row["backend"])
        if got is None or want is None:
            row[column] = None
            continue
        m = min(len(got), len(want))
        same = bool(np.array_equal(got[:m], want[:m]))
        row[column] = same
        row["picks_compared"] = m
        if not same:
            first = int(np.flatnonzero(got[:m] != want[:m])[0])
            row["note"] = "; ".join(filter(None, [row.get("note"), f"picks differ from {ref}'s at pick {first}"]))


def failure_note(exc: BaseException, what: str = "failed") -> str:
    """One line for a row's ``note``: ``"<what>: <ExceptionType>: <first line of its message>"``."""
    lines = str(exc).strip().splitlines()
    return f"{what}: {type(exc).__name__}: {lines[0][:200] if lines else ''}"


def recover_cuda() -> None:
    """After a failed call on a GPU: wait for the device and free the cached blocks (no-op on a CPU)."""
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001  (a sticky CUDA error: the next call reports it)
        pass


def add_target_scale(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--target-scale {full,tiny}`` (with ``--target``; see :func:`check_target_args`)."""
    from benchmarks.cases import TARGET_SCALES

    p.add_argument("--target-scale", choices=TARGET_SCALES, default="full",
                   help="with --target: full (default; the issue target shapes, CUDA only) or tiny (the "
                        "same target path: peers, checks, CSV columns and target_case values, at the small "
                        "shapes of benchmarks/cases.py target_tiny, on any device: a dry run of --target; "
                        "Triton impls run on a CPU only under TRITON_INTERPRET=1; needs --results-dir or "
                        "--no-csv)")
    return p


def check_target_args(p: argparse.ArgumentParser, args: argparse.Namespace, device: str) -> None:
    """Validate ``--target`` / ``--target-scale`` for ``device``.

    ``--target`` at the full scale needs a CUDA device (:func:`require_cuda`: one line, exit code 2).
    ``--target-scale tiny`` runs on any device; its rows carry the real ``target_case`` values, so they
    must not land in the default ``benchmarks/results``: it needs ``--results-dir`` elsewhere or ``--no-csv``.
    """
    scale = getattr(args, "target_scale", "full")
    if scale != "full" and not args.target:
        p.error(f"--target-scale {scale} goes with --target")
    if not args.target:
        return
    if scale == "full":
        require_cuda(device)
        return
    if not args.no_csv and Path(args.results_dir).resolve() == RESULTS_DIR.resolve():
        p.error(f"--target-scale {scale} writes rows with the targets' target_case values: give "
                f"--results-dir a scratch folder (not {RESULTS_DIR}) or --no-csv")


def pick_device(arg: Optional[str], threads: Optional[int] = None) -> str:
    """``arg``, else ``"cuda"`` when torch sees a GPU, else ``"cpu"``; sets torch's CPU threads if given."""
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    if arg:
        return arg
    return "cuda" if torch.cuda.is_available() else "cpu"
