"""LoRA experts over one frozen shared FFN: the MoE that MetaMoE's unification builds (docs/design.md, "The method").

Expert e is the shared base FFN with a rank-r LoRA on each projection: ``W_p + s * B_{e,p} A_{e,p}``,
``s = alpha / r``. The layer never materialises ``W_p + B A`` per expert. For a SwiGLU FFN and T tokens with
k routed (token, slot) pairs each:

    G = x W_g^T, U = x W_u^T                      base projections, once per token           (T, f)
    g_tj = G_t + s B_g[e] A_g[e] x_t               low-rank deltas on the T*k routed pairs    (T*k, f)
    h_tj = silu(g_tj) * u_tj
    y_t  = W_d (sum_j w_tj h_tj) + s sum_j w_tj B_d[e] A_d[e] h_tj

The base down projection runs once per token on the routing-weighted sum of the hidden activations: exact by
linearity (a down bias contributes ``b_d * sum_j w_tj``). GELU FFNs (ViT's fc1/fc2) work the same way with one
first projection. The low-rank deltas are the op :func:`metamoe.ops.lora_delta.lora_delta`, whose
implementations the backend registry chooses from ``lora_impl``:

- ``"grouped"``: the pairs sorted by expert and two grouped GEMMs per projection (torch's ``grouped_mm``),
  where :func:`metamoe.backends.grouped_mm_reasons` finds nothing against it (float32/bfloat16/float16 on the
  CPU, bfloat16 on CUDA of compute capability >= 8.0, hidden, ffn_hidden and rank multiples of 16 bytes;
  bfloat16/float16 under ``torch.compile``).
- ``"dense"``: one GEMM against all E experts' A, a mask, one GEMM against all B. E times the useful work, but
  any dtype, device and size; cheap while E * r stays well below f (the MetaMoE regime: a handful of
  clients, r <= 16).

``lora_impl="auto"`` takes ``"grouped"`` where it can run and ``"dense"`` elsewhere; an explicit ``lora_impl``
that cannot run raises :class:`~metamoe.backends.BackendNotSupportedError` naming the reasons. The choice
depends only on dtypes, devices and sizes, never on routed values, so neither path synchronises with the host.
"""

from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.lora_delta import LORA_IMPLS, lora_delta_op, select_lora_impl
from ..utils.checks import check_choice, check_float, check_int
from .layer import RoutedMoEBase
from .router_config import RouterConfig

__all__ = ["LORA_IMPLS", "LORA_KEY_ALIASES", "PROJECTIONS", "LoRAMoELayer"]

# The projections of each FFN kind, in forward order: (name, input is "model" or "ffn" width).
PROJECTIONS: Dict[str, Tuple[Tuple[str, str], ...]] = {
    "swiglu": (("gate", "model"), ("up", "model"), ("down", "ffn")),
    "gelu": (("fc1", "model"), ("fc2", "ffn")),
}

# Names a projection goes by in LoRA state dicts (PEFT on LLaMA/Mistral/Qwen MLPs, Mixtral w1/w3/w2, timm).
LORA_KEY_ALIASES: Dict[str, Tuple[str, ...]] = {
    "gate": ("gate_proj", "gate", "w1"),
    "up": ("up_proj", "up", "w3"),
    "down": ("down_proj", "down", "w2"),
    "fc1": ("fc1",),
    "fc2": ("fc2",),
}


class LoRAMoELayer(RoutedMoEBase):
    """Top-k MoE whose experts are rank-r LoRAs over ONE frozen shared FFN.

    Args:
        hidden: model width d.
        ffn_hidden: FFN width f.
        num_experts: E (one LoRA per expert).
        top_k: experts per token, 1 <= top_k <= E.
        rank: LoRA rank r >= 1.
        alpha: LoRA alpha; the deltas are scaled by ``alpha / rank`` (default alpha = rank, scale 1).
        activation: ``"swiglu"`` (projections gate, up, down) or ``"gelu"`` (fc1, fc2; ViT MLP).
        bias: whether the base projections have biases (ViT MLPs do, LLaMA-style SwiGLU MLPs do not).
        gelu_approximate: ``"none"`` (exact, ``nn.GELU()``'s default, timm's ViT) or ``"tanh"``.
        lora_impl: ``"auto"``, ``"grouped"`` or ``"dense"`` (module docstring), resolved per call through the
            backend registry (op ``lora_delta``).
        base_weights: optional mapping ``{"gate": (f, d), "up": (f, d), "down": (d, f)}`` (SwiGLU) or
            ``{"fc1": (f, d), "fc2": (d, f)}`` (GELU), plus ``"<name>_bias"`` entries when ``bias``: used as
            the frozen base FFN without copying (Parameters are registered as they are; their
            ``requires_grad`` is set to False). Random base weights when None.
        router, backend, router_order, renormalize, aux_loss_coef, z_loss_coef, context_routing,
        context_lambda_init, dtype, device: as for :class:`metamoe.moe.MoELayer` (``router=RouterConfig(...)``
        or the keyword arguments).

    Parameters:
        ``<p>_weight`` (out, in) and ``<p>_bias`` (out,) for each projection p: the frozen base FFN.
        ``lora_A_<p>`` (E, r, in), ``lora_B_<p>`` (E, out, r): trainable. A ~ U(-1/sqrt(in), 1/sqrt(in))
        (PEFT's default), B = 0, so a fresh layer computes ``sum_j w_tj * FFN(x_t)``: the base FFN whenever
        the routing weights sum to 1 (``renormalize=True``, the default).
    """

    def __init__(
        self,
        hidden: int,
        ffn_hidden: int,
        num_experts: int,
        top_k: Optional[int] = None,
        *,
        rank: int,
        alpha: Optional[float] = None,
        activation: str = "swiglu",
        bias: bool = False,
        gelu_approximate: str = "none",
        lora_impl: str = "auto",
        base_weights: Optional[Mapping[str, Tensor]] = None,
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
        if base_weights is not None:  # dtype and device follow the shared base weights
            first = next(iter(base_weights.values()), None)
            if isinstance(first, torch.Tensor):
                dtype, device = first.dtype, first.device
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
        self.rank = check_int(rank, "rank")
        self.alpha = float(self.rank) if alpha is None else check_float(alpha, "alpha")
        self.scaling = self.alpha / self.rank
        self.activation = check_choice(activation, "activation", tuple(PROJECTIONS))
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
        self.bias = bias
        self.gelu_approximate = check_choice(gelu_approximate, "gelu_approximate", ("none", "tanh"))
        self.lora_impl = check_choice(lora_impl, "lora_impl", LORA_IMPLS)
        self.projections = tuple(p for p, _ in PROJECTIONS[self.activation])
        factory = {"dtype": self.router.weight.dtype, "device": self.router.weight.device}
        dims = {"model": self.hidden, "ffn": self.ffn_hidden}
        self._shapes: Dict[str, Tuple[int, int]] = {}
        for p, src in PROJECTIONS[self.activation]:
            fan_in = dims[src]
            fan_out = self.ffn_hidden if src == "model" else self.hidden
            self._shapes[p] = (fan_out, fan_in)
        if base_weights is not None:
            self._adopt_base(base_weights)
        else:
            for p, (fan_out, fan_in) in self._shapes.items():
                bound = 1.0 / math.sqrt(fan_in)
                w = torch.empty(fan_out, fan_in, **factory).uniform_(-bound, bound)
                self.register_parameter(f"{p}_weight", nn.Parameter(w, requires_grad=False))
                if bias:
                    b = torch.empty(fan_out, **factory).uniform_(-bound, bound)
                    self.register_parameter(f"{p}_bias", nn.Parameter(b, requires_grad=False))
                else:
                    self.register_parameter(f"{p}_bias", None)
        for p, (fan_out, fan_in) in self._shapes.items():
            self.register_parameter(
                f"lora_A_{p}", nn.Parameter(torch.empty(self.num_experts, self.rank, fan_in, **factory))
            )
            self.register_parameter(
                f"lora_B_{p}", nn.Parameter(torch.zeros(self.num_experts, fan_out, self.rank, **factory))
            )
        self.reset_lora_parameters()

    # ------------------------------------------------------------------ construction

    def _adopt_base(self, base: Mapping[str, Tensor]) -> None:
        allowed = set(self.projections) | {f"{p}_bias" for p in self.projections}
        unknown = sorted(set(base) - allowed)
        if unknown:
            raise ValueError(
                f"base_weights has unexpected keys {unknown}; "
                f"for {self.activation} it takes {sorted(allowed)}"
            )
        dtype, device = self.router.weight.dtype, self.router.weight.device
        for p, (fan_out, fan_in) in self._shapes.items():
            for key, shape in ((p, (fan_out, fan_in)), (f"{p}_bias", (fan_out,))):
                t = base.get(key)
                if key.endswith("_bias") and not self.bias:
                    if t is not None:
                        raise ValueError(f"base_weights[{key!r}] was given but bias=False")
                    self.register_parameter(key, None)
                    continue
                if t is None:
                    raise ValueError(f"base_weights is missing {key!r} of shape {shape}")
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"base_weights[{key!r}] must be a torch.Tensor, got {type(t).__name__}")
                if tuple(t.shape) != shape:
                    raise ValueError(f"base_weights[{key!r}] must have shape {shape}, got {tuple(t.shape)}")
                if t.dtype != dtype or t.device != device:
                    raise TypeError(
                        f"base_weights[{key!r}] is {t.dtype} on {t.device}; "
                        f"all base weights must share {dtype} on {device}"
                    )
                param = t if isinstance(t, nn.Parameter) else nn.Parameter(t.detach(), requires_grad=False)
                param.requires_grad_(False)
                name = f"{p}_weight" if key == p else key
                self.register_parameter(name, param)

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming-uniform(a=sqrt(5)) default), B = 0."""
        for p, (_, fan_in) in self._shapes.items():
            bound = 1.0 / math.sqrt(fan_in)
            getattr(self, f"lora_A_{p}").uniform_(-bound, bound)
            getattr(self, f"lora_B_{p}").zero_()

    @classmethod
    def from_base_ffn(
        cls,
        base: Any,
        lora_state_dicts: Optional[Sequence[Mapping[str, Tensor]]] = None,
        *,
        top_k: Optional[int] = None,
        num_experts: Optional[int] = None,
        rank: Optional[int] = None,
        alpha: Optional[float] = None,
        layer_index: Optional[int] = None,
        lora_key_names: Optional[Mapping[str, str]] = None,
        **kwargs: Any,
    ) -> "LoRAMoELayer":
        """Build the MoE around an existing FFN (shared, frozen, not copied) and per-expert LoRA weights.

        Args:
            base: the shared FFN, either a module with ``gate_proj``/``up_proj``/``down_proj`` Linears
                (LLaMA / Mistral / Qwen MLP, SiLU) or ``fc1``/``fc2`` Linears (timm / ViT MLP, GELU), or a
                mapping as ``base_weights`` of :class:`LoRAMoELayer` (``gate``/``up``/``down`` or
                ``fc1``/``fc2`` weights (out, in), optional ``<name>_bias``). Its Parameters are reused as
                they are and frozen (``requires_grad=False``).
            lora_state_dicts: one mapping per expert with each projection's ``lora_A`` (r, in) and
                ``lora_B`` (out, r), keyed PEFT-style: any key ending in ``<alias>.lora_A.weight`` or
                ``<alias>.lora_A`` (aliases in ``LORA_KEY_ALIASES``, e.g. ``gate_proj``, ``fc1``). A
                projection absent from an expert's dict gets a zero delta. None: ``num_experts`` fresh LoRAs.
            layer_index: with state dicts that hold every FFN layer (keys ``layers.{i}.<name>.lora_A``, as
                :mod:`metamoe.models.lora` writes them), keep only the keys of layer ``i``.
            lora_key_names: ``{projection: native name}`` overriding the aliases, e.g.
                ``{"fc1": "intermediate.dense", "fc2": "output.dense"}`` for a BERT FFN.
            top_k: experts per token (or ``router=RouterConfig(top_k=...)`` in ``kwargs``).
            num_experts: required when ``lora_state_dicts`` is None; else must equal its length if given.
            rank: LoRA rank; inferred from the state dicts when they are given.
            alpha: LoRA alpha (scale alpha / rank); default alpha = rank.
            **kwargs: the remaining :class:`LoRAMoELayer` options (``context_routing``, ``backend``, ...).
        """
        weights, activation, has_bias, approx = _base_from_any(base)
        kwargs.setdefault("gelu_approximate", approx)
        ref = weights["fc1" if activation == "gelu" else "gate"]
        ffn_hidden, hidden = ref.shape
        if lora_state_dicts is None:
            if num_experts is None:
                raise ValueError("num_experts is required when lora_state_dicts is None")
            if rank is None:
                raise ValueError("rank is required when lora_state_dicts is None")
            parsed = None
        else:
            if isinstance(lora_state_dicts, Mapping) or not isinstance(lora_state_dicts, Sequence):
                raise TypeError("lora_state_dicts must be a list of per-expert mappings")
            if len(lora_state_dicts) == 0:
                raise ValueError("lora_state_dicts is empty; give one mapping per expert")
            if num_experts is not None and num_experts != len(lora_state_dicts):
                raise ValueError(
                    f"num_experts={num_experts} but {len(lora_state_dicts)} lora_state_dicts were given"
                )
            num_experts = len(lora_state_dicts)
            projs = [p for p, _ in PROJECTIONS[activation]]
            if layer_index is not None:
                layer_index = check_int(layer_index, "layer_index", 0)
            if lora_key_names is not None:
                unknown = sorted(set(lora_key_names) - set(projs))
                if unknown:
                    raise ValueError(f"lora_key_names has keys {unknown}; the projections are {projs}")
            parsed = [
                _parse_lora_state_dict(sd, projs, i, layer_index, lora_key_names)
                for i, sd in enumerate(lora_state_dicts)
            ]
            ranks = {a.shape[0] for d in parsed for a, _ in d.values()}
            if not ranks:
                raise ValueError(f"no LoRA weights found in lora_state_dicts for projections {projs}")
            if len(ranks) > 1:
                raise ValueError(
                    f"lora_state_dicts mix LoRA ranks {sorted(ranks)}; all experts must share one rank"
                )
            found = ranks.pop()
            if rank is not None and rank != found:
                raise ValueError(f"rank={rank} but the LoRA state dicts have rank {found}")
            rank = found
        layer = cls(
            hidden,
            ffn_hidden,
            num_experts,
            top_k,
            rank=rank,
            alpha=alpha,
            activation=activation,
            bias=has_bias,
            base_weights=weights,
            **kwargs,
        )
        if parsed is not None:
            layer.load_lora_weights(parsed)
        return layer

    @torch.no_grad()
    def load_lora_weights(self, per_expert: Sequence[Mapping[str, Tuple[Tensor, Tensor]]]) -> None:
        """Copy per-expert LoRA factors: ``per_expert[e][p] = (A (r, in), B (out, r))``; missing -> zero."""
        if len(per_expert) != self.num_experts:
            raise ValueError(f"expected {self.num_experts} experts' LoRA weights, got {len(per_expert)}")
        for e, d in enumerate(per_expert):
            for p, (fan_out, fan_in) in self._shapes.items():
                A_all, B_all = getattr(self, f"lora_A_{p}"), getattr(self, f"lora_B_{p}")
                if p not in d:
                    A_all[e].zero_()
                    B_all[e].zero_()
                    continue
                A, B = d[p]
                if tuple(A.shape) != (self.rank, fan_in) or tuple(B.shape) != (fan_out, self.rank):
                    raise ValueError(
                        f"expert {e} projection {p!r}: lora_A must be {(self.rank, fan_in)} and lora_B "
                        f"{(fan_out, self.rank)}, got {tuple(A.shape)} and {tuple(B.shape)}"
                    )
                A_all[e].copy_(A)
                B_all[e].copy_(B)

    # ------------------------------------------------------------------ forward pieces

    def _base(self, p: str, x: Tensor) -> Tensor:
        return F.linear(x, getattr(self, f"{p}_weight"), getattr(self, f"{p}_bias"))

    def _act(self, pre: Tensor) -> Tensor:
        return F.gelu(pre, approximate=self.gelu_approximate)

    def base_ffn(self, x: Tensor) -> Tensor:
        """The shared base FFN alone (experts off), (..., hidden) -> (..., hidden).

        This is the first pass MetaMoE's context-aware routing takes to build each sample's context vector.
        """
        self._check_input(x)
        if self.activation == "swiglu":
            h = F.silu(self._base("gate", x)) * self._base("up", x)
            return self._base("down", h)
        return self._base("fc2", self._act(self._base("fc1", x)))

    def resolved_lora_impl(self, x: Tensor) -> str:
        """``"grouped"`` or ``"dense"``: what ``lora_impl`` resolves to for inputs like ``x``, through the
        backend registry (op ``lora_delta``). An explicit ``lora_impl`` that cannot run raises
        :class:`~metamoe.backends.BackendNotSupportedError` (a ValueError) naming every reason."""
        sizes = {"hidden": self.hidden, "ffn_hidden": self.ffn_hidden, "rank": self.rank}
        return select_lora_impl(x, sizes, self.lora_impl)

    def _delta(self, p: str, inp: Tensor, per_token: bool, eids: Tensor, impl: str, routing: Any) -> Tensor:
        """``scaling * B[e] A[e] inp`` for every routed pair, in pair order (P, out), by implementation ``impl``.

        ``inp`` is (T, in) (one row per token, shared by its k pairs) when ``per_token``, else (P, in).
        """
        fn = lora_delta_op.impls[impl].fn
        A = getattr(self, f"lora_A_{p}")  # (E, r, in)
        B = getattr(self, f"lora_B_{p}")  # (E, out, r)
        return fn(inp, A, B, eids, self.top_k, per_token=per_token, routing=routing) * self.scaling

    def _experts(self, x: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
        T = x.shape[0]
        k = self.top_k
        P = T * k
        eids = indices.reshape(P)
        w = weights.to(x.dtype).reshape(P, 1)
        impl = self.resolved_lora_impl(x)
        routing = None
        if impl == "grouped" and T > 0:  # one expert order shared by every projection
            from ..ops.moe_routing import moe_routing

            routing = moe_routing(indices, self.num_experts)
        if self.activation == "swiglu":
            g = self._base("gate", x).repeat_interleave(k, dim=0) + self._delta(
                "gate", x, True, eids, impl, routing
            )
            u = self._base("up", x).repeat_interleave(k, dim=0) + self._delta("up", x, True, eids, impl, routing)
            h = F.silu(g) * u  # (P, f)
            last = "down"
        else:
            pre = self._base("fc1", x).repeat_interleave(k, dim=0) + self._delta(
                "fc1", x, True, eids, impl, routing
            )
            h = self._act(pre)
            last = "fc2"
        f = h.shape[1]
        hsum = (h * w).view(T, k, f).sum(dim=1)  # routing-weighted sum of hidden activations (T, f)
        y = F.linear(hsum, getattr(self, f"{last}_weight"))  # base down projection, once per token
        b = getattr(self, f"{last}_bias")
        if b is not None:
            y = y + w.view(T, k).sum(dim=1, keepdim=True) * b
        dy = self._delta(last, h, False, eids, impl, routing) * w
        return y + dy.view(T, k, self.hidden).sum(dim=1)

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden}, ffn_hidden={self.ffn_hidden}, num_experts={self.num_experts}, "
            f"top_k={self.top_k}, rank={self.rank}, alpha={self.alpha}, activation={self.activation!r}, "
            f"bias={self.bias}, "
            f"lora_impl={self.lora_impl!r}, context_routing={self.context_routing}"
        )


# --------------------------------------------------------------------------- parsing helpers


def _base_from_any(base: Any) -> Tuple[Dict[str, Tensor], str, bool, str]:
    """(weights mapping, activation, has_bias, gelu_approximate) from a module or a mapping."""
    if isinstance(base, nn.Module):
        if all(hasattr(base, n) for n in ("gate_proj", "up_proj", "down_proj")):
            act = getattr(base, "act_fn", None)
            if (
                act is not None
                and not isinstance(act, nn.SiLU)
                and type(act).__name__ not in ("SiLUActivation", "SiLU")
            ):
                raise ValueError(
                    f"base has activation {type(act).__name__}; a gate/up/down MLP must use SiLU (SwiGLU)"
                )
            mods = {"gate": base.gate_proj, "up": base.up_proj, "down": base.down_proj}
            activation, approx = "swiglu", "none"
        elif all(hasattr(base, n) for n in ("fc1", "fc2")):
            act = getattr(base, "act", None)
            if act is not None and not isinstance(act, nn.GELU):
                raise ValueError(f"base has activation {type(act).__name__}; an fc1/fc2 MLP must use nn.GELU")
            mods = {"fc1": base.fc1, "fc2": base.fc2}
            activation, approx = "gelu", (act.approximate if act is not None else "none")
            for n in ("norm", "drop1", "drop2"):
                sub = getattr(base, n, None)
                if sub is not None and not isinstance(sub, (nn.Identity, nn.Dropout)):
                    raise ValueError(
                        f"base.{n} is {type(sub).__name__}; "
                        "only Identity/Dropout are supported between fc1 and fc2"
                    )
        else:
            raise TypeError(
                "base must have gate_proj/up_proj/down_proj (SwiGLU) or fc1/fc2 (GELU) Linear submodules"
            )
        weights: Dict[str, Tensor] = {}
        biases = [m.bias is not None for m in mods.values()]
        if any(biases) and not all(biases):
            raise ValueError("base projections mix with and without bias; all or none must have one")
        for p, m in mods.items():
            if not isinstance(m, nn.Linear):
                raise TypeError(f"base.{p} must be an nn.Linear, got {type(m).__name__}")
            weights[p] = m.weight
            if m.bias is not None:
                weights[f"{p}_bias"] = m.bias
        return weights, activation, all(biases), approx
    if isinstance(base, Mapping):
        keys = set(base)
        if {"gate", "up", "down"} <= keys:
            activation = "swiglu"
        elif {"fc1", "fc2"} <= keys:
            activation = "gelu"
        else:
            raise ValueError(
                f"base mapping must have keys gate/up/down (SwiGLU) or fc1/fc2 (GELU), got {sorted(keys)}"
            )
        has_bias = any(k.endswith("_bias") for k in keys)
        return dict(base), activation, has_bias, "none"
    raise TypeError(f"base must be an nn.Module or a mapping of tensors, got {type(base).__name__}")


def _parse_lora_state_dict(
    sd: Mapping[str, Tensor],
    projections: Sequence[str],
    expert: int,
    layer_index: Optional[int] = None,
    key_names: Optional[Mapping[str, str]] = None,
) -> Dict[str, Tuple[Tensor, Tensor]]:
    if not isinstance(sd, Mapping):
        raise TypeError(f"lora_state_dicts[{expert}] must be a mapping, got {type(sd).__name__}")
    if layer_index is not None:
        prefix = re.compile(rf"(^|\.)layers\.{layer_index}\.")
        sd = {key: v for key, v in sd.items() if prefix.search(key)}
    out: Dict[str, Tuple[Tensor, Tensor]] = {}
    for p in projections:
        found: Dict[str, List[str]] = {"A": [], "B": []}
        aliases = (key_names[p],) if key_names is not None and p in key_names else LORA_KEY_ALIASES[p]
        for alias in aliases:
            for which in ("A", "B"):
                pat = re.compile(rf"(^|\.){re.escape(alias)}\.lora_{which}(\.weight)?$")
                found[which] += [key for key in sd if pat.search(key)]
        if not found["A"] and not found["B"]:
            continue
        for which in ("A", "B"):
            if len(found[which]) != 1:
                raise ValueError(
                    f"lora_state_dicts[{expert}]: projection {p!r} needs exactly one lora_{which} key, found "
                    f"{found[which] or 'none'} (pass one layer's LoRA per mapping)"
                )
        A, B = sd[found["A"][0]], sd[found["B"][0]]
        if not isinstance(A, torch.Tensor) or not isinstance(B, torch.Tensor) or A.dim() != 2 or B.dim() != 2:
            raise ValueError(f"lora_state_dicts[{expert}]: {p!r} lora_A and lora_B must be 2-D tensors")
        if A.shape[0] != B.shape[1]:
            raise ValueError(
                f"lora_state_dicts[{expert}]: {p!r} lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                "disagree on the rank"
            )
        out[p] = (A, B)
    return out
