"""Checks a command runs before its work: the output can be written, holds no result it would replace unasked,
and its disk has room. Each failure is one :class:`PreflightError` naming the path and what to do.

Used by ``metamoe train-expert`` and ``metamoe unify`` before the first embedding or epoch and by ``metamoe select``
before the relevance step, so that a run never ends in a permission or disk-full error after its work is done.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Optional


class PreflightError(ValueError):
    """The environment cannot hold the command's result (the message names the path and the remedy)."""


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    return p


def check_writable(path: Any, what: str) -> Path:
    """``path`` (a folder, existing or not) can be created and written: its nearest existing ancestor is a
    writable folder (and ``path`` itself, when it exists, a writable folder). Returns the absolute path."""
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise PreflightError(f"{what} {path} is a file, not a folder")
    anc = _existing_ancestor(path)
    if not anc.is_dir():
        raise PreflightError(f"{what} {path} cannot be created: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise PreflightError(f"{what} {path} cannot be written: no write permission in {anc}")
    return path


def check_free_space(path: Any, need_bytes: int, what: str) -> None:
    """The file system holding ``path`` (or its nearest existing ancestor) has at least ``need_bytes`` free."""
    anc = _existing_ancestor(Path(path))
    free = shutil.disk_usage(anc).free
    if free < need_bytes:
        raise PreflightError(
            f"{what} {Path(path).absolute()} needs about {_mib(need_bytes)} but {anc} has {_mib(free)} free"
        )


def check_file_output(path: Any, what: str) -> Path:
    """``path`` (a file to be written) is not a folder and its folder can be created and written."""
    path = Path(path).absolute()
    if path.is_dir():
        raise PreflightError(f"{what} {path} is a folder, not a file")
    check_writable(path.parent, f"the folder of {what}")
    return path


def check_output(path: Any, what: str, *, need_bytes: int = 0, exists_hint: Optional[str] = None) -> Path:
    """:func:`check_writable` and :func:`check_free_space` for ``need_bytes``; with ``exists_hint`` an existing
    ``path`` is refused, the message ending with the hint (how to replace it)."""
    path = check_writable(path, what)
    if exists_hint is not None and path.exists():
        raise PreflightError(f"{what} {path} already exists; {exists_hint}")
    if need_bytes > 0:
        check_free_space(path, need_bytes, what)
    return path


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


__all__ = ["PreflightError", "check_writable", "check_free_space", "check_output", "check_file_output"]
