"""Triton kernels, installed as ``metamoe.kernels``.

Nothing here is imported by ``import metamoe``: each op module imports its kernel file on first use,
so a missing Triton only disables the ``triton`` backend.
"""
