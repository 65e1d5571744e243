"""Files written atomically (a temporary file in the same folder, fsync, then ``os.replace``) and hashed.

Files and folders made through :mod:`tempfile` (mode 0600 / 0700) get the modes a plain ``open`` / ``mkdir``
would give them (0666 / 0777 less the umask) before they become visible under their final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

PathLike = Union[str, os.PathLike]


def fsync_dir(path: PathLike) -> None:
    """fsync a folder so that a rename inside it survives a crash (best effort: not every OS allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask. On Linux it is read from ``/proc/self/status`` without changing it; elsewhere it is
    set to 0o077 and restored at once (a file another thread creates in that instant gets 0o077 modes)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def make_temp_dir(parent: PathLike, prefix: str, suffix: str) -> Path:
    """A new folder in ``parent`` (``tempfile.mkdtemp``) with the mode ``mkdir`` would give it (0777 less the umask)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def atomic_write(path: PathLike, writer: Callable[[Path], None]) -> None:
    """Create ``path`` atomically: ``writer(tmp)`` writes a temporary file beside it, which is fsynced and
    renamed over ``path``. On any error (or interrupt) the temporary file is removed and ``path`` untouched; an
    OSError about the temporary file is raised naming ``path``.
    ``path`` gets the mode ``open(path, "w")`` would create it with (0666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o666 & ~current_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(Path(tmp))
        os.chmod(tmp, mode)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename == tmp and exc.filename2 is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc  # name the file being written
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_json(path: PathLike) -> Optional[Dict[str, Any]]:
    """The JSON object in ``path``, or None when the file is missing or not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def unreadable_array(path: PathLike, what: str, err: BaseException) -> str:
    """The one-line message for an array file NumPy could not read: ``what`` names it (``--public``,
    ``private.path``); pickled object arrays are named as such, anything else as truncated or corrupt."""
    detail = " ".join(str(err).split())
    if "allow_pickle" in detail or "Python objects" in detail:
        return f"{what} {path} holds Python objects (pickled arrays), which are not loaded; save numeric arrays"
    return f"{what} {path} is truncated or corrupt: NumPy cannot read it ({detail})"


def open_npy(path: PathLike, what: str, mmap_mode: Optional[str] = "r"):
    """``np.load(path, mmap_mode, allow_pickle=False)``; a file NumPy cannot read raises ValueError with
    :func:`unreadable_array`'s message (an operating-system error, such as a folder or no permission, is
    raised as it is)."""
    import numpy as np

    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        if isinstance(e, OSError) and e.errno is not None:  # the OS's error (a folder, permission): as it is
            raise
        raise ValueError(unreadable_array(path, what, e)) from None


def save_safetensors(tensors: Dict[str, Any], path: PathLike, metadata: Optional[Dict[str, str]] = None) -> None:
    """``safetensors.torch.save_file`` to ``path``, with the mode ``open(path, "w")`` gives (0666 less the umask;
    safetensors creates 0600). An I/O failure (disk full, permission) raises the OSError it stands for, naming
    ``path``: safetensors reports it as a SafetensorError whose text carries ``(os error N)``."""
    import re

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        m = re.search(r"\(os error (\d+)\)", str(exc))
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), str(path)) from exc
    os.chmod(path, 0o666 & ~current_umask())
