"""`metamoe unify` / `evaluate` fail before the work: an unwritable or full output folder, inputs that do not fit
the seed model, a truncated .npy; and unify reports a resume and each epoch's loss as it finishes."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import yaml
from test_unify_cli import work  # noqa: F401  (the module fixture: two packages + a unified model)

from metamoe.unify import cli as ucli
from metamoe.unify import evaluate_cli as evcli
from metamoe.unify.config import ConfigError
from metamoe.unify.data_loading import load_data
from metamoe.unify.router_training import training_storage_bytes


def _server(t, tmp_path, name="srv.yaml", **changes):
    cfg = yaml.safe_load((t / "server.yaml").read_text())
    cfg.update(changes)
    p = tmp_path / name
    cfg["packages"] = [str(t / q) for q in cfg["packages"]]
    cfg["seed_model"] = {**cfg["seed_model"], "checkpoint": str(t / cfg["seed_model"]["checkpoint"])}
    if isinstance(cfg["public"], str):
        cfg["public"] = str(t / cfg["public"])
    p.write_text(yaml.safe_dump(cfg))
    return p


def _no_training(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("train_router was called")

    monkeypatch.setattr(ucli, "train_router", refuse)


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_output_under_a_file_fails_before_the_pool_is_read(work, tmp_path, monkeypatch, capsys):  # noqa: F811
    t, _ = work
    _no_training(monkeypatch)

    def no_pool(*a, **k):
        raise AssertionError("the public pool was read")

    monkeypatch.setattr(ucli, "load_data", no_pool)
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "unified"
    rc = ucli.main_unify(["--config", str(_server(t, tmp_path)), "--quiet", "--out", str(out)])
    err = _one_line_error(capsys)
    assert rc == 2 and f"unify output folder {out} cannot be created" in err and "is a file" in err, err
    assert not out.exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_parent_fails_before_training(work, tmp_path, monkeypatch, capsys):  # noqa: F811
    t, _ = work
    _no_training(monkeypatch)
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        rc = ucli.main_unify(["--config", str(_server(t, tmp_path)), "--quiet", "--out", str(parent / "u")])
        err = _one_line_error(capsys)
    finally:
        parent.chmod(0o755)
    assert rc == 2 and f"unify output folder {parent / 'u'} cannot be written" in err, err


def test_little_free_space_fails_before_training(work, tmp_path, monkeypatch, capsys):  # noqa: F811
    t, _ = work
    _no_training(monkeypatch)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    out = tmp_path / "u"
    rc = ucli.main_unify(["--config", str(_server(t, tmp_path)), "--quiet", "--out", str(out)])
    err = _one_line_error(capsys)
    assert rc == 2 and f"unify output folder {out} needs about" in err and "0.0 MiB free" in err, err
    assert not (out / ucli.UNIFIED_CHECKPOINTS).exists()  # the run did not start


def test_storage_estimate_counts_the_trained_parameters(work):  # noqa: F811
    t, _ = work
    model = ucli.load_unified(t / "unified")
    base = training_storage_bytes(model, ucli.RouterTraining())
    routers = sum(p.numel() for n, p in model.named_parameters() if "router" in n or "lambda" in n)
    assert base >= 24 * routers + (1 << 20)
    lora = sum(p.numel() for m in model.moe_layers for n, p in m.named_parameters() if n.startswith("lora_"))
    with_lora = training_storage_bytes(model, ucli.RouterTraining(train_lora=True))
    assert lora > 0 and with_lora - base == 24 * lora


def test_public_pool_that_does_not_fit_the_seed(work, tmp_path, monkeypatch, capsys):  # noqa: F811
    t, data = work
    _no_training(monkeypatch)
    rgb = np.repeat(data.public_x[:, None], 3, axis=1)  # (n, 3, 8, 8): the seed takes one channel
    np.savez(tmp_path / "rgb.npz", x=rgb, y=data.public_y)
    srv = _server(t, tmp_path, public=str(tmp_path / "rgb.npz"))
    rc = ucli.main_unify(["--config", str(srv), "--quiet", "--out", str(tmp_path / "u")])
    err = _one_line_error(capsys)
    assert rc == 2 and err.startswith("error: public: images are 3 x 8 x 8"), err
    assert "timm:vit_tiny_patch16_224 takes 1 x 8 x 8" in err and "channels: 1" in err, err
    big = np.zeros((len(data.public_x), 12, 12), np.float32)
    np.savez(tmp_path / "big.npz", x=big, y=data.public_y)
    srv = _server(t, tmp_path, public=str(tmp_path / "big.npz"))
    rc = ucli.main_unify(["--config", str(srv), "--quiet", "--out", str(tmp_path / "u")])
    err = _one_line_error(capsys)
    assert rc == 2 and "public: images are 1 x 12 x 12" in err and "image_size: [8, 8]" in err, err


def test_evaluate_data_that_does_not_fit_the_seed(work, tmp_path, capsys):  # noqa: F811
    t, data = work
    b = data.clients[1]
    np.savez(tmp_path / "big.npz", x=np.zeros((4, 16, 16), np.float32), y=b.y_test[:4])
    rc = evcli.main_evaluate(["--model", str(t / "unified"), "--data", f"big={tmp_path / 'big.npz'}"])
    err = _one_line_error(capsys)
    assert rc == 2 and f"--data big={tmp_path / 'big.npz'}: images are 1 x 16 x 16" in err, err
    assert "--image-size 8,8" in err, err


def test_truncated_npy_names_the_file(work, tmp_path, capsys):  # noqa: F811
    t, data = work
    x = tmp_path / "x.npy"
    np.save(x, data.clients[1].x_test)
    raw = x.read_bytes()
    x.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ConfigError, match=re.escape(f"public.path {x} is truncated or corrupt")):
        load_data({"path": str(x)}, None, "public")
    x.write_bytes(raw[:40])  # cut inside the header
    with pytest.raises(ConfigError, match=re.escape(f"public.path {x} is truncated or corrupt")):
        load_data({"path": str(x)}, None, "public")
    np.save(x, data.clients[1].x_test)
    y = tmp_path / "y.npy"
    np.save(y, data.clients[1].y_test)
    y.write_bytes(y.read_bytes()[:-8])
    rc = evcli.main_evaluate(["--model", str(t / "unified"), "--data", str(x), "--labels", str(y)])
    err = _one_line_error(capsys)
    assert rc == 2 and f"--data {x}.labels {y} is truncated or corrupt" in err, err
    z = tmp_path / "d.npz"
    np.savez(z, x=data.clients[1].x_test, y=data.clients[1].y_test)
    z.write_bytes(z.read_bytes()[:100])
    with pytest.raises(ConfigError, match=re.escape(f"private.path {z} is truncated or corrupt")):
        load_data(str(z), None, "private")


EPOCH_LINE = re.compile(r"^epoch (\d+)/2: loss \d+\.\d{4}, routing loss \d+\.\d{4}$")


def test_unify_reports_epochs_and_resume(work, tmp_path, monkeypatch, capsys):  # noqa: F811
    t, _ = work
    srv = _server(t, tmp_path, training={"epochs": 2, "batch_size": 16, "lr": 0.01, "checkpoint_every": 1})
    out = tmp_path / "u"
    real = ucli.train_router

    def killed_at_step_3(*a, **k):
        def cb(step, loss):
            if step == 3:
                raise KeyboardInterrupt

        return real(*a, **k, callback=cb)

    monkeypatch.setattr(ucli, "train_router", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        ucli.main_unify(["--config", str(srv), "--out", str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert [m.group(1) for m in map(EPOCH_LINE.match, lines) if m] == ["1"], lines
    monkeypatch.setattr(ucli, "train_router", real)
    assert ucli.main_unify(["--config", str(srv), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    ckpt = out / ucli.UNIFIED_CHECKPOINTS
    assert f"resuming router training from epoch 2 of 2 ({ckpt})" in lines, lines
    assert [m.group(1) for m in map(EPOCH_LINE.match, lines) if m] == ["2"], lines
    assert not any("[" in line for line in lines), lines  # no Python list of losses
    assert lines[-1].startswith(f"wrote unified model {out} (2 epochs, final router loss "), lines
    # a fresh run prints every epoch, in order
    assert ucli.main_unify(["--config", str(srv), "--out", str(tmp_path / "fresh")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [m.group(1) for m in map(EPOCH_LINE.match, lines) if m] == ["1", "2"], lines
    assert not any(line.startswith("resuming") for line in lines)
    # --quiet prints nothing
    assert ucli.main_unify(["--config", str(srv), "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out == ""


def test_checkpoint_of_another_run_names_real_options(work, tmp_path, monkeypatch, capsys):  # noqa: F811
    t, _ = work
    srv = _server(t, tmp_path, training={"epochs": 2, "batch_size": 16, "lr": 0.01, "checkpoint_every": 1})
    out = tmp_path / "u"
    assert ucli.main_unify(["--config", str(srv), "--out", str(out), "--quiet"]) == 0
    state = out / ucli.UNIFIED_CHECKPOINTS / "state.json"
    s = json.loads(state.read_text())
    s["data"] = "0" * 64
    state.write_text(json.dumps(s))
    rc = ucli.main_unify(["--config", str(srv), "--out", str(out), "--quiet"])
    err = _one_line_error(capsys)
    assert rc == 2 and f"{out / ucli.UNIFIED_CHECKPOINTS} holds router checkpoints of another" in err, err
    assert "server.yaml 'output' or --out" in err and "resume=False" not in err, err


def test_unified_folder_moves_alone(work, tmp_path, capsys):  # noqa: F811
    """unify copies the packages into the output folder: moved alone, with the originals gone, it evaluates the same."""
    t, data = work
    src = tmp_path / "src"
    for c in ("a", "b"):
        shutil.copytree(t / "packages" / c, src / c)
    srv = _server(t, tmp_path, packages=[str(src / "a"), str(src / "b")])
    out = tmp_path / "u"
    assert ucli.main_unify(["--config", str(srv), "--quiet", "--out", str(out)]) == 0, capsys.readouterr().err
    man = json.loads((out / ucli.UNIFIED_MANIFEST).read_text())
    assert man["packages"] == ["packages/a", "packages/b"]
    assert (out / "packages" / "a" / "manifest.json").is_file()
    b = data.clients[1]
    np.savez(tmp_path / "b.npz", x=b.x_test, y=b.y_test)
    res = tmp_path / "res.json"
    assert evcli.main_evaluate(["--model", str(out), "--data", f"b={tmp_path / 'b.npz'}", "--json", str(res)]) == 0
    want = json.loads(res.read_text())["b"]["accuracy"]
    shutil.rmtree(src)
    moved = tmp_path / "far" / "away"
    moved.parent.mkdir()
    shutil.move(str(out), str(moved))
    assert evcli.main_evaluate(["--model", str(moved), "--data", f"b={tmp_path / 'b.npz'}", "--json", str(res)]) == 0
    assert json.loads(res.read_text())["b"]["accuracy"] == pytest.approx(want)
    # the copies are checked against the digests unified.json records
    m = moved / "packages" / "b" / "manifest.json"
    m.write_text(m.read_text() + "\n")
    rc = evcli.main_evaluate(["--model", str(moved), "--data", f"b={tmp_path / 'b.npz'}"])
    err = _one_line_error(capsys)
    assert rc == 2 and "packages/b changed since unify" in err, err


def test_unified_json_naming_outside_packages_still_loads(work, tmp_path):  # noqa: F811
    """A unified.json whose packages lie outside its folder (``../packages/a``) loads as written."""
    t, data = work
    d = t / "outside"
    shutil.copytree(t / "unified", d)
    shutil.rmtree(d / "packages")
    man = json.loads((d / ucli.UNIFIED_MANIFEST).read_text())
    man["packages"] = ["../packages/a", "../packages/b"]
    man.pop("seed_model_base_absolute")
    man.pop(ucli.UNIFIED_DIGEST)
    man[ucli.UNIFIED_DIGEST] = ucli.unified_digest(man)
    (d / ucli.UNIFIED_MANIFEST).write_text(json.dumps(man, indent=1))
    x = data.clients[1].x_test[:8]
    want = ucli.load_unified(t / "unified").predict_proba(x)
    np.testing.assert_allclose(ucli.load_unified(d).predict_proba(x), want, rtol=0, atol=1e-6)
    shutil.rmtree(d)
