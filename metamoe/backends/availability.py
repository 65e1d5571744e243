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
from typing import Any, Dict, List, Mapping, Optional, Tuple

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


# --------------------------------------------------------------------------- torch's grouped_mm


@_memo
def cuda_capability(index: int) -> Tuple[int, int]:
    """Compute capability ``(major, minor)`` of CUDA device ``index``."""
    import torch

    return tuple(torch.cuda.get_device_capability(index))


def grouped_mm_reasons(
    device: Any,
    dtype: Any,
    sizes: Optional[Mapping[str, int]] = None,
    *,
    fused: bool = False,
    compiling: bool = False,
) -> List[str]:
    """Every reason torch's grouped GEMM (``torch.nn.functional.grouped_mm`` / ``torch._grouped_mm``) cannot
    take operands on ``device`` in ``dtype``; empty when it can. The one capability check of metamoe for it.

    Args:
        device: a ``torch.device`` or its string (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        dtype: a ``torch.dtype`` or its short name (``"bfloat16"``).
        sizes: ``{name: n}``, the inner sizes of the operands (row lengths): each must span a multiple of 16
            bytes (grouped_mm's stride rule).
        fused: also require torch's fused grouped GEMM kernel (CUDA, compute capability 9.x or 10.x). Elsewhere
            torch runs its own loop over the groups, which reads the group sizes on the host; a caller that
            uses grouped_mm to avoid exactly that host synchronisation asks for ``fused``.
        compiling: the call is traced by ``torch.compile``, whose fake-tensor rule for grouped_mm takes
            bfloat16 and float16 only.

    What runs where (torch 2.14): the CPU takes float32, bfloat16 and float16 (torch's loop); CUDA takes
    bfloat16 on compute capability >= 8.0 (the fused kernel on 9.x / 10.x, the loop on the others).
    """
    import torch

    reasons: List[str] = []
    if not (hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")):
        return [f"torch {torch.__version__} has no grouped_mm"]
    dev = torch.device(device)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if dtype else None
    if not isinstance(dtype, torch.dtype):
        return [f"grouped_mm needs a torch dtype, got {dtype!r}"]
    name = str(dtype).replace("torch.", "")
    if compiling and dtype not in (torch.bfloat16, torch.float16):
        reasons.append(f"torch.compile traces grouped_mm for bfloat16/float16 only, not {name}")
    if dev.type == "cpu":
        if fused:
            reasons.append("torch's fused grouped GEMM kernel needs a CUDA device (on the CPU torch loops over "
                           "the groups)")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            reasons.append(f"grouped_mm on the CPU takes float32/bfloat16/float16, not {name}")
    elif dev.type == "cuda":
        if dtype != torch.bfloat16:
            reasons.append(f"grouped_mm on CUDA takes bfloat16, not {name}")
        cap = cuda_capability(dev.index if dev.index is not None else torch.cuda.current_device())
        if cap < (8, 0):
            reasons.append(f"grouped_mm on CUDA needs compute capability >= 8.0, this device has {cap[0]}.{cap[1]}")
        elif fused and cap[0] not in (9, 10):
            reasons.append(f"torch's fused grouped GEMM kernel needs compute capability 9.x or 10.x, this device "
                           f"has {cap[0]}.{cap[1]} (torch loops over the groups there)")
    else:
        reasons.append(f"grouped_mm does not run on device type {dev.type!r}")
    step = max(16 // dtype.itemsize, 1)
    for key, n in (sizes or {}).items():
        if n % step:
            reasons.append(f"{key}={n} is not a multiple of {step} elements (grouped_mm needs 16-byte strides)")
    return reasons


def grouped_mm(a, b, offs):
    """torch's grouped GEMM of ``a`` (rows grouped by ``offs``) with ``b`` (one matrix per group)."""
    import torch

    fn = getattr(torch.nn.functional, "grouped_mm", None)
    if fn is not None:
        return fn(a, b, offs=offs)
    return torch._grouped_mm(a, b, offs=offs)


def reset_cache() -> None:
    """Forget every probe (tests that change the environment call this)."""
    _PROBES.clear()
