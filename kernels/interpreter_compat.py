"""Triton interpreter compatibility: loop bounds taken from kernel arguments.

Under ``TRITON_INTERPRET=1`` an integer kernel argument is a tensor whose data is a one-element 1-D NumPy
array. ``range(0, D, BLOCK_K)`` in a kernel converts it through ``tensor.__index__``, which in Triton 3.6 is
``int(data)``: NumPy >= 2.4 refuses to convert a 1-D array to a scalar, so every kernel with such a loop
fails there. Later Triton releases squeeze the array first. :func:`ensure` makes the interpreter of the
installed Triton do the same; it changes nothing where the interpreter already squeezes, and nothing for
compiled kernels (the interpreter is not involved).
"""

from __future__ import annotations

import functools


def _index(self):
    return int(self.handle.data.reshape(-1)[0]) if self.handle.data.size == 1 else int(self.handle.data)


@functools.lru_cache(maxsize=None)
def ensure() -> bool:
    """Install the squeezing ``__index__`` in the interpreter's tensor patches; True when it was needed."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_metamoe_index", False):
        return False
    import inspect

    try:
        source = inspect.getsource(original)
    except (OSError, TypeError):
        return False
    if "int(self.handle.data)" not in source:
        return False

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _index)

    patch_lang_tensor._metamoe_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
