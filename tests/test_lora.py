"""LoRA on every FFN projection: exact identity at init, only LoRA trains, merge == unmerged (float64), state dicts."""

import pytest
import torch

from metamoe.models import (
    LoRALinear,
    apply_lora,
    create_seed_model,
    has_lora,
    load_lora_state_dict,
    lora_modules,
    lora_state_dict,
    merge_lora,
    merged,
    remove_lora,
    trainable_parameters,
    unmerge_lora,
    weight_hash,
)

VIT_CFG = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=5)
LLAMA_CFG = dict(
    vocab_size=50,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=16,
)


# tiny models: one torch thread (see conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(kind, seed=0):
    if kind == "vit":
        return create_seed_model("timm:vit_tiny_patch16_224", seed=seed, **VIT_CFG)
    if kind == "bert":
        return create_seed_model(
            "hf:bert",
            seed=seed,
            num_classes=3,
            vocab_size=50,
            hidden_size=32,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    return create_seed_model("hf:llama", seed=seed, **LLAMA_CFG)


def _inputs(kind, n=3):
    g = torch.Generator().manual_seed(7)
    if kind == "vit":
        return torch.rand(n, 1, 8, 8, generator=g)
    return torch.randint(0, 50, (n, 5), generator=g)


def _randomize_lora(model, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in lora_modules(model).values():
            mod.lora_B.copy_(
                torch.randn(mod.lora_B.shape, generator=g, dtype=torch.float64).to(mod.lora_B.dtype) * scale
            )


@pytest.mark.parametrize("kind", ["vit", "llama", "bert"])
def test_fresh_lora_equals_base(kind):
    m = _model(kind)
    x = _inputs(kind)
    with torch.no_grad():
        base = m(m.prepare(x))
    cfg = apply_lora(m, rank=4)
    n_layers = len(m.ffn_layers())
    mods = lora_modules(m)
    assert len(mods) == n_layers * len(m.adapter.projection_names) and has_lora(m)
    assert cfg.rank == 4 and cfg.alpha == 8.0 and cfg.projections == m.adapter.projection_names
    for mod in mods.values():
        assert float(mod.lora_A.detach().abs().sum()) > 0 and float(mod.lora_B.detach().abs().sum()) == 0
    with torch.no_grad():
        assert torch.equal(m(m.prepare(x)), base)  # B = 0: bit-identical


def test_only_lora_trains():
    m = _model("vit")
    apply_lora(m, rank=2, seed=1)
    names = set(trainable_parameters(m))
    assert names and all(n.endswith(".lora_A") or n.endswith(".lora_B") for n in names)
    assert len(names) == 2 * 2 * 2  # 2 layers x (fc1, fc2) x (A, B)
    frozen = {n: p.detach().clone() for n, p in m.net.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in m.net.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in m.net.parameters() if p.requires_grad], lr=0.5)
    m.train()
    x = _inputs("vit", 8)
    y = torch.arange(8) % 5
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(m(m.prepare(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in m.net.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
            assert p.grad is None, n
    changed = [
        n for n, p in m.net.named_parameters() if n in lora_before and not torch.equal(p, lora_before[n])
    ]
    assert any(n.endswith("lora_B") for n in changed) and any(n.endswith("lora_A") for n in changed)


def test_lora_linear_against_float64_reference():
    torch.manual_seed(0)
    lin = torch.nn.Linear(7, 5).double()
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    mod = LoRALinear(lin, rank=3, alpha=6.0, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mod.lora_B.copy_(torch.randn(5, 3, dtype=torch.float64))
    x = torch.randn(4, 2, 7, dtype=torch.float64)
    ref = x @ (w0 + 2.0 * mod.lora_B.detach() @ mod.lora_A.detach()).T + b0
    torch.testing.assert_close(mod(x), ref, rtol=1e-12, atol=1e-12)
    assert mod.weight is lin.weight  # the base Parameter itself, not a copy
    bound = 1 / 7**0.5
    assert float(mod.lora_A.detach().abs().max()) <= bound


@pytest.mark.parametrize("kind", ["vit", "llama", "bert"])
def test_merge_equals_unmerged_float64(kind):
    m = _model(kind).double()
    apply_lora(m, rank=3, alpha=5.0)
    _randomize_lora(m)
    x = _inputs(kind)
    if kind == "vit":
        x = x.double()
    w_before = {k: mod.weight.detach().clone() for k, mod in lora_modules(m).items()}
    with torch.no_grad():
        unmerged_out = m(m.prepare(x))
        with merged(m):
            assert all(mod.merged for mod in lora_modules(m).values())
            merged_out = m(m.prepare(x))
            merge_lora(m)  # idempotent
        assert not any(mod.merged for mod in lora_modules(m).values())
    torch.testing.assert_close(merged_out, unmerged_out, rtol=1e-11, atol=1e-11)
    assert not torch.allclose(unmerged_out, _base_output(kind, x))  # the LoRA update does change the output
    for k, mod in lora_modules(m).items():
        torch.testing.assert_close(mod.weight, w_before[k], rtol=0, atol=1e-14)
    unmerge_lora(m)  # idempotent
    for k, mod in lora_modules(m).items():
        torch.testing.assert_close(mod.weight, w_before[k], rtol=0, atol=1e-14)


def _base_output(kind, x):
    m = _model(kind).double()
    with torch.no_grad():
        return m(m.prepare(x))


def test_state_dict_roundtrip_and_keys():
    a = _model("llama")
    apply_lora(a, rank=2, seed=3)
    _randomize_lora(a, seed=4)
    sd = lora_state_dict(a)
    assert sorted(sd) == sorted(
        f"layers.{i}.{p}.lora_{ab}"
        for i in range(2)
        for p in ("gate_proj", "up_proj", "down_proj")
        for ab in "AB"
    )
    assert sd["layers.1.down_proj.lora_A"].shape == (2, 40) and sd["layers.1.down_proj.lora_B"].shape == (
        32,
        2,
    )
    assert sd["layers.0.gate_proj.lora_A"].shape == (2, 32) and sd["layers.0.gate_proj.lora_B"].shape == (
        40,
        2,
    )
    b = _model("llama")
    apply_lora(b, rank=2, seed=99)
    load_lora_state_dict(b, sd)
    x = _inputs("llama")
    with torch.no_grad():
        assert torch.equal(a(a.prepare(x)), b(b.prepare(x)))
    sd["layers.0.up_proj.lora_A"].add_(1.0)  # returned tensors are copies: the model is untouched
    assert not torch.equal(lora_state_dict(a)["layers.0.up_proj.lora_A"], sd["layers.0.up_proj.lora_A"])


def test_state_dict_errors():
    m = _model("vit")
    with pytest.raises(ValueError, match="no LoRA adapters"):
        lora_state_dict(m)
    apply_lora(m, rank=2)
    sd = lora_state_dict(m)
    bad = dict(sd)
    bad.pop("layers.1.fc2.lora_B")
    with pytest.raises(ValueError, match="missing \\['layers.1.fc2.lora_B'\\]"):
        load_lora_state_dict(m, bad)
    bad = dict(sd, **{"layers.1.fc2.lora_B": torch.zeros(32, 3)})
    with pytest.raises(ValueError, match="has shape \\(32, 3\\), the model expects \\(32, 2\\)"):
        load_lora_state_dict(m, bad)
    bad = dict(sd, **{"layers.1.fc2.lora_B": torch.full((32, 2), float("nan"))})
    with pytest.raises(ValueError, match="NaN or inf"):
        load_lora_state_dict(m, bad)
    merge_lora(m)
    with pytest.raises(ValueError, match="is merged"):
        load_lora_state_dict(m, sd)


def test_apply_lora_errors_and_subset():
    m = _model("vit")
    with pytest.raises(ValueError, match="rank must be a positive int"):
        apply_lora(m, rank=0)
    with pytest.raises(ValueError, match="projections must be distinct names among fc1, fc2"):
        apply_lora(m, rank=2, projections=["fc3"])
    with pytest.raises(ValueError, match="dropout must be in"):
        apply_lora(m, rank=2, dropout=1.0)
    with pytest.raises(TypeError, match="must be a SeedModel"):
        apply_lora(m.net, rank=2)
    cfg = apply_lora(m, rank=2, projections=["fc1"])
    assert cfg.projections == ("fc1",)
    assert set(k[1] for k in lora_modules(m)) == {"fc1"}
    assert isinstance(m.net.blocks[0].mlp.fc2, torch.nn.Linear)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(m, rank=2)


def test_remove_lora_restores_plain_linears():
    m = _model("vit")
    h = weight_hash(m)
    apply_lora(m, rank=2)
    _randomize_lora(m)
    remove_lora(m)
    assert not has_lora(m)
    assert type(m.net.blocks[1].mlp.fc1) is torch.nn.Linear
    assert weight_hash(m) == h


def test_dropout_only_in_training():
    m = _model("vit")
    x = _inputs("vit")
    with torch.no_grad():
        base = m(m.prepare(x))
    apply_lora(m, rank=2, dropout=0.5)
    _randomize_lora(m)
    with torch.no_grad():
        m.eval()
        e1, e2 = m(m.prepare(x)), m(m.prepare(x))
        m.train()
        torch.manual_seed(0)
        t1 = m(m.prepare(x))
    assert torch.equal(e1, e2) and not torch.equal(e1, base)
    assert not torch.allclose(t1, e1)
