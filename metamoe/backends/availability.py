"""What can run here, and why not: the compiled extension, Triton, CUDA devices.

Everything is probed lazily (on first use) and cached; importing :mod:`metamoe` never needs Triton,
a GPU or the compiled extension. A missing or mismatched extension is recorded with its reason.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, Optional, Tuple

from ..version import __version__

_PKG_DIR = Path(__file__).resolve().parent.parent

# Probe results, keyed by (probe, args). A plain dict rather than functools.lru_cache: torch.compile
# traces the per-call dispatch, and Dynamo reads a dict without the warning it gives for lru_cache.
_PROBES: Dict[tuple, Any] = {}


def _memo(fn):
    @functools.wraps(fn)
    def probe(*args):
        key = (fn.__name__, *args)
        if key not in _PROBES:
            _PROBES[key] = fn(*args)
        return _PROBES[key]

    return probe


def triton_interpret() -> bool:
    """True when Triton kernels run through the interpreter (``TRITON_INTERPRET=1``), on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@_memo
def _load(name: str) -> Tuple[Optional[ModuleType], Optional[str]]:
    """Import ``metamoe.<name>``; on failure return ``(None, reason)`` instead of raising."""
    try:
        mod = importlib.import_module(f"metamoe.{name}")
    except ImportError as exc:
        msg = str(exc) or type(exc).__name__
        if "No module named" in msg or "import of metamoe" in msg or "halted" in msg:
            return None, (
                f"the compiled extension metamoe.{name} is not installed "
                f"(build it with `pip install -e .` from the repository; {msg})"
            )
        return None, f"the compiled extension metamoe.{name} failed to load: {msg}"
    except Exception as exc:  # a broken build must not break `import metamoe`
        return None, f"the compiled extension metamoe.{name} failed to load: {type(exc).__name__}: {exc}"
    built_for = getattr(mod, "__version__", None)
    if built_for != __version__:
        return None, (
            f"metamoe.{name} was built for metamoe {built_for}, but the package is {__version__}: "
            f"rebuild it (`pip install -e .`)"
        )
    return mod, None


def extension(name: str = "_C") -> Tuple[Optional[ModuleType], Optional[str]]:
    """``(module, None)`` for a loadable extension module, else ``(None, reason)``."""
    return _load(name)


def require_extension(name: str = "_C") -> ModuleType:
    mod, reason = _load(name)
    if mod is None:
        raise RuntimeError(reason)
    return mod


@_memo
def triton_status() -> Tuple[Optional[str], Optional[str]]:
    """``(version, None)`` when Triton imports, else ``(None, reason)``."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return None, f"triton is not installed ({exc}); pip install triton"
    except Exception as exc:
        return None, f"triton failed to import: {type(exc).__name__}: {exc}"
    return getattr(triton, "__version__", "unknown"), None


@_memo
def torch_cuda_reason() -> Optional[str]:
    """None when torch sees a CUDA device, else why not."""
    import torch

    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device on this machine"
    return None


@_memo
def cuda_extension_reason() -> Optional[str]:
    """None when metamoe._C_cuda loads and sees a device, else why not."""
    mod, reason = _load("_C_cuda")
    if mod is None:
        info = build_info()
        if info and info.get("cuda_built") is False and info.get("cuda_not_built_reason"):
            return f"metamoe._C_cuda was not built: {info['cuda_not_built_reason']}"
        return reason
    count, err = mod.device_count()
    if count <= 0:
        return f"no CUDA device is available to metamoe._C_cuda: {err}"
    return None


def backend_unavailable_reason(backend: str) -> Optional[str]:
    """Why ``backend`` cannot run anything on this machine, or None when it can run something."""
    if backend == "torch":
        return None
    if backend == "cpp":
        return _load("_C")[1]
    if backend == "cuda":
        return cuda_extension_reason()
    if backend == "triton":
        version, reason = triton_status()
        if reason:
            return reason
        if triton_interpret():
            return None
        cuda = torch_cuda_reason()
        if cuda:
            return f"{cuda}, and TRITON_INTERPRET=1 is not set (Triton runs on the CPU only through its interpreter)"
        return None
    raise ValueError(f"unknown backend {backend!r}")


@_memo
def build_info() -> Dict[str, Any]:
    """The extension's build metadata (compiler, flags, OpenMP, CUDA), or {} when there is none."""
    path = _PKG_DIR / "_build_info.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def reset_cache() -> None:
    """Forget every probe (tests that change the environment call this)."""
    _PROBES.clear()
