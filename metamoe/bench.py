"""``metamoe bench``: run the benchmark scripts of a source checkout (``benchmarks/bench_<name>.py``).

Each script times metamoe's implementations against their peers in the same run, prints a table with the
ratios and appends CSV rows under ``benchmarks/results/``. Arguments after ``--`` go to every script
(e.g. ``metamoe bench router_topk -- --quick``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import List, Optional


def benchmarks_dir() -> Path:
    here = Path(__file__).resolve().parent.parent / "benchmarks"
    if not here.is_dir():
        raise SystemExit(
            "metamoe bench: the benchmark scripts ship with the source repository, not the wheel; "
            f"run it from a checkout (looked in {here})"
        )
    return here


def available() -> List[str]:
    return sorted(p.stem[len("bench_"):] for p in benchmarks_dir().glob("bench_*.py"))


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: List[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(
        prog="metamoe bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("names", nargs="*", help="benchmarks to run (default: all); see --list")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--quick", action="store_true", help="pass --quick to every script (small shapes, CPU-friendly)")
    args = p.parse_args(argv)
    names = available()
    if args.list:
        print("\n".join(names))
        return 0
    chosen = args.names or names
    unknown = [n for n in chosen if n not in names]
    if unknown:
        print(
            f"metamoe bench: unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(names)}",
            file=sys.stderr,
        )
        return 2
    if args.quick:
        extra = ["--quick", *extra]
    failed = []
    for name in chosen:
        script = benchmarks_dir() / f"bench_{name}.py"
        print(f"== {name}: {script.name} {' '.join(extra)}", flush=True)
        rc = subprocess.run([sys.executable, str(script), *extra], cwd=script.parent.parent).returncode
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"metamoe bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
