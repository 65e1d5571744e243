"""Seed models by name: ``"timm:<arch>"`` and ``"hf:<arch>"``, through a registry of sources and a factory.

``create_seed_model("timm:vit_tiny_patch16_224", img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=2,
num_heads=2, num_classes=10)`` builds a randomly initialised timm ViT from its config;
``create_seed_model("hf:llama", hidden_size=32, num_hidden_layers=2, ...)`` a transformers decoder
(``AutoConfig.for_model`` + ``from_config``). With ``checkpoint=PATH`` the weights come from a LOCAL path through
the library's own loading code: timm ``create_model("local-dir:PATH", pretrained=True)`` for a folder written by
:func:`save_seed_model` (timm's ``save_for_hf`` layout: ``config.json`` + ``model.safetensors``) or
``checkpoint_path=FILE`` for a bare weights file; transformers ``from_pretrained(PATH, local_files_only=True)``.
Nothing downloads: random initialisation never asks a hub, and a checkpoint that is not on disk is a
``FileNotFoundError`` naming the path.

Each source declares, by name, which architectures it serves and the FFN adapter (:mod:`metamoe.models.ffn`)
for each: timm architectures of the ``vision_transformer`` module use ``timm_vit_mlp``; transformers
``llama``/``qwen2``/``qwen3``/``mistral`` use ``hf_gated_mlp`` and ``bert`` uses ``hf_bert_ffn``.
:func:`supported_seed_architectures` lists, from these tables, every name the sources serve (a timm architecture
counts when a tiny build of it has the FFN layout its adapter wraps) and why the others are refused.

The returned :class:`SeedModel` wraps the library's own module (``.net``: a timm ``VisionTransformer`` or a
transformers ``PreTrainedModel``) and gives the unification code one interface: batching of inputs,
the pooled representation the classifier head sees, logits, loss, the FFN layers, the head.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..utils.files import current_umask
from .ffn import ADAPTERS, FFNAdapter, FFNLayer
from .lora_linear import LoRALinear

PathLike = Union[str, os.PathLike]

TASKS = ("image_classification", "sequence_classification", "causal_lm")


# --------------------------------------------------------------------------- name parsing


def parse_model_name(name: Any) -> Tuple[str, str]:
    """``"source:arch"`` -> ``(source, arch)``; TypeError/ValueError with the known sources otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string 'source:arch', got {type(name).__name__}")
    known = ", ".join(SOURCES)
    source, sep, arch = name.partition(":")
    if not sep:
        raise ValueError(
            f"model name {name!r} has no source prefix; write 'source:arch' with source one of: {known}"
        )
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r} in {name!r}; known: {known}")
    if not arch or arch != arch.strip():
        raise ValueError(f"model name {name!r} has an empty or blank architecture after '{source}:'")
    return source, arch


# --------------------------------------------------------------------------- sources


class Source:
    """How one library builds, loads, saves and runs its models. Subclasses register by name in ``SOURCES``."""

    name: str = ""

    def adapter_for(self, arch: str) -> FFNAdapter:  # pragma: no cover - abstract
        raise NotImplementedError

    def default_task(self, arch: str) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def build(
        self,
        arch: str,
        task: str,
        checkpoint: Optional[Path],
        num_classes: Optional[int],
        overrides: Dict[str, Any],
        progress: bool = True,
    ) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def families(self) -> List[Dict[str, Any]]:  # pragma: no cover - abstract
        """The architecture families this source serves (see :func:`supported_seed_architectures`)."""
        raise NotImplementedError


SOURCES: Dict[str, Source] = {}


def register_source(cls):
    """Class decorator: instantiate and register a :class:`Source` under ``cls.name``."""
    inst = cls()
    if not inst.name or inst.name in SOURCES:
        raise ValueError(f"source name {inst.name!r} is empty or registered twice")
    SOURCES[inst.name] = inst
    return cls


@contextlib.contextmanager
def seeded(seed: Optional[int]):
    """Run a block under ``torch.manual_seed(seed)`` without changing the caller's global RNG state."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


@contextlib.contextmanager
def progress_bars(enabled: bool):
    """Run a block with transformers' (and huggingface_hub's) progress bars on or off; both settings restored."""
    if enabled:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hub_was_disabled = are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        if hub_was_disabled:
            disable_progress_bars()
        elif are_progress_bars_disabled():
            enable_progress_bars()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _adapter_note(adapter_name: str, tasks) -> str:
    adapter = ADAPTERS[adapter_name]
    return f"FFN {'/'.join(adapter.projection_names)} (adapter {adapter_name}); tasks: {', '.join(tasks)}"


@register_source
class TimmSource(Source):
    name = "timm"
    # timm module (file under timm/models) -> FFN adapter name
    MODULE_ADAPTERS = {"vision_transformer": "timm_vit_mlp"}
    # a tiny build of each architecture checks its FFN layout against the adapter (the layout does not depend on size)
    PROBE_CONFIG = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=1, num_heads=2, num_classes=2)

    def families(self) -> List[Dict[str, Any]]:
        import timm

        out = []
        for module, adapter_name in self.MODULE_ADAPTERS.items():
            names, refused = [], {}
            for arch in timm.list_models(module=module):
                try:
                    with seeded(0):
                        net = self.build(arch, "image_classification", None, None, dict(self.PROBE_CONFIG))
                except Exception as exc:  # reported as the reason, like an adapter refusal
                    refused[f"timm:{arch}"] = f"no tiny build ({_first_line(exc)})"
                    continue
                try:
                    ADAPTERS[adapter_name].layers(net)
                except ValueError as exc:
                    refused[f"timm:{arch}"] = str(exc).splitlines()[0]
                else:
                    names.append(f"timm:{arch}")
            tasks = (self.default_task(module),)
            note = f"{len(names)} of {len(names) + len(refused)} timm '{module}' architectures; "
            out.append(dict(source=self.name, family=module, adapter=adapter_name, tasks=list(tasks), names=names,
                            refused=refused, note=note + _adapter_note(adapter_name, tasks)))
        return out

    def _module_of(self, arch: str) -> str:
        import timm
        from timm.models import is_model_in_modules

        if not timm.is_model(arch):
            import difflib

            close = difflib.get_close_matches(arch, timm.list_models(), n=3)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise ValueError(f"unknown timm architecture {arch!r}{hint}")
        for module in self.MODULE_ADAPTERS:
            if is_model_in_modules(arch, [module]):
                return module
        raise ValueError(
            f"timm architecture {arch!r} has no FFN adapter; supported timm modules: {', '.join(self.MODULE_ADAPTERS)}"
        )

    def adapter_for(self, arch):
        return ADAPTERS[self.MODULE_ADAPTERS[self._module_of(arch)]]

    def default_task(self, arch):
        return "image_classification"

    def build(self, arch, task, checkpoint, num_classes, overrides, progress=True):
        import timm

        if task != "image_classification":
            raise ValueError(
                f"task={task!r} is not available for timm models; timm supports 'image_classification'"
            )
        kwargs = dict(overrides)
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        if checkpoint is None:
            return timm.create_model(arch, pretrained=False, **kwargs)
        if checkpoint.is_dir():
            cfg_file = checkpoint / "config.json"
            if not cfg_file.is_file():
                raise FileNotFoundError(
                    f"timm checkpoint folder {checkpoint} has no config.json (write it with save_seed_model)"
                )
            saved_arch = json.loads(cfg_file.read_text()).get("architecture")
            if saved_arch != arch:
                raise ValueError(
                    f"checkpoint {checkpoint} holds timm architecture {saved_arch!r}, not {arch!r}"
                )
            # timm's own local-folder loader: config.json (model_args) + model.safetensors, no hub access.
            return timm.create_model(f"local-dir:{checkpoint}", pretrained=True, **kwargs)
        # a bare weights file (.safetensors or .pth): the architecture comes from arch + overrides
        return timm.create_model(arch, pretrained=False, checkpoint_path=str(checkpoint), **kwargs)

    def save(self, net, directory: Path, progress: bool = True) -> None:
        from timm.models import save_for_hf

        save_for_hf(net, str(directory), safe_serialization=True)

    # ---- running
    def prepare(self, net, data, device) -> Dict[str, torch.Tensor]:
        x = torch.as_tensor(data) if not isinstance(data, torch.Tensor) else data
        if not torch.is_floating_point(x):
            raise TypeError(f"timm image inputs must be floating point, got {x.dtype}")
        in_chans = net.patch_embed.proj.in_channels
        if x.dim() == 3 and in_chans == 1:
            x = x.unsqueeze(1)
        if x.dim() != 4 or x.shape[1] != in_chans:
            raise ValueError(
                f"timm image inputs must be (n, {in_chans}, H, W){' or (n, H, W)' if in_chans == 1 else ''}, "
                f"got shape {tuple(x.shape)}"
            )
        p = next(net.parameters())
        return {"x": x.to(device=device, dtype=p.dtype)}

    def features(self, net, batch):
        return net.forward_head(net.forward_features(batch["x"]), pre_logits=True)

    def logits(self, net, batch):
        return net(batch["x"])

    def token_mask(self, batch):
        return None

    def feature_dim(self, net):
        return int(net.num_features)

    def head_path(self, net):
        return "head"

    def num_classes(self, net):
        return int(net.num_classes)

    def replace_head(self, net, num_classes):
        net.reset_classifier(num_classes)


@register_source
class HFSource(Source):
    name = "hf"
    ARCH_ADAPTERS = {
        "llama": "hf_gated_mlp",
        "qwen2": "hf_gated_mlp",
        "qwen3": "hf_gated_mlp",
        "mistral": "hf_gated_mlp",
        "bert": "hf_bert_ffn",
    }
    ARCH_TASKS = {"bert": ("sequence_classification",)}
    DECODER_TASKS = ("causal_lm",)

    def families(self) -> List[Dict[str, Any]]:
        import transformers

        out = []
        for arch, adapter_name in self.ARCH_ADAPTERS.items():
            try:
                transformers.AutoConfig.for_model(arch)
                refused = {}
            except Exception as exc:  # a model_type this transformers version does not know
                refused = {f"hf:{arch}": f"not in this transformers version ({_first_line(exc)})"}
            tasks = self.tasks(arch)
            note = f"transformers model_type '{arch}'; " + _adapter_note(adapter_name, tasks)
            out.append(dict(source=self.name, family=arch, adapter=adapter_name, tasks=list(tasks),
                            names=[] if refused else [f"hf:{arch}"], refused=refused, note=note))
        return out

    def adapter_for(self, arch):
        if arch not in self.ARCH_ADAPTERS:
            raise ValueError(
                f"unknown transformers architecture {arch!r} for source 'hf'; known: {', '.join(self.ARCH_ADAPTERS)}"
            )
        return ADAPTERS[self.ARCH_ADAPTERS[arch]]

    def tasks(self, arch):
        return self.ARCH_TASKS.get(arch, self.DECODER_TASKS)

    def default_task(self, arch):
        return self.tasks(arch)[0]

    def _auto_class(self, task):
        import transformers

        return {
            "causal_lm": transformers.AutoModelForCausalLM,
            "sequence_classification": transformers.AutoModelForSequenceClassification,
        }[task]

    def build(self, arch, task, checkpoint, num_classes, overrides, progress=True):
        import transformers

        self.adapter_for(arch)
        if task not in self.tasks(arch):
            raise ValueError(
                f"task={task!r} is not available for hf:{arch}; available: {', '.join(self.tasks(arch))}"
            )
        kwargs = dict(overrides)
        if num_classes is not None:
            if task != "sequence_classification":
                raise ValueError(
                    f"num_classes applies to classification models; hf:{arch} with task={task!r} predicts tokens"
                )
            kwargs["num_labels"] = num_classes
        if checkpoint is None:
            default = transformers.AutoConfig.for_model(arch)
            unknown = sorted(k for k in kwargs if not hasattr(default, k))
            if unknown:
                raise ValueError(f"unknown config field(s) for hf:{arch}: {', '.join(unknown)}")
            config = transformers.AutoConfig.for_model(arch, **kwargs)
            return self._auto_class(task).from_config(config)
        if not checkpoint.is_dir():
            raise ValueError(
                f"hf checkpoints are folders written by save_pretrained/save_seed_model; {checkpoint} is a file"
            )
        if not (checkpoint / "config.json").is_file():
            raise FileNotFoundError(f"transformers checkpoint folder {checkpoint} has no config.json")
        config = transformers.AutoConfig.from_pretrained(str(checkpoint), local_files_only=True)
        if config.model_type != arch:
            raise ValueError(
                f"checkpoint {checkpoint} holds transformers model_type {config.model_type!r}, not {arch!r}"
            )
        with progress_bars(progress):
            return self._auto_class(task).from_pretrained(str(checkpoint), local_files_only=True, **kwargs)

    def save(self, net, directory: Path, progress: bool = True) -> None:
        with progress_bars(progress):
            net.save_pretrained(str(directory), safe_serialization=True)

    # ---- running
    def prepare(self, net, data, device):
        if isinstance(data, Mapping):
            if "input_ids" not in data:
                raise ValueError(f"token inputs as a mapping need 'input_ids', got keys {sorted(data)}")
            ids = torch.as_tensor(data["input_ids"])
            mask = data.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
        else:
            ids = torch.as_tensor(data)
            mask = torch.ones_like(ids)
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"token ids must be integers, got {ids.dtype}")
        if ids.dim() != 2 or mask.shape != ids.shape:
            raise ValueError(
                f"token ids must be (n, seq_len) with an attention_mask of the same shape; got {tuple(ids.shape)}"
                f" and {tuple(mask.shape)}"
            )
        vocab = net.config.vocab_size
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(
                f"token ids must lie in [0, vocab_size={vocab}), got [{int(ids.min())}, {int(ids.max())}]"
            )
        return {
            "input_ids": ids.to(device=device, dtype=torch.long),
            "attention_mask": mask.to(device=device, dtype=torch.long),
        }

    def _is_causal(self, net):
        return getattr(net, "lm_head", None) is not None

    def features(self, net, batch):
        if self._is_causal(net):
            # what lm_head sees, averaged over the valid tokens: (B, D)
            h = net.model(**batch).last_hidden_state
            m = batch["attention_mask"].to(h.dtype).unsqueeze(-1)
            return (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        # BERT: the pooler output (what the classifier sees, before dropout)
        return net.bert(**batch).pooler_output

    def logits(self, net, batch):
        return net(**batch).logits

    def token_mask(self, batch):
        return batch["attention_mask"].bool()

    def feature_dim(self, net):
        return int(net.config.hidden_size)

    def head_path(self, net):
        return None if self._is_causal(net) else "classifier"

    def num_classes(self, net):
        return None if self._is_causal(net) else int(net.config.num_labels)

    def replace_head(self, net, num_classes):
        if self._is_causal(net):
            raise ValueError("a causal LM predicts tokens; it has no classification head to replace")
        old = net.classifier
        net.classifier = nn.Linear(
            old.in_features, num_classes, dtype=old.weight.dtype, device=old.weight.device
        )
        net.classifier.weight.data.normal_(mean=0.0, std=getattr(net.config, "initializer_range", 0.02))
        net.classifier.bias.data.zero_()
        net.num_labels = num_classes
        net.config.num_labels = num_classes


# --------------------------------------------------------------------------- the seed model


class SeedModel(nn.Module):
    """A seed model of a registered source: the library's own module plus what metamoe needs to run it.

    Attributes:
        net: the timm / transformers module (its parameters and state dict are the seed's).
        name: ``"source:arch"`` as given to :func:`create_seed_model`.
        source, arch, task: parsed parts and the task (``image_classification``, ``sequence_classification``,
            ``causal_lm``).
        adapter: the FFN adapter declared for this architecture.

    Inputs (``data`` below): timm: float images (n, C, H, W), or (n, H, W) when ``in_chans == 1``;
    transformers: integer token ids (n, L) or a mapping with ``input_ids`` and ``attention_mask`` (n, L).
    NumPy arrays and torch tensors are both accepted.
    """

    def __init__(self, net: nn.Module, *, name: str, task: str, adapter: FFNAdapter):
        super().__init__()
        self.net = net
        self.name = name
        self.source, self.arch = parse_model_name(name)
        self.task = task
        self.adapter_name = adapter.name
        self.ffn_layers()  # validates the module layout against the adapter now, not at first use

    @property
    def adapter(self) -> FFNAdapter:
        return ADAPTERS[self.adapter_name]

    @property
    def _impl(self) -> Source:
        return SOURCES[self.source]

    # ---- data
    @staticmethod
    def num_samples(data) -> int:
        """Number of samples in ``data`` (array, tensor, or mapping of them)."""
        if isinstance(data, Mapping):
            return int(len(data["input_ids"]))
        return int(len(data))

    @staticmethod
    def take(data, index):
        """Rows ``index`` (slice, int array or tensor) of ``data``; mappings are indexed key by key."""
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        if isinstance(data, Mapping):
            return {k: (None if v is None else v[index]) for k, v in data.items()}
        return data[index]

    def prepare(self, data) -> Dict[str, torch.Tensor]:
        """Validated model inputs on the model's device, as keyword arguments for the source's forward."""
        dev = next(self.net.parameters()).device
        return self._impl.prepare(self.net, data, dev)

    # ---- running
    def forward(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits: (B, num_classes) float for classifiers, (B, L, vocab) for a causal LM. ``batch`` from
        :meth:`prepare`."""
        return self._impl.logits(self.net, batch)

    def features(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The pooled representation the head sees: (B, feature_dim) in the model's dtype.

        timm ViT: ``forward_head(..., pre_logits=True)``; BERT: the pooler output; causal LM: the final hidden
        state (after the last norm) averaged over the tokens where ``attention_mask`` is 1.
        """
        return self._impl.features(self.net, batch)

    def token_mask(self, batch) -> Optional[torch.Tensor]:
        """(B, T) bool of the tokens that count in FFN-input averages, or None when every token counts."""
        return self._impl.token_mask(batch)

    @property
    def feature_dim(self) -> int:
        return self._impl.feature_dim(self.net)

    @property
    def num_classes(self) -> Optional[int]:
        """Classes of the head, or None for a causal LM."""
        return self._impl.num_classes(self.net)

    @property
    def head_path(self) -> Optional[str]:
        """Dotted path of the classification head inside ``net``, None for a causal LM."""
        return self._impl.head_path(self.net)

    def head(self) -> Optional[nn.Module]:
        p = self.head_path
        return None if p is None else self.net.get_submodule(p)

    def replace_head(self, num_classes: int, *, seed: Optional[int] = None) -> nn.Module:
        """A fresh classification head with ``num_classes`` outputs (initialised under ``seed``); returns it."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        with seeded(seed):
            self._impl.replace_head(self.net, num_classes)
        return self.head()

    def ffn_layers(self) -> List[FFNLayer]:
        """The FFN sublayers in depth order (see :class:`metamoe.models.ffn.FFNLayer`)."""
        return self.adapter.layers(self.net)

    def save(self, directory: PathLike) -> Path:
        """Write the model with its library's own format (timm ``save_for_hf`` / transformers ``save_pretrained``)."""
        return save_seed_model(self, directory)


def create_seed_model(
    name: str,
    *,
    checkpoint: Optional[PathLike] = None,
    num_classes: Optional[int] = None,
    task: Optional[str] = None,
    seed: Optional[int] = None,
    progress: bool = True,
    **config: Any,
) -> SeedModel:
    """Build a seed model by name, randomly initialised from a config or loaded from a local checkpoint.

    Args:
        name: ``"timm:<arch>"`` (a timm VisionTransformer architecture, e.g. ``"timm:vit_tiny_patch16_224"``)
            or ``"hf:<model_type>"`` (``llama``, ``qwen2``, ``qwen3``, ``mistral``: decoders; ``bert``: encoder).
        checkpoint: a local path. timm: a folder from :func:`save_seed_model` (``config.json`` +
            ``model.safetensors``) or a bare weights file (then ``config`` must rebuild the architecture);
            transformers: a ``save_pretrained`` folder. Missing path: FileNotFoundError naming it.
        num_classes: classifier outputs (timm ``num_classes``, transformers ``num_labels``); not for a causal LM.
        task: ``image_classification`` (timm), ``causal_lm`` (decoders) or ``sequence_classification`` (bert);
            the source's default when None.
        seed: if given, any random initialisation runs under ``torch.manual_seed(seed)`` (global RNG restored after).
        progress: False: no progress bar while a checkpoint loads (transformers' setting is restored after).
        **config: architecture overrides: timm ``create_model`` kwargs (``img_size``, ``patch_size``,
            ``in_chans``, ``embed_dim``, ``depth``, ``num_heads``, ...) or transformers config fields
            (``hidden_size``, ``num_hidden_layers``, ``vocab_size``, ...). Unknown transformers fields are an error.

    Returns:
        A :class:`SeedModel` in eval mode, float32, on the CPU.
    """
    source_name, arch = parse_model_name(name)
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {progress!r}")
    source = SOURCES[source_name]
    adapter = source.adapter_for(arch)
    task = source.default_task(arch) if task is None else task
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    path = None
    if checkpoint is not None:
        if not isinstance(checkpoint, (str, os.PathLike)):
            raise TypeError(
                f"checkpoint must be a path (str or os.PathLike), got {type(checkpoint).__name__}"
            )
        path = Path(checkpoint).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"checkpoint for {name!r} not found: {path} (nothing is downloaded; give a local path)"
            )
    with seeded(seed):  # random init (or a re-initialised head on a checkpoint) under the seed
        net = source.build(arch, task, path, num_classes, config, progress=progress)
    net.eval()
    return SeedModel(net, name=name, task=task, adapter=adapter)


def save_seed_model(model: SeedModel, directory: PathLike, *, progress: bool = True) -> Path:
    """Save ``model`` to ``directory`` with its library's own code (safetensors weights + ``config.json``).

    A LoRA-wrapped model is refused (save the seed before wrapping; LoRA weights go into expert packages).
    Returns the folder; :func:`create_seed_model` with ``checkpoint=directory`` reloads it. ``progress=False``:
    no progress bar while writing.
    """
    if not isinstance(model, SeedModel):
        raise TypeError(f"model must be a SeedModel, got {type(model).__name__}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {progress!r}")
    if any(isinstance(m, LoRALinear) for m in model.net.modules()):
        raise ValueError(
            "model has LoRA adapters; save the seed model before apply_lora (LoRA weights go into packages)"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    SOURCES[model.source].save(model.net, directory, progress=progress)
    mode = 0o666 & ~current_umask()
    for weights in directory.glob("*.safetensors"):  # safetensors creates its files 0600
        os.chmod(weights, mode)
    return directory


def supported_seed_architectures() -> List[Dict[str, Any]]:
    """The seed-model architectures each registered source serves, from its own adapter tables.

    One entry per family (a timm module, a transformers ``model_type``): ``source``, ``family``, ``adapter``
    (the FFN adapter LoRA wraps), ``tasks``, ``names`` (the ``"source:arch"`` names :func:`create_seed_model`
    accepts), ``refused`` (name -> why not: an FFN layout the adapter cannot wrap, or a model type the installed
    library lacks) and a one-line ``note``. A source whose library does not import gives one entry with no
    names and the import error as its note.
    """
    out: List[Dict[str, Any]] = []
    for source in SOURCES.values():
        try:
            out.extend(source.families())
        except ImportError as exc:
            out.append({
                "source": source.name, "family": None, "adapter": None, "tasks": [], "names": [], "refused": {},
                "note": f"not available ({type(exc).__name__}: {exc})",
            })
    return out


# --------------------------------------------------------------------------- hashing


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def weight_hash(model: Union[SeedModel, nn.Module]) -> str:
    """sha256 (hex) of the model's state dict: keys sorted, each as key, dtype, shape and little-endian bytes.

    LoRA parameters are left out and LoRA-wrapped linears hash as the plain linears they wrap, so a seed
    model hashes the same before and after :func:`metamoe.models.lora.apply_lora`; a merged LoRA model is
    refused (its base weights hold the update).
    """
    net = model.net if isinstance(model, SeedModel) else model
    if not isinstance(net, nn.Module):
        raise TypeError(f"model must be a SeedModel or torch.nn.Module, got {type(model).__name__}")
    if any(isinstance(m, LoRALinear) and m.merged for m in net.modules()):
        raise ValueError("model has merged LoRA weights; unmerge before hashing the seed weights")
    sd = {k: v for k, v in net.state_dict().items() if not (k.endswith(".lora_A") or k.endswith(".lora_B"))}
    h = hashlib.sha256()
    for key in sorted(sd):
        t = sd[key]
        h.update(key.encode())
        h.update(b"\0")
        h.update(str(t.dtype).encode())
        h.update(json.dumps(list(t.shape)).encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()
