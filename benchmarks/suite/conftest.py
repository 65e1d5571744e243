"""pytest-benchmark suite of the ops (router top-k, MoE experts, the patch_moe drop-in, DPP, facility location,
kNN graph).

Not part of ``make test`` (whose testpaths is tests/). ``make bench-quick BENCH_JSON=path`` runs the CPU
half; on a CUDA machine ``pytest benchmarks/suite -m gpu --benchmark-only`` runs the GPU half. Shapes and
peers come from benchmarks/cases.py.
"""

import sys
from pathlib import Path

import pytest

# The repository root goes last on sys.path (importable `benchmarks` package, but the root's kernels/
# folder must not shadow the PyPI package `kernels`: see benchmarks/utils.py).
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)


@pytest.fixture(scope="session")
def torch_threads():
    """The CPU threads the suite runs with (torch's default); recorded in every benchmark's extra_info."""
    import torch

    return torch.get_num_threads()


@pytest.fixture(scope="session", autouse=True)
def _repo_root_last():
    """Keep the repository root behind site-packages on sys.path.

    pytest (prepend import mode) puts the root first when it sets up the ``benchmarks`` package; there the
    root's kernels/ folder would shadow the PyPI package ``kernels`` that transformers imports.
    """
    while _ROOT in sys.path:
        sys.path.remove(_ROOT)
    sys.path.append(_ROOT)
    yield
