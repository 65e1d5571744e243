"""Array-likes in, facts out: device and dtype of NumPy arrays, memmaps, torch tensors and CuPy arrays."""

from __future__ import annotations

from typing import Any

import numpy as np


def is_torch(x: Any) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


def is_cuda_array(x: Any) -> bool:
    """A non-torch array exposing ``__cuda_array_interface__`` (CuPy, Numba, ...)."""
    return hasattr(x, "__cuda_array_interface__") and not is_torch(x)


def device_type(x: Any) -> str:
    """``"cpu"`` or ``"cuda"`` (or whatever torch says) for any supported array."""
    if is_torch(x):
        return x.device.type
    if is_cuda_array(x):
        return "cuda"
    return "cpu"


def dtype_name(x: Any) -> str:
    """Short dtype name: ``float32``, ``float16``, ``bfloat16``, ``int64``, ..."""
    if is_torch(x):
        return str(x.dtype).replace("torch.", "")
    dt = np.dtype(x.dtype) if not isinstance(x, np.dtype) else x
    return "bfloat16" if dt.name == "bfloat16" else dt.name


def as_torch(x: Any):
    """A torch tensor sharing memory with ``x`` where possible (NumPy and memmaps: zero copy; CuPy: DLPack)."""
    import torch

    if is_torch(x):
        return x
    if is_cuda_array(x):
        return torch.from_dlpack(x)
    arr = np.asarray(x)
    if arr.dtype.name == "bfloat16":  # ml_dtypes bfloat16: reinterpret the bits
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    if not arr.flags.writeable:
        arr = np.array(arr)
    return torch.from_numpy(arr)
