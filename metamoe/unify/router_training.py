"""Router training: :func:`train_router` trains the routers of a :class:`~metamoe.unify.UnifiedModel` (and
lambda; optionally the LoRAs and the head) with the task loss plus every layer's load-balancing and z losses
and, optionally, a routing loss towards given experts; with checkpoints (:mod:`.checkpoint`) and exact
resume. Its optimisation options are one frozen dataclass, :class:`RouterTraining`, whose defaults are the
only ones: the digits demo (:class:`~metamoe.unify.DigitsConfig`) and ``metamoe unify`` (server.yaml's
``training``) take theirs from it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..models.registry import SeedModel
from ..utils.checks import check_float, check_int
from .checkpoint import checkpoint_bytes, data_fingerprint, load_checkpoint, save_checkpoint
from .unified_model import UnifiedModel

PathLike = Union[str, os.PathLike]

__all__ = ["RouterTraining", "train_router", "training_storage_bytes"]

CONTEXT_CHUNK = 256  # samples per first pass when caching the context vectors


# --------------------------------------------------------------------------- the options


@dataclass(frozen=True)
class RouterTraining:
    """How :func:`train_router` optimises: frozen, validated when built (errors name the field).

    The defaults are the digits demo's router training (:class:`~metamoe.unify.DigitsConfig` and server.yaml's
    ``training`` section take theirs from here). With the routing loss the routers need the steps to learn
    the client domains from the proxies' owners: 10 epochs of the demo's proxies are 60 steps, too few.

    Attributes:
        epochs: >= 1, passes over the training set.
        lr: > 0, AdamW's learning rate.
        batch_size: >= 1, samples per step.
        weight_decay: >= 0, AdamW's weight decay.
        train_lora: also train the experts' LoRA factors.
        train_head: also train the head (classification).
        seed: >= 0, the shuffling: step ``s`` of epoch ``e`` reads a permutation seeded by ``(seed, e)``.
        checkpoint_every: >= 1, steps between checkpoints (with ``train_router(checkpoint_dir=...)``).
        route_loss_coef: > 0, the weight of the routing loss (with ``train_router(route_targets=...)``).
    """

    epochs: int = 40
    lr: float = 1e-2
    batch_size: int = 64
    weight_decay: float = 0.0
    train_lora: bool = False
    train_head: bool = False
    seed: int = 0
    checkpoint_every: int = 50
    route_loss_coef: float = 1.0

    def __post_init__(self):
        def set_(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in ("epochs", "batch_size", "checkpoint_every"):
            set_(name, check_int(getattr(self, name), f"RouterTraining.{name}", 1))
        set_("seed", check_int(self.seed, "RouterTraining.seed", 0))
        for name in ("lr", "route_loss_coef"):
            value = check_float(getattr(self, name), f"RouterTraining.{name}")
            if value <= 0:
                raise ValueError(f"RouterTraining.{name} must be a positive finite number, got {value:g}")
            set_(name, value)
        set_("weight_decay", check_float(self.weight_decay, "RouterTraining.weight_decay"))
        for name in ("train_lora", "train_head"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"RouterTraining.{name} must be a bool, got {type(value).__name__} {value!r}")
            set_(name, bool(value))

    def replace(self, **changes: Any) -> "RouterTraining":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


TRAINING_OPTIONS = tuple(f.name for f in dataclasses.fields(RouterTraining))


def _training_from(training: Optional[RouterTraining], options: Dict[str, Any]) -> RouterTraining:
    """The :class:`RouterTraining` of ``train_router(training=..., **options)``: one or the other."""
    unknown = sorted(set(options) - set(TRAINING_OPTIONS))
    if unknown:
        raise TypeError(
            f"train_router() got unexpected keyword argument(s) {unknown}; "
            f"its training options are {', '.join(TRAINING_OPTIONS)}"
        )
    if training is None:
        return RouterTraining(**options)
    if not isinstance(training, RouterTraining):
        raise TypeError(f"training must be a RouterTraining, got {type(training).__name__}")
    if options:
        raise TypeError(
            f"training options given twice: training=RouterTraining(...) and the keyword arguments "
            f"{sorted(options)}; put them in the RouterTraining"
        )
    return training


# --------------------------------------------------------------------------- losses


def _task_loss(
    logits: torch.Tensor, batch, y: Optional[torch.Tensor], block: Optional[Tuple[int, int]] = None
) -> torch.Tensor:
    if y is not None:
        if block is not None:  # softmax within the classes the labels come from
            return nn.functional.cross_entropy(
                logits[:, block[0] : block[1]].float(), y.to(logits.device) - block[0]
            )
        return nn.functional.cross_entropy(logits.float(), y.to(logits.device))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    return nn.functional.cross_entropy(logits[:, :-1][valid].float(), ids[:, 1:][valid])


def _check_route_targets(route_targets: Any, n: int, E: int) -> torch.Tensor:
    """(n, E) float32 tensor of ``train_router``'s ``route_targets``, after checking them."""
    a = route_targets.detach().cpu().numpy() if isinstance(route_targets, torch.Tensor) else route_targets
    rt = torch.as_tensor(np.asarray(a, dtype=np.float64))
    if rt.shape != (n, E):
        raise ValueError(f"route_targets must be (n={n}, E={E}), got {tuple(rt.shape)}")
    if not bool(torch.isfinite(rt).all()) or bool((rt < 0).any()):
        raise ValueError("route_targets must be finite and non-negative")
    if not torch.allclose(rt.sum(1), torch.ones(n, dtype=rt.dtype), atol=1e-6):
        raise ValueError("every row of route_targets must sum to 1 (a distribution over the experts)")
    return rt.float()


def _route_loss(model: UnifiedModel, batch: Dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Mean over the MoE layers of the cross-entropy between ``targets`` (B, E) and each sample's mean routing
    probability per expert in that layer (of the forward just run)."""
    terms = []
    for layer in range(len(model.moe_layers)):
        g = model.expert_weights(batch, layer)
        logg = torch.log(g.clamp_min(torch.finfo(g.dtype).tiny))
        terms.append(-(targets.to(logg.dtype) * logg).sum(1).mean())
    return torch.stack(terms).mean()


# --------------------------------------------------------------------------- checks


def _check_model(model: Any) -> None:
    if not isinstance(model, UnifiedModel):
        raise TypeError(f"model must be a UnifiedModel (build_unified_model), got {type(model).__name__}")


def _check_labels(
    model: UnifiedModel, y: Any, n: int, label_block: Any
) -> Tuple[Optional[torch.Tensor], Optional[Tuple[int, int]]]:
    """``(labels, label_block)`` of ``train_router``: (n,) int64 labels in the unified label space (None for a
    causal LM) and the checked ``(start, stop)`` block they lie in (or None)."""
    if model.label_space.kind != "classes":
        if y is not None:
            raise ValueError("a causal LM trains on next tokens; y must be None")
        if label_block is not None:
            raise ValueError(
                "label_block applies to classification; a causal LM's loss is over its vocabulary"
            )
        return None, None
    if y is None:
        raise ValueError("y is required to train a classification model")
    yt = torch.as_tensor(np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y))
    if yt.shape != (n,) or yt.is_floating_point():
        raise ValueError(f"y must be (n={n},) integers, got {tuple(yt.shape)} {yt.dtype}")
    yt = yt.long()
    C = model.label_space.num_classes
    if label_block is not None:
        lb = tuple(int(v) for v in label_block)
        if len(lb) != 2 or not 0 <= lb[0] < lb[1] <= C:
            raise ValueError(f"label_block must be (start, stop) inside [0, {C}], got {label_block!r}")
        if int(yt.min()) < lb[0] or int(yt.max()) >= lb[1]:
            raise ValueError(
                f"every y must lie in label_block [{lb[0]}, {lb[1]}), got [{int(yt.min())}, {int(yt.max())}]"
            )
        label_block = lb
    if int(yt.min()) < 0 or int(yt.max()) >= C:
        raise ValueError(
            f"y must lie in [0, {C}) (the unified label space), got [{int(yt.min())}, {int(yt.max())}]"
        )
    return yt, label_block


# --------------------------------------------------------------------------- data and batches


def _trainable_parameters(model: UnifiedModel, train_lora: bool, train_head: bool) -> Dict[str, nn.Parameter]:
    """Switch the LoRA factors and the head on or off and return every parameter that trains, by name (the
    routers and lambdas stay as :func:`~metamoe.unify.build_unified_model` set them)."""
    for moe in model.moe_layers:
        for name, prm in moe.named_parameters():
            if name.startswith("lora_"):
                prm.requires_grad_(bool(train_lora))
    head = model.seed.head() if model.label_space.kind == "classes" else None
    if head is not None:
        for prm in head.parameters():
            prm.requires_grad_(bool(train_head))
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("model has nothing to train (a one-expert soup has no router to train)")
    return params


STORAGE_SLACK_BYTES = 1 << 20  # state.json, run.json, unified.json and the safetensors headers


def training_storage_bytes(model: UnifiedModel, training: Optional[RouterTraining] = None) -> int:
    """Bytes of disk a :func:`train_router` run with checkpoints and its saved result need, an upper estimate.

    ``P`` parameters train (the routers and lambdas, plus the LoRA factors with ``train_lora`` and the head
    with ``train_head``); a checkpoint holds them and AdamW's two moments, 3 float32 tensors of ``P`` each,
    and while one is written the previous one still exists; the result holds the ``P`` parameters once more.
    The estimate is ``4 * P * 3 * 2`` bytes (two checkpoints, which also covers the result) plus 1 MiB for
    the JSON files and headers. The model is left unchanged."""
    tr = training if training is not None else RouterTraining()
    head = model.seed.head() if model.label_space.kind == "classes" else None
    head_ids = set() if head is None else {id(p) for p in head.parameters()}
    lora_ids = {id(p) for moe in model.moe_layers for n, p in moe.named_parameters() if n.startswith("lora_")}
    count = 0
    for prm in model.parameters():
        if id(prm) in lora_ids:
            trains = tr.train_lora
        elif id(prm) in head_ids:
            trains = tr.train_head
        else:
            trains = prm.requires_grad
        count += prm.numel() if trains else 0
    return checkpoint_bytes(count) + STORAGE_SLACK_BYTES


def _cached_contexts(model: UnifiedModel, x: Any, n: int) -> Optional[torch.Tensor]:
    """(L, n, D) context vectors of every sample (first pass, base model), or None without context routing.
    They depend only on the frozen base, so one pass serves every epoch."""
    if not model.context_routing:
        return None
    parts = []
    for s in range(0, n, CONTEXT_CHUNK):
        parts.append(model.compute_context(model.prepare(SeedModel.take(x, slice(s, s + CONTEXT_CHUNK)))))
    return torch.cat(parts, dim=1)


class _Batches:
    """Sample indices of every step: step ``s`` belongs to epoch ``s // steps_per_epoch`` and reads its batch
    from a permutation seeded by ``(seed, epoch)``, so any step's batch is known without replaying the run."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, int(seed)
        self.steps_per_epoch = math.ceil(n / batch_size)
        self._perm: Optional[torch.Tensor] = None
        self._epoch = -1

    def indices(self, step: int) -> torch.Tensor:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm[pos * self.batch_size : (pos + 1) * self.batch_size]


# --------------------------------------------------------------------------- one epoch


@dataclass
class _EpochLosses:
    """Mean task (and routing) loss of every completed epoch and the sample-weighted sums of the current one;
    all of it goes into a checkpoint, so a run resumed inside an epoch reports the same means."""

    per_epoch: List[float] = field(default_factory=list)
    route_per_epoch: List[float] = field(default_factory=list)
    task_sum: float = 0.0
    route_sum: float = 0.0
    count: int = 0

    @classmethod
    def from_checkpoint(cls, state: Dict[str, Any], inside_epoch: bool) -> "_EpochLosses":
        out = cls(list(state["loss_per_epoch"]), list(state.get("route_loss_per_epoch", [])))
        if inside_epoch:
            out.task_sum, out.count = float(state["epoch_loss_sum"]), int(state["epoch_loss_count"])
            out.route_sum = float(state.get("epoch_route_loss_sum", 0.0))
        return out

    def add(self, task: float, route: Optional[float], size: int) -> None:
        if route is not None:
            self.route_sum += route * size
        self.task_sum += task * size
        self.count += size

    def end_epoch(self, with_route: bool) -> None:
        self.per_epoch.append(self.task_sum / max(self.count, 1))
        if with_route:
            self.route_per_epoch.append(self.route_sum / max(self.count, 1))
        self.task_sum, self.route_sum, self.count = 0.0, 0.0, 0

    def checkpoint_state(self) -> Dict[str, Any]:
        return dict(
            loss_per_epoch=self.per_epoch,
            epoch_loss_sum=self.task_sum,
            epoch_loss_count=self.count,
            route_loss_per_epoch=self.route_per_epoch,
            epoch_route_loss_sum=self.route_sum,
        )


def _train_step(
    model: UnifiedModel,
    opt: torch.optim.Optimizer,
    x: Any,
    idx: torch.Tensor,
    contexts: Optional[torch.Tensor],
    y: Optional[torch.Tensor],
    label_block: Optional[Tuple[int, int]],
    route_targets: Optional[torch.Tensor],
    route_loss_coef: float,
) -> Tuple[float, float, Optional[float]]:
    """One optimizer step on the samples ``idx``; returns ``(loss, task loss, routing loss or None)``."""
    batch = model.prepare(SeedModel.take(x, idx))
    logits = model(batch, None if contexts is None else contexts[:, idx])
    task = _task_loss(logits, batch, None if y is None else y[idx], label_block)
    loss = task + model.router_loss()
    route = None
    if route_targets is not None:
        route_t = _route_loss(model, batch, route_targets[idx])
        loss = loss + float(route_loss_coef) * route_t
        route = float(route_t.detach())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach()), float(task.detach()), route


# --------------------------------------------------------------------------- the training loop


def _resume_line(start: int, steps_per_epoch: int, epochs: int, ckpt: Path) -> str:
    """What a run resumed at step ``start`` says: the epoch it continues in, or that it had finished."""
    if start >= steps_per_epoch * epochs:
        return f"router training already finished ({epochs} of {epochs} epochs) in the checkpoint in {ckpt}"
    return f"resuming router training from epoch {start // steps_per_epoch + 1} of {epochs} ({ckpt})"


def _epoch_line(epoch: int, epochs: int, losses: _EpochLosses) -> str:
    line = f"epoch {epoch}/{epochs}: loss {losses.per_epoch[-1]:.4f}"
    if losses.route_per_epoch:
        line += f", routing loss {losses.route_per_epoch[-1]:.4f}"
    return line


def train_router(
    model: UnifiedModel,
    x: Any,
    y: Optional[Any] = None,
    *,
    training: Optional[RouterTraining] = None,
    checkpoint_dir: Optional[PathLike] = None,
    resume: bool = True,
    label_block: Optional[Tuple[int, int]] = None,
    route_targets: Optional[Any] = None,
    callback: Optional[Callable[[int, float], None]] = None,
    progress: bool = False,
    log: Optional[Callable[[str], None]] = None,
    **options: Any,
) -> Dict[str, Any]:
    """Train the routers (and lambda; optionally the LoRAs and the head) of ``model`` in place.

    Loss per step: the task loss (cross-entropy over the unified label space; next-token loss for a causal
    LM) plus :meth:`~metamoe.unify.UnifiedModel.router_loss` (load balancing + z loss of every layer).
    AdamW. Step ``s`` belongs to epoch ``s // steps_per_epoch`` and reads its batch from a permutation seeded
    by ``(seed, epoch)``, so the run is a pure function of its arguments and can stop and resume anywhere.
    The context vectors (first pass, base model) are computed once per sample and cached: they depend only
    on the frozen base.

    Args:
        model: from :func:`~metamoe.unify.build_unified_model`.
        x: training inputs (n, ...), e.g. the union of the proxies
            (:func:`~metamoe.unify.proxy_training_set`).
        y: (n,) int labels in the unified label space (classification); None for a causal LM.
        training: the optimisation options, a :class:`RouterTraining` (epochs, lr, batch_size, weight_decay,
            train_lora, train_head, seed, checkpoint_every, route_loss_coef); default ``RouterTraining()``.
        **options: the same options as keyword arguments (``epochs=...``, ...), which just build a
            RouterTraining; either ``training`` or these, not both (TypeError); an unknown one is a TypeError.
        checkpoint_dir: if given, every ``checkpoint_every`` steps and at the end the trainable parameters,
            the optimizer state and the step go to ``checkpoint_dir`` (``ckpt-<step>.safetensors`` written
            atomically, then ``state.json`` atomically pointing at it). With ``resume=True`` an existing
            checkpoint of the same run (same config and data) is loaded first and training continues from its
            step: an interrupted-and-resumed run ends with exactly the parameters of an uninterrupted one.
        label_block: None: the cross-entropy runs over the whole unified label space. ``(start, stop)``: over
            those classes only (every label must lie inside): e.g. ``label_space.public_slice`` for proxies,
            whose labels are public classes, so that probability a sample puts on a client's private classes
            is not counted as an error (the private class may name the same thing: ``"rotated:3"`` and
            ``"3"``).
        route_targets: None, or (n, E) non-negative rows summing to 1: the share of each expert every sample
            should be routed to (:func:`~metamoe.unify.server.proxy_owners` for proxies: their clients'
            experts). Adds ``route_loss_coef`` times the routing cross-entropy, averaged over the MoE
            layers: ``-sum_e target_e log g_e`` with ``g`` the sample's mean routing probability per expert
            (:meth:`~metamoe.unify.UnifiedModel.expert_weights`). Not part of the paper's description (task
            loss plus load balancing only); None (default) trains as the paper does.
        callback: ``callback(step, loss)`` after every step (step counts from 1); may raise to stop.
        progress: a tqdm bar.
        log: if given, called with one line when the run resumes from a checkpoint (``resuming router training
            from epoch E of N (<checkpoint_dir>)``) and with ``epoch E/N: loss L`` as each epoch finishes
            (the bar, if any, is cleared while it writes).

    Returns:
        Metrics: ``steps``, ``resumed_from``, ``loss_per_epoch`` (mean task loss of every completed epoch),
        ``final_lambda`` (per layer, or None), ``seconds``; with ``route_targets`` also
        ``route_loss_per_epoch``.
    """
    from tqdm.auto import tqdm

    _check_model(model)
    tr = _training_from(training, options)
    n = SeedModel.num_samples(x)
    if n == 0:
        raise ValueError("x is empty (0 training samples)")
    yt, label_block = _check_labels(model, y, n, label_block)
    rt = None if route_targets is None else _check_route_targets(route_targets, n, model.num_experts)
    params = _trainable_parameters(model, tr.train_lora, tr.train_head)
    opt = torch.optim.AdamW(list(params.values()), lr=tr.lr, weight_decay=tr.weight_decay)
    batches = _Batches(n, tr.batch_size, tr.seed)
    total = tr.epochs * batches.steps_per_epoch
    config = dict(  # what a checkpoint must match to resume (route_loss_coef only counts with route_targets)
        epochs=tr.epochs,
        lr=tr.lr,
        batch_size=tr.batch_size,
        weight_decay=tr.weight_decay,
        train_lora=tr.train_lora,
        train_head=tr.train_head,
        seed=tr.seed,
        params=sorted(params),
        label_block=None if label_block is None else list(label_block),
        route_loss_coef=None if rt is None else tr.route_loss_coef,
    )
    meta = {
        "config": config,
        "data": data_fingerprint(x, None if yt is None else yt.numpy(), None if rt is None else rt.numpy()),
        "loss_per_epoch": [],
        "route_loss_per_epoch": [],
    }

    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start, resumed_from, losses = 0, None, _EpochLosses()
    if ckpt is not None and resume:
        state = load_checkpoint(ckpt, params, opt, meta)
        if state is not None:
            start = resumed_from = int(state["step"])
            losses = _EpochLosses.from_checkpoint(state, inside_epoch=start % batches.steps_per_epoch != 0)
            if log is not None:
                log(_resume_line(start, batches.steps_per_epoch, tr.epochs, ckpt))
    t0 = time.perf_counter()
    contexts = _cached_contexts(model, x, n)

    model.train()
    with tqdm(total=total, initial=start, disable=not progress, desc="train router", leave=False) as bar:
        for step in range(start, total):
            idx = batches.indices(step)
            loss, task, route = _train_step(model, opt, x, idx, contexts, yt, label_block, rt, tr.route_loss_coef)
            losses.add(task, route, len(idx))
            bar.update(1)
            done = step + 1
            if done % batches.steps_per_epoch == 0:
                losses.end_epoch(with_route=rt is not None)
                if log is not None:
                    with bar.external_write_mode():
                        log(_epoch_line(len(losses.per_epoch), tr.epochs, losses))
            if ckpt is not None and (done % tr.checkpoint_every == 0 or done == total):
                save_checkpoint(ckpt, done, params, opt, {**meta, **losses.checkpoint_state()})
            if callback is not None:
                callback(done, loss)
    model.eval()

    lam = None
    if model.context_routing:
        lam = [float(m.context_lambda.detach()) for m in model.moe_layers]
    out = {
        "steps": total,
        "resumed_from": resumed_from,
        "loss_per_epoch": losses.per_epoch,
        "final_lambda": lam,
        "seconds": time.perf_counter() - t0,
        "trained": sorted(params),
    }
    if rt is not None:
        out["route_loss_per_epoch"] = losses.route_per_epoch
    return out
