"""The seed architectures the registry says it serves (``supported_seed_architectures``, ``metamoe info``) all
build tiny and run, the refused ones are refused by create_seed_model, and an ``hf:`` checkpoint loads without
transformers' progress bar when asked (``progress=False``), leaving the global setting as it was."""

import json

import numpy as np
import pytest
import torch

from metamoe import info
from metamoe.models import create_seed_model, save_seed_model
from metamoe.models.registry import supported_seed_architectures
from metamoe.unify.config import seed_model_from_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TIMM_TINY = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=3)
DECODER_TINY = dict(
    vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, max_position_embeddings=16,
)
HF_TINY = {
    "llama": DECODER_TINY,
    "qwen2": DECODER_TINY,
    "qwen3": dict(DECODER_TINY, head_dim=16),
    "mistral": dict(DECODER_TINY, head_dim=16),
    "bert": dict(
        vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, num_classes=3,
    ),
}


@pytest.fixture(scope="module")
def families():
    return supported_seed_architectures()


def _names(families, source):
    return [n for f in families if f["source"] == source for n in f["names"]]


def test_families_come_with_notes_and_known_names(families):
    assert {"timm", "hf"} <= {f["source"] for f in families}
    for f in families:
        assert isinstance(f["note"], str) and f["note"] and "\n" not in f["note"], f
        assert f["adapter"] in f["note"]
        assert not set(f["names"]) & set(f["refused"])
    hf = _names(families, "hf")
    assert {"hf:llama", "hf:qwen2", "hf:qwen3", "hf:mistral", "hf:bert"} <= set(hf)
    timm_names = _names(families, "timm")
    assert "timm:vit_tiny_patch16_224" in timm_names and len(timm_names) > 10
    timm_refused = [n for f in families if f["source"] == "timm" for n in f["refused"]]
    assert "timm:vit_base_patch16_xp_224" in timm_refused  # no plain Mlp in its blocks


def test_every_listed_timm_architecture_builds_tiny_and_runs(families):
    x = torch.randn(2, 1, 8, 8)
    for name in _names(families, "timm"):
        m = create_seed_model(name, seed=0, **TIMM_TINY)
        assert len(m.ffn_layers()) == 2, name
        with torch.no_grad():
            assert m(m.prepare(x)).shape == (2, 3), name


def test_refused_timm_architectures_are_refused(families):
    refused = [n for f in families if f["source"] == "timm" for n in f["refused"]]
    assert refused
    for name in refused[:: max(1, len(refused) // 5)]:
        with pytest.raises(ValueError, match="timm_vit_mlp"):
            create_seed_model(name, seed=0, **TIMM_TINY)


def test_every_listed_hf_architecture_builds_tiny_and_runs(families):
    ids = np.arange(12, dtype=np.int64).reshape(2, 6) % 32
    for name in _names(families, "hf"):
        arch = name.split(":", 1)[1]
        assert arch in HF_TINY, f"add a tiny config for {name} to HF_TINY"
        m = create_seed_model(name, seed=0, **HF_TINY[arch])
        assert len(m.ffn_layers()) == 2, name
        with torch.no_grad():
            out = m(m.prepare(ids))
        assert out.shape == ((2, 3) if m.task == "sequence_classification" else (2, 6, 32)), name


def test_info_prints_the_seed_models_section(families, capsys):
    text = info.render(info.collect())
    section = text[text.index("seed models"):]
    for name in _names(families, "hf"):
        assert name in section
    assert "timm:<arch>" in section and "timm_vit_mlp" in section
    assert info.main(["--seed-models"]) == 0
    every = capsys.readouterr().out
    for f in families:
        for name in f["names"]:
            assert f" {name}" in every, name
        for name in f["refused"]:
            assert f"-- {name}" in every, name
    assert info.main(["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["seed_models"] == families


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("seed") / "llama"
    save_seed_model(create_seed_model("hf:llama", seed=0, **DECODER_TINY), path, progress=False)
    return path


def test_hf_checkpoint_loads_with_and_without_progress_bar(llama_ckpt, capfd):
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    capfd.readouterr()
    create_seed_model("hf:llama", checkpoint=llama_ckpt)
    assert "Loading weights" in capfd.readouterr().err
    m = create_seed_model("hf:llama", checkpoint=llama_ckpt, progress=False)
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "it/s" not in err, err
    assert hf_logging.is_progress_bar_enabled()
    assert m.arch == "llama"


def test_progress_false_keeps_a_disabled_setting_disabled(llama_ckpt, capfd):
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        create_seed_model("hf:llama", checkpoint=llama_ckpt, progress=False)
        assert not hf_logging.is_progress_bar_enabled()
        assert are_progress_bars_disabled()
    finally:
        hf_logging.enable_progress_bar()
    assert not are_progress_bars_disabled()
    disable_progress_bars()  # huggingface_hub's bars off, transformers' on: both stay so
    try:
        create_seed_model("hf:llama", checkpoint=llama_ckpt, progress=False)
        assert hf_logging.is_progress_bar_enabled()
        assert are_progress_bars_disabled()
    finally:
        enable_progress_bars()


def test_seed_model_from_config_passes_progress_on(llama_ckpt, capfd):
    cfg = {"seed_model": {"name": "hf:llama", "checkpoint": str(llama_ckpt)}}
    capfd.readouterr()
    seed_model_from_config(cfg, None, progress=False)
    assert "Loading weights" not in capfd.readouterr().err
    with pytest.raises(TypeError, match="progress"):
        seed_model_from_config(cfg, None, progress="no")
    with pytest.raises(TypeError, match="progress"):
        create_seed_model("hf:llama", checkpoint=llama_ckpt, progress=None)
