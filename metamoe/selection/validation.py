"""Input checks shared by the selectors: clear errors that name the argument and what was expected."""

from __future__ import annotations

import numbers
from typing import Any, Optional

import numpy as np

from ..backends.tensors import as_torch, device_type, dtype_name, is_torch

FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")

# Bytes of one row block when a selector streams the pool (an ``np.memmap`` larger than memory is read
# block by block; every temporary is O(block) and the per-row state is a few (N,) vectors). 16 MiB of
# float64 is 2,730 rows at D = 768: large enough that the per-block Python overhead (~10 us per op) is
# noise next to the block's arithmetic (~0.3 ms per block even at 20 GB/s), small enough that a block
# and its conversions stay far below the pool (10M x 768 float16 = 14.3 GiB).
BLOCK_BYTES = 1 << 24


def block_rows(d: int, itemsize: int = 8, budget: int = BLOCK_BYTES) -> int:
    """Rows per block so that one (rows, d) block of ``itemsize``-byte values takes about ``budget`` bytes (>= 1)."""
    return max(1, int(budget) // max(1, int(d) * int(itemsize)))


def check_embeddings(
    X: Any,
    name: str = "X",
    *,
    check_finite: bool = True,
    chunk_rows: Optional[int] = None,
    zero_copy_readonly: bool = False,
    row_ids: Optional[Any] = None,
):
    """Validate a (N, D) floating-point embedding matrix; returns it as a torch tensor (zero copy where possible).

    Raises TypeError for non-array or integer input and ValueError for wrong shape, empty or NaN/inf rows.
    ``zero_copy_readonly=True`` wraps a read-only NumPy array (``np.load(..., mmap_mode="r")``) without
    copying it; the caller promises never to write to the returned tensor. The NaN/inf scan reads
    ``chunk_rows`` rows at a time (None: :func:`block_rows` of 4-byte values), so a memmap is streamed,
    never converted whole. ``row_ids`` (optional, one id per row) names rows in errors by their id instead
    of their position, e.g. the pool index of a gathered candidate row.
    """
    if isinstance(X, (list, tuple)):
        raise TypeError(f"{name} must be a NumPy array, torch tensor or CuPy array of floats, got a {type(X).__name__}")
    if not (is_torch(X) or hasattr(X, "__cuda_array_interface__") or isinstance(X, np.ndarray)):
        raise TypeError(f"{name} must be a NumPy array, torch tensor or CuPy array, got {type(X).__name__}")
    dt = dtype_name(X)
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype ({', '.join(FLOAT_DTYPES)}), got {dt}")
    if len(X.shape) != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, dim), got shape {tuple(X.shape)}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(X.shape)}")
    if zero_copy_readonly and isinstance(X, np.ndarray) and not X.flags.writeable and dt != "bfloat16":
        t = readonly_from_numpy(X)
    else:
        t = as_torch(X)
    if check_finite:
        chunk_rows = block_rows(t.shape[1], 4) if chunk_rows is None else int(chunk_rows)
        for start in range(0, t.shape[0], chunk_rows):
            block = t[start : start + chunk_rows]
            bad = ~torch_isfinite_rows(block)
            if bool(bad.any()):
                row = start + int(bad.nonzero()[0, 0])
                row = row if row_ids is None else int(row_ids[row])
                raise ValueError(f"{name} has NaN or inf values (first in row {row})")
    return t


def readonly_from_numpy(a: np.ndarray):
    """``torch.from_numpy(a)`` without copying, also for a read-only array (e.g. an ``np.memmap`` opened
    with ``mmap_mode="r"``): torch's "array is not writable" warning is silenced. The caller promises never
    to write to the returned tensor (it shares ``a``'s memory)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "array is not writable": we only read it
        return torch.from_numpy(a)


def first_zero_row(t, rows: Optional[int] = None) -> Optional[int]:
    """Index of the first all-zero row of the (N, D) tensor ``t`` (None if there is none), read ``rows`` rows
    at a time (None: :func:`block_rows` of 4-byte values), so a memmap is streamed, never copied whole."""
    rows = block_rows(t.shape[1], 4) if rows is None else int(rows)
    for a in range(0, t.shape[0], rows):
        zero = t[a : a + rows].abs().amax(dim=1) == 0
        if bool(zero.any()):
            return a + int(zero.nonzero()[0, 0])
    return None


def row_norms(X, work, rows: int):
    """(N,) float64 ``||x_i||`` of the rows of the tensor X, each block of ``rows`` rows cast to ``work``
    (e.g. float64 on the CPU, float32 on a GPU) before the norm: X is never converted whole."""
    import torch

    out = torch.empty(X.shape[0], dtype=torch.float64, device=X.device)
    for a in range(0, X.shape[0], rows):
        out[a : a + rows] = torch.linalg.vector_norm(X[a : a + rows].to(work), dim=1).double()
    return out


def torch_isfinite_rows(block):
    import torch

    return torch.isfinite(block).all(dim=1)


def check_k(k: Any, n: int, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(k).__name__}")
    k = int(k)
    if k <= 0:
        raise ValueError(f"{name} must be >= 1, got {k}")
    if k > n:
        raise ValueError(f"{name}={k} is larger than the pool (N={n})")
    return k


def as_float64_vector(values: Any, n: int, name: str, what: str) -> np.ndarray:
    """``values`` (NumPy, torch or CuPy) as a contiguous float64 (n,) NumPy array of finite reals.

    ``what`` ends the shape error, with its separator: "{name} must have shape (n,){what}, got ...".
    """
    if is_torch(values):
        v = values.detach().to("cpu").double().numpy()
    elif hasattr(values, "__cuda_array_interface__"):
        v = as_torch(values).to("cpu").double().numpy()
    else:
        v = np.asarray(values)
        if not np.issubdtype(v.dtype, np.number) or np.issubdtype(v.dtype, np.complexfloating):
            raise TypeError(f"{name} must be a real-valued array, got dtype {v.dtype}")
        v = v.astype(np.float64)
    if v.ndim != 1 or v.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},){what}, got {tuple(v.shape)}")
    if not np.isfinite(v).all():
        raise ValueError(f"{name} has NaN or inf values (first at {int(np.flatnonzero(~np.isfinite(v))[0])})")
    return np.ascontiguousarray(v)


def check_relevance(relevance: Optional[Any], n: int, name: str = "relevance") -> np.ndarray:
    """A float64 NumPy array of length n in [0, 1] (all ones when None)."""
    if relevance is None:
        return np.ones(n, dtype=np.float64)
    r = as_float64_vector(relevance, n, name, " to match the pool")
    if r.min() < 0 or r.max() > 1:
        raise ValueError(f"{name} must lie in [0, 1], got values in [{r.min():.4g}, {r.max():.4g}]")
    return r


def check_weights(weights: Optional[Any], m: int) -> np.ndarray:
    """Facility location's ground weights: a float64 NumPy array of length m, all >= 0 (all ones when None)."""
    if weights is None:
        return np.ones(m, dtype=np.float64)
    w = as_float64_vector(weights, m, "weights", ", one per ground point")
    if w.min() < 0:
        raise ValueError(f"weights must be >= 0, got a minimum of {w.min():.4g} at {int(np.argmin(w))}")
    return w


def check_nonnegative(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


__all__ = ["BLOCK_BYTES", "block_rows", "check_embeddings", "first_zero_row", "readonly_from_numpy", "row_norms",
           "check_k", "check_relevance", "check_weights", "check_nonnegative", "device_type", "FLOAT_DTYPES"]
