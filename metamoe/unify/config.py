"""The YAML configs of ``metamoe train-expert``, ``metamoe unify`` and ``metamoe embed-pool``.

The key templates (:data:`CLIENT_YAML`, :data:`SERVER_YAML`), :func:`load_config`, the typed readers that
name the offending key in a :class:`ConfigError`, and the seed model a config describes
(:func:`seed_model_from_config`).

Seed model (``seed_model``, the same on every client and on the server; packages record its weight hash):
``name`` (``timm:<arch>`` or ``hf:<model_type>``), ``checkpoint`` (a local folder from
:func:`metamoe.models.save_seed_model` / ``save_pretrained``; recommended), or ``config`` (architecture fields)
with ``seed`` (random-init seed) to build it from scratch; ``num_classes`` (classification head size).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from ..utils.checks import check_float, check_int
from .router_training import RouterTraining

CLIENT_YAML = """\
client.yaml keys (required: seed_model.name, private, public, output):
  client_name: str           name of this client; private classes are named "<client_name>:<class>" (default: the
                             output folder's name)
  seed_model:
    name: timm:<arch> | hf:<model_type>
    checkpoint: PATH         local seed checkpoint folder (recommended; same file on every client and the server)
    config: {..}             architecture fields when building from scratch (e.g. img_size, patch_size, in_chans,
                             embed_dim, depth, num_heads for timm; hidden_size, num_hidden_layers, vocab_size for hf)
    seed: 0                  random-init seed when building from scratch
    num_classes: int         size of the seed's own classification head (optional)
  private: DATA              the client's labelled private data (never leaves the client)
  public: DATA               the public pool (labels required for classification: the proxies' labels)
  selection:
    method: dpp              dpp (relevance-weighted DPP, default) | facility_location (over the private set) |
                             top_relevance | random; the short spellings fl and topk are accepted
    k: 100                   proxies to select (<= pool size)
    kernel: rbf              DPP kernel: rbf (default) | cosine
    relevance_epochs: 5      epochs of the private-vs-public relevance classifier
    features: pooled         what relevance and selection see: pooled (the head's input, default) | context
                             (every FFN layer's mean input, concatenated) | pooled+context (both; the digits
                             harness's choice, where the seed's head input hardly tells domains apart)
  training:
    lora_rank: 8             LoRA rank on every FFN projection
    epochs: 5                expert training epochs (private data + proxies)
    lr: 0.001                AdamW learning rate
    batch_size: 64
    seed: 0                  LoRA/head init and shuffling
    align: true              false: train on private data only (the no_alignment ablation)
  output: PATH               the expert package folder to write
  overwrite: false           replace an existing package (or --overwrite)
DATA = {path: PATH, labels: PATH (.npy), x_key: str, y_key: str, class_names: [..], image_size: [H, W] or int,
        channels: 1|3}"""

_TRAINING = RouterTraining()  # server.yaml's training defaults: train_router's (the digits demo's)


def _yaml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value)


SERVER_YAML = f"""\
server.yaml keys (required: seed_model, packages, public, output):
  seed_model: {{name, checkpoint | config + seed, num_classes}}   the same seed model as the clients'
  packages: [PATH, ...]      expert package folders (one expert each, in expert order)
  public: DATA               the same public pool the clients selected from (labels: the proxies' labels)
  moe:
    top_k: 2                 experts per token (default min(2, number of experts))
    context_routing: true    two-pass context-aware routing (false: route on tokens alone)
    routed_head: true        weigh each client's private classes by the sample's routing to its expert
    router_init_scale: 4.0   norm of each prototype-initialised router row
  training:                  (defaults: metamoe.unify.RouterTraining's, the digits demo's)
    epochs: {_yaml(_TRAINING.epochs):<17}router training epochs on the union of the proxies
    lr: {_yaml(_TRAINING.lr):<21}AdamW learning rate
    batch_size: {_yaml(_TRAINING.batch_size):<13}proxies per step
    seed: {_yaml(_TRAINING.seed):<19}shuffling
    train_lora: {_yaml(_TRAINING.train_lora):<13}also fine-tune the experts' LoRA factors
    loss: block              block: cross-entropy over the public classes only (the proxies' labels); full: over
                             the whole unified label space
    route_loss: {_yaml(_TRAINING.route_loss_coef):<13}the proxies supervise the routers: each proxy is sent towards
                             the expert of the client(s) that picked it, with this weight (as the digits
                             harness's metamoe); 0: the task + load-balancing loss only
    checkpoint_every: {_yaml(_TRAINING.checkpoint_every):<7}steps between checkpoints (in OUTPUT/checkpoints; a rerun
                             resumes from them)
  output: PATH               the unified model folder to write (unified.json, written last, records this config;
                             a run with another config first moves an earlier result to OUTPUT/previous)
DATA as in client.yaml."""


class ConfigError(ValueError):
    """A configuration problem, with the key that is wrong."""


def load_config(path: Any) -> Dict[str, Any]:
    """Read a YAML mapping from ``path``; relative data/model paths in it are resolved against its folder."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        cfg = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{p}: the config must be a YAML mapping, got {type(cfg).__name__}")
    cfg["_base"] = str(p.resolve().parent)
    return cfg


def resolve_path(base: Optional[str], path: Any, key: str) -> Path:
    """``path`` (a config value named ``key``) resolved against the config's folder ``base`` (None: as given)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ConfigError(f"{key} must be a path, got {path!r}")
    p = Path(path).expanduser()
    return p if p.is_absolute() or base is None else Path(base) / p


def check_keys(d: Dict[str, Any], allowed: Sequence[str], where: str) -> None:
    """ConfigError naming the keys of ``d`` (the mapping ``where``) that are not ``allowed`` ("_" keys pass)."""
    bad = sorted(k for k in d if k not in allowed and not k.startswith("_"))
    if bad:
        raise ConfigError(f"unknown key(s) {bad} in {where}; allowed: {', '.join(allowed)}")


def read_section(cfg: Dict[str, Any], key: str, allowed: Sequence[str]) -> Dict[str, Any]:
    """The mapping ``cfg[key]`` (empty if absent) holding only ``allowed`` keys."""
    d = cfg.get(key) or {}
    if not isinstance(d, dict):
        raise ConfigError(f"{key} must be a mapping")
    check_keys(d, allowed, key)
    return d


def read_int(d: Dict[str, Any], key: str, default: Any, where: str, lo: int = 1) -> int:
    """``d[key]`` (or ``default``) as an int >= ``lo``."""
    try:
        return check_int(d.get(key, default), f"{where}.{key}", lo)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def read_float(
    d: Dict[str, Any], key: str, default: Any, where: str, lo: float = 0.0, inclusive: bool = False
) -> float:
    """``d[key]`` (or ``default``) as a finite number > ``lo`` (>= ``lo`` when ``inclusive``)."""
    name = f"{where}.{key}"
    try:
        v = check_float(d.get(key, default), name, lo)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    if v == lo and not inclusive:
        raise ConfigError(f"{name} must be > {lo:g}, got {v:g}")
    return v


def read_bool(d: Dict[str, Any], key: str, default: bool, where: str) -> bool:
    """``d[key]`` (or ``default``) as YAML's true/false; a quoted "false" (truthy under bool()) is refused."""
    v = d.get(key, default)
    if not isinstance(v, bool):
        raise ConfigError(f"{where}.{key} must be true or false, got {v!r}")
    return v


def seed_model_from_config(cfg: Dict[str, Any], base: Optional[str], progress: bool = True):
    """The seed model ``cfg["seed_model"]`` describes (module docstring); paths resolve against ``base``.
    ``progress=False``: no progress bar while a checkpoint loads (``--quiet``)."""
    from ..models import create_seed_model

    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {progress!r}")

    sm = cfg.get("seed_model")
    if not isinstance(sm, dict) or "name" not in sm:
        raise ConfigError("seed_model must be a mapping with 'name' (timm:<arch> or hf:<model_type>)")
    check_keys(sm, ("name", "checkpoint", "config", "seed", "num_classes", "task"), "seed_model")
    conf = sm.get("config") or {}
    if not isinstance(conf, dict):
        raise ConfigError("seed_model.config must be a mapping of architecture fields")
    conf = dict(conf)
    num_classes = sm.get("num_classes")
    if "num_classes" in conf:
        if num_classes is not None and num_classes != conf["num_classes"]:
            raise ConfigError("seed_model.num_classes and seed_model.config.num_classes disagree")
        num_classes = conf.pop("num_classes")
    ckpt = resolve_path(base, sm["checkpoint"], "seed_model.checkpoint") if sm.get("checkpoint") else None
    if ckpt is None and "seed" not in sm:
        raise ConfigError(
            "seed_model without checkpoint needs 'seed' (the random init must be identical on every client and "
            "the server)"
        )
    return create_seed_model(
        sm["name"],
        checkpoint=ckpt,
        num_classes=num_classes,
        task=sm.get("task"),
        seed=sm.get("seed"),
        progress=progress,
        **conf,
    )


__all__ = [
    "CLIENT_YAML",
    "SERVER_YAML",
    "ConfigError",
    "load_config",
    "resolve_path",
    "check_keys",
    "read_section",
    "read_int",
    "read_float",
    "read_bool",
    "seed_model_from_config",
]
