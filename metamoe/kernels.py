"""The Triton kernels: the repository's top-level ``kernels/`` folder, imported as ``metamoe.kernels``.

``kernels/`` holds the kernel modules and no ``__init__.py``, so that Python started from the repository
root never takes it for a package called ``kernels`` (the PyPI package of that name, which transformers
imports, stays importable there). This module is the package's body: its ``__path__`` is the folder
that holds the kernel modules -- ``metamoe/kernels/`` in an installed wheel (setup.py maps the folder
there), the top-level ``kernels/`` in a source checkout (an editable install).

Nothing here is imported by ``import metamoe``: each op module imports its kernel file on first use, so a
missing Triton only disables the ``triton`` backend. Under ``TRITON_INTERPRET=1`` the interpreter of the
installed Triton is made to accept loop bounds taken from kernel arguments (``interpreter_compat``).
"""

import contextlib as _contextlib
import os as _os

from metamoe.backends.availability import triton_interpret as _triton_interpret

_here = _os.path.dirname(_os.path.abspath(__file__))
__path__ = [p for p in (_os.path.join(_here, "kernels"), _os.path.join(_os.path.dirname(_here), "kernels"))
            if _os.path.isfile(_os.path.join(p, "router_topk.py"))][:1]
if not __path__:
    raise ImportError(f"metamoe.kernels: the Triton kernel modules are neither in {_here}/kernels (installed) nor in "
                      f"{_os.path.dirname(_here)}/kernels (source checkout)")

if _triton_interpret():
    from metamoe.kernels import interpreter_compat as _interpreter_compat

    _interpreter_compat.ensure()


def on_device(t):
    """Launch on the tensor's GPU, not the current one (a no-op for the interpreter's CPU tensors)."""
    import torch

    return torch.cuda.device(t.device) if t.is_cuda else _contextlib.nullcontext()
