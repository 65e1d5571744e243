"""FFN adapters: where each seed model family keeps its FFN sublayers, declared by name, one per family.

An adapter answers three questions about a model of its family, without guessing from state-dict keys:

* which modules are the FFN sublayers, in depth order (:class:`FFNLayer`: the module whose forward input
  is the FFN input, and the linear projections by their native names with their role ``gate``/``up``/``down``);
* what activation sits between the projections;
* how to reach each FFN's input at run time (a forward pre-hook on the input module, :func:`ffn_input_hooks`).

Adapters (``ADAPTERS``):

* ``timm_vit_mlp``: timm VisionTransformer blocks, ``blocks.{i}.mlp`` = ``fc1`` (up) -> GELU -> ``fc2`` (down).
* ``hf_gated_mlp``: transformers LLaMA / Qwen2 / Qwen3 / Mistral decoders, ``model.layers.{i}.mlp`` =
  ``down_proj(act(gate_proj(x)) * up_proj(x))`` with SiLU.
* ``hf_bert_ffn``: transformers BERT encoders, ``bert.encoder.layer.{i}``: ``intermediate.dense`` (up) -> GELU
  -> ``output.dense`` (down); the FFN input is the input of ``intermediate`` (the residual and LayerNorm after
  ``output.dense`` are not part of the FFN).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .lora_linear import LoRALinear

ROLES = ("gate", "up", "down")


@dataclass(frozen=True)
class FFNLayer:
    """One FFN sublayer of a model.

    Attributes:
        index: depth position, 0-based.
        input_path: dotted path (``net.get_submodule``) of the module whose forward input is the FFN input,
            a (batch, tokens, hidden) float tensor.
        projections: native projection name -> dotted path of its ``nn.Linear`` (``{"fc1": "blocks.0.mlp.fc1", ...}``).
        roles: native projection name -> ``"gate"``, ``"up"`` or ``"down"``.
        activation: ``"gelu"``, ``"gelu_tanh"``, ``"silu"``, ... (what is applied to the up/gate projection).
        hidden_size: FFN input/output width D; ffn_size: inner width.
    """

    index: int
    input_path: str
    projections: Mapping[str, str]
    roles: Mapping[str, str]
    activation: str
    hidden_size: int
    ffn_size: int

    def linear(self, net: nn.Module, name: str) -> nn.Module:
        """The projection module called ``name`` (an ``nn.Linear`` or a LoRA-wrapped linear)."""
        if name not in self.projections:
            raise KeyError(
                f"FFN layer {self.index} has no projection {name!r}; it has {', '.join(self.projections)}"
            )
        return net.get_submodule(self.projections[name])


class FFNAdapter:
    """Base class: subclasses set ``name`` and implement :meth:`layers`."""

    name: str = ""
    projection_names: Tuple[str, ...] = ()

    def layers(self, net: nn.Module) -> List[FFNLayer]:  # pragma: no cover - abstract
        raise NotImplementedError

    def reference_ffn(
        self,
        layer: FFNLayer,
        weights: Mapping[str, Tuple[torch.Tensor, Optional[torch.Tensor]]],
        x: torch.Tensor,
    ) -> torch.Tensor:
        """The FFN computed from its weights alone (for tests and for the MoE conversion): (..., D) -> (..., D)."""
        act = _ACTIVATIONS[layer.activation]
        lin = {
            name: (lambda t, wb=wb: torch.nn.functional.linear(t, wb[0], wb[1]))
            for name, wb in weights.items()
        }
        by_role = {layer.roles[n]: f for n, f in lin.items()}
        if "gate" in by_role:
            return by_role["down"](act(by_role["gate"](x)) * by_role["up"](x))
        return by_role["down"](act(by_role["up"](x)))


def _gelu_tanh(x):
    return torch.nn.functional.gelu(x, approximate="tanh")


_ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": _gelu_tanh,
    "silu": torch.nn.functional.silu,
    "relu": torch.nn.functional.relu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def _activation_name(module: nn.Module, owner: str) -> str:
    """Name an activation module (torch, timm and transformers classes) or raise naming where it sits."""
    cls = type(module).__name__
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    if isinstance(module, nn.SiLU) or cls in ("SiLUActivation", "SiLU"):
        return "silu"
    if isinstance(module, nn.ReLU):
        return "relu"
    if cls == "GELUActivation":
        return "gelu"
    if cls in ("GELUTanh", "NewGELUActivation", "GELUPytorchTanh", "PytorchGELUTanh", "GELUTanhActivation"):
        return "gelu_tanh"
    if cls in ("QuickGELU", "QuickGELUActivation"):
        return "quick_gelu"
    raise ValueError(
        f"{owner}: activation {cls} is not one metamoe knows (gelu, gelu_tanh, silu, relu, quick_gelu)"
    )


class TimmViTMlp(FFNAdapter):
    name = "timm_vit_mlp"
    projection_names = ("fc1", "fc2")
    timm_modules = ("vision_transformer",)

    def layers(self, net):
        from timm.layers import Mlp

        blocks = getattr(net, "blocks", None)
        if blocks is None:
            raise ValueError(
                f"{self.name}: model {type(net).__name__} has no .blocks (not a timm VisionTransformer)"
            )
        out = []
        for i, block in enumerate(blocks):
            mlp = getattr(block, "mlp", None)
            if type(mlp) is not Mlp:
                raise ValueError(
                    f"{self.name}: blocks.{i}.mlp is {type(mlp).__name__}, "
                    "expected timm.layers.Mlp (fc1 -> act -> fc2); "
                    "gated (SwiGLU/GluMlp) ViT variants have no adapter yet"
                )
            if not isinstance(mlp.norm, nn.Identity):
                raise ValueError(
                    f"{self.name}: blocks.{i}.mlp has an inner norm ({type(mlp.norm).__name__}); not supported"
                )
            out.append(
                FFNLayer(
                    index=i,
                    input_path=f"blocks.{i}.mlp",
                    projections={"fc1": f"blocks.{i}.mlp.fc1", "fc2": f"blocks.{i}.mlp.fc2"},
                    roles={"fc1": "up", "fc2": "down"},
                    activation=_activation_name(mlp.act, f"blocks.{i}.mlp.act"),
                    hidden_size=mlp.fc1.in_features,
                    ffn_size=mlp.fc1.out_features,
                )
            )
        return out


class HFGatedMLP(FFNAdapter):
    name = "hf_gated_mlp"
    projection_names = ("gate_proj", "up_proj", "down_proj")

    def layers(self, net):
        base = getattr(net, "model", net)
        decoder_layers = getattr(base, "layers", None)
        if decoder_layers is None:
            raise ValueError(
                f"{self.name}: {type(net).__name__} has no .model.layers (not a LLaMA-style decoder)"
            )
        prefix = "model.layers" if base is not net else "layers"
        act = getattr(net.config, "hidden_act", None)
        if act not in ("silu", "swish"):
            raise ValueError(f"{self.name}: hidden_act={act!r}; the gated MLP adapter expects silu")
        out = []
        for i, layer in enumerate(decoder_layers):
            mlp = layer.mlp
            for p in self.projection_names:
                if not isinstance(getattr(mlp, p, None), (nn.Linear, LoRALinear)):
                    raise ValueError(
                        f"{self.name}: {prefix}.{i}.mlp has no nn.Linear {p!r} ({type(mlp).__name__})"
                    )
            out.append(
                FFNLayer(
                    index=i,
                    input_path=f"{prefix}.{i}.mlp",
                    projections={p: f"{prefix}.{i}.mlp.{p}" for p in self.projection_names},
                    roles={"gate_proj": "gate", "up_proj": "up", "down_proj": "down"},
                    activation="silu",
                    hidden_size=mlp.up_proj.in_features,
                    ffn_size=mlp.up_proj.out_features,
                )
            )
        return out


class HFBertFFN(FFNAdapter):
    name = "hf_bert_ffn"
    projection_names = ("intermediate.dense", "output.dense")

    def layers(self, net):
        encoder = getattr(getattr(net, "bert", net), "encoder", None)
        if encoder is None:
            raise ValueError(f"{self.name}: {type(net).__name__} has no .bert.encoder (not a BERT model)")
        prefix = "bert.encoder.layer" if hasattr(net, "bert") else "encoder.layer"
        out = []
        for i, layer in enumerate(encoder.layer):
            act = _activation_name(layer.intermediate.intermediate_act_fn, f"{prefix}.{i}.intermediate")
            out.append(
                FFNLayer(
                    index=i,
                    input_path=f"{prefix}.{i}.intermediate",
                    projections={p: f"{prefix}.{i}.{p}" for p in self.projection_names},
                    roles={"intermediate.dense": "up", "output.dense": "down"},
                    activation=act,
                    hidden_size=layer.intermediate.dense.in_features,
                    ffn_size=layer.intermediate.dense.out_features,
                )
            )
        return out


ADAPTERS: Dict[str, FFNAdapter] = {a.name: a for a in (TimmViTMlp(), HFGatedMLP(), HFBertFFN())}


def ffn_weights(net: nn.Module, layer: FFNLayer) -> Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """{projection name: (weight (out, in), bias (out,) or None)} of one FFN layer, the tensors themselves (no copy).

    For a LoRA-wrapped projection this is the frozen base weight; on a merged LoRA model it includes the
    merged update (unmerge first to read the seed's weights).
    """
    out = {}
    for name in layer.projections:
        lin = layer.linear(net, name)
        out[name] = (lin.weight, lin.bias)
    return out


@contextlib.contextmanager
def ffn_input_hooks(
    net: nn.Module, layers: List[FFNLayer], callback: Callable[[int, torch.Tensor], None]
) -> Iterator[None]:
    """Call ``callback(layer.index, x)`` with every FFN input ``x`` (batch, tokens, hidden) seen inside the block.

    Forward pre-hooks on each layer's input module; removed on exit, also on error.
    """
    handles = []
    try:
        for layer in layers:
            mod = net.get_submodule(layer.input_path)

            def hook(_m, args, kwargs, _i=layer.index):
                x = args[0] if args else next(iter(kwargs.values()))
                callback(_i, x)

            handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
