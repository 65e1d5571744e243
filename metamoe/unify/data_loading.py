"""The data sets of ``metamoe train-expert``, ``unify``, ``evaluate`` and ``embed-pool``: :func:`load_data`.

A data set is a path or a mapping (``path``, ``labels``, ``x_key``, ``y_key``, ``class_names``, ``image_size``,
``channels``): NumPy ``.npz`` / ``.npy`` files, an image folder with one sub-folder per class, or a Hugging Face
``datasets`` ``save_to_disk`` folder. :data:`DATA_HELP` (printed by the commands' ``--help``) describes them.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..utils.files import unreadable_array
from .config import ConfigError, check_keys, resolve_path

DATA_HELP = """\
Data (``private``, ``public``, ``--data``), each a mapping in YAML or a path on the command line:

* ``path: data.npz``: NumPy archive, arrays ``x_key`` (default ``x``) and ``y_key`` (default ``y``, optional);
* ``path: x.npy`` with ``labels: y.npy``: NumPy arrays (labels optional for the public pool of a causal LM);
* ``path: folder/`` with one sub-folder per class: an image folder (PNG/JPEG/...; read with Pillow, converted
  to ``channels`` 1 (grey) or 3 (RGB), resized to ``image_size`` if given, scaled to [0, 1]); class names are the
  sub-folder names, sorted;
* ``path: folder/`` written by Hugging Face ``datasets`` ``save_to_disk`` (it holds ``dataset_info.json`` or
  ``state.json``): columns ``x_key`` (default ``image``) and ``y_key`` (default ``label``); needs the ``datasets``
  package, which metamoe does not install (a clear error says so).
* ``class_names: [...]`` names the label values 0..C-1 (default: the folder names, else ``"0"``, ``"1"``, ...).

Images are float arrays (n, H, W) (one channel) or (n, C, H, W); integer arrays (n, L) are token ids for an
``hf:`` decoder (then labels are not used: the task is next-token prediction).
"""

DATA_KEYS = ("path", "labels", "x_key", "y_key", "class_names", "image_size", "channels")
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def load_data(
    spec: Any, base: Optional[str] = None, where: str = "data"
) -> Tuple[np.ndarray, Optional[np.ndarray], List[str]]:
    """Load a data set described by ``spec`` (a path or a mapping, :data:`DATA_HELP`).

    Returns:
        ``(x, y, class_names)``: x (n, ...) float32 images or int64 token ids; y (n,) int64 in
        ``[0, len(class_names))`` or None when the data has no labels; class_names the label names.
    """
    if isinstance(spec, (str, os.PathLike)):
        spec = {"path": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a path or a mapping with 'path', got {type(spec).__name__}")
    check_keys(spec, DATA_KEYS, where)
    if "path" not in spec:
        raise ConfigError(f"{where} needs 'path'")
    path = resolve_path(base, spec["path"], f"{where}.path")
    if not path.exists():
        raise FileNotFoundError(f"{where}.path not found: {path}")
    names: Optional[List[str]] = None
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
        x, y, names = _load_hf_disk(path, spec.get("x_key", "image"), spec.get("y_key", "label"), spec, where)
    elif path.is_dir():
        x, y, names = _load_image_folder(path, spec, where)
    elif path.suffix == ".npz":
        x, y = _read_npz(path, where, spec.get("x_key", "x"), spec.get("y_key", "y"))
    elif path.suffix == ".npy":
        x = _read_npy(path, where, "path")
        y = None
        if spec.get("labels") is not None:
            lp = resolve_path(base, spec["labels"], f"{where}.labels")
            if not lp.is_file():
                raise FileNotFoundError(f"{where}.labels not found: {lp}")
            y = _read_npy(lp, where, "labels")
    else:
        raise ConfigError(
            f"{where}.path {path}: expected a .npz or .npy file, an image folder or a datasets save_to_disk folder"
        )
    x = np.asarray(x)
    if x.dtype.kind == "f":
        x = x.astype(np.float32)
    elif x.dtype.kind in "iu":
        x = x.astype(np.int64)
    else:
        raise ConfigError(f"{where}: x must be float images or integer token ids, got dtype {x.dtype}")
    if x.ndim < 2 or len(x) == 0:
        raise ConfigError(f"{where}: x must be (n, ...) with n > 0, got shape {x.shape}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise ConfigError(f"{where}: x holds NaN or inf")
    if y is not None:
        y = np.asarray(y)
        if y.shape != (len(x),) or y.dtype.kind not in "iu":
            raise ConfigError(
                f"{where}: labels must be ({len(x)},) integers, got shape {y.shape} dtype {y.dtype}"
            )
        y = y.astype(np.int64)
        if y.min() < 0:
            raise ConfigError(f"{where}: labels must be >= 0, got {y.min()}")
    if spec.get("class_names") is not None:
        cn = spec["class_names"]
        if (
            not isinstance(cn, list)
            or not all(isinstance(c, (str, int)) for c in cn)
            or len(set(map(str, cn))) != len(cn)
        ):
            raise ConfigError(f"{where}.class_names must be a list of distinct names")
        names = [str(c) for c in cn]
    if names is None:
        names = [str(i) for i in range(int(y.max()) + 1)] if y is not None else []
    if y is not None and y.max() >= len(names):
        raise ConfigError(f"{where}: label {int(y.max())} but only {len(names)} class_names")
    return x, y, names


def seed_image_shape(seed_model: Any) -> Optional[Tuple[int, Optional[Tuple[int, int]]]]:
    """``(channels, (height, width))`` a timm seed model takes as input, ``(channels, None)`` when it takes any
    size (no patch embedding, or one without a fixed size); None for a seed that does not take images."""
    if getattr(seed_model, "source", None) != "timm":
        return None
    import torch

    net = seed_model.net
    pe = getattr(net, "patch_embed", None)
    proj = getattr(pe, "proj", None)
    if isinstance(proj, torch.nn.Conv2d):
        size = getattr(pe, "img_size", None)
        fixed = getattr(pe, "strict_img_size", True) and not getattr(pe, "dynamic_img_size", False)
        hw = (int(size[0]), int(size[1])) if fixed and size is not None else None
        return int(proj.in_channels), hw
    conv = next((m for m in net.modules() if isinstance(m, torch.nn.Conv2d)), None)
    return None if conv is None else (int(conv.in_channels), None)


def check_inputs_for_seed(seed_model: Any, x: Any, where: str, *, flags: bool = False) -> None:
    """Check, before any work, that the loaded inputs ``x`` of the data set ``where`` (e.g. ``public``,
    ``private``, ``--data NAME``) fit ``seed_model``: a timm seed takes float images (n, C, H, W) (or (n, H, W)
    with one channel) with its channels and, when fixed, its image size; a transformers seed takes integer
    token ids (n, L) or a mapping of them.

    Raises:
        ConfigError: one line naming ``where``, the data's shape and what the seed expects (for an image folder:
            the ``channels`` / ``image_size`` keys to set, or with ``flags`` the ``--channels`` /
            ``--image-size`` options).
    """
    want = seed_image_shape(seed_model)
    name = getattr(seed_model, "name", "the seed model")
    if want is None:
        if getattr(seed_model, "source", None) == "timm":
            return
        if isinstance(x, np.ndarray) and x.dtype.kind == "f":
            raise ConfigError(
                f"{where}: holds float images of shape {x.shape[1:]} but the seed model {name} takes integer "
                "token ids (n, L)"
            )
        return
    ch, hw = want
    a = np.asarray(x) if not isinstance(x, dict) else None
    if a is None or a.dtype.kind != "f":
        kind = "a mapping" if a is None else f"{a.dtype} values"
        raise ConfigError(f"{where}: holds {kind} but the seed model {name} takes float images")
    if a.ndim == 3:
        got_c, got_hw = 1, a.shape[1:]
    elif a.ndim == 4:
        got_c, got_hw = a.shape[1], a.shape[2:]
    else:
        raise ConfigError(
            f"{where}: inputs of shape {a.shape} are not images (n, C, H, W) for the seed model {name}"
        )
    if got_c != ch or (hw is not None and tuple(got_hw) != hw):
        want_s = f"{ch} x {hw[0]} x {hw[1]}" if hw is not None else f"{ch} channel(s)"
        if flags:
            fix = f"--channels {ch}" + (f" --image-size {hw[0]},{hw[1]}" if hw is not None else "")
        else:
            fix = f"channels: {ch}" + (f" and image_size: [{hw[0]}, {hw[1]}]" if hw is not None else "")
        raise ConfigError(
            f"{where}: images are {got_c} x {got_hw[0]} x {got_hw[1]} (channels x height x width) but the seed "
            f"model {name} takes {want_s}; convert the data, or for an image folder set {fix}"
        )


def _unreadable(path: Path, where: str, key: str, err: BaseException) -> Exception:
    if isinstance(err, OSError) and err.errno is not None:  # the OS's error (a folder, permission): as it is
        return err
    return ConfigError(unreadable_array(path, f"{where}.{key}", err))


def _read_npy(path: Path, where: str, key: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise _unreadable(path, where, key, e) from None


def _read_npz(path: Path, where: str, xk: str, yk: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise _unreadable(path, where, "path", e) from None
    with z:
        if xk not in z:
            raise ConfigError(f"{where}: {path} has no array {xk!r} (x_key); it holds {sorted(z.files)}")
        try:
            return z[xk], (z[yk] if yk in z else None)
        except (ValueError, EOFError, OSError, zipfile.BadZipFile, zlib.error) as e:
            raise _unreadable(path, where, "path", e) from None


def _load_image_folder(path: Path, spec: Dict[str, Any], where: str):
    from PIL import Image

    classes = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ConfigError(
            f"{where}: {path} is a folder without class sub-folders (expected <path>/<class>/<image>)"
        )
    channels = spec.get("channels", 1)
    if channels not in (1, 3):
        raise ConfigError(f"{where}.channels must be 1 or 3, got {channels!r}")
    size = spec.get("image_size")
    if isinstance(size, int):
        size = (size, size)
    if size is not None and (not isinstance(size, (list, tuple)) or len(size) != 2):
        raise ConfigError(f"{where}.image_size must be an int or [H, W], got {size!r}")
    xs, ys = [], []
    for ci, c in enumerate(classes):
        for f in sorted((path / c).iterdir()):
            if f.suffix.lower() not in IMAGE_EXTS:
                continue
            with Image.open(f) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                if size is not None:
                    im = im.resize((int(size[1]), int(size[0])))
                a = np.asarray(im, dtype=np.float32) / 255.0
            if channels == 3:
                a = a.transpose(2, 0, 1)
            xs.append(a)
            ys.append(ci)
    if not xs:
        raise ConfigError(f"{where}: no images ({', '.join(sorted(IMAGE_EXTS))}) under {path}")
    shapes = {a.shape for a in xs}
    if len(shapes) > 1:
        raise ConfigError(f"{where}: images of different sizes {sorted(shapes)[:3]}...; set image_size")
    return np.stack(xs), np.asarray(ys, dtype=np.int64), classes


def _load_hf_disk(path: Path, xk: str, yk: str, spec: Dict[str, Any], where: str):
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"{where}: {path} is a Hugging Face datasets folder (save_to_disk), but the 'datasets' package is not "
            "installed; `pip install datasets`, or export the data to .npz"
        ) from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        raise ConfigError(f"{where}: {path} holds splits {list(ds)}; point path at one split's folder")
    if xk not in ds.column_names:
        raise ConfigError(f"{where}: column {xk!r} (x_key) not in {ds.column_names}")
    col = ds[xk]
    if len(col) and hasattr(col[0], "convert"):  # PIL images
        ch = spec.get("channels", 1)
        col = [np.asarray(im.convert("L" if ch == 1 else "RGB"), dtype=np.float32) / 255.0 for im in col]
        col = [a if ch == 1 else a.transpose(2, 0, 1) for a in col]
    x = np.asarray(col)
    y, names = None, None
    if yk in ds.column_names:
        y = np.asarray(ds[yk])
        feat = ds.features[yk]
        names = list(getattr(feat, "names", None) or []) or None
    return x, y, names


__all__ = ["DATA_HELP", "DATA_KEYS", "IMAGE_EXTS", "check_inputs_for_seed", "load_data", "seed_image_shape"]
