"""Seed-model registry: names, timm and transformers models from configs, local checkpoints, FFN adapters, hashing."""

import socket

import pytest
import torch

from metamoe.models import (
    ADAPTERS,
    apply_lora,
    create_seed_model,
    ffn_input_hooks,
    ffn_weights,
    merge_lora,
    parse_model_name,
    weight_hash,
)

VIT = "timm:vit_tiny_patch16_224"
VIT_CFG = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=3, num_heads=2)
HF_CFG = dict(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=32,
)


# tiny models: one torch thread (see conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _hf_cfg(arch):
    cfg = dict(HF_CFG)
    if arch != "bert":
        cfg["num_key_value_heads"] = 2
    return cfg


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Nothing in this file may open a network connection (models are built or loaded locally)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _vit(seed=0, **kw):
    return create_seed_model(VIT, num_classes=10, seed=seed, **{**VIT_CFG, **kw})


def _images(n=5, seed=0):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _tokens(n=3, length=6, vocab=61, seed=0):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- names


def test_parse_model_name():
    assert parse_model_name("timm:vit_tiny_patch16_224") == ("timm", "vit_tiny_patch16_224")
    assert parse_model_name("hf:llama") == ("hf", "llama")


@pytest.mark.parametrize(
    "name, message",
    [
        ("foo:bar", "unknown source 'foo' in 'foo:bar'; known: timm, hf"),
        ("vit_tiny_patch16_224", "has no source prefix"),
        ("timm:", "empty or blank architecture"),
        ("hf: llama", "empty or blank architecture"),
    ],
)
def test_parse_model_name_errors(name, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_model_name(name)


def test_parse_model_name_type():
    with pytest.raises(TypeError, match="model name must be a string"):
        parse_model_name(3)


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("timm:vit_no_such_model", {}, "unknown timm architecture 'vit_no_such_model'"),
        (
            "timm:resnet18",
            {},
            "timm architecture 'resnet18' has no FFN adapter; supported timm modules: vision_transformer",
        ),
        ("hf:gpt2", {}, "unknown transformers architecture 'gpt2' for source 'hf'; known: llama"),
        ("hf:llama", {"hidden_sise": 32}, "unknown config field\\(s\\) for hf:llama: hidden_sise"),
        ("hf:llama", {"num_classes": 3}, "num_classes applies to classification models"),
        ("hf:bert", {"task": "causal_lm"}, "task='causal_lm' is not available for hf:bert"),
        ("timm:vit_tiny_patch16_224", {"task": "causal_lm"}, "not available for timm"),
        ("timm:vit_tiny_patch16_224", {"task": "segmentation"}, "task must be one of"),
        ("timm:vit_tiny_patch16_224", {"num_classes": 0}, "num_classes must be a positive int"),
    ],
)
def test_create_errors(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_seed_model(name, **kwargs)


def test_gated_vit_variant_has_no_adapter():
    # timm ViTs with a SwiGLU MLP are in the same module but not fc1 -> act -> fc2: refused by name, not guessed
    with pytest.raises(ValueError, match="expected timm.layers.Mlp"):
        create_seed_model(
            "timm:vit_medium_patch16_gap_256",
            img_size=8,
            patch_size=2,
            in_chans=1,
            embed_dim=32,
            depth=1,
            num_heads=2,
            mlp_layer=__import__("timm").layers.SwiGLUPacked,
            act_layer=torch.nn.SiLU,
            mlp_ratio=2.0,
        )


# --------------------------------------------------------------------------- timm


def test_timm_from_config():
    m = _vit()
    x = _images()
    b = m.prepare(x)
    assert m(b).shape == (5, 10)
    assert m.features(b).shape == (5, 32) and m.feature_dim == 32
    assert m.num_classes == 10 and m.task == "image_classification" and m.head_path == "head"
    # (n, H, W) is accepted for one-channel models
    assert torch.equal(m(m.prepare(x[:, 0])), m(b))
    layers = m.ffn_layers()
    assert [layer.index for layer in layers] == [0, 1, 2]
    assert layers[1].projections == {"fc1": "blocks.1.mlp.fc1", "fc2": "blocks.1.mlp.fc2"}
    assert layers[0].roles == {"fc1": "up", "fc2": "down"} and layers[0].activation == "gelu"
    assert (layers[0].hidden_size, layers[0].ffn_size) == (32, 128)
    with pytest.raises(ValueError, match=r"must be \(n, 1, H, W\)"):
        m.prepare(torch.rand(2, 3, 8, 8))


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = _vit(seed=0)
    after = torch.rand(3)
    assert torch.equal(before, after)  # building under seed= did not consume the caller's RNG stream
    assert weight_hash(a) == weight_hash(_vit(seed=0))
    assert weight_hash(a) != weight_hash(_vit(seed=1))


def test_timm_save_and_reload_folder(tmp_path):
    m = _vit(seed=3)
    m.save(tmp_path / "vit")
    assert (tmp_path / "vit" / "model.safetensors").is_file() and (tmp_path / "vit" / "config.json").is_file()
    r = create_seed_model(VIT, checkpoint=tmp_path / "vit")
    assert weight_hash(r) == weight_hash(m)
    x = _images()
    with torch.no_grad():
        assert torch.equal(r(r.prepare(x)), m(m.prepare(x)))


def test_timm_reload_weights_file(tmp_path):
    m = _vit(seed=4)
    m.save(tmp_path / "vit")
    r = create_seed_model(VIT, checkpoint=tmp_path / "vit" / "model.safetensors", num_classes=10, **VIT_CFG)
    x = _images()
    with torch.no_grad():
        assert torch.equal(r(r.prepare(x)), m(m.prepare(x)))


def test_timm_checkpoint_of_other_architecture(tmp_path):
    _vit().save(tmp_path / "vit")
    with pytest.raises(
        ValueError, match="holds timm architecture 'vit_tiny_patch16_224', not 'vit_small_patch16_224'"
    ):
        create_seed_model("timm:vit_small_patch16_224", checkpoint=tmp_path / "vit")


def test_missing_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "model"
    for name in (VIT, "hf:llama"):
        with pytest.raises(FileNotFoundError, match=str(missing)):
            create_seed_model(name, checkpoint=missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        create_seed_model(VIT, checkpoint=tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        create_seed_model("hf:llama", checkpoint=tmp_path / "empty")
    with pytest.raises(TypeError, match="checkpoint must be a path"):
        create_seed_model(VIT, checkpoint=3)


# --------------------------------------------------------------------------- transformers


@pytest.mark.parametrize("arch", ["llama", "qwen2", "bert"])
def test_hf_from_config_save_reload(arch, tmp_path):
    kw = {"num_classes": 4} if arch == "bert" else {}
    m = create_seed_model(f"hf:{arch}", seed=0, **kw, **_hf_cfg(arch))
    layers = m.ffn_layers()
    assert len(layers) == 2
    if arch == "bert":
        assert m.task == "sequence_classification" and m.num_classes == 4
        assert layers[1].input_path == "bert.encoder.layer.1.intermediate"
        assert layers[1].roles == {"intermediate.dense": "up", "output.dense": "down"}
        assert layers[0].activation == "gelu"
    else:
        assert m.task == "causal_lm" and m.num_classes is None and m.head_path is None
        assert layers[1].input_path == "model.layers.1.mlp"
        assert layers[0].roles == {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
        assert layers[0].activation == "silu"
    assert (layers[0].hidden_size, layers[0].ffn_size) == (32, 48)
    ids = _tokens()
    b = m.prepare(ids)
    with torch.no_grad():
        logits = m(b)
        assert logits.shape == ((3, 4) if arch == "bert" else (3, 6, 61))
        assert m.features(b).shape == (3, 32)
    m.save(tmp_path / arch)
    r = create_seed_model(f"hf:{arch}", checkpoint=tmp_path / arch)
    assert weight_hash(r) == weight_hash(m)
    with torch.no_grad():
        assert torch.equal(r(r.prepare(ids)), logits)


def test_hf_checkpoint_model_type_mismatch(tmp_path):
    create_seed_model("hf:llama", **_hf_cfg("llama")).save(tmp_path / "llama")
    with pytest.raises(ValueError, match="holds transformers model_type 'llama', not 'qwen2'"):
        create_seed_model("hf:qwen2", checkpoint=tmp_path / "llama")
    with pytest.raises(ValueError, match="is a file"):
        create_seed_model("hf:llama", checkpoint=tmp_path / "llama" / "config.json")


def test_hf_token_input_errors():
    m = create_seed_model("hf:llama", **_hf_cfg("llama"))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, vocab_size=61\)"):
        m.prepare(torch.tensor([[1, 61]]))
    with pytest.raises(TypeError, match="token ids must be integers"):
        m.prepare(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="need 'input_ids'"):
        m.prepare({"ids": torch.zeros(2, 3, dtype=torch.long)})


def test_causal_lm_features_respect_attention_mask():
    m = create_seed_model("hf:llama", seed=0, **_hf_cfg("llama"))
    ids = _tokens(n=2, length=6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        f = m.features(m.prepare({"input_ids": ids, "attention_mask": mask}))
        # row 1 equals the pooled features of its first three tokens alone (causal: padding after them is unseen)
        f1 = m.features(m.prepare(ids[1:, :3]))
    torch.testing.assert_close(f[1], f1[0], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- FFN adapters and hooks


def _models_for_hooks():
    return [
        _vit(seed=0),
        create_seed_model("hf:llama", seed=0, **_hf_cfg("llama")),
        create_seed_model("hf:qwen2", seed=0, **_hf_cfg("qwen2")),
        create_seed_model("hf:bert", seed=0, num_classes=3, **_hf_cfg("bert")),
    ]


@pytest.mark.parametrize("which", range(4))
def test_hooks_capture_ffn_inputs_and_weights_reproduce_ffn(which):
    """The hooked input, pushed through the adapter's weights and activation in float64, gives the FFN's output."""
    m = _models_for_hooks()[which].double()
    layers = m.ffn_layers()
    inputs, outputs = {}, {}
    handles = []
    for layer in layers:
        # output of the FFN: the down projection's output
        down = [n for n, r in layer.roles.items() if r == "down"][0]
        mod = layer.linear(m.net, down)
        handles.append(
            mod.register_forward_hook(lambda _m, _a, out, i=layer.index: outputs.__setitem__(i, out))
        )
    x = _images(4).double() if m.source == "timm" else _tokens(4)
    with torch.no_grad(), ffn_input_hooks(m.net, layers, lambda i, t: inputs.__setitem__(i, t)):
        m(m.prepare(x))
    for h in handles:
        h.remove()
    assert sorted(inputs) == list(range(len(layers)))
    for layer in layers:
        h = inputs[layer.index]
        assert h.dim() == 3 and h.shape[0] == 4 and h.shape[-1] == layer.hidden_size
        with torch.no_grad():
            ref = m.adapter.reference_ffn(layer, ffn_weights(m.net, layer), h)
        torch.testing.assert_close(ref, outputs[layer.index], rtol=1e-12, atol=1e-12)
    # hooks are gone after the block
    inputs.clear()
    with torch.no_grad():
        m(m.prepare(x))
    assert inputs == {}


def test_timm_first_ffn_input_matches_manual_block():
    """Independent of the hook: input of blocks[0].mlp = norm2(x + attn(norm1(x))) on the embedded patches."""
    m = _vit(seed=2).double()
    net = m.net
    x = _images(3).double()
    got = {}
    with torch.no_grad(), ffn_input_hooks(net, m.ffn_layers()[:1], lambda i, t: got.__setitem__(i, t)):
        m(m.prepare(x))
        h = net.norm_pre(net._pos_embed(net.patch_embed(x)))
        blk = net.blocks[0]
        h = h + blk.attn(blk.norm1(h))
        expected = blk.norm2(h)
    torch.testing.assert_close(got[0], expected, rtol=1e-12, atol=1e-12)
    assert got[0].shape == (3, 1 + 16, 32)  # class token + (8/2)^2 patches


def test_adapters_are_declared_by_name():
    assert set(ADAPTERS) == {"timm_vit_mlp", "hf_gated_mlp", "hf_bert_ffn"}
    assert _vit().adapter.name == "timm_vit_mlp"
    assert create_seed_model("hf:qwen2", **_hf_cfg("qwen2")).adapter.name == "hf_gated_mlp"


# --------------------------------------------------------------------------- hashing


def test_weight_hash():
    a = _vit(seed=0)
    h = weight_hash(a)
    assert len(h) == 64 and h == weight_hash(a.net)
    b = _vit(seed=5)
    b.net.load_state_dict(a.net.state_dict())
    assert weight_hash(b) == h  # same weights in another instance: same hash
    with torch.no_grad():
        b.net.blocks[1].mlp.fc2.bias[3] += 1e-6
    assert weight_hash(b) != h  # one changed element changes it
    apply_lora(a, rank=2)
    assert weight_hash(a) == h  # LoRA (B = 0, not merged) leaves the seed hash alone
    merge_lora(a)
    with pytest.raises(ValueError, match="merged LoRA"):
        weight_hash(a)
    with pytest.raises(TypeError, match="SeedModel or torch.nn.Module"):
        weight_hash("model")
