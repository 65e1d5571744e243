"""Triton kernels, installed as ``metamoe.kernels``.

Nothing here is imported by ``import metamoe``: each op module imports its kernel file on first use,
so a missing Triton only disables the ``triton`` backend. Under ``TRITON_INTERPRET=1`` the interpreter of
the installed Triton is made to accept loop bounds taken from kernel arguments (``interpreter_compat``).
"""

import contextlib as _contextlib

from metamoe.backends.availability import triton_interpret as _triton_interpret

if _triton_interpret():
    from . import interpreter_compat as _interpreter_compat

    _interpreter_compat.ensure()


def on_device(t):
    """Launch on the tensor's GPU, not the current one (a no-op for the interpreter's CPU tensors)."""
    import torch

    return torch.cuda.device(t.device) if t.is_cuda else _contextlib.nullcontext()
