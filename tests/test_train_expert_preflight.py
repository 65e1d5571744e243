"""`metamoe train-expert` fails before the work (an existing, unwritable or too-full package folder), prints a
training summary and a warning when the expert barely learned, and resumes an interrupted run from its
checkpoint with a bit-identical result."""

import json
import re
import shutil
from collections import namedtuple

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from metamoe.data.digits import make_digits_domains
from metamoe.models import create_seed_model, save_seed_model
from metamoe.unify import client as uclient
from metamoe.unify import train_expert_cli as tecli
from metamoe.unify.client import expert_storage_bytes
from metamoe.utils import preflight

VIT = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=1, num_heads=2, num_classes=10)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    t = tmp_path_factory.mktemp("te_preflight")
    data = make_digits_domains(0, n_private=30, n_test=5, public_per_domain=10)
    save_seed_model(create_seed_model("timm:vit_tiny_patch16_224", seed=0, **VIT), t / "seed")
    np.savez(t / "public.npz", x=data.public_x, y=data.public_y)
    a = data.clients[0]
    np.savez(t / "private.npz", x=a.x_train, y=a.y_train)
    cfg = {
        "client_name": "a",
        "seed_model": {"name": "timm:vit_tiny_patch16_224", "checkpoint": "seed"},
        "private": "private.npz",
        "public": {"path": "public.npz"},
        "selection": {"method": "random", "k": 10, "relevance_epochs": 1},
        "training": {"lora_rank": 2, "epochs": 3, "lr": 0.003, "batch_size": 16, "seed": 1},
        "output": "packages/a",
    }
    return t, cfg


def _config(t, cfg, name="client.yaml", **changes):
    cfg = {**cfg, **changes}
    p = t / name
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def _no_embedding(monkeypatch):
    def embed(*a, **k):
        raise RuntimeError("embed was called")

    monkeypatch.setattr(uclient, "embed", embed)


def _tensors(folder):
    files = sorted(folder.glob("*.safetensors"))
    assert files, folder
    return {(f.name, k): v for f in files for k, v in load_file(str(f)).items()}


# --------------------------------------------------------------------------- preflight


def test_existing_package_refused_before_embedding(setup, tmp_path, monkeypatch, capsys):
    t, cfg = setup
    _no_embedding(monkeypatch)
    out = tmp_path / "pkg"
    out.mkdir()
    rc = tecli.main_train_expert(["--config", _config(t, cfg), "--quiet", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().splitlines() == [
        f"error: package folder {out} already exists; set `overwrite: true` in client.yaml or pass --overwrite"
    ]


def test_overwrite_flag_or_yaml_passes_the_existing_folder_check(setup, tmp_path, monkeypatch):
    t, cfg = setup
    _no_embedding(monkeypatch)
    out = tmp_path / "pkg"
    out.mkdir()
    with pytest.raises(RuntimeError, match="embed was called"):  # past the preflight, at the first embedding
        tecli.main_train_expert(["--config", _config(t, cfg), "--quiet", "--out", str(out), "--overwrite"])
    with pytest.raises(RuntimeError, match="embed was called"):
        tecli.main_train_expert(["--config", _config(t, cfg, overwrite=True), "--quiet", "--out", str(out)])


def test_unwritable_package_folder_refused_before_embedding(setup, tmp_path, monkeypatch, capsys):
    t, cfg = setup
    _no_embedding(monkeypatch)
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "pkg"
    rc = tecli.main_train_expert(["--config", _config(t, cfg), "--quiet", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"error: package folder {out} cannot be created: {tmp_path / 'afile'} is a file, not a folder" in err


def test_full_disk_refused_before_embedding(setup, tmp_path, monkeypatch, capsys):
    t, cfg = setup
    _no_embedding(monkeypatch)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "pkg"
    rc = tecli.main_train_expert(["--config", _config(t, cfg), "--quiet", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert re.search(
        rf"error: package folder and its training checkpoint {re.escape(str(out))} needs about [0-9.]+ MiB "
        r"but .* has 0\.0 MiB free",
        err,
    ), err
    assert not out.exists()


def test_private_images_that_do_not_fit_the_seed_refused_before_embedding(setup, tmp_path, monkeypatch, capsys):
    t, cfg = setup
    _no_embedding(monkeypatch)
    priv = np.load(t / "private.npz")
    np.savez(tmp_path / "rgb.npz", x=np.repeat(priv["x"][:, None], 3, axis=1), y=priv["y"])
    rc = tecli.main_train_expert(["--config", _config(t, cfg, private=str(tmp_path / "rgb.npz")), "--quiet",
                                  "--out", str(tmp_path / "pkg")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: private: images are 3 x 8 x 8"), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "pkg").exists()


def test_storage_estimate_counts_lora_head_and_prototypes():
    seed = create_seed_model("timm:vit_tiny_patch16_224", seed=0, **VIT)
    # depth 1: fc1 16 -> 64, fc2 64 -> 16; rank 2: 2 * (16 + 64) * 2 LoRA values; head 20 * 17; prototypes 16
    lora, head, protos = 2 * 2 * (16 + 64), 20 * 17, 16
    want = 4 * (lora + head + protos) + 24 * 10 + 2 * 100 + 65536 + 24 * (lora + head) + 65536
    assert expert_storage_bytes(seed, 2, 20, 10, 100) == want
    assert expert_storage_bytes(seed, 4, 20, 10, 100) > want


# --------------------------------------------------------------------------- summary and warning


def test_learning_warning_learned():
    m = {"loss_per_epoch": [2.3, 1.1], "private_accuracy": 0.9, "n_private": 30, "epochs": 2, "lr": 0.001}
    assert tecli.learning_warning(m, 10) is None


def test_learning_warning_at_chance():
    # chance 0.1, margin max(0.05, 2 * sqrt(0.09 / 30)) = 0.1095: 0.2 is within it, 0.25 is not
    m = {"loss_per_epoch": [2.3, 2.2], "private_accuracy": 0.2, "n_private": 30, "epochs": 2, "lr": 0.001}
    w = tecli.learning_warning(m, 10)
    assert w == (
        "the expert barely learned: its private accuracy 0.200 is within 0.110 of chance (0.100 for 10 classes); "
        "try more epochs (training.epochs, 2 now) or a higher learning rate (training.lr, 0.001 now)"
    )
    assert tecli.learning_warning({**m, "private_accuracy": 0.25}, 10) is None
    # many samples: the margin is the 0.05 floor
    assert tecli.learning_warning({**m, "private_accuracy": 0.16, "n_private": 10_000}, 10) is None
    assert "within 0.050 of chance" in tecli.learning_warning({**m, "private_accuracy": 0.14, "n_private": 10_000}, 10)


def test_learning_warning_proxy_accuracy_at_chance():
    """An expert that fits its private data but not the proxies (proxy accuracy 0.0) is not aligned with them."""
    m = {"loss_per_epoch": [2.3, 0.4], "private_accuracy": 0.95, "n_private": 30, "proxy_accuracy": 0.0,
         "n_proxies": 20, "epochs": 2, "lr": 0.001}
    w = tecli.learning_warning(m, 10, 10)
    # chance 0.1, margin max(0.05, 2 * sqrt(0.09 / 20)) = 0.134
    assert "its proxy accuracy 0.000 is within 0.134 of chance (0.100 for 10 classes)" in w
    assert "private accuracy" not in w
    assert tecli.learning_warning({**m, "proxy_accuracy": 0.6}, 10, 10) is None
    assert tecli.learning_warning(m, 10) is None  # without the public label space's size: not judged
    assert tecli.learning_warning({**m, "n_proxies": 0, "proxy_accuracy": None}, 10, 10) is None


def test_learning_warning_loss_did_not_fall():
    m = {"loss_per_epoch": [1.0, 0.5, 1.0], "private_accuracy": 0.9, "n_private": 30, "epochs": 3, "lr": 0.01}
    w = tecli.learning_warning(m, 10)
    assert "its loss did not fall (1.0000 in the first epoch, 1.0000 in the last)" in w
    assert "private accuracy" not in w and "training.epochs, 3 now" in w


def test_learning_warning_causal_lm_uses_the_loss_only():
    m = {"loss_per_epoch": [5.0, 4.0], "private_accuracy": 0.01, "n_private": 30, "epochs": 2, "lr": 0.001}
    assert tecli.learning_warning(m, None) is None  # next-token accuracy is no class accuracy
    w = tecli.learning_warning({**m, "loss_per_epoch": [5.0, 5.1]}, None)
    assert w is not None and "loss did not fall" in w and "accuracy" not in w


def test_summary_printed_after_training(setup, tmp_path, capsys):
    t, cfg = setup
    out = tmp_path / "pkg"
    assert tecli.main_train_expert(["--config", _config(t, cfg), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    losses = m["loss_per_epoch"]
    assert f"loss {losses[0]:.4f} -> {losses[-1]:.4f} (first -> last epoch)" in stdout
    assert re.search(r"training: 3 epochs in [0-9.]+ s", stdout)
    assert f"private: 30 samples, accuracy {m['private_accuracy']:.3f}" in stdout
    assert f"proxies: 10 samples, accuracy {m['proxy_accuracy']:.3f}" in stdout
    # the estimate is an upper bound of the package written
    written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    seed = create_seed_model("timm:vit_tiny_patch16_224", checkpoint=t / "seed")
    assert written <= expert_storage_bytes(seed, 2, 20, 10, 20 * 8)


def test_warning_when_the_expert_barely_learned_even_with_quiet(setup, tmp_path, capsys):
    t, cfg = setup
    training = {**cfg["training"], "epochs": 2, "lr": 1e-9}
    rc = tecli.main_train_expert(
        ["--config", _config(t, cfg, training=training), "--quiet", "--out", str(tmp_path / "pkg")]
    )
    captured = capsys.readouterr()
    assert rc == 0 and captured.out == ""
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, captured.err
    assert warnings[0].startswith("warning: the expert barely learned: its private accuracy")
    assert warnings[0].endswith(
        "try more epochs (training.epochs, 2 now) or a higher learning rate (training.lr, 1e-09 now)"
    )


# --------------------------------------------------------------------------- checkpoints


def _interrupt_after(monkeypatch, epoch):
    real = uclient.save_checkpoint

    def save(directory, step, *a, **k):
        real(directory, step, *a, **k)
        if step == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(uclient, "save_checkpoint", save)


def test_interrupted_run_resumes_bit_identical(setup, tmp_path, monkeypatch, capsys):
    t, cfg = setup
    conf = _config(t, cfg)
    full, part = tmp_path / "full", tmp_path / "part"
    assert tecli.main_train_expert(["--config", conf, "--quiet", "--out", str(full)]) == 0
    assert not tecli.checkpoint_folder(full).exists()

    with monkeypatch.context() as mp:
        _interrupt_after(mp, 2)
        with pytest.raises(KeyboardInterrupt):
            tecli.main_train_expert(["--config", conf, "--quiet", "--out", str(part)])
    ckpt = tecli.checkpoint_folder(part)
    assert ckpt == tmp_path / ".part.checkpoints"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 2 and len(state["losses"]) == 2 and not part.exists()
    capsys.readouterr()

    assert tecli.main_train_expert(["--config", conf, "--out", str(part)]) == 0
    assert f"resuming expert training from epoch 2 of 3 ({ckpt})" in capsys.readouterr().out
    assert not ckpt.exists()
    a, b = _tensors(full), _tensors(part)
    assert a.keys() == b.keys() and any(name == "lora.safetensors" for name, _ in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ma = json.loads((full / "manifest.json").read_text())["metrics"]
    mb = json.loads((part / "manifest.json").read_text())["metrics"]
    assert ma["loss_per_epoch"] == mb["loss_per_epoch"]


def test_checkpoint_of_another_config_is_ignored(setup, tmp_path, monkeypatch, capsys):
    t, cfg = setup
    out, fresh = tmp_path / "pkg", tmp_path / "fresh"
    with monkeypatch.context() as mp:
        _interrupt_after(mp, 1)
        with pytest.raises(KeyboardInterrupt):
            tecli.main_train_expert(["--config", _config(t, cfg), "--quiet", "--out", str(out)])
    ckpt = tecli.checkpoint_folder(out)
    assert json.loads((ckpt / "state.json").read_text())["step"] == 1
    capsys.readouterr()
    conf = _config(t, cfg, name="other.yaml", training={**cfg["training"], "lr": 0.01})
    assert tecli.main_train_expert(["--config", conf, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert (
        f"ignoring checkpoint {ckpt}: it was written by a different run (config differs); training from epoch 0"
        in stdout
    )
    assert "resuming" not in stdout and not ckpt.exists()
    assert tecli.main_train_expert(["--config", conf, "--quiet", "--out", str(fresh)]) == 0
    a, b = _tensors(fresh), _tensors(out)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    shutil.rmtree(out)
