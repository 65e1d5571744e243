"""unified.json: its own digest (edits refused, format 1 warned), the configuration it records, and a new unify
run invalidating the old result before it trains (a killed run leaves no result; a rerun resumes exactly)."""

import json
import shutil

import numpy as np
import pytest
import yaml
from test_unify_cli import work  # noqa: F401  (the module fixture: two packages + a unified model)

from metamoe.unify import cli as ucli
from metamoe.unify import evaluate_cli as evcli
from metamoe.unify import router_training
from metamoe.unify.package_format import pool_fingerprint


def _copy(work, tmp_path):  # noqa: F811
    t, _ = work
    root = tmp_path / "tree"
    shutil.copytree(t, root, ignore=shutil.ignore_patterns("eval.json", "bad.yaml"))
    return root


def _rewrite(path, fn):
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m, indent=1) + "\n")


def _err(capsys):
    return capsys.readouterr().err.strip()


def test_unified_json_records_its_digest_and_config(work):  # noqa: F811
    t, data = work
    m = json.loads((t / "unified" / ucli.UNIFIED_MANIFEST).read_text())
    assert m["format"] == 2 and m[ucli.UNIFIED_DIGEST] == ucli.unified_digest(m)
    cfg = m["config"]
    assert cfg["training"]["epochs"] == 2 and cfg["training"]["lr"] == 0.01 and cfg["training"]["batch_size"] == 16
    assert cfg["training"]["loss"] == "block" and cfg["training"]["seed"] == 0
    assert cfg["moe"] == m["moe"] and cfg["moe"]["top_k"] == 2
    assert [p["selection"] for p in cfg["packages"]] == [{"method": "dpp", "k": 15}] * 2
    assert [p["manifest_sha256"] for p in cfg["packages"]] == m["package_manifest_sha256"]
    assert cfg["public"]["size"] == len(data.public_x)
    assert cfg["public"]["sha256"] == pool_fingerprint(data.public_x, data.public_y)
    assert len(m["run_sha256"]) == 64
    run = json.loads((t / "unified" / "checkpoints" / ucli.RUN_FILE).read_text())
    assert run["run_sha256"] == m["run_sha256"]


def test_edited_unified_json_is_refused(work, tmp_path, capsys):  # noqa: F811
    t, data = work
    root = _copy(work, tmp_path)
    d = root / "unified"
    mp = d / ucli.UNIFIED_MANIFEST
    original = mp.read_text()
    # whitespace and key order are not content: a reformatted file loads
    mp.write_text(json.dumps(dict(reversed(list(json.loads(original).items()))), indent=4))
    ucli.load_unified(d)

    def edited(fn):
        mp.write_text(original)
        _rewrite(mp, fn)
        rc = evcli.main_evaluate(["--model", str(d), "--data", str(t / "a_test.npz")])
        err = _err(capsys)
        assert rc == 2 and "\n" not in err and str(mp) in err and "edited" in err, err
        with pytest.raises(ValueError, match="edited"):
            ucli.load_unified(d)

    edited(lambda m: m["moe"].update(top_k=1))
    edited(lambda m: m["label_space"].update(names=list(reversed(m["label_space"]["names"]))))
    edited(lambda m: m.update(format=2, **{ucli.UNIFIED_DIGEST: "0" * 64}))
    edited(lambda m: m.pop(ucli.UNIFIED_DIGEST))  # format 2 without its digest
    # a number's spelling is content too
    mp.write_text(original.replace('"lr": 0.01', '"lr": 0.010'))
    assert mp.read_text() != original
    with pytest.raises(ValueError, match="edited"):
        ucli.load_unified(d)
    mp.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ucli.load_unified(d)


def test_format_1_loads_with_a_warning(work, tmp_path):  # noqa: F811
    t, data = work
    root = _copy(work, tmp_path)
    d = root / "unified"
    x = data.clients[1].x_test[:8]
    want = ucli.load_unified(t / "unified").predict_proba(x)

    def old(m):
        for k in (ucli.UNIFIED_DIGEST, "config", "run_sha256", "seed_model_weight_hash"):
            m.pop(k)
        m["format"] = 1

    _rewrite(d / ucli.UNIFIED_MANIFEST, old)
    with pytest.warns(ucli.UnverifiedUnifiedWarning, match="not verified"):
        got = ucli.load_unified(d).predict_proba(x)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_every_file_is_checked(work, tmp_path):  # noqa: F811
    root = _copy(work, tmp_path)
    d = root / "unified"
    lora = d / "packages" / "a" / "lora.safetensors"
    raw = bytearray(lora.read_bytes())
    raw[-1] ^= 1
    lora.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="lora.safetensors"):
        ucli.load_unified(d)


def _server(root, **training):
    srv = yaml.safe_load((root / "server.yaml").read_text())
    srv["moe"] = {"top_k": 1}  # another configuration than the fixture's (only the MoE options differ)
    srv["training"] = {**srv["training"], **training}
    p = root / "server2.yaml"
    p.write_text(yaml.safe_dump(srv))
    return ucli.load_config(p)


def test_new_run_invalidates_the_old_result_and_resumes_exactly(work, tmp_path, monkeypatch, capsys):  # noqa: F811
    from safetensors.torch import load_file

    t, data = work
    root = _copy(work, tmp_path)
    d = root / "unified"
    old_manifest = (d / ucli.UNIFIED_MANIFEST).read_text()
    real_save = router_training.save_checkpoint

    def killed_after_first_checkpoint(directory, step, *a, **k):
        real_save(directory, step, *a, **k)
        raise KeyboardInterrupt  # the process dies right after the first checkpoint

    monkeypatch.setattr(router_training, "save_checkpoint", killed_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        ucli.unify_from_config(_server(root, checkpoint_every=1), quiet=True)
    monkeypatch.undo()
    # the old result is no longer in the output folder; it was moved aside, intact
    assert not (d / ucli.UNIFIED_MANIFEST).exists()
    assert (d / "previous" / ucli.UNIFIED_MANIFEST).read_text() == old_manifest
    rc = evcli.main_evaluate(["--model", str(d), "--data", str(t / "a_test.npz")])
    err = _err(capsys)
    assert rc == 2 and "\n" not in err and "no finished unified model" in err, err

    # the rerun with the same config resumes from the checkpoint and ends exactly as an uninterrupted run
    ucli.unify_from_config(_server(root, checkpoint_every=1), quiet=True)
    m = json.loads((d / ucli.UNIFIED_MANIFEST).read_text())
    assert m["metrics"]["resumed_from"] == 1 and m["moe"]["top_k"] == 1
    fresh = ucli.unify_from_config(_server(root, checkpoint_every=1), out=str(root / "fresh"), quiet=True)
    mf = json.loads((fresh / ucli.UNIFIED_MANIFEST).read_text())
    assert mf["metrics"]["resumed_from"] is None and mf["run_sha256"] == m["run_sha256"]
    a, b = load_file(str(d / ucli.UNIFIED_WEIGHTS)), load_file(str(fresh / ucli.UNIFIED_WEIGHTS))
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    ucli.load_unified(d)

    # the same config once more: a finished run resumes to itself; nothing is moved aside
    shutil.rmtree(d / "previous")
    ucli.unify_from_config(_server(root, checkpoint_every=1), quiet=True)
    assert not (d / "previous").exists()
    assert json.loads((d / ucli.UNIFIED_MANIFEST).read_text())["metrics"]["resumed_from"] == 4
    # checkpoint_every does not change the result: still the same run
    ucli.unify_from_config(_server(root, checkpoint_every=7), quiet=True)
    assert not (d / "previous").exists()
