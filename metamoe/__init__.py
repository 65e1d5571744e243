"""metamoe: million-scale proxy selection, fast Mixture-of-Experts kernels, privacy-preserving MoE unification.

Importing metamoe needs neither Triton, a GPU nor the compiled extension; what is missing is recorded
and reported by ``python -m metamoe.info``. Subpackages load on first use.
"""

from __future__ import annotations

import importlib

from .version import __version__

_SUBMODULES = ("utils", "backends", "selection", "info", "cli", "ops", "moe", "integrations", "models", "unify")

def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'metamoe' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))


__all__ = ["__version__", *_SUBMODULES]
