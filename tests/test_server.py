"""Server side: package validation, the unified MoE, two-pass context, soup, router training, resume."""

import json
import math
import os

import numpy as np
import pytest
import torch

from metamoe.data.digits import make_digits_domains
from metamoe.models import create_seed_model, ffn_input_hooks
from metamoe.unify import PackageError, expert_from_package, train_expert, write_expert_package
from metamoe.unify.server import (
    UnifiedModel,
    build_soup_model,
    build_unified_model,
    proxy_owners,
    proxy_training_set,
    train_router,
    unified_label_space,
    validate_packages,
)

VIT = "timm:vit_tiny_patch16_224"
VIT_CFG = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=2, num_heads=2, num_classes=10)


# tiny models: one torch thread (see conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    return make_digits_domains(seed=0, n_private=24, n_test=8, public_per_domain=16)


@pytest.fixture(scope="module")
def seed_vit():
    return create_seed_model(VIT, seed=0, **VIT_CFG)


def _spaces(domain):
    return {"private": [f"{domain}:{d}" for d in range(10)], "public": [str(d) for d in range(10)]}


def _package(seed_model, digits, i, path, proxies):
    c = digits.clients[i]
    ex = train_expert(
        seed_model,
        (c.x_train, c.y_train),
        (digits.public_x[proxies], digits.public_y[proxies]),
        _spaces(c.domain),
        lora_rank=2,
        epochs=2,
        lr=2e-2,  # large on purpose: the LoRAs must move far from zero for the equalities below to mean much
        batch_size=16,
        seed=10 + i,
    )
    return write_expert_package(
        path, ex, proxy_indices=proxies, public_pool_size=len(digits.public_x), method="dpp", k=len(proxies)
    )


@pytest.fixture(scope="module")
def paths(seed_vit, digits, tmp_path_factory):
    root = tmp_path_factory.mktemp("pkgs")
    proxies = [np.array([0, 3, 5, 7, 9]), np.array([1, 3, 11, 12]), np.array([2, 20, 21, 22, 5, 30])]
    return [_package(seed_vit, digits, i, root / c.domain, proxies[i]) for i, c in enumerate(digits.clients)]


@pytest.fixture(scope="module")
def packages(paths, seed_vit, digits):
    return validate_packages(paths, seed_model=seed_vit, public_pool_size=len(digits.public_x))


# --------------------------------------------------------------------------- validation


def test_validate_refuses_mixed_seed_models(seed_vit, digits, paths, tmp_path):
    other_weights = create_seed_model(VIT, seed=1, **VIT_CFG)  # same name, different weights
    bad = _package(other_weights, digits, 0, tmp_path / "w", np.array([4, 6]))
    with pytest.raises(PackageError, match="different weights"):
        validate_packages([paths[1], bad])
    with pytest.raises(PackageError, match="seed weights"):
        validate_packages([bad], seed_model=seed_vit)
    other_name = create_seed_model("timm:vit_small_patch16_224", seed=0, **VIT_CFG)
    bad2 = _package(other_name, digits, 0, tmp_path / "n", np.array([4, 6]))
    with pytest.raises(PackageError, match="seed model"):
        validate_packages([paths[1], bad2])


def test_validate_refuses_tampered_and_incomplete_packages(paths, tmp_path):
    import shutil

    t = tmp_path / "tampered"
    shutil.copytree(paths[0], t)
    raw = bytearray((t / "lora.safetensors").read_bytes())
    raw[-3] ^= 0xFF  # flip bits inside the last tensor's data
    (t / "lora.safetensors").write_bytes(bytes(raw))
    with pytest.raises(PackageError, match="was modified"):
        validate_packages([paths[1], t])
    m = tmp_path / "missing"
    shutil.copytree(paths[0], m)
    os.unlink(m / "prototypes.safetensors")
    with pytest.raises(PackageError, match="missing file prototypes.safetensors"):
        validate_packages([m])
    with pytest.raises(PackageError, match="public pool"):
        validate_packages([paths[0]], public_pool_size=10_000)
    with pytest.raises(PackageError, match="given twice"):
        validate_packages([paths[0], paths[0]])
    with pytest.raises(ValueError, match="empty"):
        validate_packages([])
    with pytest.raises(TypeError, match="list of package folders"):
        validate_packages(paths[0])


def test_label_space_and_head(packages, seed_vit):
    space = unified_label_space(packages)
    assert space.names[:10] == tuple(f"upright:{d}" for d in range(10))
    assert space.names[20:30] == tuple(f"inverted:{d}" for d in range(10))
    assert space.names[30:] == tuple(str(d) for d in range(10))
    assert space.private_slices == ((0, 10), (10, 20), (20, 30)) and space.public_slice == (30, 40)
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
    with pytest.raises(ValueError, match="nothing to train"):
        train_router(soup, digits.public_x[:4], np.full(4, 31))


# --------------------------------------------------------------------------- proxies and training


def test_proxy_training_set(packages, digits):
    space = unified_label_space(packages)
    x, y, idx = proxy_training_set(packages, digits.public_x, digits.public_y, space)
    want = [0, 3, 5, 7, 9, 1, 11, 12, 2, 20, 21, 22, 30]  # union, order of first appearance
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_array_equal(x, digits.public_x[want])
    np.testing.assert_array_equal(y, digits.public_y[want] + 30)
    with pytest.raises(PackageError, match="public pool"):
        proxy_training_set(packages, digits.public_x[:50], digits.public_y[:50], space)


def _params(m: UnifiedModel):
    return {k: v.detach().clone() for k, v in m.named_parameters() if v.requires_grad}


@pytest.mark.parametrize("routed", [False, True])
def test_train_router_resume_equals_uninterrupted(packages, seed_vit, digits, tmp_path, routed):
    space = unified_label_space(packages)
    x, y, idx = proxy_training_set(packages, digits.public_x, digits.public_y, space)
    kw = dict(epochs=3, lr=5e-2, batch_size=5, seed=3, checkpoint_every=2)  # 3 steps/epoch, 9 in all
    if routed:
        kw["route_targets"] = proxy_owners(packages, idx)
    full = build_unified_model(seed_vit, packages)
    before = _params(full)
    r_full = train_router(full, x, y, checkpoint_dir=tmp_path / "a", **kw)
    after = _params(full)
    assert any((after[k] - before[k]).abs().max() > 1e-4 for k in after)  # training moved the router

    class Stop(Exception):
        pass

    def stop_at_5(step, loss):
        if step == 5:
            raise Stop

    part = build_unified_model(seed_vit, packages)
    with pytest.raises(Stop):
        train_router(part, x, y, checkpoint_dir=tmp_path / "b", callback=stop_at_5, **kw)
    state = json.loads((tmp_path / "b" / "state.json").read_text())
    assert state["step"] == 4  # the last checkpoint before the interruption
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["ckpt-00000004.safetensors", "state.json"]
    fresh = build_unified_model(seed_vit, packages)  # a new process would start from the same packages
    r_res = train_router(fresh, x, y, checkpoint_dir=tmp_path / "b", **kw)
    assert r_res["resumed_from"] == 4 and r_full["resumed_from"] is None
    for k, v in _params(fresh).items():
        assert torch.equal(v, after[k]), k
    assert r_res["loss_per_epoch"] == r_full["loss_per_epoch"]
    assert r_res.get("route_loss_per_epoch") == r_full.get("route_loss_per_epoch")
    assert ("route_loss_per_epoch" in r_full) == routed
    # a finished run resumes to itself; a different run refuses the folder
    again = build_unified_model(seed_vit, packages)
    train_router(again, x, y, checkpoint_dir=tmp_path / "a", **kw)
    for k, v in _params(again).items():
        assert torch.equal(v, after[k]), k
    with pytest.raises(ValueError, match="different run"):
        train_router(
            build_unified_model(seed_vit, packages), x, y, checkpoint_dir=tmp_path / "a", **{**kw, "lr": 1e-3}
        )


def test_train_router_options_and_errors(packages, seed_vit, digits):
    space = unified_label_space(packages)
    x, y, _ = proxy_training_set(packages, digits.public_x, digits.public_y, space)
    m = build_unified_model(seed_vit, packages, context_routing=False)
    head0 = m.seed.head().weight.detach().clone()
    lora0 = m.moe_layers[0].lora_B_fc1.detach().clone()
    r = train_router(m, x, y, epochs=1, batch_size=8, train_lora=True, train_head=True)
    assert r["final_lambda"] is None and len(r["loss_per_epoch"]) == 1
    assert (m.seed.head().weight - head0).abs().max() > 0
    assert (m.moe_layers[0].lora_B_fc1 - lora0).abs().max() > 0
    with pytest.raises(ValueError, match=r"y must lie in \[0, 40\)"):
        train_router(m, x, np.full(len(x), 40))
    with pytest.raises(ValueError, match="y is required"):
        train_router(m, x)
    with pytest.raises(ValueError, match="epochs"):
        train_router(m, x, y, epochs=0)
    with pytest.raises(TypeError, match="UnifiedModel"):
        train_router(seed_vit, x, y)


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
    paths = []
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
        paths.append(
            write_expert_package(
                tmp_path / f"c{i}", ex, proxy_indices=prox, public_pool_size=20, method="dpp"
            )
        )
    pkgs = validate_packages(paths, seed_model=seed)
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


@pytest.mark.parametrize("block", [None, "public"])
def test_router_task_loss_against_reference(packages, seed_vit, digits, block):
    """One full-batch step: the recorded epoch loss is the cross-entropy of the model before the step."""
    space = unified_label_space(packages)
    x, y, _ = proxy_training_set(packages, digits.public_x, digits.public_y, space)
    lb = space.public_slice if block == "public" else None
    m = build_unified_model(seed_vit, packages)
    with torch.no_grad():
        logits = m(m.prepare(x)).double()
    yt = torch.from_numpy(y)
    if lb is None:
        want = torch.nn.functional.cross_entropy(logits, yt)
    else:
        want = torch.nn.functional.cross_entropy(logits[:, lb[0] : lb[1]], yt - lb[0])
    r = train_router(m, x, y, epochs=1, batch_size=len(x), label_block=lb)
    assert r["loss_per_epoch"][0] == pytest.approx(float(want), rel=1e-5)
    if lb is not None:
        with pytest.raises(ValueError, match="label_block"):
            train_router(m, x, np.zeros(len(x), dtype=np.int64), label_block=lb)


def test_proxy_owners(packages, digits):
    space = unified_label_space(packages)
    _, _, idx = proxy_training_set(packages, digits.public_x, digits.public_y, space)
    picks = [set(p.proxy_indices.tolist()) for p in packages]
    want = np.array([[float(i in s) for s in picks] for i in idx.tolist()])
    want /= want.sum(1, keepdims=True)
    got = proxy_owners(packages, idx)
    np.testing.assert_array_equal(got, want)
    assert got[idx.tolist().index(3)].tolist() == [0.5, 0.5, 0.0]  # picked by clients 0 and 1
    assert got[idx.tolist().index(30)].tolist() == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="pool index 4 .* not a proxy"):
        proxy_owners(packages, np.array([0, 4]))
    with pytest.raises(ValueError, match="1-D integer"):
        proxy_owners(packages, idx.astype(np.float64))


def test_route_loss_against_reference(packages, seed_vit, digits):
    """One full-batch step: the recorded routing loss is the float64 cross-entropy of the targets against each
    sample's mean routing probability per expert, averaged over the layers, of the model before the step."""
    space = unified_label_space(packages)
    x, y, idx = proxy_training_set(packages, digits.public_x, digits.public_y, space)
    t = proxy_owners(packages, idx)
    m = build_unified_model(seed_vit, packages)
    B, E = len(x), len(packages)
    with torch.no_grad():
        m(m.prepare(x))
        want = np.mean(
            [
                float(-(torch.from_numpy(t) * torch.log(
                    torch.softmax(lay.router_logits.double(), -1).reshape(B, -1, E).mean(1))).sum(1).mean())
                for lay in m.moe_layers
            ]
        )
    r = train_router(m, x, y, epochs=1, batch_size=B, route_targets=t, route_loss_coef=0.5)
    assert r["route_loss_per_epoch"][0] == pytest.approx(want, rel=1e-5)
    assert want > 0.1  # the untrained router is far from the targets: the comparison means something


def test_route_loss_teaches_the_router_the_client_domains(packages, seed_vit, digits):
    # proxies drawn from each client's domain, labelled with their public digits (block loss, as the harness
    # trains): the task loss alone barely tells the router which expert owns a domain (the routed head only
    # weighs private classes); the routing loss does, and it carries over to the clients' unseen test images
    space = unified_label_space(packages)
    picks = [np.flatnonzero(digits.public_domain == i)[:12] for i in range(len(packages))]
    x = np.concatenate([digits.public_x[s] for s in picks])
    y = np.concatenate([digits.public_y[s] for s in picks]) + space.public_slice[0]
    t = np.repeat(np.eye(len(packages)), [len(s) for s in picks], axis=0)
    x_test = np.concatenate([c.x_test for c in digits.clients])
    t_test = np.repeat(np.eye(len(packages)), [len(c.x_test) for c in digits.clients], axis=0)
    kw = dict(epochs=10, lr=5e-2, batch_size=12, seed=1, label_block=space.public_slice)
    plain, routed = build_unified_model(seed_vit, packages), build_unified_model(seed_vit, packages)
    train_router(plain, x, y, **kw)
    r = train_router(routed, x, y, route_targets=t, **kw)
    assert r["route_loss_per_epoch"][-1] < r["route_loss_per_epoch"][0]
    own_plain = float((plain.routing_weights(x_test) * t_test).sum(1).mean())
    own_routed = float((routed.routing_weights(x_test) * t_test).sum(1).mean())
    assert own_routed > own_plain + 0.05  # measured: 0.644 vs 0.544


def test_route_targets_errors(packages, seed_vit, digits):
    space = unified_label_space(packages)
    x, y, idx = proxy_training_set(packages, digits.public_x, digits.public_y, space)
    t = proxy_owners(packages, idx)
    m = build_unified_model(seed_vit, packages)
    with pytest.raises(ValueError, match=r"route_targets must be \(n=13, E=3\)"):
        train_router(m, x, y, route_targets=t[:, :2])
    bad = t.copy()
    bad[0] = [1.5, -0.5, 0.0]
    with pytest.raises(ValueError, match="non-negative"):
        train_router(m, x, y, route_targets=bad)
    with pytest.raises(ValueError, match="sum to 1"):
        train_router(m, x, y, route_targets=t * 2)
    with pytest.raises(ValueError, match="route_loss_coef"):
        train_router(m, x, y, route_targets=t, route_loss_coef=0)
