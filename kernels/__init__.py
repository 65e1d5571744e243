"""Triton kernels, installed as ``metamoe.kernels``.

Nothing here is imported by ``import metamoe``: each op module imports its kernel file on first use,
so a missing Triton only disables the ``triton`` backend. Under ``TRITON_INTERPRET=1`` the interpreter of
the installed Triton is made to accept loop bounds taken from kernel arguments (``interpreter_compat``).
"""

import os as _os

if _os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on"):
    from . import interpreter_compat as _interpreter_compat

    _interpreter_compat.ensure()
