"""The unified model: head and router initialisation from the packages, one RouterConfig for every layer,
float64 equivalences (one forced expert, routed head, two-pass context, soup), a causal-LM decoder, refused seed
families."""

import math

import numpy as np
import pytest
import test_server
import torch

from metamoe.models import create_seed_model, ffn_input_hooks
from metamoe.moe import RouterConfig
from metamoe.unify import expert_from_package, train_expert, write_expert_package
from metamoe.unify.baselines import build_method, method_spec
from metamoe.unify.router_training import train_router
from metamoe.unify.server import proxy_training_set, unified_label_space, validate_packages
from metamoe.unify.unified_model import build_soup_model, build_unified_model

# tiny models: one torch thread (see conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the module-scoped fixtures of test_server.py: a tiny ViT seed, the digit domains, three expert packages
digits, seed_vit, paths, packages = test_server.digits, test_server.seed_vit, test_server.paths, test_server.packages


# --------------------------------------------------------------------------- head and routers from the packages


def test_head_from_packages(packages, seed_vit):
    space = unified_label_space(packages)
    m = build_unified_model(seed_vit, packages)
    head = m.seed.head()
    W = head.weight.detach().double()
    for p, (s, e) in zip(packages, space.private_slices):
        torch.testing.assert_close(W[s:e], p.head_state["weight"][:10].double(), rtol=0, atol=0)
    mean_pub = torch.stack([p.head_state["weight"][10:].double() for p in packages]).mean(0)
    torch.testing.assert_close(W[30:], mean_pub, rtol=1e-6, atol=1e-7)
    assert not any(prm.requires_grad for prm in head.parameters())
    trainable = {k for k, prm in m.named_parameters() if prm.requires_grad}
    assert trainable and all(
        k.endswith("router.weight") or k.endswith("context_lambda_logit") for k in trainable
    )
    assert m.num_experts == 3 and all(layer.top_k == 2 for layer in m.moe_layers)


def test_router_rows_from_prototypes(packages, seed_vit):
    m = build_unified_model(seed_vit, packages, router_init_scale=3.0, center_prototypes=True)
    for i, layer in enumerate(m.moe_layers):
        P = torch.stack([p.prototypes[i].double() for p in packages])
        C = P - P.mean(0)
        want = 3.0 * C / C.norm(dim=1, keepdim=True)
        torch.testing.assert_close(layer.router.weight.detach().double(), want, rtol=1e-5, atol=1e-6)
    raw = build_unified_model(seed_vit, packages, center_prototypes=False, router_init_scale=1.0)
    P0 = torch.stack([p.prototypes[0].double() for p in packages])
    torch.testing.assert_close(
        raw.moe_layers[0].router.weight.detach().double(),
        P0 / P0.norm(dim=1, keepdim=True),
        rtol=1e-5,
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="top_k"):
        build_unified_model(seed_vit, packages, top_k=4)
    with pytest.raises(ValueError, match="router_init_scale"):
        build_unified_model(seed_vit, packages, router_init_scale=0.0)


# --------------------------------------------------------------------------- one RouterConfig


def test_router_config_default_is_shared_by_every_layer(packages, seed_vit):
    m = build_unified_model(seed_vit, packages)
    assert m.router_config == RouterConfig(top_k=2, context_routing=True)  # min(2, E), context on by default
    assert all(layer.router_config is m.router_config for layer in m.moe_layers)
    assert m.context_routing is True
    one = build_unified_model(seed_vit, packages[:1], context_routing=False)
    assert one.router_config == RouterConfig(top_k=1) and one.context_routing is False


@pytest.mark.parametrize("context", [False, True])
def test_router_config_equals_keyword_arguments(packages, seed_vit, digits, context):
    opts = dict(top_k=1, context_routing=context, context_lambda_init=0.3, aux_loss_coef=0.05, z_loss_coef=0.0)
    kw = build_unified_model(seed_vit, packages, **opts).double()
    rc = RouterConfig(**opts)
    cfg = build_unified_model(seed_vit, packages, router=rc).double()
    assert cfg.router_config is rc and kw.router_config == rc
    assert all(layer.router_config is rc for layer in cfg.moe_layers)
    assert cfg.context_routing is context
    sa, sb = kw.state_dict(), cfg.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    b = kw.prepare(digits.public_x[:12])
    assert torch.equal(kw(b), cfg(b))
    assert torch.equal(kw.router_loss(), cfg.router_loss())
    # top_k from the call with a RouterConfig that leaves it open; the router's own options flow to every layer
    m = build_unified_model(seed_vit, packages, router=RouterConfig(order="topk_then_softmax"), top_k=3)
    assert m.router_config == RouterConfig(top_k=3, order="topk_then_softmax")
    assert all(layer.router_order == "topk_then_softmax" and layer.top_k == 3 for layer in m.moe_layers)


def test_router_config_errors(packages, seed_vit):
    rc = RouterConfig(top_k=2)
    with pytest.raises(TypeError, match=r"given twice.*context_routing"):
        build_unified_model(seed_vit, packages, router=rc, context_routing=True)
    with pytest.raises(TypeError, match=r"given twice.*aux_loss_coef"):
        build_unified_model(seed_vit, packages, router=rc, aux_loss_coef=0.1)
    with pytest.raises(ValueError, match="top_k=1 but router=RouterConfig"):
        build_unified_model(seed_vit, packages, router=rc, top_k=1)
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, 3\]"):
        build_unified_model(seed_vit, packages, router=RouterConfig(top_k=4))
    with pytest.raises(TypeError, match="router must be a RouterConfig"):
        build_unified_model(seed_vit, packages, router={"top_k": 2})
    with pytest.raises(ValueError, match="context_lambda_init"):
        build_unified_model(seed_vit, packages, context_lambda_init=1.0)


def test_build_method_keeps_the_methods_context_routing(packages, seed_vit):
    rc = RouterConfig(top_k=1, aux_loss_coef=0.05)
    for name in ("metamoe", "no_context"):
        spec = method_spec(name)
        m = build_method(spec, seed_vit, packages, router=rc)
        assert m.router_config == rc.replace(context_routing=spec.context_routing)
        plain = build_method(spec, seed_vit, packages, top_k=1, aux_loss_coef=0.05)
        assert plain.router_config == m.router_config


# --------------------------------------------------------------------------- equivalences (float64)


@pytest.mark.parametrize("context", [False, True])
@pytest.mark.parametrize("which", [0, 2])
def test_forced_single_expert_equals_that_expert(packages, seed_vit, digits, context, which):
    """Top-1 with an all-zero router: every token ties and goes to expert 0, which is package ``which``."""
    order = [packages[which]] + [p for j, p in enumerate(packages) if j != which]
    m = build_unified_model(
        seed_vit, order, top_k=1, router_init="zeros", context_routing=context, routed_head=False
    ).double()
    expert = expert_from_package(seed_vit, packages[which]).double()
    x = torch.from_numpy(np.concatenate([c.x_test for c in digits.clients])).double()
    b = m.prepare(x)
    with torch.no_grad():
        feats_u, logits_u = m.features(b), m(b)
        feats_e, logits_e = expert.features(expert.prepare(x)), expert(expert.prepare(x))
    torch.testing.assert_close(feats_u, feats_e, rtol=1e-12, atol=1e-12)
    # its private classes are the first block of the unified head, copied from its own head
    torch.testing.assert_close(logits_u[:, :10], logits_e[:, :10], rtol=1e-12, atol=1e-12)
    frac = m.routing_fractions(x)
    np.testing.assert_array_equal(frac[:, 0], 1.0)
    # and the experts really differ from the plain seed (the test would be vacuous otherwise)
    with torch.no_grad():
        base = seed_vit.double().features(seed_vit.prepare(x))
    seed_vit.float()
    assert (feats_e - base).abs().max() > 1e-3


@pytest.mark.parametrize("context", [False, True])
def test_routed_head_adds_log_routing_weight_to_each_private_block(packages, seed_vit, digits, context):
    plain = build_unified_model(seed_vit, packages, routed_head=False, context_routing=context).double()
    routed = build_unified_model(seed_vit, packages, context_routing=context).double()
    assert routed.routed_head and not plain.routed_head
    x = torch.from_numpy(np.concatenate([c.x_test for c in digits.clients])).double()
    b = plain.prepare(x)
    with torch.no_grad():
        lp = plain(b)
        R = plain.moe_layers[-1].router_logits.double()  # (B * S, E), the same routers in both models
        lr = routed(b)
    B, E = len(x), len(packages)
    g = torch.softmax(R, -1).reshape(B, -1, E).mean(1)  # each sample's mean routing probability per expert
    want = lp.clone()
    for c, (s, e) in enumerate(routed.label_space.private_slices):
        want[:, s:e] += torch.log(g[:, c : c + 1])
    torch.testing.assert_close(lr, want, rtol=1e-10, atol=1e-10)
    ps, pe = routed.label_space.public_slice
    torch.testing.assert_close(lr[:, ps:pe], lp[:, ps:pe], rtol=0, atol=0)
    assert (g.max(1).values - g.min(1).values).max() > 1e-2  # the routers are not uniform: the test means something
    torch.testing.assert_close(routed.expert_weights(b).double(), g, rtol=1e-6, atol=1e-7)
    rw = routed.routing_weights(x, batch_size=7)  # batched, in eval mode: the same weights
    np.testing.assert_allclose(rw, g.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(rw.sum(1), 1.0, rtol=0, atol=1e-9)
    p = routed.predict_proba(x.float())
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=0, atol=1e-9)
    assert not build_unified_model(seed_vit, packages[:1]).routed_head  # one expert: nothing to weigh
    with pytest.raises(TypeError, match="routed_head"):
        build_unified_model(seed_vit, packages, routed_head=1)


def test_context_is_mean_ffn_input_of_base_pass(packages, seed_vit, digits):
    m = build_unified_model(seed_vit, packages).double()
    x = torch.from_numpy(digits.clients[1].x_test).double()
    ref = {}
    seed64 = seed_vit.double()
    try:
        with (
            torch.no_grad(),
            ffn_input_hooks(seed64.net, seed64.ffn_layers(), lambda i, t: ref.__setitem__(i, t.mean(1))),
        ):
            seed64(seed64.prepare(x))
    finally:
        seed_vit.float()
    ctx = m.compute_context(m.prepare(x))
    assert ctx.shape == (2, len(x), 16) and ctx.dtype == torch.float64
    for i in range(2):
        torch.testing.assert_close(ctx[i], ref[i], rtol=1e-12, atol=1e-12)


def test_context_on_off(packages, seed_vit, digits):
    on = build_unified_model(seed_vit, packages, context_routing=True).double()
    off = build_unified_model(seed_vit, packages, context_routing=False).double()
    x = torch.from_numpy(digits.clients[0].x_test).double()
    b = on.prepare(x)
    with torch.no_grad():
        y_off = off(b)
        y_on = on(b)
        assert (y_on - y_off).abs().max() > 1e-6  # lambda = 0.5: the context changes the routing
        ctx = on.compute_context(b)
        y_other = on(b, ctx.flip(1))  # someone else's context: a different answer
        assert (y_other - y_on).abs().max() > 1e-6
        for layer in on.moe_layers:  # lambda -> 0: token routing, exactly the no-context model
            layer.context_lambda_logit.fill_(-1e4)
        torch.testing.assert_close(on(b), y_off, rtol=1e-12, atol=1e-12)
    assert all(float(layer.context_lambda.detach()) == 0.0 for layer in on.moe_layers)


def test_soup_averages_lora_updates(packages, seed_vit, digits):
    """Reference: the seed with every FFN weight += mean_e (alpha/r) B_e A_e, in float64."""
    import copy

    soup = build_soup_model(seed_vit, packages).double()
    ref = copy.deepcopy(seed_vit).double()
    space = soup.label_space
    ref.replace_head(space.num_classes)
    ref.head().load_state_dict({k: v.double() for k, v in soup.seed.head().state_dict().items()})
    cfg = packages[0].lora_config
    with torch.no_grad():
        for layer in ref.ffn_layers():
            for proj in cfg.projections:
                delta = sum(
                    p.lora_state[f"layers.{layer.index}.{proj}.lora_B"].double()
                    @ p.lora_state[f"layers.{layer.index}.{proj}.lora_A"].double()
                    for p in packages
                ) * (cfg.scaling / len(packages))
                layer.linear(ref.net, proj).weight.add_(delta)
    x = torch.from_numpy(digits.clients[2].x_test).double()
    with torch.no_grad():
        torch.testing.assert_close(soup(soup.prepare(x)), ref(ref.prepare(x)), rtol=1e-10, atol=1e-10)


def test_causal_lm_decoder_unifies(tmp_path):
    """A transformers LLaMA decoder (gate/up/down FFN): one forced expert == that expert; padded context."""
    cfg = dict(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
    )
    seed = create_seed_model("hf:llama", seed=0, **cfg)
    rng = np.random.default_rng(0)
    pub = rng.integers(0, 40, (20, 8))
    pkg_paths = []
    for i in range(2):
        prox = np.arange(i * 5, i * 5 + 5)
        ex = train_expert(
            seed,
            rng.integers(i * 20, i * 20 + 20, (10, 8)),
            pub[prox],
            lora_rank=2,
            epochs=2,
            lr=2e-2,
            batch_size=8,
            seed=i,
        )
        pkg_paths.append(
            write_expert_package(
                tmp_path / f"c{i}", ex, proxy_indices=prox, public_pool_size=20, method="dpp"
            )
        )
    pkgs = validate_packages(pkg_paths, seed_model=seed)
    assert unified_label_space(pkgs).kind == "vocabulary"
    x = {"input_ids": torch.from_numpy(pub[:6]), "attention_mask": torch.ones(6, 8, dtype=torch.long)}
    x["attention_mask"][0, 5:] = 0
    for which in (0, 1):
        m = build_unified_model(seed, [pkgs[which], pkgs[1 - which]], top_k=1, router_init="zeros").double()
        e = expert_from_package(seed, pkgs[which]).double()
        with torch.no_grad():
            got, want = m(m.prepare(x)), e(e.prepare(x))
            base = seed.double()(seed.prepare(x))
        seed.float()
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert (want - base).abs().max() > 1e-3
    m = build_unified_model(seed, pkgs).double()
    ctx = m.compute_context(m.prepare(x))
    hooks = {}
    seed64 = seed.double()
    try:
        with (
            torch.no_grad(),
            ffn_input_hooks(seed64.net, seed64.ffn_layers(), lambda i, t: hooks.__setitem__(i, t)),
        ):
            seed64(seed64.prepare(x))
    finally:
        seed.float()
    torch.testing.assert_close(ctx[0, 0], hooks[0][0, :5].mean(0), rtol=1e-12, atol=1e-12)  # padding left out
    torch.testing.assert_close(ctx[1, 1], hooks[1][1].mean(0), rtol=1e-12, atol=1e-12)
    xx, yy, _ = proxy_training_set(pkgs, pub, None, m.label_space)
    assert yy is None and len(xx) == 10
    r = train_router(build_unified_model(seed, pkgs), xx, None, epochs=1, batch_size=4)
    assert len(r["loss_per_epoch"]) == 1 and math.isfinite(r["loss_per_epoch"][0])


def test_bert_is_refused_clearly():
    bert = create_seed_model(
        "hf:bert",
        seed=0,
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        num_classes=3,
    )
    with pytest.raises(ValueError, match="hf_bert_ffn"):
        build_unified_model(bert, [])


