"""Drop-in metamoe MoE blocks for transformers models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE).

:func:`patch_moe` walks a transformers model and replaces every sparse MoE block whose class is one of the
registered architectures by a :class:`MetaMoeSparseMoeBlock` that routes with :func:`metamoe.ops.router_topk`
(fused softmax + top-k + statistics) and runs the experts with :func:`metamoe.ops.moe_experts` (grouped
Triton kernels on a GPU, PyTorch elsewhere). Nothing is copied: the new block holds the original router,
experts (and shared-expert) modules, so every Parameter is the same object, with the same storage, and the
state dict keeps its keys (``save_pretrained`` / ``from_pretrained`` work unchanged after patching).

Each architecture is declared by name with its block class, its router class and its converter (timm-style:
no guessing from state-dict keys), and the converter encodes that architecture's routing semantics:

========== ===================================== ======================================================
arch       renormalise the top-k probabilities   routing weights given to the experts
========== ===================================== ======================================================
mixtral    always                                float32 (the softmax's dtype); router jitter in training
qwen2_moe  ``config.norm_topk_prob``             cast to the logits' dtype; plus the sigmoid-gated
                                                 shared expert
qwen3_moe  ``config.norm_topk_prob``             cast to the logits' dtype
olmoe      ``config.norm_topk_prob``             cast to the logits' dtype
========== ===================================== ======================================================

``output_router_logits`` keeps working: transformers records the router logits with a forward hook on
instances of the router class (``OutputRecorder(MixtralTopKRouter, index=0)``). The router *instance* is kept
(hooks already installed on it stay) and its class is switched to a subclass of the original router class
whose forward computes the logits the same way and routes with metamoe; its output tuple still starts with
the logits. The new block also exposes ``aux_loss`` (Switch load balancing, metamoe's normalisation: 1 when
uniform) and ``z_loss`` after each forward.

Where transformers has the pluggable experts interface (``transformers.integrations.moe.ExpertsInterface``,
transformers >= 5), :func:`register_experts_implementation` also registers metamoe's experts there, so that
``model.set_experts_implementation("metamoe")`` uses the metamoe kernels inside the original blocks.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backends.registry import check_backend
from ..moe.losses import load_balancing_loss, z_loss

__all__ = [
    "ARCHITECTURES",
    "MetaMoeSparseMoeBlock",
    "MoEArchitecture",
    "available_architectures",
    "metamoe_experts_forward",
    "patch_moe",
    "register_architecture",
    "register_experts_implementation",
]

EXPERTS_IMPLEMENTATION_NAME = "metamoe"


@dataclass(frozen=True)
class MoEArchitecture:
    """One transformers MoE architecture metamoe can replace, declared by name.

    Attributes:
        name: short name (``"mixtral"``).
        module: the transformers modeling module that defines the classes.
        block: class name of the sparse MoE block that :func:`patch_moe` replaces.
        router: class name of its top-k router (the class transformers records ``router_logits`` from).
        converter: ``converter(block, arch, backend) -> MetaMoeSparseMoeBlock``.
    """

    name: str
    module: str
    block: str
    router: str
    converter: Callable[..., nn.Module]

    def classes(self) -> Optional[Tuple[type, type]]:
        """(block class, router class), or None when the installed transformers does not have them."""
        try:
            mod = importlib.import_module(self.module)
        except Exception:  # not in this transformers version (or transformers missing)
            return None
        block, router = getattr(mod, self.block, None), getattr(mod, self.router, None)
        if block is None or router is None:
            return None
        return block, router


ARCHITECTURES: Dict[str, MoEArchitecture] = {}


def register_architecture(name: str, module: str, block: str, router: str):
    """Decorator registering ``converter`` for the architecture ``name`` (see :class:`MoEArchitecture`)."""

    def deco(converter: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in ARCHITECTURES:
            raise ValueError(f"MoE architecture {name!r} is already registered")
        ARCHITECTURES[name] = MoEArchitecture(name, module, block, router, converter)
        return converter

    return deco


def available_architectures() -> List[str]:
    """Names of the registered architectures the installed transformers has."""
    return [name for name, arch in ARCHITECTURES.items() if arch.classes() is not None]


# --------------------------------------------------------------------------- router subclass

_ROUTER_CLASSES: Dict[type, type] = {}


def _metamoe_router_class(base: type) -> type:
    """A subclass of transformers' router class ``base`` whose forward routes with metamoe's router_topk."""
    cls = _ROUTER_CLASSES.get(base)
    if cls is not None:
        return cls

    def forward(self, hidden_states: Tensor, return_stats: bool = False):
        """(router_logits (T, E), weights (T, k), indices (T, k) int64[, RouterStats]); logits first."""
        from ..ops.router_topk import router_topk

        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)  # (T, E)
        weights, indices, stats = router_topk(
            router_logits,
            self.top_k,
            renormalize=self._metamoe_renormalize,
            order="softmax_then_topk",
            return_stats=True,
            backend=self._metamoe_backend,
        )
        if self._metamoe_weights_in_logits_dtype:
            weights = weights.to(router_logits.dtype)
        if return_stats:
            return router_logits, weights, indices, stats
        return router_logits, weights, indices

    name = f"MetaMoe{base.__name__}"
    cls = type(name, (base,), {"forward": forward, "__module__": __name__, "__qualname__": name})
    _ROUTER_CLASSES[base] = cls
    return cls


def __getattr__(name: str):
    # Pickling a patched model refers to the router subclasses by name (e.g. MetaMoeMixtralTopKRouter);
    # build them on demand so that unpickling works in a fresh process too.
    if name.startswith("MetaMoe"):
        for arch in ARCHITECTURES.values():
            if arch.router == name[len("MetaMoe") :]:
                classes = arch.classes()
                if classes is not None:
                    return _metamoe_router_class(classes[1])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _adopt_router(
    gate: nn.Module,
    router_cls: type,
    *,
    renormalize: bool,
    weights_in_logits_dtype: bool,
    backend: Optional[str],
) -> nn.Module:
    if type(gate) is not router_cls:
        raise TypeError(f"expected the block's gate to be a {router_cls.__name__}, got {type(gate).__name__}")
    for attr in ("weight", "top_k", "hidden_dim"):
        if not hasattr(gate, attr):
            raise TypeError(
                f"{router_cls.__name__} has no attribute {attr!r}; this transformers version is not supported"
            )
    gate.__class__ = _metamoe_router_class(router_cls)  # same instance: same Parameter, same hooks
    gate._metamoe_renormalize = bool(renormalize)
    gate._metamoe_weights_in_logits_dtype = bool(weights_in_logits_dtype)
    gate._metamoe_backend = backend
    return gate


def _check_experts(experts: nn.Module, gate: nn.Module, where: str) -> None:
    """The experts module must be transformers' stacked SwiGLU layout that moe_experts takes."""
    for attr, want in (
        ("has_gate", True),
        ("has_bias", False),
        ("is_transposed", False),
        ("is_concatenated", True),
        ("_is_expert_parallel", False),
        ("has_post_expert_norm", False),
    ):
        if getattr(experts, attr, want) != want:
            raise ValueError(
                f"{where}: experts.{attr} = {getattr(experts, attr)!r}, metamoe supports {want!r}"
            )
    act = getattr(experts, "act_fn", None)
    if type(act).__name__ not in ("SiLUActivation", "SiLU"):
        raise ValueError(
            f"{where}: the experts' activation is {type(act).__name__}; "
            "metamoe's stacked experts implement SwiGLU "
            "(hidden_act='silu')"
        )
    gu, dn = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(gu, torch.Tensor) or not isinstance(dn, torch.Tensor) or gu.dim() != 3 or dn.dim() != 3:
        raise ValueError(f"{where}: experts must hold 3-D gate_up_proj (E, 2f, d) and down_proj (E, d, f)")
    E, d = gate.weight.shape
    f = dn.shape[2]
    if tuple(gu.shape) != (E, 2 * f, d) or tuple(dn.shape) != (E, d, f):
        raise ValueError(
            f"{where}: expected gate_up_proj {(E, 2 * f, d)} and down_proj {(E, d, f)}, "
            f"got {tuple(gu.shape)} and "
            f"{tuple(dn.shape)}"
        )


# --------------------------------------------------------------------------- the replacement block


class MetaMoeSparseMoeBlock(nn.Module):
    """A transformers sparse MoE block running on metamoe's router and experts ops, same submodules.

    Submodules (the original objects): ``gate`` (the router, class switched to its metamoe subclass),
    ``experts`` (stacked ``gate_up_proj`` (E, 2f, d) and ``down_proj`` (E, d, f)), and for Qwen2-MoE
    ``shared_expert`` and ``shared_expert_gate``.

    forward(hidden_states (batch, seq, d)) -> (batch, seq, d), like the block it replaces. After each forward,
    ``aux_loss`` (E * sum_e f_e P_e, f_e = fraction of routed (token, slot) pairs; transformers' own
    load-balancing loss is top_k times this) and ``z_loss`` (mean logsumexp^2) are set.
    """

    def __init__(
        self,
        original: nn.Module,
        arch: str,
        *,
        jitter_noise: float = 0.0,
        shared_expert: bool = False,
        backend: Optional[str] = None,
    ):
        super().__init__()
        self.arch = arch
        wanted = ("gate", "experts") + (("shared_expert", "shared_expert_gate") if shared_expert else ())
        # the original submodules, registered in the original order (same parameter order and state dict)
        for name, child in original.named_children():
            if name in wanted:
                self.add_module(name, child)
        missing = [n for n in wanted if n not in self._modules]
        if missing:
            raise ValueError(
                f"{type(original).__name__} has no {missing} submodules; "
                "this transformers version is not supported"
            )
        self.top_k = int(self.gate.top_k)
        self.num_experts = int(self.gate.weight.shape[0])
        self.jitter_noise = float(jitter_noise)
        self.has_shared_expert = shared_expert
        self.backend = backend
        self.aux_loss: Optional[Tensor] = None
        self.z_loss: Optional[Tensor] = None

    def forward(self, hidden_states: Tensor) -> Tensor:
        from ..ops.moe_experts import moe_experts

        batch_size, sequence_length, hidden_dim = hidden_states.shape
        if self.training and self.jitter_noise > 0:  # Mixtral's router jitter (multiplicative, training only)
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            hidden_states = hidden_states * noise
        x = hidden_states.reshape(-1, hidden_dim)
        _, weights, indices, stats = self.gate(x, return_stats=True)
        y = moe_experts(
            x,
            weights,
            indices,
            self.experts.gate_up_proj,
            self.experts.down_proj,
            activation="swiglu",
            backend=self.backend,
        )
        if self.has_shared_expert:
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        self.aux_loss = load_balancing_loss(stats.counts, stats.prob_mean)
        self.z_loss = z_loss(stats.lse)
        return y.reshape(batch_size, sequence_length, hidden_dim)

    def __getstate__(self):
        # the last forward's losses hold autograd graphs: not part of the module's state (deepcopy, pickle)
        state = self.__dict__.copy()
        state["aux_loss"] = state["z_loss"] = None
        return state

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, num_experts={self.num_experts}, top_k={self.top_k}, " + (
            f"backend={self.backend!r}"
        )


# --------------------------------------------------------------------------- converters, one per architecture


@register_architecture(
    "mixtral", "transformers.models.mixtral.modeling_mixtral", "MixtralSparseMoeBlock", "MixtralTopKRouter"
)
def _convert_mixtral(block: nn.Module, arch: MoEArchitecture, backend: Optional[str]) -> nn.Module:
    """Mixtral: softmax in float32, top-k, always renormalised; float32 weights; router jitter in training."""
    _, router_cls = arch.classes()
    _check_experts(block.experts, block.gate, arch.block)
    _adopt_router(block.gate, router_cls, renormalize=True, weights_in_logits_dtype=False, backend=backend)
    return MetaMoeSparseMoeBlock(
        block, arch.name, jitter_noise=getattr(block, "jitter_noise", 0.0), backend=backend
    )


@register_architecture(
    "qwen2_moe",
    "transformers.models.qwen2_moe.modeling_qwen2_moe",
    "Qwen2MoeSparseMoeBlock",
    "Qwen2MoeTopKRouter",
)
def _convert_qwen2_moe(block: nn.Module, arch: MoEArchitecture, backend: Optional[str]) -> nn.Module:
    """Qwen2-MoE: renormalise iff norm_topk_prob; weights in the logits' dtype; gated shared expert."""
    _, router_cls = arch.classes()
    _check_experts(block.experts, block.gate, arch.block)
    for name in ("shared_expert", "shared_expert_gate"):
        if not isinstance(getattr(block, name, None), nn.Module):
            raise ValueError(f"{arch.block} has no {name} module; this transformers version is not supported")
    _adopt_router(
        block.gate,
        router_cls,
        renormalize=bool(block.gate.norm_topk_prob),
        weights_in_logits_dtype=True,
        backend=backend,
    )
    return MetaMoeSparseMoeBlock(block, arch.name, shared_expert=True, backend=backend)


@register_architecture(
    "qwen3_moe",
    "transformers.models.qwen3_moe.modeling_qwen3_moe",
    "Qwen3MoeSparseMoeBlock",
    "Qwen3MoeTopKRouter",
)
def _convert_qwen3_moe(block: nn.Module, arch: MoEArchitecture, backend: Optional[str]) -> nn.Module:
    """Qwen3-MoE: renormalise iff norm_topk_prob; weights in the logits' dtype; no shared expert."""
    _, router_cls = arch.classes()
    _check_experts(block.experts, block.gate, arch.block)
    _adopt_router(
        block.gate,
        router_cls,
        renormalize=bool(block.gate.norm_topk_prob),
        weights_in_logits_dtype=True,
        backend=backend,
    )
    return MetaMoeSparseMoeBlock(block, arch.name, backend=backend)


@register_architecture(
    "olmoe", "transformers.models.olmoe.modeling_olmoe", "OlmoeSparseMoeBlock", "OlmoeTopKRouter"
)
def _convert_olmoe(block: nn.Module, arch: MoEArchitecture, backend: Optional[str]) -> nn.Module:
    """OLMoE: renormalise iff norm_topk_prob (False for OLMoE-1B-7B); weights in the logits' dtype."""
    _, router_cls = arch.classes()
    _check_experts(block.experts, block.gate, arch.block)
    _adopt_router(
        block.gate,
        router_cls,
        renormalize=bool(block.gate.norm_topk_prob),
        weights_in_logits_dtype=True,
        backend=backend,
    )
    return MetaMoeSparseMoeBlock(block, arch.name, backend=backend)


# --------------------------------------------------------------------------- public API


def patch_moe(model: nn.Module, *, backend: Optional[str] = None, register_experts: bool = True) -> int:
    """Replace the sparse MoE blocks of a transformers model by metamoe's, in place; returns how many.

    Blocks are recognised by their exact class (``MixtralSparseMoeBlock``, ``Qwen2MoeSparseMoeBlock``,
    ``Qwen3MoeSparseMoeBlock``, ``OlmoeSparseMoeBlock``: whichever the installed transformers has). The new
    blocks reuse the original Parameter objects (no copy, same ``data_ptr()``, same state-dict keys) and
    reproduce each architecture's routing (module docstring), so logits and gradients match the original
    model within floating-point rounding. Patching twice replaces nothing the second time.

    Args:
        model: any ``nn.Module`` (typically a ``PreTrainedModel``).
        backend: ``None``/``"auto"`` (fastest per call), ``"triton"`` or ``"torch"``, for the router and
            the experts.
        register_experts: also register ``"metamoe"`` in transformers' experts interface where it exists
            (:func:`register_experts_implementation`).

    Returns:
        The number of blocks replaced (0 when the model has none of the registered blocks).

    Raises:
        TypeError for a non-module ``model``; ValueError when a recognised block has a configuration metamoe
        does not implement (e.g. a non-SiLU activation, biases, expert parallelism), before anything changes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    backend = check_backend(backend)
    if register_experts:
        register_experts_implementation()
    block_types: Dict[type, MoEArchitecture] = {}
    for arch in ARCHITECTURES.values():
        classes = arch.classes()
        if classes is not None:
            block_types[classes[0]] = arch
    if not block_types:
        return 0
    targets = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            arch = block_types.get(type(child))
            if arch is not None:
                targets.append((parent, child_name, child, arch, f"{parent_name}.{child_name}".lstrip(".")))
    # validate every block before changing any, so a refusal leaves the model untouched
    for _, _, child, arch, where in targets:
        _check_experts(child.experts, child.gate, f"{where} ({arch.block})")
    for parent, child_name, child, arch, _ in targets:
        setattr(parent, child_name, arch.converter(child, arch, backend))
    return len(targets)


def metamoe_experts_forward(
    self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """transformers experts-interface entry: ``experts(hidden_states, top_k_index, top_k_weights)``.

    Shapes: hidden_states (T, d), top_k_index (T, k) integer, top_k_weights (T, k) floating.

    Runs :func:`metamoe.ops.moe_experts` on the experts module's stacked weights (``gate_up_proj`` (E, 2f, d)
    with SiLU, or ``up_proj`` (E, f, d) with GELU when the module has no gate). Returns (T, d) in the dtype of
    ``hidden_states``.
    """
    from ..ops.moe_experts import moe_experts

    if (
        getattr(self, "has_bias", False)
        or getattr(self, "is_transposed", False)
        or not getattr(self, "is_concatenated", True)
    ):
        raise ValueError(
            "the metamoe experts implementation supports non-transposed, bias-free, concatenated weights"
        )
    if getattr(self, "_is_expert_parallel", False) or getattr(self, "has_post_expert_norm", False):
        raise ValueError(
            "the metamoe experts implementation does not support expert parallelism or post-expert norms"
        )
    act = type(getattr(self, "act_fn", None)).__name__
    if getattr(self, "has_gate", True):
        if act not in ("SiLUActivation", "SiLU"):
            raise ValueError(f"the metamoe experts implementation needs SiLU for gated experts, got {act}")
        w1, activation = self.gate_up_proj, "swiglu"
    else:
        if act not in ("GELUActivation", "GELU"):
            raise ValueError(
                f"the metamoe experts implementation needs exact GELU for ungated experts, got {act}"
            )
        w1, activation = self.up_proj, "gelu"
    return moe_experts(hidden_states, top_k_weights, top_k_index, w1, self.down_proj, activation=activation)


def register_experts_implementation(name: str = EXPERTS_IMPLEMENTATION_NAME) -> bool:
    """Register metamoe in transformers' ``ExpertsInterface`` (``set_experts_implementation(name)``).

    Returns True when registered, False when the installed transformers has no experts interface.
    """
    try:
        from transformers.integrations.moe import ExpertsInterface
    except Exception:
        return False
    register = getattr(ExpertsInterface, "register", None)
    if register is None:
        return False
    register(name, metamoe_experts_forward)
    return True
