"""The plumbing floor: files, the pool embedding format, distributed helpers, argument checks, progress.

Every other subsystem (``selection``, ``moe``, ``unify``, ...) may import from here; nothing here imports
from them. Importing this package imports neither torch nor NumPy.
"""
