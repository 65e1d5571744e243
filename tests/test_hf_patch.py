"""metamoe.integrations.hf.patch_moe on tiny random-init transformers models built from configs.

For each MoE architecture the installed transformers has: the patched model (metamoe router + experts) gives
the same logits, router logits, aux loss and parameter gradients as an unpatched deep copy, while reusing
the very same Parameter objects.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from metamoe.integrations import hf  # noqa: E402
from metamoe.integrations.hf import MetaMoeSparseMoeBlock, patch_moe  # noqa: E402

VOCAB = 61
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _configs():
    """name -> (config class name, kwargs): small shapes, every routing flavour (renormalised or not)."""
    return {
        "mixtral": ("MixtralConfig", dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)),
        "qwen2_moe": (
            "Qwen2MoeConfig",
            dict(
                intermediate_size=48,
                moe_intermediate_size=16,
                shared_expert_intermediate_size=24,
                num_experts=6,
                num_experts_per_tok=2,
                norm_topk_prob=False,
            ),
        ),
        "qwen3_moe": (
            "Qwen3MoeConfig",
            dict(
                intermediate_size=48,
                moe_intermediate_size=16,
                head_dim=8,
                num_experts=6,
                num_experts_per_tok=3,
                norm_topk_prob=True,
            ),
        ),
        "olmoe": (
            "OlmoeConfig",
            dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
        ),
    }


def build(name, seed=0, **overrides):
    cls_name, kw = _configs()[name]
    cls = getattr(transformers, cls_name, None)
    if cls is None or name not in hf.available_architectures():
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    cfg = cls(**{**COMMON, **kw, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():  # router weights well away from ties (some routers initialise to zeros)
        for n, p in model.named_parameters():
            if n.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
    return model


def count_blocks(model):
    names = {a.block for a in hf.ARCHITECTURES.values()}
    return sum(type(m).__name__ in names for m in model.modules())


@pytest.mark.parametrize("name", list(_configs()))
def test_patched_model_matches_original(name):
    model = build(name)
    ref = copy.deepcopy(model)
    before = {n: (p, p.data_ptr()) for n, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    n_blocks = count_blocks(model)
    assert n_blocks == 2

    assert patch_moe(model, backend="torch") == n_blocks
    assert count_blocks(model) == 0
    assert sum(isinstance(m, MetaMoeSparseMoeBlock) for m in model.modules()) == n_blocks
    after = dict(model.named_parameters())
    assert list(after) == list(before)  # same names, same order
    for n, p in after.items():
        assert p is before[n][0] and p.data_ptr() == before[n][1], n
    assert list(model.state_dict()) == keys_before

    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 9))
    out_ref = ref(ids, labels=ids, output_router_logits=True)
    out = model(ids, labels=ids, output_router_logits=True)
    torch.testing.assert_close(out.logits, out_ref.logits, rtol=1e-5, atol=1e-5)
    assert len(out.router_logits) == len(out_ref.router_logits) == n_blocks
    for a, b in zip(out.router_logits, out_ref.router_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.aux_loss, out_ref.aux_loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    out_ref.loss.backward()
    grads_ref = dict(ref.named_parameters())
    checked = 0
    for n, p in model.named_parameters():
        g_ref = grads_ref[n].grad
        if g_ref is None:
            assert p.grad is None, n
            continue
        torch.testing.assert_close(p.grad, g_ref, rtol=1e-4, atol=2e-6, msg=lambda m, n=n: f"{n}: {m}")
        checked += 1
    assert checked == len(before)
    assert any("experts" in n and grads_ref[n].grad.abs().max() > 0 for n in grads_ref)

    # metamoe's own losses on the block: aux is transformers' per-layer value / top_k (1 when uniform)
    block = next(m for m in model.modules() if isinstance(m, MetaMoeSparseMoeBlock))
    assert block.aux_loss is not None and block.z_loss is not None
    assert torch.isfinite(block.aux_loss) and block.aux_loss.item() >= 1.0 - 1e-6

    assert patch_moe(model) == 0  # nothing left to replace


def test_patch_after_router_hooks_were_installed():
    model = build("olmoe", seed=2)
    ids = torch.randint(3, VOCAB, (1, 6))
    first = model(ids, output_router_logits=True).router_logits  # installs transformers' capture hooks
    assert patch_moe(model, backend="torch") == 2
    again = model(ids, output_router_logits=True)
    assert len(again.router_logits) == 2
    for a, b in zip(again.router_logits, first, strict=True):
        torch.testing.assert_close(a, b)


def test_mixtral_jitter_is_training_only():
    model = build("mixtral", seed=3, router_jitter_noise=0.1)
    ref = copy.deepcopy(model)
    patch_moe(model, backend="torch")
    ids = torch.randint(3, VOCAB, (2, 5))
    model.eval(), ref.eval()
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    model.train()
    block = next(m for m in model.modules() if isinstance(m, MetaMoeSparseMoeBlock))
    assert block.jitter_noise == 0.1
    x = torch.randn(1, 4, 32)
    torch.manual_seed(0)
    a = block(x)
    torch.manual_seed(1)
    b = block(x)
    assert not torch.allclose(a, b)  # the noise is drawn in training mode


def test_unsupported_block_is_refused_before_any_change():
    model = build("mixtral", seed=4, hidden_act="gelu")
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="SwiGLU"):
        patch_moe(model)
    assert [type(m) for m in model.modules()] == before


def test_patch_rejects_non_modules_and_counts_zero_without_moe():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        patch_moe("not a model")
    assert patch_moe(torch.nn.Sequential(torch.nn.Linear(4, 4))) == 0
    with pytest.raises(ValueError, match="backend"):
        patch_moe(torch.nn.Linear(2, 2), backend="nope")


def test_experts_interface_registration():
    from transformers.integrations import moe as tmoe

    if not hasattr(tmoe, "ExpertsInterface"):
        pytest.skip("this transformers has no experts interface")
    assert hf.register_experts_implementation() is True
    assert "metamoe" in tmoe.ALL_EXPERTS_FUNCTIONS
    model = build("qwen2_moe", seed=5)
    ref = copy.deepcopy(model)
    model.set_experts_implementation("metamoe")
    ids = torch.randint(3, VOCAB, (2, 7))
    out = model(ids, labels=ids)
    out_ref = ref(ids, labels=ids)
    torch.testing.assert_close(out.logits, out_ref.logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    out_ref.loss.backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=2e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_patched_model_on_triton_kernels():
    from metamoe.backends import CallSpec
    from metamoe.ops.moe_experts import moe_experts_op

    spec = CallSpec("cpu", "float32", {"T": 8, "E": 8, "k": 2, "d": 32, "f": 16, "activation": "swiglu"})
    reasons = moe_experts_op.impls["triton"].not_supported_reasons(spec)
    if reasons:
        pytest.skip("Triton kernels cannot run here: " + "; ".join(reasons))
    model = build("olmoe", seed=6, num_hidden_layers=1)
    ref = copy.deepcopy(model)
    assert patch_moe(model, backend="triton") == 1
    ids = torch.randint(3, VOCAB, (1, 8))
    out, out_ref = model(ids, labels=ids), ref(ids, labels=ids)
    torch.testing.assert_close(out.logits, out_ref.logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    out_ref.loss.backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=2e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_patched_model_pickles_and_deepcopies():
    import pickle

    model = build("qwen3_moe", seed=7)
    patch_moe(model, backend="torch")
    ids = torch.randint(3, VOCAB, (1, 6))
    expected = model(ids).logits
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert sum(isinstance(m, MetaMoeSparseMoeBlock) for m in clone.modules()) == 2
        torch.testing.assert_close(clone(ids).logits, expected)


@pytest.mark.parametrize("name", list(_configs()))
def test_block_losses_match_an_independent_reference(name):
    """Each patched block's aux_loss and z_loss against float64 values computed from the unpatched model's
    own router logits of that layer: aux = E sum_e f_e P_e (f_e the fraction of (token, slot) pairs routed
    to e, P_e the mean router probability), z = mean logsumexp^2."""
    model = build(name, seed=3)
    ref = copy.deepcopy(model)
    assert patch_moe(model, backend="torch") == 2
    torch.manual_seed(4)
    ids = torch.randint(3, VOCAB, (3, 11))
    with torch.no_grad():
        logits_per_layer = ref(ids, output_router_logits=True).router_logits
        model(ids)
    blocks = [m for m in model.modules() if isinstance(m, MetaMoeSparseMoeBlock)]
    values = []
    for block, logits in zip(blocks, logits_per_layer, strict=True):
        E, k = block.num_experts, block.top_k
        L = logits.detach().double().reshape(-1, E)
        p = torch.softmax(L, dim=-1)
        top = torch.topk(p, k, dim=-1).indices
        f = torch.bincount(top.reshape(-1), minlength=E).double() / top.numel()
        aux = E * (f * p.mean(0)).sum()
        z = torch.logsumexp(L, dim=-1).square().mean()
        torch.testing.assert_close(block.aux_loss.double(), aux, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(block.z_loss.double(), z, rtol=1e-5, atol=1e-7)
        values.append((block.aux_loss.item(), block.z_loss.item()))
    assert values[0] != values[1]  # each block its own statistics, not one layer's copied
