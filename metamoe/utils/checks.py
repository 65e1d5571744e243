"""Argument checks shared by every subsystem: each error names the argument and what was expected."""

from __future__ import annotations

import numbers
import operator
from typing import Any, Sequence, Tuple


def check_int(value: Any, name: str, lo: int = 1) -> int:
    """``value`` as an int >= ``lo``; TypeError for non-integers (and bools), ValueError below ``lo``.

    Accepts Python, NumPy and 0-d torch integers (anything with ``__index__``)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got bool {value!r}")
    if isinstance(value, numbers.Integral):
        value = int(value)
    else:
        try:
            value = operator.index(value)
        except TypeError:
            raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return value


def check_float(value: Any, name: str, lo: float = 0.0) -> float:
    """``value`` as a finite float >= ``lo``; TypeError for non-numbers (and bools), ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not value == value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return value


def check_choice(value: Any, name: str, allowed: Sequence[str]) -> str:
    """``value`` if it is one of ``allowed``, else ValueError listing them."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def check_row_range(rows: Any, n: int, name: str = "rows") -> Tuple[int, int]:
    """``(start, stop)`` with ``0 <= start < stop <= n`` from a pair of integers; TypeError / ValueError."""
    if (not isinstance(rows, (tuple, list)) or len(rows) != 2
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in rows)):
        raise TypeError(f"{name} must be a (start, stop) pair of integers, got {rows!r}")
    lo, hi = int(rows[0]), int(rows[1])
    if not 0 <= lo < hi <= n:
        raise ValueError(f"{name} must satisfy 0 <= start < stop <= N={n}, got ({lo}, {hi})")
    return lo, hi
