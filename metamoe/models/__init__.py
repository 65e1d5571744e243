"""Seed models (timm and transformers) by name, their FFN sublayers, and LoRA on every FFN.

``create_seed_model("timm:vit_tiny_patch16_224", ...)`` / ``create_seed_model("hf:llama", ...)`` build a seed from a
config (random init) or load it from a local checkpoint; :func:`apply_lora` wraps every FFN projection.
Importing this package imports torch, and timm / transformers only when a model of that source is built.
"""

from .ffn import ADAPTERS, FFNAdapter, FFNLayer, ffn_input_hooks, ffn_weights
from .lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    has_lora,
    load_lora_state_dict,
    lora_modules,
    lora_state_dict,
    merge_lora,
    merged,
    remove_lora,
    trainable_parameters,
    unmerge_lora,
)
from .registry import (
    SOURCES,
    SeedModel,
    create_seed_model,
    parse_model_name,
    register_source,
    save_seed_model,
    supported_seed_architectures,
    weight_hash,
)

__all__ = [
    "ADAPTERS",
    "FFNAdapter",
    "FFNLayer",
    "ffn_input_hooks",
    "ffn_weights",
    "LoRAConfig",
    "LoRALinear",
    "apply_lora",
    "has_lora",
    "load_lora_state_dict",
    "lora_modules",
    "lora_state_dict",
    "merge_lora",
    "merged",
    "remove_lora",
    "trainable_parameters",
    "unmerge_lora",
    "SOURCES",
    "SeedModel",
    "create_seed_model",
    "parse_model_name",
    "register_source",
    "save_seed_model",
    "supported_seed_architectures",
    "weight_hash",
]
