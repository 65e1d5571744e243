"""Backend dispatch: each op's implementations (torch, triton, cpp, cuda), chosen per call."""

from .availability import (
    backend_unavailable_reason,
    build_info,
    extension,
    grouped_mm,
    grouped_mm_reasons,
    triton_interpret,
)
from .registry import (
    BACKENDS,
    ENV_VAR,
    BackendError,
    BackendNotSupportedError,
    CallSpec,
    Implementation,
    NoBackendError,
    Op,
    all_ops,
    check_backend,
    define_op,
    get_op,
    resolve_backend,
)
from .tensors import device_type, dtype_name

__all__ = [
    "BACKENDS", "ENV_VAR", "BackendError", "BackendNotSupportedError", "CallSpec", "Implementation",
    "NoBackendError", "Op", "all_ops", "check_backend", "define_op", "get_op", "resolve_backend",
    "backend_unavailable_reason", "build_info", "extension", "grouped_mm", "grouped_mm_reasons", "triton_interpret",
    "dtype_name", "device_type",
]
