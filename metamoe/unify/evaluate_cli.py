"""``metamoe evaluate --model DIR --data PATH``: rebuild a unified model (:func:`metamoe.unify.cli.load_unified`)
and score it on labelled data.

Classification: the probabilities of unified classes that name the same test class (exactly, or after the last
``:`` as in ``clientA:3`` and ``3``) are summed, then argmax = accuracy. A causal LM: mean next-token loss and
perplexity.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..utils.files import atomic_write_text
from ..utils.preflight import check_file_output
from .cli import UNIFIED_MANIFEST, command_parser, load_unified, run_command
from .config import ConfigError
from .data_loading import DATA_HELP, check_inputs_for_seed, load_data, seed_image_shape

__all__ = ["evaluate_model", "main_evaluate"]


def _target_map(space_names: Sequence[str], class_names: Sequence[str]) -> np.ndarray:
    """Target index of each unified class: its name, or the part after its last ':', among class_names; -1 if none."""
    pos = {c: i for i, c in enumerate(class_names)}
    return np.array([pos.get(n, pos.get(n.rsplit(":", 1)[-1], -1)) for n in space_names], dtype=np.int64)


def evaluate_model(
    model, x: np.ndarray, y: Optional[np.ndarray], class_names: Sequence[str], batch_size: int = 256
) -> Dict[str, Any]:
    """Accuracy (classification: probabilities summed per test class name, module docstring) or next-token loss."""
    import torch

    from ..models.registry import SeedModel

    if model.label_space.kind != "classes":
        tot, cnt = 0.0, 0
        with torch.no_grad():
            for s in range(0, len(x), batch_size):
                b = model.prepare(SeedModel.take(x, slice(s, s + batch_size)))
                logits = model(b)[:, :-1].double()
                t = b["input_ids"][:, 1:]
                tot += float(
                    torch.nn.functional.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]), t.reshape(-1), reduction="sum"
                    )
                )
                cnt += t.numel()
        return {"n": int(len(x)), "next_token_loss": tot / cnt, "perplexity": float(np.exp(tot / cnt))}
    if y is None:
        raise ConfigError("evaluation of a classifier needs labels (labels / y_key)")
    tm = _target_map(model.label_space.names, class_names)
    if (tm < 0).all():
        raise ConfigError(
            f"no class of the unified label space ({model.label_space.names[:6]}...) matches the test class names "
            f"{list(class_names)[:6]}...: give class_names"
        )
    p = model.predict_proba(x, batch_size=batch_size)
    marg = np.zeros((len(x), len(class_names)))
    for c, t in enumerate(tm):
        if t >= 0:
            marg[:, t] += p[:, c]
    return {"n": int(len(x)), "accuracy": float((marg.argmax(1) == y).mean())}


def _parse_image_size(text: Optional[str]) -> Optional[List[int]]:
    """``--image-size``: ``S`` or ``H,W`` (positive integers) -> ``[H, W]``; None when not given."""
    if text is None:
        return None
    parts = [t.strip() for t in str(text).split(",")]
    try:
        size = [int(t) for t in parts]
    except ValueError:
        size = []
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise ConfigError(f"--image-size must be S or H,W with positive integers, got {text!r}")
    return size


def _folder_options(seed_model, channels: Optional[int], image_size: Optional[List[int]]) -> Dict[str, Any]:
    """The ``channels`` / ``image_size`` of an image-folder --data: the options given, else the seed model's."""
    shape = seed_image_shape(seed_model)
    out: Dict[str, Any] = {}
    if channels is None and shape is not None:
        channels = shape[0] if shape[0] in (1, 3) else None
    if image_size is None and shape is not None and shape[1] is not None:
        image_size = list(shape[1])
    if channels is not None:
        out["channels"] = channels
    if image_size is not None:
        out["image_size"] = image_size
    return out


def main_evaluate(argv: Optional[List[str]] = None) -> int:
    """``metamoe evaluate --model DIR --data PATH [--class-names A,B,..] ... [--labels Y.npy] [--channels C]
    [--image-size S|H,W] [--json FILE]``."""
    p = command_parser(
        "metamoe evaluate",
        f"Rebuild a unified model written by `metamoe unify` (checking {UNIFIED_MANIFEST}'s own digest, the router "
        "weights' and the packages' hashes) and "
        "evaluate it on labelled data. Classification: the probabilities of unified classes that name the same "
        "test class (exactly, or after the last ':' as in 'clientA:3' and '3') are summed, then argmax = accuracy. "
        "A causal LM: mean next-token loss and perplexity.",
        DATA_HELP,
    )
    p.add_argument("--model", required=True, help="unified model folder from `metamoe unify`")
    p.add_argument(
        "--data",
        required=True,
        action="append",
        help="test data: .npz (x, y), .npy (with --labels), an image folder, or NAME=PATH; repeat for several sets",
    )
    p.add_argument("--labels", default=None, help="labels .npy for a .npy --data (only with a single --data)")
    p.add_argument("--x-key", default=None, help="array/column name of the inputs (.npz default 'x')")
    p.add_argument("--y-key", default=None, help="array/column name of the labels (.npz default 'y')")
    p.add_argument(
        "--class-names",
        default=None,
        action="append",
        help="comma-separated names of labels 0..C-1 of a --data set (default: the set's own names, else "
        "'0','1',...); give one per --data, in the same order ('' keeps a set's own names)",
    )
    p.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        default=None,
        help="image-folder --data: convert the images to 1 (grey) or 3 (RGB) channels (default: the seed "
        "model's input channels)",
    )
    p.add_argument(
        "--image-size",
        default=None,
        help="image-folder --data: resize the images to S or H,W (default: the seed model's input size, else "
        "as stored)",
    )
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    a = p.parse_args(argv)

    def run():
        if a.labels and len(a.data) > 1:
            raise ConfigError("--labels applies to a single --data")
        class_names = a.class_names if a.class_names is not None else [""] * len(a.data)
        if len(class_names) != len(a.data):
            raise ConfigError(
                f"give one --class-names per --data, in the same order ('' keeps a set's own names): got "
                f"{len(class_names)} --class-names for {len(a.data)} --data"
            )
        image_size = _parse_image_size(a.image_size)
        if a.json:
            check_file_output(a.json, "--json")  # before the model is rebuilt and evaluated
        model = load_unified(a.model)
        folder = _folder_options(model.seed, a.channels, image_size)
        res = {}
        for item, cn in zip(a.data, class_names):
            name, sep, path = item.partition("=")
            if not sep:
                name, path = Path(item).stem, item
            spec: Dict[str, Any] = {"path": path}
            for k, v in (("labels", a.labels), ("x_key", a.x_key), ("y_key", a.y_key)):
                if v is not None:
                    spec[k] = v
            if cn.strip():
                spec["class_names"] = [c.strip() for c in cn.split(",")]
            if Path(path).is_dir():
                spec.update(folder)
            x, y, names = load_data(spec, None, f"--data {item}")
            check_inputs_for_seed(model.seed, x, f"--data {item}", flags=True)
            r = evaluate_model(model, x, y, names)
            res[name] = r
            if "accuracy" in r:
                print(f"{name}: accuracy {r['accuracy']:.4f} (n={r['n']})")
            else:
                print(
                    f"{name}: next-token loss {r['next_token_loss']:.4f}, perplexity {r['perplexity']:.2f} (n={r['n']})"
                )
        if a.json:
            atomic_write_text(Path(a.json), json.dumps(res, indent=1) + "\n")

    return run_command(run)
