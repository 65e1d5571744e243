"""Client side of the unification pipeline: embed with the frozen seed, train a proxy-aligned LoRA expert.

* :func:`embed` runs the frozen seed model over a data set in batches and returns the pooled representation
  its classifier head sees (what relevance scoring and proxy selection work on).
* :func:`train_expert` copies the seed, puts LoRA on every FFN projection, and fine-tunes on the private data
  together with the proxies (docs/design.md, "The method", stage 2). Classification: a new head over the
  concatenated label spaces, private classes first, then the public classes (a proxy keeps its public
  label ``j``, trained as class ``len(private) + j``). Causal LM: next-token prediction on both.
  Afterwards it records, for every FFN layer, the mean FFN input over the training data: the expert's
  router prototype (the paper's Eq. 7), computed with the trained expert in eval mode, every valid token
  weighted equally.

Selection of the proxies (relevance scores, DPP, ...) lives in :mod:`metamoe.selection`; this module takes
the chosen proxies as (x, y) arrays.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..models.ffn import ffn_input_hooks
from ..models.lora import LoRAConfig, apply_lora, has_lora, lora_state_dict
from ..models.registry import SeedModel, seeded, weight_hash
from ..utils.progress import progress_bar
from .checkpoint import CheckpointMismatchError, checkpoint_bytes, data_fingerprint, load_checkpoint, save_checkpoint

PROTOTYPE_DATA = ("train", "private")


def check_seed_model(model: Any, name: str = "seed_model") -> SeedModel:
    """``model`` if it is a SeedModel, else TypeError naming ``name``."""
    if not isinstance(model, SeedModel):
        raise TypeError(
            f"{name} must be a SeedModel (metamoe.models.create_seed_model), got {type(model).__name__}"
        )
    return model


def check_batch_size(batch_size: Any) -> int:
    """``batch_size`` if it is a positive int, else ValueError."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


class _TrainFlag:
    """Context manager: set a module's training flag, restore it afterwards."""

    def __init__(self, module: nn.Module, mode: bool):
        self.module, self.mode = module, mode

    def __enter__(self):
        self.prev = self.module.training
        self.module.train(self.mode)

    def __exit__(self, *exc):
        self.module.train(self.prev)


EMBED_FEATURES = ("pooled", "context", "pooled+context")


def _masked_token_mean(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, T, D) -> (B, D): the mean over each sample's valid tokens (every token when ``mask`` is None)."""
    if mask is None:
        return x.mean(dim=1)
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1)


def embedding_dim(model: SeedModel, features: str = "pooled") -> int:
    """Width of :func:`embed`'s output for ``features``: D, L * H or D + L * H (L FFN layers of width H)."""
    if features not in EMBED_FEATURES:
        raise ValueError(f"features must be one of {', '.join(EMBED_FEATURES)}, got {features!r}")
    ctx = sum(layer.hidden_size for layer in model.ffn_layers()) if features != "pooled" else 0
    return (model.feature_dim if features != "context" else 0) + ctx


@torch.no_grad()
def embed(
    model: SeedModel, data: Any, batch_size: int = 256, progress: bool = True, features: str = "pooled"
) -> np.ndarray:
    """Representations of ``data`` under the model in eval mode: float32 NumPy array (n, D_out).

    Args:
        model: a :class:`~metamoe.models.SeedModel`. Not modified.
        data: images (n, C, H, W) / (n, H, W) float for timm; token ids (n, L) int or a mapping with
            ``input_ids`` and ``attention_mask`` (n, L) for transformers. NumPy or torch.
        batch_size: rows per forward pass.
        progress: show a tqdm bar.
        features: ``"pooled"`` (default): what the classifier head sees, D = ``model.feature_dim``:
            ``forward_head(pre_logits=True)`` for a timm ViT, the pooler output for BERT, the final hidden state
            averaged over valid tokens for a causal LM. ``"context"``: for every FFN layer, the mean of its
            inputs over the sample's valid tokens, concatenated in depth order (the context vector the
            server's context-aware router reads). ``"pooled+context"``: both, pooled first. A head trained
            on labels learns to ignore how a sample looks apart from its class; the intermediate layers keep
            that "style" (a domain's transform, its texture), which is what a domain classifier and a
            diversity kernel need. Width: :func:`embedding_dim`.

    Returns:
        (n, D_out) float32.
    """
    model = check_seed_model(model, "model")
    batch_size = check_batch_size(batch_size)
    dim = embedding_dim(model, features)
    n = SeedModel.num_samples(data)
    if n == 0:
        raise ValueError("data is empty (0 samples)")
    out = np.empty((n, dim), dtype=np.float32)
    layers = model.ffn_layers() if features != "pooled" else []
    means: Dict[int, torch.Tensor] = {}
    state: Dict[str, Any] = {}

    def record(i: int, x: torch.Tensor) -> None:
        means[i] = _masked_token_mean(x.float(), state["mask"])

    with (
        _TrainFlag(model, False),
        ffn_input_hooks(model.net, layers, record),
        progress_bar(n, progress, f"embed ({model.name})", "sample") as bar,
    ):
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            batch = model.prepare(SeedModel.take(data, slice(start, stop)))
            state["mask"] = model.token_mask(batch) if layers else None
            means.clear()
            parts = []
            pooled = model.features(batch).float()  # runs the whole network, so every FFN hook fires
            if features != "context":
                parts.append(pooled)
            parts += [means[layer.index] for layer in layers]
            out[start:stop] = torch.cat(parts, dim=1).cpu().numpy()
            bar.update(stop - start)
    return out


@torch.no_grad()
def compute_prototypes(
    model: SeedModel, data: Any, batch_size: int = 256, progress: bool = False
) -> Tuple[torch.Tensor, int]:
    """Mean FFN input of every FFN layer over ``data`` (eval mode): ((L, D) float32, number of tokens averaged).

    Every token that the model's attention mask keeps counts once (all tokens of a ViT: class token and
    patches). Sums run in float64.
    """
    model = check_seed_model(model, "model")
    batch_size = check_batch_size(batch_size)
    layers = model.ffn_layers()
    if not layers:
        raise ValueError(f"{model.name} has no FFN layers")
    n = SeedModel.num_samples(data)
    if n == 0:
        raise ValueError("data is empty (0 samples)")
    dims = {layer.hidden_size for layer in layers}
    if len(dims) != 1:
        raise ValueError(
            f"FFN layers of {model.name} have different widths {sorted(dims)}; prototypes need one width"
        )
    sums = torch.zeros(len(layers), dims.pop(), dtype=torch.float64)
    counts = torch.zeros(len(layers), dtype=torch.float64)
    state = {}

    def record(i, x):
        x = x.detach().double().cpu()
        mask = state["mask"]
        if mask is None:
            sums[i] += x.reshape(-1, x.shape[-1]).sum(0)
            counts[i] += x.shape[0] * x.shape[1]
        else:
            m = mask.to(x.dtype).cpu().unsqueeze(-1)
            sums[i] += (x * m).sum((0, 1))
            counts[i] += m.sum()

    with (
        _TrainFlag(model, False),
        ffn_input_hooks(model.net, layers, record),
        progress_bar(n, progress, "prototypes", "sample") as bar,
    ):
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            batch = model.prepare(SeedModel.take(data, slice(start, stop)))
            state["mask"] = model.token_mask(batch)
            model(batch)
            bar.update(stop - start)
    if not bool((counts > 0).all()):
        raise ValueError("no valid tokens in data (every attention_mask entry is 0)")
    tokens = int(counts[0].item())
    return (sums / counts.unsqueeze(1)).float(), tokens


# --------------------------------------------------------------------------- training


@dataclass
class TrainedExpert:
    """What :func:`train_expert` returns.

    Attributes:
        model: the trained expert (a deep copy of the seed with LoRA and, for classification, the new head);
            for evaluation on the client. Never shipped.
        seed_name, seed_hash: the seed model's name and :func:`~metamoe.models.weight_hash`.
        lora_config: rank, alpha, dropout, projections.
        lora_state: {``layers.{i}.{proj}.lora_A`` (r, in), ``.lora_B`` (out, r)} float32 CPU tensors.
        head_state: {``weight`` (C, D), ``bias`` (C,)} of the new head, or None (causal LM).
        prototypes: (L, D) float32: mean FFN input per FFN layer over the training data.
        label_space: ``{"kind": "classes", "private": [...], "public": [...]}`` or
            ``{"kind": "vocabulary", "size": V}``.
        metrics: aggregate numbers only (losses per epoch, accuracies, counts, seconds); nothing per sample.
    """

    model: SeedModel
    seed_name: str
    seed_hash: str
    lora_config: LoRAConfig
    lora_state: Dict[str, torch.Tensor]
    head_state: Optional[Dict[str, torch.Tensor]]
    prototypes: torch.Tensor
    label_space: Dict[str, Any]
    metrics: Dict[str, Any] = field(default_factory=dict)


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise TypeError(f"{name} must be a NumPy array or torch tensor, got {type(x).__name__}")


def _as_inputs(x: Any, name: str):
    if isinstance(x, Mapping):
        if "input_ids" not in x:
            raise ValueError(f"{name} as a mapping needs 'input_ids', got keys {sorted(x)}")
        out = {"input_ids": _as_tensor(x["input_ids"], f"{name}['input_ids']")}
        mask = x.get("attention_mask")
        out["attention_mask"] = (
            torch.ones_like(out["input_ids"])
            if mask is None
            else _as_tensor(mask, f"{name}['attention_mask']")
        )
        return out
    return _as_tensor(x, name)


def _concat(a, b, name_a: str, name_b: str):
    if isinstance(a, dict) != isinstance(b, dict):  # token ids without a mask: every token is valid
        a, b = (
            {"input_ids": t, "attention_mask": torch.ones_like(t)} if not isinstance(t, dict) else t
            for t in (a, b)
        )
    try:
        if isinstance(a, dict):
            return {k: torch.cat([a[k], b[k].to(a[k].dtype)]) for k in a}
        return torch.cat([a, b.to(a.dtype)])
    except RuntimeError as exc:
        raise ValueError(f"{name_a} and {name_b} samples have different shapes: {exc}") from None


def _labels(y: Any, n: int, n_classes: int, name: str) -> torch.Tensor:
    t = _as_tensor(y, name)
    if t.dim() != 1 or len(t) != n:
        raise ValueError(f"{name} must be 1-D with one label per sample ({n}), got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class indices, got {t.dtype}")
    t = t.long()
    if n and (int(t.min()) < 0 or int(t.max()) >= n_classes):
        raise ValueError(
            f"{name} must lie in [0, {n_classes}) (its label space), got [{int(t.min())}, {int(t.max())}]"
        )
    return t


def _check_label_spaces(label_spaces: Any) -> Tuple[List[str], List[str]]:
    if not isinstance(label_spaces, Mapping) or set(label_spaces) != {"private", "public"}:
        raise ValueError(
            "label_spaces must be a mapping with exactly the keys 'private' and 'public' (lists of class names)"
        )
    out = []
    for key in ("private", "public"):
        names = label_spaces[key]
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise TypeError(
                f"label_spaces[{key!r}] must be a list of class names, got {type(names).__name__}"
            )
        names = list(names)
        if any(not isinstance(s, str) or not s for s in names):
            raise ValueError(f"label_spaces[{key!r}] must hold non-empty strings")
        if len(set(names)) != len(names):
            raise ValueError(f"label_spaces[{key!r}] has duplicate class names")
        out.append(names)
    private, public = out
    if not private:
        raise ValueError("label_spaces['private'] is empty")
    clash = sorted(set(private) & set(public))
    if clash:
        raise ValueError(
            f"label spaces collide: private and public both name {clash[:5]}; private names must be distinct "
            "(prefix them with the client's domain)"
        )
    return private, public


def _split_xy(data: Any, name: str, needs_labels: bool):
    if isinstance(data, tuple) and len(data) == 2:
        x, y = data
    elif needs_labels:
        raise TypeError(f"{name} must be a tuple (x, y)")
    else:
        x, y = data, None
    if needs_labels and y is None:
        raise ValueError(f"{name} needs labels y for a classification model")
    if not needs_labels and y is not None:
        raise ValueError(f"{name}: a causal LM trains on next tokens; pass x alone or (x, None), not labels")
    return _as_inputs(x, f"{name} x"), y


def train_expert(
    seed_model: SeedModel,
    private: Any,
    proxies: Any = None,
    label_spaces: Optional[Mapping[str, Sequence[str]]] = None,
    *,
    lora_rank: int = 8,
    lora_alpha: Optional[float] = None,
    lora_dropout: float = 0.0,
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    seed: int = 0,
    prototype_data: str = "train",
    progress: bool = False,
    checkpoint_dir: Optional[Any] = None,
    log: Optional[Callable[[str], None]] = None,
) -> TrainedExpert:
    """Proxy-aligned LoRA fine-tuning of a copy of ``seed_model`` (the seed itself is not modified).

    Args:
        seed_model: the shared seed (:func:`~metamoe.models.create_seed_model`), without LoRA.
        private: classification: ``(x, y)`` with x as :func:`embed` takes it (n_private samples) and y (n_private,)
            int in ``[0, len(label_spaces["private"]))``; causal LM: token ids x (n, L) (or ``(x, None)``).
        proxies: ``(x, y_public)`` of the selected public samples, y_public in ``[0, len(label_spaces["public"]))``
            (causal LM: token ids). None trains on the private data alone (the ``no_alignment`` ablation);
            an empty set is an error.
        label_spaces: ``{"private": [names], "public": [names]}``, disjoint, for classification; None for a causal LM.
            The head predicts ``private + public`` classes in that order.
        lora_rank, lora_alpha, lora_dropout: LoRA on every FFN projection (alpha defaults to 2 * rank).
        epochs, lr, batch_size, weight_decay: AdamW over the LoRA weights and the head.
        seed: LoRA init, head init, shuffling and dropout all derive from it: same seed, same expert (on the CPU).
        prototype_data: ``"train"`` (private + proxies, the default) or ``"private"``: the data the
            per-layer mean FFN input is taken over.
        progress: tqdm bars.
        checkpoint_dir: a folder for the run's checkpoint (None: none). After every epoch it holds the
            trainable LoRA/head weights, the optimizer state, the epoch, the losses so far and the RNG states
            (:func:`~metamoe.unify.checkpoint.save_checkpoint`: safetensors + ``state.json``). A call whose
            checkpoint folder holds a checkpoint of the same run (same training options, seed weights and
            data) resumes after its last finished epoch, with a result bit-identical to an uninterrupted run;
            another run's checkpoint is ignored (and replaced after the first epoch). The folder is left in
            place: remove it once the result is stored.
        log: receives the one-line messages about resuming or ignoring a checkpoint (None: not reported).

    Returns:
        :class:`TrainedExpert`: the trained model, LoRA state, head state, prototypes (L, D) float32, label space,
        aggregate metrics.
    """
    seed_model = check_seed_model(seed_model)
    if has_lora(seed_model):
        raise ValueError("seed_model already has LoRA adapters; pass the plain seed model")
    for nm, v in (("epochs", epochs), ("lora_rank", lora_rank)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{nm} must be a positive int, got {v!r}")
    batch_size = check_batch_size(batch_size)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if prototype_data not in PROTOTYPE_DATA:
        raise ValueError(f"prototype_data must be one of {', '.join(PROTOTYPE_DATA)}, got {prototype_data!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")

    causal = seed_model.task == "causal_lm"
    if causal and label_spaces is not None:
        raise ValueError(
            "label_spaces applies to classification; a causal LM's label space is its vocabulary"
        )
    if not causal and label_spaces is None:
        raise ValueError(
            "label_spaces is required for a classification seed model: {'private': [...], 'public': [...]}"
        )

    x_priv, y_priv = _split_xy(private, "private", not causal)
    n_priv = SeedModel.num_samples(x_priv)
    if n_priv == 0:
        raise ValueError("private is empty (0 samples)")
    x_prox, y_prox, n_prox = None, None, 0
    if proxies is not None:
        x_prox, y_prox = _split_xy(proxies, "proxies", not causal)
        n_prox = SeedModel.num_samples(x_prox)
        if n_prox == 0:
            raise ValueError(
                "proxies is empty (zero proxies); pass proxies=None to train on the private data only"
            )

    if causal:
        label_space = {"kind": "vocabulary", "size": int(seed_model.net.config.vocab_size)}
        y_all = None
    else:
        priv_names, pub_names = _check_label_spaces(label_spaces)
        label_space = {"kind": "classes", "private": priv_names, "public": pub_names}
        y_p = _labels(y_priv, n_priv, len(priv_names), "private y")
        parts = [y_p]
        if x_prox is not None:
            if not pub_names:
                raise ValueError("proxies are given but label_spaces['public'] is empty")
            parts.append(_labels(y_prox, n_prox, len(pub_names), "proxies y") + len(priv_names))
        y_all = torch.cat(parts)
    # validate the inputs up front (shapes, dtypes, token range), each set under its own name
    for name, x in (("private", x_priv), ("proxies", x_prox)):
        if x is not None:
            try:
                seed_model.prepare(x)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{name}: {exc}") from None
    x_all = x_priv if x_prox is None else _concat(x_priv, x_prox, "private", "proxies")

    t0 = time.perf_counter()
    seed_hash = weight_hash(seed_model)
    expert = copy.deepcopy(seed_model)
    n_total = n_priv + n_prox
    losses: List[float] = []
    say = log if log is not None else (lambda s: None)
    run_meta = None
    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir)
        options = dict(
            lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=float(lora_dropout), epochs=epochs,
            lr=float(lr), batch_size=batch_size, weight_decay=float(weight_decay), seed=int(seed),
            seed_hash=seed_hash, n_private=n_priv, n_proxies=n_prox, label_space=label_space,
        )
        run_meta = {
            "config": hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest(),
            "data": data_fingerprint(x_all, None if y_all is None else y_all.numpy()),
        }
    seconds_before = 0.0
    with seeded(int(seed)):
        head = None
        if not causal:
            head = expert.replace_head(len(priv_names) + len(pub_names), seed=int(seed))
        cfg = apply_lora(expert, lora_rank, lora_alpha, lora_dropout, seed=int(seed))
        if head is not None:
            for p in head.parameters():
                p.requires_grad_(True)
        trainable = {k: p for k, p in expert.net.named_parameters() if p.requires_grad}
        opt = torch.optim.AdamW(list(trainable.values()), lr=float(lr), weight_decay=float(weight_decay))
        gen = torch.Generator().manual_seed(int(seed))
        per_epoch = math.ceil(n_total / batch_size)
        steps = epochs * per_epoch
        device = next(iter(trainable.values())).device
        first = 0
        if run_meta is not None:
            state = _load_expert_checkpoint(checkpoint_dir, trainable, opt, run_meta, say)
            if state is not None:
                first, losses, seconds_before = int(state["step"]), list(state["losses"]), state["seconds"]
                _set_rng_state(state["rng"], gen, device)
                say(f"resuming expert training from epoch {first} of {epochs} ({checkpoint_dir})")
        expert.train()
        with progress_bar(steps, progress, f"train expert ({expert.name})", "step") as bar:
            bar.update(first * per_epoch)
            for epoch in range(first, epochs):
                perm = torch.randperm(n_total, generator=gen)
                total, count = 0.0, 0
                for start in range(0, n_total, batch_size):
                    idx = perm[start : start + batch_size]
                    batch = expert.prepare(SeedModel.take(x_all, idx))
                    loss, n_items = _loss(expert, batch, None if y_all is None else y_all[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * n_items
                    count += n_items
                    bar.update(1)
                losses.append(total / max(count, 1))
                if run_meta is not None:
                    meta = dict(
                        run_meta,
                        losses=losses,
                        seconds=seconds_before + time.perf_counter() - t0,
                        rng=_rng_state(gen, device),
                    )
                    save_checkpoint(checkpoint_dir, epoch + 1, trainable, opt, meta)
        expert.eval()
    train_seconds = seconds_before + time.perf_counter() - t0

    metrics: Dict[str, Any] = {
        "epochs": epochs,
        "steps": steps,
        "batch_size": batch_size,
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "seed": int(seed),
        "n_private": n_priv,
        "n_proxies": n_prox,
        "loss_per_epoch": losses,
        "train_seconds": train_seconds,
    }
    metrics["private_accuracy"] = _accuracy(
        expert, x_priv, None if y_all is None else y_all[:n_priv], batch_size
    )
    if x_prox is not None:
        metrics["proxy_accuracy"] = _accuracy(
            expert, x_prox, None if y_all is None else y_all[n_priv:], batch_size
        )
    proto_x = x_all if prototype_data == "train" else x_priv
    prototypes, tokens = compute_prototypes(expert, proto_x, batch_size=batch_size, progress=progress)
    metrics["prototype_data"] = prototype_data
    metrics["prototype_tokens"] = tokens

    head_state = None
    if head is not None:
        head_state = {k: v.detach().cpu().contiguous().clone() for k, v in head.state_dict().items()}
    return TrainedExpert(
        model=expert,
        seed_name=seed_model.name,
        seed_hash=seed_hash,
        lora_config=cfg,
        lora_state=lora_state_dict(expert),
        head_state=head_state,
        prototypes=prototypes,
        label_space=label_space,
        metrics=metrics,
    )


def expert_storage_bytes(
    seed_model: SeedModel, lora_rank: int, n_classes: int = 0, n_proxies: int = 0, names_bytes: int = 0
) -> int:
    """An upper estimate of the disk space :func:`train_expert` with ``checkpoint_dir`` and the expert package
    need together, from the seed model's shapes before training (float32 = 4 bytes):

    * the package: LoRA ``r * (in + out)`` values per FFN projection, the head ``n_classes * (D + 1)``
      (0 classes: a causal LM, no head), the prototypes ``L * D``, plus its manifest: 24 bytes per proxy index
      (a JSON integer and its separator), twice ``names_bytes`` (the class names, written in the label space
      and the per-class metrics) and 64 KiB for the rest;
    * the checkpoint: the trained values three times (weights and AdamW's two moments), twice over (a new
      tensor file is written before the old one is removed), and 64 KiB for ``state.json``.
    """
    seed_model = check_seed_model(seed_model)
    net, layers = seed_model.net, seed_model.ffn_layers()
    lora = 0
    for layer in layers:
        for name in seed_model.adapter.projection_names:
            lin = net.get_submodule(layer.projections[name])
            lora += lora_rank * (lin.in_features + lin.out_features)
    head = n_classes * (seed_model.feature_dim + 1)
    protos = sum(layer.hidden_size for layer in layers)
    package = 4 * (lora + head + protos) + 24 * n_proxies + 2 * names_bytes + 65536
    return package + checkpoint_bytes(lora + head) + 65536


def _tensor_b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _b64_tensor(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def _rng_state(gen: torch.Generator, device: torch.device) -> Dict[str, str]:
    """The shuffling generator's and torch's RNG states (dropout), base64 byte strings for ``state.json``."""
    st = {"shuffle": _tensor_b64(gen.get_state()), "torch": _tensor_b64(torch.get_rng_state())}
    if device.type == "cuda":
        st["cuda"] = _tensor_b64(torch.cuda.get_rng_state(device))
    return st


def _set_rng_state(st: Mapping[str, str], gen: torch.Generator, device: torch.device) -> None:
    gen.set_state(_b64_tensor(st["shuffle"]))
    torch.set_rng_state(_b64_tensor(st["torch"]))
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(_b64_tensor(st["cuda"]), device)


def _load_expert_checkpoint(
    directory: Path, params: Mapping[str, nn.Parameter], opt, meta: Dict[str, Any], say: Callable[[str], None]
) -> Optional[Dict[str, Any]]:
    """:func:`load_checkpoint` of this run (its state), or None when ``directory`` holds none or another run's
    checkpoint or an unreadable one (reported through ``say``; training starts from epoch 0)."""
    initial = {k: p.detach().clone() for k, p in params.items()}
    try:
        state = load_checkpoint(directory, params, opt, meta)
        if state is not None and not all(k in state for k in ("losses", "seconds", "rng")):
            raise ValueError("it is not an expert-training checkpoint")
        return state
    except CheckpointMismatchError as exc:
        why = f"it was written by a different run ({exc.key} differs)"
    except (ValueError, KeyError) as exc:
        why = str(exc)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(initial[k])
    opt.state.clear()
    say(f"ignoring checkpoint {directory}: {why}; training from epoch 0")
    return None


def _loss(model: SeedModel, batch, y) -> Tuple[torch.Tensor, int]:
    logits = model(batch)
    if y is not None:
        return nn.functional.cross_entropy(logits.float(), y.to(logits.device)), int(len(y))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    tgt = ids[:, 1:][valid]
    n = int(valid.sum())
    if n == 0:
        return logits.sum() * 0.0, 0
    return nn.functional.cross_entropy(logits[:, :-1][valid].float(), tgt), n


@torch.no_grad()
def _accuracy(model: SeedModel, x, y, batch_size: int) -> float:
    """Classification: fraction of argmax == y; causal LM: next-token accuracy over valid positions (None if none)."""
    n = SeedModel.num_samples(x)
    hit, tot = 0, 0
    with _TrainFlag(model, False):
        for start in range(0, n, batch_size):
            batch = model.prepare(SeedModel.take(x, slice(start, start + batch_size)))
            logits = model(batch)
            if y is not None:
                yy = y[start : start + batch_size].to(logits.device)
                hit += int((logits.argmax(-1) == yy).sum())
                tot += len(yy)
            else:
                ids, mask = batch["input_ids"], batch["attention_mask"]
                valid = (mask[:, 1:] * mask[:, :-1]).bool()
                hit += int((logits[:, :-1].argmax(-1) == ids[:, 1:])[valid].sum())
                tot += int(valid.sum())
    return hit / tot if tot else None
