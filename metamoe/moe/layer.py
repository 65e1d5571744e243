"""Dropless top-k Mixture-of-Experts layer: router, stacked experts, load-balancing and z losses.

:class:`MoELayer` holds a router ``Linear(hidden, E, bias=False)`` and the experts stacked as
``[E, ...]`` tensors in transformers' ``MixtralExperts`` layouts (SwiGLU ``w_gate_up`` (E, 2f, d), gate = the
first f rows, up = the last f; GELU ``w_gate_up`` (E, f, d); ``w_down`` (E, d, f)). The forward pass is

    logits = router(router_input)                      (T, E)
    weights, indices, stats = router_topk(logits, k)    fused softmax + top-k (+ renormalise) + statistics
    y = moe_experts(x, weights, indices, w_gate_up, w_down)

with :func:`metamoe.ops.router_topk` and :func:`metamoe.ops.moe_experts` dispatched per call to the fastest
backend (Triton kernels on a GPU, PyTorch elsewhere). Nothing in the forward or backward pass reads a device
value on the host: no ``.item()``, no data-dependent Python branch, so the layer runs under CUDA graphs and
traces with ``torch.compile``. After each forward the layer exposes ``aux_loss`` (Switch load balancing),
``z_loss`` (ST-MoE) and ``router_logits``.

Options the MetaMoE unification needs (docs/design.md, "The method") live in the shared base class
:class:`RoutedMoEBase`: context-aware routing (router input ``(1 - lambda) * token + lambda * context``) and
router rows initialised from expert prototypes. The router's options are one :class:`RouterConfig`
(``router=RouterConfig(...)``, or the same options as keyword arguments). LoRA experts over one frozen shared FFN are
:class:`metamoe.moe.LoRAMoELayer` (``lora_experts.py``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..backends.registry import check_backend
from ..ops.moe_experts import ACTIVATIONS
from ..utils.checks import check_choice, check_float, check_int
from .losses import load_balancing_loss, z_loss
from .router_config import (
    DEFAULT_AUX_LOSS_COEF,
    DEFAULT_CONTEXT_LAMBDA,
    DEFAULT_Z_LOSS_COEF,
    ROUTER_ORDERS,
    RouterConfig,
    router_config_from,
)

__all__ = [
    "ACTIVATIONS",
    "DEFAULT_AUX_LOSS_COEF",
    "DEFAULT_CONTEXT_LAMBDA",
    "DEFAULT_Z_LOSS_COEF",
    "ROUTER_ORDERS",
    "MoELayer",
    "RoutedMoEBase",
    "RouterOutput",
]


class RouterOutput(NamedTuple):
    """What the router produced for the T tokens of one forward pass.

    Attributes:
        logits: (T, E) router logits, in the router weight's dtype.
        weights: (T, k) float32 (float64 for a float64 layer) routing weights, descending.
        indices: (T, k) int64 expert ids, ties to the lowest index.
        stats: :class:`metamoe.ops.RouterStats` (counts (E,) int64, prob_sum/prob_mean (E,), lse (T,)).
    """

    logits: Tensor
    weights: Tensor
    indices: Tensor
    stats: Any


# --------------------------------------------------------------------------- shared router logic


class RoutedMoEBase(nn.Module):
    """Router, context-aware routing, prototype init and auxiliary losses shared by the MoE layers.

    Subclasses provide the experts by implementing ``_experts(x, weights, indices) -> y``.

    The router's options are ``router_config`` (a :class:`RouterConfig`); ``top_k``, ``router_order``,
    ``renormalize``, ``aux_loss_coef``, ``z_loss_coef`` and ``context_routing`` read it.

    Attributes set by each forward (None before the first):
        aux_loss: 0-d tensor, Switch load-balancing loss ``E * sum_e f_e * P_e`` (f_e = fraction of the T*k
            routed (token, slot) pairs sent to expert e, P_e = mean router probability of e; 1 when uniform).
        z_loss: 0-d tensor, ``mean_t logsumexp(logits_t) ** 2``.
        router_logits: (T, E) logits of the last forward (what transformers' ``output_router_logits``
            reports).
    ``router_loss`` = ``aux_loss_coef * aux_loss + z_loss_coef * z_loss`` is what a training loop adds.
    """

    def __init__(
        self,
        hidden: int,
        num_experts: int,
        top_k: Optional[int] = None,
        *,
        router: Optional[RouterConfig] = None,
        backend: Optional[str] = "auto",
        router_order: Optional[str] = None,
        renormalize: Optional[bool] = None,
        aux_loss_coef: Optional[float] = None,
        z_loss_coef: Optional[float] = None,
        context_routing: Optional[bool] = None,
        context_lambda_init: Optional[float] = None,
        dtype: Optional[torch.dtype] = None,
        device: Optional[Any] = None,
    ):
        super().__init__()
        self.hidden = check_int(hidden, "hidden")
        self.num_experts = check_int(num_experts, "num_experts")
        cfg = router_config_from(
            router,
            top_k,
            router_order=router_order,
            renormalize=renormalize,
            aux_loss_coef=aux_loss_coef,
            z_loss_coef=z_loss_coef,
            context_routing=context_routing,
            context_lambda_init=context_lambda_init,
        )
        if cfg.top_k > self.num_experts:
            raise ValueError(f"top_k must be <= num_experts ({self.num_experts}), got top_k={cfg.top_k}")
        self.router_config = cfg
        self.backend = check_backend(backend)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        factory = {"dtype": dtype, "device": device}
        self.router = nn.Linear(self.hidden, self.num_experts, bias=False, **factory)
        if cfg.context_routing:
            lam = cfg.context_lambda_init
            # lambda = sigmoid(context_lambda_logit) stays in [0, 1] whatever the optimiser does.
            self.context_lambda_logit = nn.Parameter(torch.full((), math.log(lam / (1.0 - lam)), **factory))
        else:
            self.register_parameter("context_lambda_logit", None)
        self.aux_loss: Optional[Tensor] = None
        self.z_loss: Optional[Tensor] = None
        self.router_logits: Optional[Tensor] = None

    def __getstate__(self):
        # the last forward's losses and logits hold autograd graphs: not part of the state (deepcopy, pickle)
        state = self.__dict__.copy()
        state["aux_loss"] = state["z_loss"] = state["router_logits"] = None
        return state

    # ------------------------------------------------------------------ properties

    @property
    def top_k(self) -> int:
        """Experts per token (``router_config.top_k``)."""
        return self.router_config.top_k

    @property
    def router_order(self) -> str:
        """``router_config.order``: ``"softmax_then_topk"`` or ``"topk_then_softmax"``."""
        return self.router_config.order

    @property
    def renormalize(self) -> bool:
        return self.router_config.renormalize

    @property
    def aux_loss_coef(self) -> float:
        return self.router_config.aux_loss_coef

    @property
    def z_loss_coef(self) -> float:
        return self.router_config.z_loss_coef

    @property
    def context_routing(self) -> bool:
        return self.router_config.context_routing

    @property
    def context_lambda(self) -> Optional[Tensor]:
        """0-d tensor lambda = sigmoid(context_lambda_logit) in [0, 1], or None without context routing."""
        if self.context_lambda_logit is None:
            return None
        return torch.sigmoid(self.context_lambda_logit)

    @property
    def router_loss(self) -> Optional[Tensor]:
        """``aux_loss_coef * aux_loss + z_loss_coef * z_loss`` of the last forward (None before one)."""
        if self.aux_loss is None:
            return None
        return self.aux_loss_coef * self.aux_loss + self.z_loss_coef * self.z_loss

    def _param_dtype_device(self):
        w = self.router.weight
        return w.dtype, w.device

    # ------------------------------------------------------------------ validation

    def _check_input(self, x: Any, name: str = "x") -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor of shape (..., hidden={self.hidden}), got {type(x).__name__}"
            )
        if x.dim() < 1 or x.shape[-1] != self.hidden:
            raise ValueError(f"{name} must have shape (..., hidden={self.hidden}), got {tuple(x.shape)}")
        dtype, device = self._param_dtype_device()
        if x.dtype != dtype:
            raise TypeError(
                f"{name} has dtype {x.dtype} but the layer's weights are {dtype}; "
                "cast the input or the layer (.to(dtype))"
            )
        if x.device != device:
            raise ValueError(
                f"{name} is on device {x.device} but the layer's weights are on {device}; move one of them"
            )

    def _check_context(self, x: Tensor, context: Any) -> None:
        if context is None:
            if self.context_routing:
                raise ValueError(
                    "context is required: the layer was built with context_routing=True; "
                    "pass context= of shape "
                    f"x.shape[:-2] + (hidden,) (e.g. (batch, {self.hidden}))"
                )
            return
        if not self.context_routing:
            raise ValueError("context was given but the layer was built with context_routing=False")
        if not isinstance(context, torch.Tensor):
            raise TypeError(f"context must be a torch.Tensor, got {type(context).__name__}")
        if x.dim() < 2:
            raise ValueError(
                f"context routing needs x of shape (..., seq, hidden), got x of shape {tuple(x.shape)}"
            )
        want = tuple(x.shape[:-2]) + (self.hidden,)
        if tuple(context.shape) != want:
            raise ValueError(
                f"context must have shape x.shape[:-2] + (hidden,) = {want} "
                "(one vector per sequence, broadcast "
                f"over its tokens), got {tuple(context.shape)}"
            )
        if context.dtype != x.dtype:
            raise TypeError(f"context has dtype {context.dtype} but x has {x.dtype}")
        if context.device != x.device:
            raise ValueError(f"context is on device {context.device} but x is on {x.device}")

    # ------------------------------------------------------------------ routing

    def router_input(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """The router's input, (T, hidden): the tokens, or ``(1 - lambda) * token + lambda * context``.

        Args:
            x: (..., seq, hidden) tokens.
            context: (..., hidden), one vector per sequence (``x.shape[:-2] + (hidden,)``), broadcast over
                the sequence; required with ``context_routing=True``, refused otherwise.
        """
        if context is None:
            return x.reshape(-1, self.hidden)
        lam = self.context_lambda.to(x.dtype)
        mixed = torch.lerp(x, context.unsqueeze(-2), lam)  # (1 - lam) * x + lam * context
        return mixed.reshape(-1, self.hidden)

    def route(self, router_in: Tensor) -> RouterOutput:
        """Logits, top-k weights/indices and statistics for (T, hidden) router inputs."""
        from ..ops.router_topk import router_topk

        logits = self.router(router_in)
        weights, indices, stats = router_topk(
            logits,
            self.top_k,
            renormalize=self.renormalize,
            order=self.router_order,
            return_stats=True,
            backend=self.backend,
        )
        return RouterOutput(logits, weights, indices, stats)

    def _record(self, r: RouterOutput) -> None:
        self.router_logits = r.logits
        self.aux_loss = load_balancing_loss(r.stats.counts, r.stats.prob_mean)
        self.z_loss = z_loss(r.stats.lse)

    def _experts(self, x: Tensor, weights: Tensor, indices: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """Route every token to its top-k experts and combine their outputs.

        Args:
            x: (..., hidden) tokens, in the layer's dtype and on its device; any number of leading dims
                (zero tokens allowed).
            context: (..., hidden) = ``x.shape[:-2] + (hidden,)``, one context vector per sequence (e.g. the
                mean FFN input of the sample from a first pass of the base model), broadcast over the
                sequence dim ``x.shape[-2]``. Required with ``context_routing=True``, refused otherwise.

        Returns:
            (..., hidden) tensor, same shape and dtype as ``x``. Sets ``aux_loss``, ``z_loss`` and
            ``router_logits`` (see the class docstring).
        """
        self._check_input(x)
        self._check_context(x, context)
        xf = x.reshape(-1, self.hidden)
        r = self.route(self.router_input(x, context))
        y = self._experts(xf, r.weights, r.indices)
        self._record(r)
        return y.reshape(x.shape)

    # ------------------------------------------------------------------ prototypes

    @torch.no_grad()
    def init_router_from_prototypes(
        self, prototypes: Any, scale: float = 1.0, *, normalize: bool = True
    ) -> None:
        """Set the router rows from per-expert prototypes (MetaMoE Eq. 7: the mean FFN input of each expert).

        Row e of the router weight becomes ``scale * prototypes[e] / ||prototypes[e]||`` (or
        ``scale * prototypes[e]`` with ``normalize=False``), so the logit of expert e is ``scale`` times the
        cosine-like projection of the router input on its prototype: ``scale`` acts as an inverse softmax
        temperature. The weight Parameter is updated in place (optimisers keep tracking it).

        Args:
            prototypes: (E, hidden) float tensor or NumPy array, finite; rows non-zero when ``normalize``.
            scale: > 0.
            normalize: L2-normalise each row first.
        """
        from ..backends.tensors import as_torch

        try:
            p = as_torch(prototypes)
        except Exception as exc:
            raise TypeError(
                f"prototypes must be a tensor or array of shape (E, hidden), got {type(prototypes).__name__}"
            ) from exc
        want = (self.num_experts, self.hidden)
        if tuple(p.shape) != want:
            raise ValueError(
                f"prototypes must have shape (num_experts, hidden) = {want}, got {tuple(p.shape)}"
            )
        if not p.dtype.is_floating_point:
            raise TypeError(f"prototypes must be floating point, got {p.dtype}")
        scale = check_float(scale, "scale")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        p = p.detach().to(device=self.router.weight.device, dtype=torch.float64)
        if not bool(torch.isfinite(p).all()):
            raise ValueError("prototypes must be finite (found NaN or inf)")
        if normalize:
            norms = torch.linalg.vector_norm(p, dim=1, keepdim=True)
            if bool((norms == 0).any()):
                row = int((norms[:, 0] == 0).nonzero()[0, 0])
                raise ValueError(f"prototypes row {row} is all zeros; it cannot be normalised")
            p = p / norms
        self.router.weight.copy_((scale * p).to(self.router.weight.dtype))


# --------------------------------------------------------------------------- the stacked-experts layer


class MoELayer(RoutedMoEBase):
    """Dropless top-k Mixture-of-Experts FFN with stacked expert weights (training and inference).

    Args:
        hidden: model width d.
        ffn_hidden: expert FFN width f.
        num_experts: E >= 1.
        top_k: experts per token, 1 <= top_k <= num_experts (or ``router.top_k``).
        activation: one of :data:`metamoe.ops.moe_experts.ACTIVATIONS`: ``"swiglu"`` (``silu(x W_g^T) *
            (x W_u^T)``, then ``W_d``), ``"gelu"`` (exact GELU) or ``"gelu_tanh"`` (tanh-approximated GELU).
        backend: ``"auto"`` (fastest available per call, or ``METAMOE_BACKEND``), ``"triton"``, ``"torch"``;
            passed to the router and experts ops.
        router: a :class:`RouterConfig` with the router's options; or, instead, the keyword arguments below
            (None = RouterConfig's default), which build one:
        router_order: ``"softmax_then_topk"`` (Mixtral, Qwen-MoE, OLMoE) or ``"topk_then_softmax"``.
        renormalize: divide the k selected probabilities by their sum (softmax_then_topk only).
        aux_loss_coef, z_loss_coef: weights of the two losses in ``router_loss``.
        context_routing: route on ``(1 - lambda) * token + lambda * context`` (``forward(x, context=...)``),
            lambda = sigmoid(raw) learnable, initialised to ``context_lambda_init`` (default 0.5).
        dtype, device: of the parameters (``torch.get_default_dtype()`` / CPU when None).

    Parameters:
        router.weight: (E, hidden).
        w_gate_up: (E, 2f, hidden) for SwiGLU (gate = rows [0, f), up = rows [f, 2f)),
            (E, f, hidden) for GELU.
        w_down: (E, hidden, f).
        context_lambda_logit: 0-d, only with ``context_routing``.

    Initialisation: every weight ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as ``nn.Linear``.
    """

    def __init__(
        self,
        hidden: int,
        ffn_hidden: int,
        num_experts: int,
        top_k: Optional[int] = None,
        *,
        activation: str = "swiglu",
        router: Optional[RouterConfig] = None,
        backend: Optional[str] = "auto",
        router_order: Optional[str] = None,
        renormalize: Optional[bool] = None,
        aux_loss_coef: Optional[float] = None,
        z_loss_coef: Optional[float] = None,
        context_routing: Optional[bool] = None,
        context_lambda_init: Optional[float] = None,
        dtype: Optional[torch.dtype] = None,
        device: Optional[Any] = None,
    ):
        super().__init__(
            hidden,
            num_experts,
            top_k,
            router=router,
            backend=backend,
            router_order=router_order,
            renormalize=renormalize,
            aux_loss_coef=aux_loss_coef,
            z_loss_coef=z_loss_coef,
            context_routing=context_routing,
            context_lambda_init=context_lambda_init,
            dtype=dtype,
            device=device,
        )
        self.ffn_hidden = check_int(ffn_hidden, "ffn_hidden")
        self.activation = check_choice(activation, "activation", ACTIVATIONS)
        rows = 2 * self.ffn_hidden if self.activation == "swiglu" else self.ffn_hidden
        factory = {"dtype": self.router.weight.dtype, "device": self.router.weight.device}
        self.w_gate_up = nn.Parameter(torch.empty(self.num_experts, rows, self.hidden, **factory))
        self.w_down = nn.Parameter(torch.empty(self.num_experts, self.hidden, self.ffn_hidden, **factory))
        self.reset_expert_parameters()

    @torch.no_grad()
    def reset_expert_parameters(self) -> None:
        """Re-draw the expert weights ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (nn.Linear's default)."""
        b1 = 1.0 / math.sqrt(self.hidden)
        b2 = 1.0 / math.sqrt(self.ffn_hidden)
        self.w_gate_up.uniform_(-b1, b1)
        self.w_down.uniform_(-b2, b2)

    @classmethod
    def from_parameters(
        cls,
        router_weight: Tensor,
        w_gate_up: Tensor,
        w_down: Tensor,
        top_k: Optional[int] = None,
        *,
        activation: str = "swiglu",
        **kwargs: Any,
    ) -> "MoELayer":
        """A layer that uses the given tensors as its weights, without copying them.

        ``nn.Parameter`` arguments are registered as they are (the same objects); plain tensors are wrapped
        in Parameters sharing their storage.

        Args:
            router_weight: (E, hidden).
            w_gate_up: (E, 2f, hidden) for SwiGLU, (E, f, hidden) for GELU.
            w_down: (E, hidden, f).
            top_k, activation, **kwargs: as for :class:`MoELayer`, ``router=`` included (dtype and device come
                from the tensors).
        """
        for name, t in (("router_weight", router_weight), ("w_gate_up", w_gate_up), ("w_down", w_down)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if router_weight.dim() != 2:
            raise ValueError(f"router_weight must be 2-D (E, hidden), got {tuple(router_weight.shape)}")
        E, d = router_weight.shape
        if w_down.dim() != 3 or w_down.shape[:2] != (E, d):
            raise ValueError(f"w_down must have shape (E={E}, hidden={d}, f), got {tuple(w_down.shape)}")
        f = w_down.shape[2]
        activation = check_choice(activation, "activation", ACTIVATIONS)
        rows = 2 * f if activation == "swiglu" else f
        if tuple(w_gate_up.shape) != (E, rows, d):
            raise ValueError(
                f"w_gate_up must have shape (E, {rows}, hidden) = {(E, rows, d)} for {activation}, "
                f"got {tuple(w_gate_up.shape)}"
            )
        for name, t in (("w_gate_up", w_gate_up), ("w_down", w_down)):
            if t.dtype != router_weight.dtype or t.device != router_weight.device:
                raise TypeError(
                    f"{name} has {t.dtype} on {t.device}, "
                    f"router_weight has {router_weight.dtype} on {router_weight.device}"
                )
        kwargs.pop("dtype", None)
        kwargs.pop("device", None)
        layer = cls(d, f, E, top_k, activation=activation, dtype=router_weight.dtype, device="meta", **kwargs)

        def as_param(t):
            return t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=t.requires_grad)

        layer.router.weight = as_param(router_weight)
        layer.w_gate_up = as_param(w_gate_up)
        layer.w_down = as_param(w_down)
        if layer.context_lambda_logit is not None:
            lam = layer.router_config.context_lambda_init
            layer.context_lambda_logit = nn.Parameter(
                torch.full(
                    (), math.log(lam / (1 - lam)), dtype=router_weight.dtype, device=router_weight.device
                )
            )
        return layer

    def _experts(self, x: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
        from ..ops.moe_experts import moe_experts

        # float32 routing weights go in as they are: the op sums the k slots in float32
        return moe_experts(
            x,
            weights,
            indices,
            self.w_gate_up,
            self.w_down,
            activation=self.activation,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden}, ffn_hidden={self.ffn_hidden}, num_experts={self.num_experts}, "
            f"top_k={self.top_k}, activation={self.activation!r}, router_order={self.router_order!r}, "
            f"renormalize={self.renormalize}, "
            f"context_routing={self.context_routing}, backend={self.backend!r}"
        )
