"""Integrations with other libraries (transformers: :mod:`metamoe.integrations.hf`), imported on use."""

from __future__ import annotations

import importlib

_SUBMODULES = ("hf",)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'metamoe.integrations' has no attribute {name!r}")


__all__ = list(_SUBMODULES)
