"""Client side: embedding with the frozen seed, proxy-aligned LoRA expert training, router prototypes."""

import numpy as np
import pytest
import torch

from metamoe.data.digits import make_digits_domains
from metamoe.models import create_seed_model, has_lora, weight_hash
from metamoe.unify import compute_prototypes, embed, train_expert

VIT = "timm:vit_tiny_patch16_224"
VIT_CFG = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=10)
LLAMA_CFG = dict(
    vocab_size=40,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=16,
)


# tiny models: one torch thread (see conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    return make_digits_domains(seed=0, n_private=40, n_test=10, public_per_domain=30)


@pytest.fixture(scope="module")
def seed_vit():
    return create_seed_model(VIT, seed=0, **VIT_CFG)


def _spaces(domain):
    return {"private": [f"{domain}/{d}" for d in range(10)], "public": [f"public/{d}" for d in range(10)]}


def _run(seed_vit, digits, seed=0, **kw):
    c = digits.clients[1]
    prox = np.arange(12)
    args = dict(lora_rank=2, epochs=2, lr=5e-3, batch_size=16, seed=seed)
    args.update(kw)
    return train_expert(
        seed_vit,
        (c.x_train, c.y_train),
        (digits.public_x[prox], digits.public_y[prox]),
        _spaces(c.domain),
        **args,
    )


@pytest.fixture(scope="module")
def expert(seed_vit, digits):
    return _run(seed_vit, digits)


# --------------------------------------------------------------------------- embed


def test_embed_shapes_batching_and_frozen(seed_vit, digits):
    x = digits.clients[0].x_train
    h = weight_hash(seed_vit)
    seed_vit.train()  # embed runs in eval mode and restores the flag
    e7 = embed(seed_vit, x, batch_size=7, progress=False)
    assert seed_vit.training
    seed_vit.eval()
    e_all = embed(seed_vit, torch.from_numpy(x), batch_size=1000, progress=True)
    assert e7.shape == (40, 32) and e7.dtype == np.float32
    np.testing.assert_allclose(e7, e_all, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # independent: timm's own pre-logits path on the whole batch
        ref = seed_vit.net.forward_head(
            seed_vit.net.forward_features(torch.from_numpy(x)[:, None]), pre_logits=True
        )
    np.testing.assert_allclose(e_all, ref.numpy(), rtol=1e-5, atol=1e-6)
    assert weight_hash(seed_vit) == h


def test_embed_context_features_are_mean_ffn_inputs(seed_vit, digits):
    """features="context": per sample, each FFN layer's input averaged over its tokens (hooked here directly on
    timm's blocks, float64); "pooled+context" is the pooled embedding followed by those means."""
    from metamoe.unify.client import embedding_dim

    x = digits.clients[1].x_train[:13]
    ctx = embed(seed_vit, x, batch_size=5, progress=False, features="context")
    both = embed(seed_vit, x, batch_size=13, progress=False, features="pooled+context")
    pooled = embed(seed_vit, x, batch_size=13, progress=False)
    assert ctx.shape == (13, 2 * 32) and (
        both.shape == (13, 32 + 2 * 32) == (13, embedding_dim(seed_vit, "pooled+context"))
    )
    seen = {i: [] for i in range(2)}
    hs = [
        blk.mlp.register_forward_pre_hook(lambda _m, a, i=i: seen[i].append(a[0].detach().double()))
        for i, blk in enumerate(seed_vit.net.blocks)
    ]
    with torch.no_grad():
        seed_vit.net(torch.from_numpy(x)[:, None])
    for h in hs:
        h.remove()
    ref = torch.cat([seen[0][0].mean(1), seen[1][0].mean(1)], dim=1).numpy()
    np.testing.assert_allclose(ctx, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(both[:, 32:], ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(both[:, :32], pooled)
    with pytest.raises(ValueError, match="features must be one of"):
        embed(seed_vit, x, progress=False, features="pixels")


def test_embed_context_of_a_causal_lm_skips_padding():
    seed = create_seed_model("hf:llama", seed=0, **LLAMA_CFG)
    ids = torch.randint(0, 40, (6, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1::2, 4:] = 0  # right padding on half the rows
    got = embed(seed, {"input_ids": ids, "attention_mask": mask}, batch_size=4, progress=False, features="context")
    seen = {0: [], 1: []}
    hs = [
        seed.net.model.layers[i].mlp.register_forward_pre_hook(
            lambda _m, a, i=i: seen[i].append(a[0].detach().double())
        )
        for i in range(2)
    ]
    with torch.no_grad():
        seed.net(input_ids=ids, attention_mask=mask)
    for h in hs:
        h.remove()
    m = mask.double().unsqueeze(-1)
    ref = torch.cat([(seen[i][0] * m).sum(1) / m.sum(1) for i in range(2)], dim=1).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_embed_errors(seed_vit):
    with pytest.raises(ValueError, match="data is empty"):
        embed(seed_vit, np.zeros((0, 8, 8), np.float32), progress=False)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        embed(seed_vit, np.zeros((2, 8, 8), np.float32), batch_size=0)
    with pytest.raises(TypeError, match="must be a SeedModel"):
        embed(seed_vit.net, np.zeros((2, 8, 8), np.float32))


# --------------------------------------------------------------------------- train_expert on digits


def test_expert_outputs(expert, seed_vit, digits):
    assert expert.seed_name == VIT and expert.seed_hash == weight_hash(seed_vit)
    assert not has_lora(seed_vit)  # the seed itself is untouched
    assert has_lora(expert.model)
    assert expert.head_state["weight"].shape == (20, 32) and expert.head_state["bias"].shape == (20,)
    assert sorted(expert.lora_state) == sorted(
        f"layers.{i}.{p}.lora_{ab}" for i in range(2) for p in ("fc1", "fc2") for ab in "AB"
    )
    assert any(
        float(v.abs().sum()) > 0 for k, v in expert.lora_state.items() if k.endswith("lora_B")
    )  # it trained
    assert expert.label_space == {"kind": "classes", **_spaces("rotated")}
    m = expert.metrics
    assert (
        m["n_private"] == 40
        and m["n_proxies"] == 12
        and m["steps"] == 2 * 4
        and len(m["loss_per_epoch"]) == 2
    )
    assert 0.0 <= m["private_accuracy"] <= 1.0 and 0.0 <= m["proxy_accuracy"] <= 1.0
    assert m["prototype_tokens"] == (40 + 12) * 17  # every token of every training image


def _direct_ffn_means(net, x_all):
    """Independent of metamoe's hook helper: pre-hooks straight on net.blocks[i].mlp, all tokens kept, mean in NumPy."""
    seen = {i: [] for i in range(len(net.blocks))}
    hs = [
        blk.mlp.register_forward_pre_hook(lambda _m, a, i=i: seen[i].append(a[0].detach().double().numpy()))
        for i, blk in enumerate(net.blocks)
    ]
    net.eval()
    with torch.no_grad():
        net(torch.from_numpy(x_all)[:, None])
    for h in hs:
        h.remove()
    return np.stack([np.concatenate(seen[i]).reshape(-1, seen[i][0].shape[-1]).mean(0) for i in sorted(seen)])


def test_prototypes_equal_direct_mean_of_ffn_inputs(expert, digits):
    c = digits.clients[1]
    x_all = np.concatenate([c.x_train, digits.public_x[:12]])
    ref = _direct_ffn_means(expert.model.net, x_all)
    assert expert.prototypes.shape == (2, 32) and expert.prototypes.dtype == torch.float32
    np.testing.assert_allclose(expert.prototypes.numpy(), ref, rtol=1e-5, atol=1e-6)
    # prototype_data="private": the private images alone
    p, tokens = compute_prototypes(expert.model, c.x_train, batch_size=9)
    np.testing.assert_allclose(
        p.numpy(), _direct_ffn_means(expert.model.net, c.x_train), rtol=1e-5, atol=1e-6
    )
    assert tokens == 40 * 17


def test_deterministic_with_seed(expert, seed_vit, digits):
    again = _run(seed_vit, digits, seed=0)
    for k in expert.lora_state:
        assert torch.equal(again.lora_state[k], expert.lora_state[k]), k
    assert torch.equal(again.head_state["weight"], expert.head_state["weight"])
    assert torch.equal(again.prototypes, expert.prototypes)
    other = _run(seed_vit, digits, seed=1, epochs=1)
    assert not torch.equal(other.lora_state["layers.0.fc1.lora_A"], expert.lora_state["layers.0.fc1.lora_A"])


def test_training_targets_the_concatenated_label_space(seed_vit, digits):
    """Proxies with public label j train head class 10 + j: only those public head biases rise.

    The seed is random, so its pooled features barely vary between images and the head mostly learns the
    label prior; that is exactly what this checks: public classes 2 and 5 (head 12, 15) are the only public
    targets, every other public class is never a target and its bias can only fall.
    """
    import copy

    c = digits.clients[0]
    prox = np.flatnonzero(np.isin(digits.public_y, [2, 5]))[:16]
    ex = train_expert(
        seed_vit,
        (c.x_train[:24], c.y_train[:24]),
        (digits.public_x[prox], digits.public_y[prox]),
        _spaces(c.domain),
        lora_rank=2,
        epochs=6,
        lr=2e-2,
        batch_size=20,
        seed=0,
    )
    init = copy.deepcopy(seed_vit)
    init.replace_head(20, seed=0)  # the head train_expert starts from (same seed)
    delta = ex.head_state["bias"] - init.head().bias.detach()
    public = delta[10:]
    assert float(public[[2, 5]].min()) > 0
    assert float(public[[0, 1, 3, 4, 6, 7, 8, 9]].max()) < 0
    losses = ex.metrics["loss_per_epoch"]
    assert losses[-1] < losses[0]


def test_private_only_training(seed_vit, digits):
    c = digits.clients[2]
    ex = train_expert(
        seed_vit,
        (c.x_train[:16], c.y_train[:16]),
        None,
        _spaces(c.domain),
        lora_rank=2,
        epochs=1,
        batch_size=8,
        prototype_data="private",
    )
    assert ex.metrics["n_proxies"] == 0 and "proxy_accuracy" not in ex.metrics
    assert ex.metrics["prototype_tokens"] == 16 * 17


@pytest.mark.parametrize(
    "change, exc, message",
    [
        (dict(proxies=(np.zeros((0, 8, 8), np.float32), np.zeros(0, np.int64))), ValueError, "zero proxies"),
        (
            dict(label_spaces={"private": ["a", "b"], "public": ["b", "c"]}),
            ValueError,
            "label spaces collide",
        ),
        (dict(label_spaces=None), ValueError, "label_spaces is required"),
        (dict(label_spaces={"private": ["a", "a"], "public": []}), ValueError, "duplicate class names"),
        (
            dict(private=(np.zeros((3, 8, 8), np.float32), np.array([0, 1, 2]))),
            ValueError,
            r"private y must lie in \[0, 2\)",
        ),
        (
            dict(private=(np.zeros((3, 8, 8), np.float32), np.array([0, 1]))),
            ValueError,
            "one label per sample",
        ),
        (
            dict(private=(np.zeros((3, 8, 8), np.float32), np.array([0.0, 1.0, 1.0]))),
            TypeError,
            "integer class",
        ),
        (
            dict(proxies=(np.zeros((2, 8, 8), np.float32), np.array([0, 5]))),
            ValueError,
            r"proxies y must lie in \[0, 2\)",
        ),
        (dict(private=np.zeros((3, 8, 8), np.float32)), TypeError, r"private must be a tuple \(x, y\)"),
        (
            dict(private=(np.zeros((0, 8, 8), np.float32), np.zeros(0, np.int64))),
            ValueError,
            "private is empty",
        ),
        (
            dict(private=(np.zeros((2, 3, 8, 8), np.float32), np.array([0, 1]))),
            ValueError,
            r"must be \(n, 1, H, W\)",
        ),
        (dict(prototype_data="all"), ValueError, "prototype_data must be one of"),
        (dict(epochs=0), ValueError, "epochs must be a positive int"),
        (dict(lr=-1.0), ValueError, "lr must be a positive"),
    ],
)
def test_train_expert_errors(seed_vit, change, exc, message):
    args = dict(
        private=(np.zeros((2, 8, 8), np.float32), np.array([0, 1])),
        proxies=(np.zeros((2, 8, 8), np.float32), np.array([0, 1])),
        label_spaces={"private": ["a", "b"], "public": ["c", "d"]},
    )
    args.update(epochs=1)
    args.update(change)
    with pytest.raises(exc, match=message):
        train_expert(seed_vit, **args)


def test_train_expert_refuses_lora_seed(expert):
    with pytest.raises(ValueError, match="already has LoRA"):
        train_expert(
            expert.model,
            (np.zeros((2, 8, 8), np.float32), np.array([0, 1])),
            None,
            {"private": ["a", "b"], "public": []},
        )


# --------------------------------------------------------------------------- the language path


def test_causal_lm_expert_and_masked_prototypes():
    seed = create_seed_model("hf:llama", seed=0, **LLAMA_CFG)
    g = torch.Generator().manual_seed(0)
    priv = torch.randint(0, 20, (10, 8), generator=g)  # "domain" A: low token ids
    mask = torch.ones_like(priv)
    mask[::2, 5:] = 0  # right padding on half the rows
    prox = torch.randint(20, 40, (6, 8), generator=g)
    private = {"input_ids": priv, "attention_mask": mask}
    ex = train_expert(seed, private, prox, None, lora_rank=2, epochs=2, lr=1e-2, batch_size=4, seed=0)
    assert ex.head_state is None and ex.label_space == {"kind": "vocabulary", "size": 40}
    assert ex.prototypes.shape == (2, 32)
    n_tokens = int(mask.sum()) + 6 * 8
    assert ex.metrics["prototype_tokens"] == n_tokens
    assert sorted({k.split(".")[2] for k in ex.lora_state}) == ["down_proj", "gate_proj", "up_proj"]
    # direct masked mean of the hooked FFN inputs
    net = ex.model.net
    seen = {0: [], 1: []}
    hs = [
        net.model.layers[i].mlp.register_forward_pre_hook(
            lambda _m, a, i=i: seen[i].append(a[0].detach().double())
        )
        for i in range(2)
    ]
    with torch.no_grad():
        net(input_ids=priv, attention_mask=mask)
        net(input_ids=prox, attention_mask=torch.ones_like(prox))
    for h in hs:
        h.remove()
    keep = torch.cat([mask, torch.ones_like(prox)]).bool()
    for i in range(2):
        tokens = torch.cat(seen[i])[keep]
        assert tokens.shape == (n_tokens, 32)
        torch.testing.assert_close(ex.prototypes[i].double(), tokens.mean(0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="a causal LM trains on next tokens"):
        train_expert(seed, (priv, torch.zeros(10, dtype=torch.long)), None, None)
    with pytest.raises(ValueError, match="label_spaces applies to classification"):
        train_expert(seed, priv, None, {"private": ["a"], "public": []})


def test_bert_classifier_expert():
    seed = create_seed_model(
        "hf:bert",
        seed=0,
        num_classes=2,
        vocab_size=30,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
    )
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 30, (8, 6), generator=g), torch.tensor([0, 1] * 4)
    px, py = torch.randint(0, 30, (4, 6), generator=g), torch.tensor([0, 1, 2, 0])
    ex = train_expert(
        seed,
        (x, y),
        (px, py),
        {"private": ["pos", "neg"], "public": ["x", "y", "z"]},
        lora_rank=2,
        epochs=1,
        batch_size=4,
    )
    assert ex.head_state["weight"].shape == (5, 32)
    assert ex.prototypes.shape == (2, 32) and ex.metrics["prototype_tokens"] == 12 * 6
    assert seed.num_classes == 2 and ex.model.num_classes == 5
