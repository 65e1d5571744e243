"""Router checkpoints: the trainable parameters and the optimizer state of a :func:`~metamoe.unify.train_router`
run, in one folder, safetensors + JSON only.

A checkpoint folder holds ``ckpt-<step>.safetensors`` (``param.<name>`` for every trained parameter,
``optim.<index>.<name>`` for the optimizer state) and ``state.json``, which points at that file and records
its sha256, the step, the optimizer's param groups and whatever the caller adds (the run's config, the
:func:`data_fingerprint` of its data, losses so far). Both files are written atomically, the tensors first,
so a crash leaves either the old checkpoint or the new one. :func:`load_checkpoint` refuses a folder written
by a different run (other config or data) and a tensor file that does not match its sha256.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch

from ..utils.files import atomic_write, atomic_write_text, read_json, save_safetensors, sha256_file

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_STATE",
    "CheckpointMismatchError",
    "data_fingerprint",
    "load_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_STATE = "state.json"
CHECKPOINT_FORMAT = "metamoe-router-checkpoint"


class CheckpointMismatchError(ValueError):
    """A checkpoint folder holds another run's checkpoint: ``directory`` and the ``key`` (``config`` or ``data``)
    that differs. Its message names :func:`~metamoe.unify.train_router`'s remedies; a command line catches it
    to name its own."""

    def __init__(self, directory: Path, key: str):
        self.directory, self.key = Path(directory), key
        super().__init__(
            f"checkpoint {directory} was written by a different run ({key} differs); "
            "use another checkpoint_dir or resume=False"
        )


def data_fingerprint(x: Any, y: Optional[np.ndarray], route_targets: Optional[np.ndarray] = None) -> str:
    """Hex sha256 of a run's training data: the inputs (an array/tensor, or a mapping of them), the labels
    (as int64) and the routing targets (as float32), each when given."""
    h = hashlib.sha256()
    items = sorted(x.items()) if isinstance(x, dict) else [("x", x)]
    for k, v in items:
        a = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        h.update(k.encode())
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    if y is not None:
        h.update(np.ascontiguousarray(np.asarray(y, dtype=np.int64)).tobytes())
    if route_targets is not None:
        h.update(b"route_targets" + np.ascontiguousarray(np.asarray(route_targets, dtype=np.float32)).tobytes())
    return h.hexdigest()


def checkpoint_bytes(n_trained: int) -> int:
    """Disk a :func:`save_checkpoint` series of ``n_trained`` float32 values with AdamW needs at most: the values and
    the optimizer's two moments (3 tensors), twice (the previous checkpoint exists while the next is written)."""
    return 4 * int(n_trained) * 3 * 2


def save_checkpoint(
    directory: Path,
    step: int,
    params: Mapping[str, torch.nn.Parameter],
    opt: torch.optim.Optimizer,
    meta: Dict[str, Any],
) -> None:
    """Write the checkpoint of ``step`` to ``directory`` (created if needed) and remove older tensor files.

    ``meta`` (JSON-serialisable) goes into ``state.json`` next to the format tag, the step, the tensor file's
    name and sha256 and the optimizer's param groups.
    """

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{k}": v.detach().cpu().contiguous().clone() for k, v in params.items()}
    sd = opt.state_dict()
    for i, st in sd["state"].items():
        for k, v in st.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            tensors[f"optim.{i}.{k}"] = t.detach().cpu().contiguous().clone()
    fname = f"ckpt-{step:08d}.safetensors"
    atomic_write(directory / fname, lambda p: save_safetensors(tensors, p))

    state = dict(meta)
    state.update(
        format=CHECKPOINT_FORMAT,
        step=step,
        tensors=fname,
        sha256=sha256_file(directory / fname),
        param_groups=sd["param_groups"],
    )
    atomic_write_text(directory / CHECKPOINT_STATE, json.dumps(state, indent=1) + "\n")
    for old in directory.glob("ckpt-*.safetensors"):  # the state file no longer points at them
        if old.name != fname:
            old.unlink(missing_ok=True)


def load_checkpoint(
    directory: Path,
    params: Mapping[str, torch.nn.Parameter],
    opt: torch.optim.Optimizer,
    meta: Dict[str, Any],
) -> Optional[Dict[str, Any]]:
    """Load the checkpoint in ``directory`` into ``params`` and ``opt``; return its state (``state.json``),
    or None when ``directory`` holds no checkpoint.

    Raises:
        CheckpointMismatchError: its ``config`` or ``data`` differ from ``meta``'s (another run).
        ValueError: ``state.json`` is not a router checkpoint; the tensor file is missing or does not match its
            recorded sha256.
    """
    from safetensors.torch import load_file

    sfile = directory / CHECKPOINT_STATE
    if not sfile.is_file():
        return None
    state = read_json(sfile)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{sfile} is not a metamoe router checkpoint")
    for key in ("config", "data"):
        if state.get(key) != meta[key]:
            raise CheckpointMismatchError(directory, key)
    tfile = directory / state["tensors"]
    if not tfile.is_file() or sha256_file(tfile) != state["sha256"]:
        raise ValueError(f"checkpoint {tfile} is missing or does not match its recorded sha256")
    tensors = load_file(str(tfile))
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[f"param.{k}"])
    opt_state: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = t
    opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    return state
