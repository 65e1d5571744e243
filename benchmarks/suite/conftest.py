"""pytest-benchmark suite of the ops (router top-k, MoE experts, the patch_moe drop-in, DPP, facility location,
kNN graph).

Not part of ``make test`` (whose testpaths is tests/). ``make bench-quick BENCH_JSON=path`` runs the CPU
half; on a CUDA machine ``pytest benchmarks/suite -m gpu --benchmark-only`` runs the GPU half. Shapes and
peers come from benchmarks/cases.py.
"""

import sys
from pathlib import Path

import pytest

# The repository root, for `import benchmarks` when the suite runs without the project's pytest config.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


@pytest.fixture(scope="session")
def torch_threads():
    """The CPU threads the suite runs with (torch's default); recorded in every benchmark's extra_info."""
    import torch

    return torch.get_num_threads()

