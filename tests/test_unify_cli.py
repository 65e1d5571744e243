"""`metamoe train-expert` / `unify` / `evaluate` on tiny user data (.npz, .npy + labels, an image folder)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from conftest import ROOT

from metamoe.data.digits import make_digits_domains
from metamoe.models import create_seed_model, save_seed_model
from metamoe.unify import cli as ucli
from metamoe.unify import evaluate_cli as evcli
from metamoe.unify import train_expert_cli as tecli
from metamoe.unify.config import ConfigError
from metamoe.unify.data_loading import load_data
from metamoe.unify.evaluate import accuracy

VIT = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=1, num_heads=2, num_classes=10)


def _cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "metamoe", *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )


def _write_image_folder(root, x, y):
    from PIL import Image

    for i, (img, lab) in enumerate(zip(x, y)):
        d = root / str(int(lab))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(np.rint(img * 255), 0, 255).astype(np.uint8), mode="L").save(d / f"{i}.png")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    t = tmp_path_factory.mktemp("ucli")
    data = make_digits_domains(0, n_private=30, n_test=20, public_per_domain=20)
    save_seed_model(create_seed_model("timm:vit_tiny_patch16_224", seed=0, **VIT), t / "seed")
    np.savez(t / "public.npz", x=data.public_x, y=data.public_y)
    a, b = data.clients[0], data.clients[1]
    np.savez(t / "a_private.npz", x=a.x_train, y=a.y_train)
    np.save(t / "b_x.npy", b.x_test)  # client b: .npy + labels for evaluation, an image folder for training
    np.save(t / "b_y.npy", b.y_test)
    _write_image_folder(t / "b_images", b.x_train, b.y_train)
    np.savez(t / "a_test.npz", x=a.x_test, y=a.y_test)
    seed_model = {"name": "timm:vit_tiny_patch16_224", "checkpoint": "seed"}
    common = {
        "seed_model": seed_model,
        "public": {"path": "public.npz"},
        "selection": {"method": "dpp", "k": 15},
        "training": {"lora_rank": 2, "epochs": 2, "lr": 0.003, "batch_size": 16, "seed": 1},
    }
    (t / "a.yaml").write_text(
        yaml.safe_dump({**common, "client_name": "a", "private": "a_private.npz", "output": "packages/a"})
    )
    (t / "b.yaml").write_text(
        yaml.safe_dump(
            {**common, "client_name": "b", "private": {"path": "b_images"}, "output": "packages/b"}
        )
    )
    (t / "server.yaml").write_text(
        yaml.safe_dump(
            {
                "seed_model": seed_model,
                "packages": ["packages/a", "packages/b"],
                "public": "public.npz",
                "moe": {"top_k": 2},
                "training": {"epochs": 2, "batch_size": 16, "lr": 0.01},
                "output": "unified",
            }
        )
    )
    for c in ("a", "b"):
        r = _cli("train-expert", "--config", str(t / f"{c}.yaml"), "--quiet")
        assert r.returncode == 0, r.stderr[-3000:]
    r = _cli("unify", "--config", str(t / "server.yaml"), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    return t, data


def test_packages_written(work):
    t, data = work
    # no private sample goes into a package: client a's private images (float32 bytes) appear in no file
    blobs = [f.read_bytes() for f in (t / "packages" / "a").rglob("*") if f.is_file()]
    for img in data.clients[0].x_train[:10]:
        assert not any(np.ascontiguousarray(img, dtype=np.float32).tobytes() in b for b in blobs)
    for c in ("a", "b"):
        m = json.loads((t / "packages" / c / "manifest.json").read_text())
        assert m["selection"]["method"] == "dpp" and m["selection"]["k"] == 15
        assert len(m["selection"]["proxy_indices"]) == 15
        assert m["label_space"]["private"] == [f"{c}:{j}" for j in range(10)]
        assert m["label_space"]["public"] == [str(j) for j in range(10)]
    assert (t / "unified" / ucli.UNIFIED_WEIGHTS).is_file()
    man = json.loads((t / "unified" / ucli.UNIFIED_MANIFEST).read_text())
    assert len(man["packages"]) == 2 and len(man["metrics"]["loss_per_epoch"]) == 2


def test_evaluate_prints_accuracy_matching_an_independent_computation(work):
    t, data = work
    r = _cli(
        "evaluate",
        "--model",
        str(t / "unified"),
        "--data",
        f"b={t / 'b_x.npy'}",
        "--labels",
        str(t / "b_y.npy"),
        "--json",
        str(t / "eval.json"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    printed = float(r.stdout.split("accuracy")[1].split()[0])
    # independent: the same model rebuilt in-process, digit targets parsed from the unified class names
    model = ucli.load_unified(t / "unified")
    targets = np.array([int(n.rsplit(":", 1)[-1]) for n in model.label_space.names])
    b = data.clients[1]
    want = accuracy(model.predict_proba(b.x_test), b.y_test, targets)
    assert printed == pytest.approx(want, abs=1e-4)
    assert json.loads((t / "eval.json").read_text())["b"]["accuracy"] == pytest.approx(want)


def test_image_folder_loader(work):
    t, data = work
    x, y, names = load_data({"path": "b_images"}, str(t))
    b = data.clients[1]
    assert names == [str(j) for j in range(10)] and x.shape == (30, 8, 8) and x.dtype == np.float32
    # folder order is by class then file name: compare as multisets of (label, rounded image)
    got = sorted((int(lab), tuple(np.rint(im * 255).astype(int).ravel())) for im, lab in zip(x, y))
    ref = sorted(
        (int(lab), tuple(np.clip(np.rint(im * 255), 0, 255).astype(int).ravel()))
        for im, lab in zip(b.x_train, b.y_train)
    )
    assert got == ref


def test_bad_configs(work, tmp_path, capsys):
    t, _ = work
    base = yaml.safe_load((t / "a.yaml").read_text())

    def run(cfg, fn=tecli.main_train_expert):
        p = t / "bad.yaml"
        p.write_text(yaml.safe_dump(cfg))
        rc = fn(["--config", str(p), "--quiet", "--out", str(tmp_path / "o")])
        return rc, capsys.readouterr().err

    rc, err = run({k: v for k, v in base.items() if k != "private"})
    assert rc == 2 and "private" in err
    rc, err = run({**base, "selction": {}})
    assert rc == 2 and "selction" in err
    rc, err = run({**base, "selection": {"k": 10_000}})
    assert rc == 2 and "exceeds the public pool" in err
    rc, err = run({**base, "selection": {"method": "greedy"}})
    assert rc == 2 and "selection.method must be one of dpp, facility_location, top_relevance, random" in err
    rc, err = run({**base, "training": {"epochs": 0}})
    assert rc == 2 and "training.epochs must be >= 1" in err
    rc, err = run({**base, "training": {"lr": "fast"}})
    assert rc == 2 and "training.lr must be a number" in err
    rc, err = run({**base, "training": {"lr": 0}})
    assert rc == 2 and "training.lr must be > 0" in err
    rc, err = run({**base, "selection": {"features": "pixels"}})
    assert rc == 2 and "selection.features" in err
    rc, err = run({**base, "private": "nope.npz"})
    assert rc == 2 and "nope.npz" in err
    rc, err = run({**base, "seed_model": {"name": "timm:vit_tiny_patch16_224", "config": VIT}})
    assert rc == 2 and "seed" in err
    (t / "bad.yaml").write_text("a: [unclosed")
    assert tecli.main_train_expert(["--config", str(t / "bad.yaml")]) == 2
    assert "YAML" in capsys.readouterr().err
    # the server refuses packages from a different seed model (random init, not the checkpoint)
    srv = yaml.safe_load((t / "server.yaml").read_text())
    srv["seed_model"] = {"name": "timm:vit_tiny_patch16_224", "config": VIT, "seed": 5}
    rc, err = run(srv, ucli.main_unify)
    assert rc == 2 and "hash" in err.lower()
    rc, err = run({**yaml.safe_load((t / "server.yaml").read_text()), "packages": []}, ucli.main_unify)
    assert rc == 2 and "packages" in err
    srv = yaml.safe_load((t / "server.yaml").read_text())
    rc, err = run({**srv, "moe": {"routed_head": "false"}}, ucli.main_unify)  # a string, not YAML's false
    assert rc == 2 and "moe.routed_head must be true or false" in err
    rc, err = run({**srv, "training": {"route_loss": -1}}, ucli.main_unify)
    assert rc == 2 and "training.route_loss" in err


def test_selection_method_spellings(work, tmp_path):
    """selection.method: a canonical name or its short spelling; the package records the canonical name."""
    t, _ = work
    base = yaml.safe_load((t / "a.yaml").read_text())
    picked = {}
    for spelling, canon in (("topk", "top_relevance"), ("top_relevance", "top_relevance"), ("fl", "facility_location")):
        cfg = {
            **base,
            "selection": {"method": spelling, "k": 5, "relevance_epochs": 1},
            "training": {**base["training"], "epochs": 1},
        }
        (t / f"method_{spelling}.yaml").write_text(yaml.safe_dump(cfg))
        out = tmp_path / spelling
        argv = ["--config", str(t / f"method_{spelling}.yaml"), "--quiet", "--out", str(out)]
        assert tecli.main_train_expert(argv) == 0
        sel = json.loads((out / "manifest.json").read_text())["selection"]
        assert sel["method"] == canon and len(sel["proxy_indices"]) == 5
        picked[spelling] = sel["proxy_indices"]
    assert picked["topk"] == picked["top_relevance"]


def test_train_expert_selects_on_the_chosen_features(work, tmp_path):
    """selection.features: pooled+context picks exactly the DPP proxies of those embeddings (computed here)."""
    from metamoe.models import create_seed_model
    from metamoe.selection import relevance_scores, select_dpp
    from metamoe.unify.client import embed

    t, data = work
    cfg = yaml.safe_load((t / "a.yaml").read_text())
    cfg["selection"]["features"] = "pooled+context"
    (t / "ctx.yaml").write_text(yaml.safe_dump(cfg))
    assert tecli.main_train_expert(["--config", str(t / "ctx.yaml"), "--quiet", "--out", str(tmp_path / "c")]) == 0
    got = json.loads((tmp_path / "c" / "manifest.json").read_text())["selection"]["proxy_indices"]
    seed = create_seed_model("timm:vit_tiny_patch16_224", checkpoint=t / "seed")
    pub = embed(seed, data.public_x, progress=False, features="pooled+context")
    priv = embed(seed, data.clients[0].x_train, progress=False, features="pooled+context")
    assert pub.shape[1] == seed.feature_dim + sum(layer.hidden_size for layer in seed.ffn_layers())
    want = select_dpp(pub, 15, relevance_scores(priv, pub, epochs=5, seed=1, progress=False), kernel="rbf",
                      progress=False)
    assert got == want.indices.tolist()
    pooled = json.loads((t / "packages" / "a" / "manifest.json").read_text())["selection"]["proxy_indices"]
    assert got != pooled  # the features change what is picked


def test_unify_with_route_loss(work, tmp_path):
    t, _ = work
    srv = yaml.safe_load((t / "server.yaml").read_text())
    srv["training"]["route_loss"] = 0.5
    (t / "route.yaml").write_text(yaml.safe_dump(srv))
    assert ucli.main_unify(["--config", str(t / "route.yaml"), "--quiet", "--out", str(tmp_path / "u")]) == 0
    metrics = json.loads((tmp_path / "u" / "unified.json").read_text())["metrics"]
    assert len(metrics["route_loss_per_epoch"]) == 2 and all(v > 0 for v in metrics["route_loss_per_epoch"])
    default = json.loads((t / "unified" / "unified.json").read_text())["metrics"]  # no route_loss key: 1.0
    assert len(default["route_loss_per_epoch"]) == 2
    assert default["route_loss_per_epoch"] != metrics["route_loss_per_epoch"]
    srv["training"]["route_loss"] = 0
    (t / "plain.yaml").write_text(yaml.safe_dump(srv))
    assert ucli.main_unify(["--config", str(t / "plain.yaml"), "--quiet", "--out", str(tmp_path / "p")]) == 0
    plain = json.loads((tmp_path / "p" / "unified.json").read_text())["metrics"]
    assert "route_loss_per_epoch" not in plain  # 0: the task + load-balancing loss only


def test_unified_folder_moves_with_its_packages(work, tmp_path):
    """unified.json holds paths relative to its folder (the packages are copied into it): the tree can be moved."""
    import shutil

    t, data = work
    man = json.loads((t / "unified" / ucli.UNIFIED_MANIFEST).read_text())
    assert not any(os.path.isabs(p) for p in man["packages"]), man["packages"]
    assert man["seed_model_base"] is None or not os.path.isabs(man["seed_model_base"])
    moved = tmp_path / "elsewhere"
    shutil.copytree(t, moved)
    x = data.clients[1].x_test[:12]
    want = ucli.load_unified(t / "unified").predict_proba(x)
    got = ucli.load_unified(moved / "unified").predict_proba(x)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    shutil.rmtree(moved / "unified" / "packages" / "b")  # a missing package copy: a clear error naming it
    with pytest.raises(FileNotFoundError, match="packages/b"):
        ucli.load_unified(moved / "unified")


def test_tampered_router_weights_refused(work, tmp_path, capsys):
    import shutil

    t, _ = work
    d = tmp_path / "u"
    shutil.copytree(t / "unified", d)
    w = d / ucli.UNIFIED_WEIGHTS
    raw = bytearray(w.read_bytes())
    raw[-1] ^= 1
    w.write_bytes(bytes(raw))
    rc = evcli.main_evaluate(["--model", str(d), "--data", str(t / "a_test.npz")])
    assert rc == 2 and "sha256" in capsys.readouterr().err
    # labels missing for a classifier: a clear error, no accuracy printed
    rc = evcli.main_evaluate(["--model", str(t / "unified"), "--data", str(t / "b_x.npy")])
    out = capsys.readouterr()
    assert rc == 2 and "labels" in out.err and "accuracy" not in out.out


def test_datasets_folder_without_datasets(tmp_path):
    pytest.importorskip("PIL")
    import importlib.util

    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("datasets is installed: the 'not installed' message does not apply")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_info.json").write_text("{}")
    with pytest.raises(ConfigError, match="datasets"):
        load_data(str(tmp_path / "ds"))


def test_help_lists_every_option():
    r = _cli("train-expert", "--help", timeout=60)
    assert r.returncode == 0
    for key in ("seed_model", "checkpoint", "selection", "lora_rank", "align", "image_size", "save_to_disk"):
        assert key in r.stdout, key
