"""MoELayer and LoRAMoELayer against independent float64 references (a plain loop over tokens).

Most cases run the torch backend; one small case runs the Triton kernels (TRITON_INTERPRET=1 on the CPU) and
one traces the layer with torch.compile through the custom ops.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metamoe.moe import LoRAMoELayer, MoELayer, load_balancing_loss, z_loss

F64 = torch.float64


# --------------------------------------------------------------------------- float64 references


def ref_select(logits_row, k):
    """Top-k of one row of logits, descending, ties to the lowest index (plain Python sort)."""
    vals = logits_row.detach().tolist()
    return sorted(range(len(vals)), key=lambda e: (-vals[e], e))[:k]


def ref_route(logits, k, renormalize=True, order="softmax_then_topk"):
    """Per token: (weights (k,) differentiable, indices list); plus aux and z losses, all float64."""
    T, E = logits.shape
    probs = torch.softmax(logits, dim=-1)
    out = []
    counts = [0] * E
    for t in range(T):
        idx = ref_select(logits[t], k)
        for e in idx:
            counts[e] += 1
        if order == "softmax_then_topk":
            w = probs[t, idx]
            if renormalize:
                w = w / w.sum()
        else:
            w = torch.softmax(logits[t, idx], dim=-1)
        out.append((w, idx))
    frac = torch.tensor(counts, dtype=F64) / max(T * k, 1)
    pmean = probs.sum(0) / max(T, 1)
    aux = E * (frac * pmean).sum()
    z = (torch.logsumexp(logits, dim=-1) ** 2).sum() / max(T, 1) if T else torch.zeros((), dtype=F64)
    return out, aux, z, counts


def ref_ffn(xt, w1, w2, activation):
    """One expert on one token: w1 (2f, d) (gate; up) for swiglu or (f, d) for gelu, w2 (d, f)."""
    a = w1 @ xt
    if activation == "swiglu":
        f = w2.shape[1]
        h = F.silu(a[:f]) * a[f:]
    else:
        h = F.gelu(a)
    return w2 @ h


def ref_moe(
    x,
    wr,
    w_gate_up,
    w_down,
    k,
    *,
    activation="swiglu",
    renormalize=True,
    order="softmax_then_topk",
    router_in=None,
):
    """y (T, d), aux, z, counts for tokens x (T, d), all float64: a loop over tokens and their k experts."""
    logits = (x if router_in is None else router_in) @ wr.t()
    routes, aux, z, counts = ref_route(logits, k, renormalize, order)
    ys = []
    for t, (w, idx) in enumerate(routes):
        y = torch.zeros(x.shape[1], dtype=F64)
        for j, e in enumerate(idx):
            y = y + w[j] * ref_ffn(x[t], w_gate_up[e], w_down[e], activation)
        ys.append(y)
    y = torch.stack(ys) if ys else x.new_zeros((0, x.shape[1]))
    return y, aux, z, counts


def f64_leaf(t):
    return t.detach().to(F64).clone().requires_grad_(True)


def assert_close(actual, expected, atol, rtol=1e-4, what=""):
    actual = actual.detach().to(F64)
    expected = expected.detach().to(F64)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual - expected).abs()
    bad = err > atol + rtol * expected.abs()
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: {int(bad.sum())} mismatches, first at {i}: {actual[i].item()} vs "
            f"{expected[i].item()} (max err {err.max().item():.3g})"
        )


def make_layer(d=16, f=24, E=6, k=2, seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("backend", "torch")
    layer = MoELayer(d, f, E, k, **kw)
    with torch.no_grad():  # larger router weights: well separated logits, no near-ties between f32 and f64
        layer.router.weight.normal_(0, 1.0)
    return layer


# ------------------------------------------------------------------ MoELayer forward / losses / grads


@pytest.mark.parametrize(
    "activation,renormalize,order,E,k,shape",
    [
        ("swiglu", True, "softmax_then_topk", 6, 2, (3, 7)),
        ("swiglu", False, "softmax_then_topk", 5, 3, (37,)),
        ("gelu", True, "topk_then_softmax", 7, 2, (2, 2, 5)),
        ("swiglu", True, "softmax_then_topk", 1, 1, (9,)),  # a single expert
        ("gelu", False, "softmax_then_topk", 4, 4, (11,)),  # k = E
    ],
)
def test_moe_layer_matches_reference(activation, renormalize, order, E, k, shape):
    d, f = 16, 24
    layer = make_layer(
        d, f, E, k, activation=activation, renormalize=renormalize, router_order=order, seed=E + k
    )
    torch.manual_seed(1)
    x = torch.randn(*shape, d, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    g = torch.randn_like(y)
    loss = (y * g).sum() + 0.3 * layer.aux_loss + 0.2 * layer.z_loss
    loss.backward()

    x64, wr, wgu, wd = (
        f64_leaf(t) for t in (x.reshape(-1, d), layer.router.weight, layer.w_gate_up, layer.w_down)
    )
    y_ref, aux_ref, z_ref, _ = ref_moe(
        x64, wr, wgu, wd, k, activation=activation, renormalize=renormalize, order=order
    )
    ((y_ref * g.reshape(-1, d).to(F64)).sum() + 0.3 * aux_ref + 0.2 * z_ref).backward()
    assert_close(y.reshape(-1, d), y_ref, 2e-5, what="y")
    assert_close(layer.aux_loss, aux_ref, 1e-6, what="aux_loss")
    assert_close(layer.z_loss, z_ref, 1e-5, what="z_loss")
    assert_close(x.grad.reshape(-1, d), x64.grad, 5e-5, what="dx")
    assert_close(layer.router.weight.grad, wr.grad, 5e-5, what="d router")
    assert_close(layer.w_gate_up.grad, wgu.grad, 5e-5, what="d w_gate_up")
    assert_close(layer.w_down.grad, wd.grad, 5e-5, what="d w_down")
    assert layer.router_logits.shape == (x.numel() // d, E)


def test_losses_match_formulas():
    rng = np.random.default_rng(3)
    T, E, k = 29, 5, 2
    logits = rng.normal(size=(T, E))
    idx = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    counts = np.bincount(idx.ravel(), minlength=E)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    aux_np = E * np.sum(counts / (T * k) * p.mean(0))
    lse = np.log(np.exp(logits).sum(1))
    z_np = np.mean(lse**2)
    aux = load_balancing_loss(torch.as_tensor(counts), torch.as_tensor(p.mean(0)))
    z = z_loss(torch.as_tensor(lse))
    assert abs(aux.item() - aux_np) < 1e-12 and abs(z.item() - z_np) < 1e-12
    # uniform routing gives exactly 1 whatever k
    uni = load_balancing_loss(torch.full((E,), 4), torch.full((E,), 1.0 / E, dtype=F64))
    assert abs(uni.item() - 1.0) < 1e-12


def test_all_tokens_on_one_expert_ties_and_empty_experts():
    d, f, E, k = 8, 12, 5, 2
    layer = make_layer(d, f, E, k, seed=4)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[3] = 1.0  # x > 0: expert 3 wins; the other logits tie at 0 -> lowest index (0)
    torch.manual_seed(5)
    x = (torch.rand(13, d) + 0.1).requires_grad_(True)
    y = layer(x)
    y.square().sum().backward()
    x64, wr, wgu, wd = (f64_leaf(t) for t in (x, layer.router.weight, layer.w_gate_up, layer.w_down))
    y_ref, aux_ref, _, counts = ref_moe(x64, wr, wgu, wd, k)
    y_ref.square().sum().backward()
    assert counts == [13, 0, 0, 13, 0]
    assert_close(y, y_ref, 2e-5, what="y")
    assert_close(layer.aux_loss, aux_ref, 1e-6, what="aux_loss")
    for e in (1, 2, 4):  # empty experts: exactly zero gradient
        assert layer.w_gate_up.grad[e].abs().max().item() == 0.0
        assert layer.w_down.grad[e].abs().max().item() == 0.0
    assert_close(layer.w_gate_up.grad, wgu.grad, 5e-5, what="d w_gate_up")
    assert_close(x.grad, x64.grad, 5e-5, what="dx")


def test_zero_tokens():
    layer = make_layer(8, 12, 4, 2)
    x = torch.zeros(0, 8, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 8)
    assert layer.aux_loss.item() == 0.0 and layer.z_loss.item() == 0.0
    (y.sum() + layer.aux_loss + layer.z_loss).backward()
    assert x.grad.shape == (0, 8)


# --------------------------------------------------------------------------- context routing, prototypes


def test_context_routing_matches_reference_and_lambda_is_learned():
    d, f, E, k, B, S = 16, 24, 5, 2, 3, 4
    layer = make_layer(d, f, E, k, seed=6, context_routing=True, context_lambda_init=0.3)
    assert abs(layer.context_lambda.item() - 0.3) < 1e-6
    torch.manual_seed(7)
    x = torch.randn(B, S, d, requires_grad=True)
    ctx = torch.randn(B, d, requires_grad=True)
    y = layer(x, context=ctx)
    g = torch.randn_like(y)
    ((y * g).sum() + layer.aux_loss).backward()

    x64, c64, wr, wgu, wd = (
        f64_leaf(t) for t in (x, ctx, layer.router.weight, layer.w_gate_up, layer.w_down)
    )
    raw = f64_leaf(layer.context_lambda_logit)
    lam = torch.sigmoid(raw)
    rin = ((1 - lam) * x64 + lam * c64[:, None, :]).reshape(-1, d)
    y_ref, aux_ref, _, _ = ref_moe(x64.reshape(-1, d), wr, wgu, wd, k, router_in=rin)
    ((y_ref * g.reshape(-1, d).to(F64)).sum() + aux_ref).backward()
    assert_close(y.reshape(-1, d), y_ref, 2e-5, what="y")
    assert_close(ctx.grad, c64.grad, 5e-5, what="d context")
    assert_close(layer.context_lambda_logit.grad, raw.grad, 5e-5, what="d lambda")
    assert layer.context_lambda_logit.grad.abs().item() > 0

    # lambda stays in [0, 1] whatever the raw parameter becomes
    for raw_value in (-1e4, -3.0, 0.0, 5.0, 1e4):
        with torch.no_grad():
            layer.context_lambda_logit.fill_(raw_value)
        lam = layer.context_lambda.item()
        assert 0.0 <= lam <= 1.0 and math.isfinite(lam)
    with torch.no_grad():
        layer.context_lambda_logit.fill_(1e4)  # lambda = 1: the router sees only the context
    layer(x, context=ctx)
    same = layer.router_logits.view(B, S, E)
    assert torch.allclose(same, (ctx @ layer.router.weight.t())[:, None, :].expand(B, S, E), atol=1e-5)


def test_context_routing_off_by_default_and_errors():
    layer = make_layer(8, 12, 4, 2)
    assert layer.context_routing is False and layer.context_lambda is None
    assert not any("lambda" in n for n, _ in layer.named_parameters())
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="context_routing=False"):
        layer(x, context=torch.randn(2, 8))
    cl = make_layer(8, 12, 4, 2, context_routing=True)
    assert abs(cl.context_lambda.item() - 0.5) < 1e-6  # documented default
    with pytest.raises(ValueError, match="context is required"):
        cl(x)
    with pytest.raises(ValueError, match=r"context must have shape"):
        cl(x, context=torch.randn(3, 8))
    with pytest.raises(TypeError, match="context has dtype"):
        cl(x, context=torch.randn(2, 8, dtype=F64))
    # an unbatched sequence (seq, hidden) takes one context vector (hidden,)
    x2, c2 = torch.randn(5, 8), torch.randn(8)
    assert cl(x2, context=c2).shape == (5, 8)
    assert torch.allclose(cl(x2[None], context=c2[None])[0], cl(x2, context=c2), atol=1e-6)
    with pytest.raises(ValueError, match=r"context routing needs x of shape \(\.\.\., seq, hidden\)"):
        cl(torch.randn(8), context=c2)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="context_lambda_init"):
            MoELayer(8, 12, 4, 2, context_routing=True, context_lambda_init=bad)


def test_init_router_from_prototypes():
    d, E = 16, 4
    layer = make_layer(d, 12, E, 1)
    weight = layer.router.weight
    rng = np.random.default_rng(8)
    protos = rng.normal(size=(E, d)) * rng.uniform(0.5, 3.0, size=(E, 1))
    layer.init_router_from_prototypes(protos, scale=2.5)
    assert layer.router.weight is weight  # updated in place
    expected = 2.5 * protos / np.linalg.norm(protos, axis=1, keepdims=True)
    np.testing.assert_allclose(weight.detach().numpy(), expected, rtol=1e-6, atol=1e-6)
    # with orthogonal prototypes every prototype routes to its own expert
    q, _ = np.linalg.qr(rng.normal(size=(d, E)))
    layer.init_router_from_prototypes(torch.tensor(q.T, dtype=torch.float32), scale=10.0)
    layer(torch.tensor(q.T, dtype=torch.float32))
    assert layer.router_logits.argmax(1).tolist() == list(range(E))
    layer.init_router_from_prototypes(protos, scale=1.0, normalize=False)
    np.testing.assert_allclose(weight.detach().numpy(), protos, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"prototypes must have shape \(num_experts, hidden\) = \(4, 16\)"):
        layer.init_router_from_prototypes(np.zeros((E + 1, d)))
    with pytest.raises(ValueError, match="prototypes must have shape"):
        layer.init_router_from_prototypes(np.zeros((E, d - 1)))
    bad = protos.copy()
    bad[2] = 0
    with pytest.raises(ValueError, match="row 2 is all zeros"):
        layer.init_router_from_prototypes(bad)
    with pytest.raises(ValueError, match="scale"):
        layer.init_router_from_prototypes(protos, scale=0.0)


# --------------------------------------------------------------------------- validation


def test_bad_arguments_name_the_argument():
    for bad_k in (0, -1):
        with pytest.raises(ValueError, match="top_k"):
            MoELayer(8, 12, 4, bad_k)
    with pytest.raises(ValueError, match=r"top_k must be <= num_experts \(4\)"):
        MoELayer(8, 12, 4, 5)
    with pytest.raises(TypeError, match="top_k"):
        MoELayer(8, 12, 4, 1.5)
    with pytest.raises(TypeError, match="top_k"):
        MoELayer(8, 12, 4, True)
    with pytest.raises(ValueError, match="num_experts"):
        MoELayer(8, 12, 0, 1)
    with pytest.raises(ValueError, match="activation"):
        MoELayer(8, 12, 4, 2, activation="relu")
    with pytest.raises(ValueError, match="router_order"):
        MoELayer(8, 12, 4, 2, router_order="sideways")
    with pytest.raises(ValueError, match="backend"):
        MoELayer(8, 12, 4, 2, backend="cudnn")
    layer = make_layer(8, 12, 4, 2)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., hidden=8\)"):
        layer(torch.randn(3, 9))
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        layer(torch.randn(3, 8, dtype=F64))
    with pytest.raises(ValueError, match="x is on device meta"):
        layer(torch.randn(3, 8, device="meta"))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer(np.zeros((3, 8), dtype=np.float32))


def test_from_parameters_shares_storage():
    torch.manual_seed(9)
    E, d, f = 4, 8, 6
    wr = torch.nn.Parameter(torch.randn(E, d))
    wgu = torch.nn.Parameter(torch.randn(E, 2 * f, d) * 0.3)
    wd = torch.randn(E, d, f) * 0.3
    layer = MoELayer.from_parameters(wr, wgu, wd, 2, backend="torch")
    assert layer.router.weight is wr and layer.w_gate_up is wgu
    assert layer.w_down.data_ptr() == wd.data_ptr()
    x = torch.randn(5, d)
    y_ref, *_ = ref_moe(x.to(F64), wr.detach().to(F64), wgu.detach().to(F64), wd.to(F64), 2)
    assert_close(layer(x), y_ref, 2e-5, what="y")
    with pytest.raises(ValueError, match="w_gate_up must have shape"):
        MoELayer.from_parameters(wr, wd, wd, 2)


# --------------------------------------------------------------------------- LoRA experts


def ref_lora_moe(x, layer, params, router_in=None):
    """Materialise W_p + s B_e A_e per expert (float64) and loop over tokens: y_t = sum_j w_j FFN_e(x_t)."""
    s = layer.scaling
    E = layer.num_experts
    W = {p: params[f"{p}_weight"] for p in layer.projections}
    b = {p: params.get(f"{p}_bias") for p in layer.projections}
    Wexp = {
        p: [W[p] + s * params[f"lora_B_{p}"][e] @ params[f"lora_A_{p}"][e] for e in range(E)]
        for p in layer.projections
    }
    logits = (x if router_in is None else router_in) @ params["router"].t()
    routes, aux, _, counts = ref_route(logits, layer.top_k, layer.renormalize, layer.router_order)

    def lin(p, e, v):
        out = Wexp[p][e] @ v
        return out if b[p] is None else out + b[p]

    ys = []
    for t, (w, idx) in enumerate(routes):
        y = torch.zeros(x.shape[1], dtype=F64)
        for j, e in enumerate(idx):
            if layer.activation == "swiglu":
                h = F.silu(lin("gate", e, x[t])) * lin("up", e, x[t])
                out = lin("down", e, h)
            else:
                out = lin("fc2", e, F.gelu(lin("fc1", e, x[t]), approximate=layer.gelu_approximate))
            y = y + w[j] * out
        ys.append(y)
    return torch.stack(ys), aux, counts


def randomize_lora(layer, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if n.startswith("lora_"):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
        layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=g))


@pytest.mark.parametrize(
    "activation,bias,impl,E,k,T",
    [
        ("swiglu", False, "grouped", 4, 2, 21),
        ("swiglu", False, "dense", 4, 2, 21),
        ("gelu", True, "grouped", 5, 3, 17),
        ("gelu", True, "dense", 3, 1, 8),
        ("swiglu", True, "dense", 1, 1, 6),
    ],
)
def test_lora_moe_matches_materialised_reference(activation, bias, impl, E, k, T):
    d, f, r = 16, 32, 4
    torch.manual_seed(10)
    layer = LoRAMoELayer(
        d,
        f,
        E,
        k,
        rank=r,
        alpha=8.0,
        activation=activation,
        bias=bias,
        lora_impl=impl,
        backend="torch",
        renormalize=(k != 3),
    )
    randomize_lora(layer, seed=11)
    assert layer.resolved_lora_impl(torch.zeros(1, d)) == impl
    x = torch.randn(T, d, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    ((y * g).sum() + layer.aux_loss).backward()

    params = {n: f64_leaf(p) for n, p in layer.named_parameters()}
    params["router"] = params.pop("router.weight")
    x64 = f64_leaf(x)
    y_ref, aux_ref, _ = ref_lora_moe(x64, layer, params)
    ((y_ref * g.to(F64)).sum() + aux_ref).backward()
    assert_close(y, y_ref, 3e-5, what="y")
    assert_close(x.grad, x64.grad, 5e-5, what="dx")
    for n, p in layer.named_parameters():
        key = "router" if n == "router.weight" else n
        if p.requires_grad:
            assert_close(p.grad, params[key].grad, 5e-5, what=f"d {n}")
        else:
            assert n.endswith("_weight") or n.endswith("_bias")
            assert p.grad is None  # frozen base FFN


def test_fresh_lora_layer_equals_base_ffn_and_base_is_shared():
    d, f, E = 16, 32, 4

    class LlamaMLP(torch.nn.Module):  # the gate/up/down layout of LLaMA/Mistral/Qwen MLPs
        def __init__(self):
            super().__init__()
            self.gate_proj = torch.nn.Linear(d, f, bias=False)
            self.up_proj = torch.nn.Linear(d, f, bias=False)
            self.down_proj = torch.nn.Linear(f, d, bias=False)
            self.act_fn = torch.nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    torch.manual_seed(12)
    mlp = LlamaMLP()
    layer = LoRAMoELayer.from_base_ffn(mlp, top_k=2, num_experts=E, rank=4, backend="torch")
    assert (
        layer.gate_weight is mlp.gate_proj.weight
        and layer.down_weight.data_ptr() == mlp.down_proj.weight.data_ptr()
    )
    assert not any(p.requires_grad for n, p in layer.named_parameters() if n.endswith("_weight"))
    assert all(p.requires_grad for n, p in layer.named_parameters() if n.startswith("lora_"))
    assert all(layer.get_parameter(f"lora_B_{p}").abs().max().item() == 0 for p in layer.projections)
    x = torch.randn(3, 5, d)
    with torch.no_grad():
        layer.router.weight.normal_()
        expected = mlp(x)
        for impl in ("grouped", "dense"):
            layer.lora_impl = impl
            assert_close(layer(x), expected, 1e-5, what=f"fresh {impl}")
        assert_close(layer.base_ffn(x), expected, 1e-6, what="base_ffn")


def test_lora_from_base_ffn_gelu_module_and_peft_state_dicts():
    timm_mlp = pytest.importorskip("timm.layers").Mlp
    d, f, r, E = 16, 32, 4, 3
    torch.manual_seed(13)
    mlp = timm_mlp(d, f)  # fc1 -> GELU -> fc2, with biases (ViT)
    sds = []
    for _ in range(E):
        sds.append(
            {
                "base_model.model.blocks.0.mlp.fc1.lora_A.weight": torch.randn(r, d) * 0.2,
                "base_model.model.blocks.0.mlp.fc1.lora_B.weight": torch.randn(f, r) * 0.2,
                "base_model.model.blocks.0.mlp.fc2.lora_A.weight": torch.randn(r, f) * 0.2,
                "base_model.model.blocks.0.mlp.fc2.lora_B.weight": torch.randn(d, r) * 0.2,
            }
        )
    del (
        sds[1]["base_model.model.blocks.0.mlp.fc2.lora_A.weight"],
        sds[1]["base_model.model.blocks.0.mlp.fc2.lora_B.weight"],
    )
    layer = LoRAMoELayer.from_base_ffn(mlp, sds, top_k=2, alpha=2.0, backend="torch")
    assert layer.activation == "gelu" and layer.bias and layer.rank == r and layer.num_experts == E
    assert layer.fc1_bias is mlp.fc1.bias and layer.fc2_weight is mlp.fc2.weight
    for e in range(E):
        key = "base_model.model.blocks.0.mlp.fc1.lora_A.weight"
        assert torch.equal(layer.lora_A_fc1[e], sds[e][key])
    assert layer.lora_B_fc2[1].abs().max().item() == 0  # absent projection: zero delta
    x = torch.randn(9, d)
    params = {n: p.detach().to(F64) for n, p in layer.named_parameters()}
    params["router"] = params.pop("router.weight")
    y_ref, _, _ = ref_lora_moe(x.to(F64), layer, params)
    assert_close(layer(x), y_ref, 3e-5, what="y")
    with pytest.raises(ValueError, match="rank"):
        LoRAMoELayer.from_base_ffn(mlp, sds, top_k=2, rank=8)
    bad = dict(sds[0])
    bad["other.fc1.lora_A.weight"] = torch.zeros(r, d)
    with pytest.raises(ValueError, match="exactly one lora_A"):
        LoRAMoELayer.from_base_ffn(mlp, [bad], top_k=1)
    with pytest.raises(ValueError, match="num_experts is required"):
        LoRAMoELayer.from_base_ffn(mlp, None, top_k=1, rank=2)
    with pytest.raises(ValueError, match=r"base_weights\['fc1'\] must have shape"):
        LoRAMoELayer(
            d,
            f + 1,
            2,
            1,
            rank=2,
            activation="gelu",
            bias=True,
            base_weights={
                "fc1": mlp.fc1.weight,
                "fc2": mlp.fc2.weight,
                "fc1_bias": mlp.fc1.bias,
                "fc2_bias": mlp.fc2.bias,
            },
        )


def test_lora_from_whole_model_state_dicts_by_layer_index_and_native_names():
    """metamoe.models.lora's format: keys ``layers.{i}.{native name}.lora_A`` for every layer in one dict."""
    d, f, r = 16, 32, 2
    torch.manual_seed(25)
    base = {"fc1": torch.randn(f, d), "fc2": torch.randn(d, f)}
    sds = []
    for _ in range(2):
        sd = {}
        for i in range(3):
            sd[f"layers.{i}.intermediate.dense.lora_A"] = torch.randn(r, d)
            sd[f"layers.{i}.intermediate.dense.lora_B"] = torch.randn(f, r)
            sd[f"layers.{i}.output.dense.lora_A"] = torch.randn(r, f)
            sd[f"layers.{i}.output.dense.lora_B"] = torch.randn(d, r)
        sds.append(sd)
    names = {"fc1": "intermediate.dense", "fc2": "output.dense"}
    layer = LoRAMoELayer.from_base_ffn(
        base, sds, top_k=1, layer_index=1, lora_key_names=names, backend="torch"
    )
    for e in range(2):
        assert torch.equal(layer.lora_A_fc1[e], sds[e]["layers.1.intermediate.dense.lora_A"])
        assert torch.equal(layer.lora_B_fc2[e], sds[e]["layers.1.output.dense.lora_B"])
    assert layer.fc1_weight.data_ptr() == base["fc1"].data_ptr()
    with pytest.raises(ValueError, match="exactly one lora_A"):  # every layer at once is ambiguous
        LoRAMoELayer.from_base_ffn(base, sds, top_k=1, lora_key_names=names)
    with pytest.raises(ValueError, match="lora_key_names has keys"):
        LoRAMoELayer.from_base_ffn(base, sds, top_k=1, layer_index=0, lora_key_names={"gate": "x"})


def test_lora_context_routing_and_zero_tokens():
    d, f, E = 16, 32, 4
    torch.manual_seed(14)
    layer = LoRAMoELayer(d, f, E, 2, rank=4, backend="torch", context_routing=True, lora_impl="grouped")
    randomize_lora(layer, seed=15)
    x = torch.randn(2, 5, d)
    ctx = torch.randn(2, d)
    y = layer(x, context=ctx)
    params = {n: p.detach().to(F64) for n, p in layer.named_parameters()}
    params["router"] = params.pop("router.weight")
    lam = torch.sigmoid(params["context_lambda_logit"])
    rin = ((1 - lam) * x.to(F64) + lam * ctx.to(F64)[:, None]).reshape(-1, d)
    y_ref, _, _ = ref_lora_moe(x.reshape(-1, d).to(F64), layer, params, router_in=rin)
    assert_close(y.reshape(-1, d), y_ref, 3e-5, what="y")
    empty = layer(torch.zeros(0, 5, d), context=torch.zeros(0, d))
    assert empty.shape == (0, 5, d)


# ------------------------------------------------------------------ Triton (interpreter) and torch.compile


def _triton_reason():
    from metamoe.backends import CallSpec
    from metamoe.ops.moe_experts import moe_experts_op
    from metamoe.ops.router_topk import router_topk_op

    spec = CallSpec("cpu", "float32", {"T": 8, "E": 4, "k": 2, "d": 16, "f": 24, "activation": "swiglu"})
    reasons = router_topk_op.impls["triton"].not_supported_reasons(spec)
    reasons += moe_experts_op.impls["triton"].not_supported_reasons(spec)
    return "; ".join(reasons)


def test_triton_backend_small_case():
    reason = _triton_reason()
    if reason:
        pytest.skip(f"Triton kernels cannot run here: {reason}")
    d, f, E, k = 16, 24, 4, 2
    layer = make_layer(d, f, E, k, seed=16, backend="triton")
    torch.manual_seed(17)
    x = torch.randn(8, d, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    ((y * g).sum() + layer.aux_loss + layer.z_loss).backward()
    x64, wr, wgu, wd = (f64_leaf(t) for t in (x, layer.router.weight, layer.w_gate_up, layer.w_down))
    y_ref, aux_ref, z_ref, _ = ref_moe(x64, wr, wgu, wd, k)
    ((y_ref * g.to(F64)).sum() + aux_ref + z_ref).backward()
    assert_close(y, y_ref, 2e-5, what="y")
    assert_close(x.grad, x64.grad, 5e-5, what="dx")
    assert_close(layer.router.weight.grad, wr.grad, 5e-5, what="d router")
    assert_close(layer.w_gate_up.grad, wgu.grad, 5e-5, what="d w_gate_up")
    assert_close(layer.w_down.grad, wd.grad, 5e-5, what="d w_down")


def test_torch_compile_traces_the_layer_through_the_custom_ops():
    if not hasattr(torch.ops.metamoe, "router_topk") or not hasattr(torch.ops.metamoe, "moe_experts_fwd"):
        pytest.skip("metamoe's router/experts ops are not registered as torch.library custom ops")
    reason = _triton_reason()
    if reason:
        pytest.skip(f"the custom ops run the Triton kernels, which cannot run here: {reason}")
    import torch._dynamo as dynamo

    d, f, E, k = 16, 24, 4, 2
    layer = make_layer(d, f, E, k, seed=18, backend="triton", context_routing=True)
    torch.manual_seed(19)
    x = torch.randn(2, 4, d, requires_grad=True)
    ctx = torch.randn(2, d)
    y_eager = layer(x, context=ctx)
    aux_eager = layer.aux_loss.detach().clone()
    (gx_eager,) = torch.autograd.grad(y_eager.square().sum() + layer.aux_loss, x)
    dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # fullgraph: no graph break anywhere
    y = compiled(x, context=ctx)
    (gx,) = torch.autograd.grad(y.square().sum() + layer.aux_loss, x)
    assert_close(y, y_eager, 1e-6, what="compiled y")
    assert_close(layer.aux_loss, aux_eager, 1e-6, what="compiled aux_loss")
    assert_close(gx, gx_eager, 1e-6, what="compiled dx")


def test_lora_grouped_refuses_what_grouped_mm_cannot_run():
    layer = LoRAMoELayer(16, 32, 4, 2, rank=3, lora_impl="grouped", backend="torch")  # rank 3: 12-byte rows
    with pytest.raises(ValueError, match=r"lora_impl 'grouped' cannot run lora_delta: rank=3 is not a multiple"):
        layer(torch.randn(5, 16))
    layer.lora_impl = "auto"
    assert layer.resolved_lora_impl(torch.randn(5, 16)) == "dense"
    layer64 = LoRAMoELayer(16, 32, 4, 2, rank=4, backend="torch", dtype=F64)
    assert layer64.resolved_lora_impl(torch.randn(5, 16, dtype=F64)) == "dense"


@pytest.mark.parametrize("impl,dtype", [("dense", torch.float32), ("grouped", torch.bfloat16)])
def test_torch_compile_traces_the_lora_layer(impl, dtype):
    import torch._dynamo as dynamo

    torch.manual_seed(20)
    layer = LoRAMoELayer(
        16, 32, 4, 2, rank=8, lora_impl=impl, backend="torch", context_routing=True, dtype=dtype
    )
    randomize_lora(layer, seed=21)
    x = torch.randn(2, 5, 16, dtype=dtype, requires_grad=True)
    ctx = torch.randn(2, 16, dtype=dtype)
    y_eager = layer(x, context=ctx)
    (gx_eager,) = torch.autograd.grad(y_eager.float().square().sum() + layer.aux_loss, x)
    dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x, context=ctx)
    (gx,) = torch.autograd.grad(y.float().square().sum() + layer.aux_loss, x)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert_close(y, y_eager, tol, what="compiled y")
    assert_close(gx, gx_eager, tol * 10, what="compiled dx")


def test_bfloat16_layer_close_to_float64_reference():
    """bf16 layer vs the float64 reference on the same bf16-rounded inputs and weights."""
    d, f, E, k = 16, 24, 4, 2
    layer = make_layer(d, f, E, k, seed=22)
    torch.manual_seed(23)
    x = torch.randn(24, d)
    lb = make_layer(d, f, E, k, seed=22, dtype=torch.bfloat16)
    with torch.no_grad():
        for p, q in zip(lb.parameters(), layer.parameters(), strict=True):
            p.copy_(q)
    xb = x.bfloat16()
    # reference from the bf16-rounded inputs and weights, so only the arithmetic differs
    y_ref, *_ = ref_moe(xb.to(F64), lb.router.weight.to(F64), lb.w_gate_up.to(F64), lb.w_down.to(F64), k)
    err_bf16 = (lb(xb).to(F64) - y_ref).abs().max().item()
    assert lb.router_logits.dtype == torch.bfloat16
    scale = y_ref.abs().max().item()
    assert err_bf16 <= 2e-2 * scale, (err_bf16, scale)


def test_layers_deepcopy_and_pickle_after_a_forward():
    import copy
    import pickle

    torch.manual_seed(24)
    x = torch.randn(6, 16)
    for layer in (make_layer(16, 24, 4, 2), LoRAMoELayer(16, 32, 4, 2, rank=4, backend="torch")):
        y = layer(x)  # aux_loss / router_logits now hold autograd graphs
        for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            assert clone.aux_loss is None
            torch.testing.assert_close(clone(x), y)


# ------------------------------------------------------------------ RouterConfig, one vocabulary, dispatch


def test_router_config_validates_each_field_by_name():
    from metamoe.moe import RouterConfig

    cfg = RouterConfig()
    assert (cfg.top_k, cfg.order, cfg.renormalize, cfg.context_routing) == (None, "softmax_then_topk", True, False)
    with pytest.raises(ValueError, match=r"RouterConfig\.top_k must be >= 1"):
        RouterConfig(top_k=0)
    with pytest.raises(TypeError, match=r"RouterConfig\.top_k must be an integer"):
        RouterConfig(top_k=1.5)
    with pytest.raises(TypeError, match=r"RouterConfig\.top_k"):
        RouterConfig(top_k=True)
    with pytest.raises(ValueError, match=r"RouterConfig\.order \(the layers' router_order\) must be one of"):
        RouterConfig(order="sideways")
    with pytest.raises(TypeError, match=r"RouterConfig\.renormalize must be a bool"):
        RouterConfig(renormalize=1)
    with pytest.raises(TypeError, match=r"RouterConfig\.context_routing must be a bool"):
        RouterConfig(context_routing="yes")
    with pytest.raises(ValueError, match=r"RouterConfig\.aux_loss_coef must be >= 0"):
        RouterConfig(aux_loss_coef=-1.0)
    with pytest.raises(ValueError, match=r"RouterConfig\.z_loss_coef must be finite"):
        RouterConfig(z_loss_coef=float("nan"))
    with pytest.raises(TypeError, match=r"RouterConfig\.z_loss_coef must be a number"):
        RouterConfig(z_loss_coef="0.1")
    for lam in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"RouterConfig\.context_lambda_init must lie strictly inside \(0, 1\)"):
            RouterConfig(context_lambda_init=lam)
    # frozen, and replace() validates again
    with pytest.raises(AttributeError):
        cfg.top_k = 3
    assert cfg.replace(top_k=np.int64(3)).top_k == 3 and type(cfg.replace(top_k=np.int64(3)).top_k) is int
    with pytest.raises(ValueError, match=r"RouterConfig\.top_k"):
        cfg.replace(top_k=-2)


ROUTER_KWARGS = dict(router_order="topk_then_softmax", renormalize=False, aux_loss_coef=0.05, z_loss_coef=0.0,
                     context_routing=True, context_lambda_init=0.25)
ROUTER_FIELDS = dict(order="topk_then_softmax", renormalize=False, aux_loss_coef=0.05, z_loss_coef=0.0,
                     context_routing=True, context_lambda_init=0.25)


def _same_layers(a, b, x, ctx):
    assert a.router_config == b.router_config
    assert (a.top_k, a.router_order, a.renormalize, a.aux_loss_coef, a.z_loss_coef, a.context_routing) == (
        b.top_k, b.router_order, b.renormalize, b.aux_loss_coef, b.z_loss_coef, b.context_routing)
    assert repr(a) == repr(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)
    torch.testing.assert_close(a(x, context=ctx), b(x, context=ctx), rtol=0, atol=0)
    torch.testing.assert_close(a.router_loss, b.router_loss, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["moe", "lora"])
def test_layers_from_router_config_equal_layers_from_keyword_arguments(kind):
    from metamoe.moe import RouterConfig

    def build(**kw):
        torch.manual_seed(30)
        if kind == "moe":
            return MoELayer(16, 24, 4, backend="torch", **kw)
        return LoRAMoELayer(16, 32, 4, rank=4, backend="torch", **kw)

    by_kwargs = build(top_k=2, **ROUTER_KWARGS)
    by_config = build(router=RouterConfig(top_k=2, **ROUTER_FIELDS))
    top_k_apart = build(top_k=2, router=RouterConfig(**ROUTER_FIELDS))  # top_k from the layer, the rest from it
    torch.manual_seed(31)
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 16)
    _same_layers(by_kwargs, by_config, x, ctx)
    _same_layers(by_kwargs, top_k_apart, x, ctx)
    assert by_config.router_config == RouterConfig(top_k=2, **ROUTER_FIELDS)
    # defaults: no router options at all is RouterConfig()'s defaults
    assert build(top_k=1).router_config == RouterConfig(top_k=1)


def test_router_config_and_keyword_arguments_do_not_mix():
    from metamoe.moe import RouterConfig

    with pytest.raises(TypeError, match=r"router options given twice: .*\['renormalize'\]"):
        MoELayer(8, 12, 4, 2, router=RouterConfig(), renormalize=False)
    with pytest.raises(ValueError, match=r"top_k=2 but router=RouterConfig\(top_k=3\)"):
        MoELayer(8, 12, 4, 2, router=RouterConfig(top_k=3))
    with pytest.raises(TypeError, match="top_k is required"):
        MoELayer(8, 12, 4)
    with pytest.raises(TypeError, match="router must be a RouterConfig"):
        LoRAMoELayer(8, 12, 4, 2, rank=2, router={"top_k": 2})
    with pytest.raises(ValueError, match=r"top_k must be <= num_experts \(4\)"):
        MoELayer(8, 12, 4, router=RouterConfig(top_k=5))
    # the layer classmethods take router= too
    wr, wgu, wd = torch.randn(4, 8), torch.randn(4, 24, 8), torch.randn(4, 8, 12)
    layer = MoELayer.from_parameters(wr, wgu, wd, router=RouterConfig(top_k=2, context_routing=True,
                                                                      context_lambda_init=0.25))
    assert layer.top_k == 2 and math.isclose(layer.context_lambda.item(), 0.25, rel_tol=1e-6)


def test_moe_layer_takes_the_ops_activations():
    """One list of activations: the layer takes every activation of moe_experts (gelu_tanh included)."""
    import importlib

    import metamoe.moe as moe

    assert moe.ACTIVATIONS is importlib.import_module("metamoe.ops.moe_experts").ACTIVATIONS
    layer = make_layer(16, 24, 4, 2, activation="gelu_tanh")
    x = torch.randn(7, 16)
    wr, wgu, wd = (t.detach().to(F64) for t in (layer.router.weight, layer.w_gate_up, layer.w_down))
    routes, *_ = ref_route(x.to(F64) @ wr.t(), 2)
    y_ref = torch.stack([sum(w[j] * (wd[e] @ F.gelu(wgu[e] @ x[t].to(F64), approximate="tanh"))
                             for j, e in enumerate(idx)) for t, (w, idx) in enumerate(routes)])
    assert_close(layer(x), y_ref, 2e-5, what="gelu_tanh y")


def test_lora_explicit_impl_that_cannot_run_raises_naming_the_reason():
    from metamoe.backends import BackendNotSupportedError

    layer = LoRAMoELayer(16, 32, 4, 2, rank=4, lora_impl="grouped", backend="torch", dtype=F64)
    with pytest.raises(BackendNotSupportedError, match=r"lora_impl 'grouped' cannot run lora_delta: dtype float64 "
                                                       r"is not supported"):
        layer(torch.randn(3, 16, dtype=F64))
    layer.lora_impl = "auto"  # auto falls back to dense, which takes float64
    assert layer.resolved_lora_impl(torch.randn(3, 16, dtype=F64)) == "dense"
    assert layer(torch.randn(3, 16, dtype=F64)).shape == (3, 16)
    with pytest.raises(ValueError, match=r"lora_impl must be one of 'auto', 'grouped', 'dense'"):
        LoRAMoELayer(16, 32, 4, 2, rank=4, lora_impl="fast")
