"""`metamoe evaluate`: class names per --data set, count mismatches, a folder without a finished result."""

import json

import numpy as np
import pytest
from test_unify_cli import work  # noqa: F401  (the module fixture: two packages + a unified model)

from metamoe.unify import cli as ucli
from metamoe.unify import evaluate_cli as evcli


def test_class_names_are_per_data_set(work, tmp_path, capsys):  # noqa: F811
    t, data = work
    b = data.clients[1]
    # the same test set twice: plain, and with labels renumbered 9 - y and named accordingly
    np.savez(tmp_path / "b.npz", x=b.x_test, y=b.y_test)
    np.savez(tmp_path / "b_rev.npz", x=b.x_test, y=9 - b.y_test)
    digits = ",".join(str(j) for j in range(10))
    reverse = ",".join(str(9 - j) for j in range(10))
    out = tmp_path / "res.json"
    argv = ["--model", str(t / "unified"), "--data", f"b={tmp_path / 'b.npz'}", "--class-names", digits,
            "--data", f"rev={tmp_path / 'b_rev.npz'}", "--class-names", reverse, "--json", str(out)]
    assert evcli.main_evaluate(argv) == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    model = ucli.load_unified(t / "unified")
    want = evcli.evaluate_model(model, b.x_test, b.y_test, [str(j) for j in range(10)])["accuracy"]
    assert res["b"]["accuracy"] == pytest.approx(want) and res["rev"]["accuracy"] == pytest.approx(want)
    # scored against the other set's names, the renumbered set would get another accuracy
    wrong = evcli.evaluate_model(model, b.x_test, 9 - b.y_test, [str(j) for j in range(10)])["accuracy"]
    assert wrong != pytest.approx(want)
    # '' keeps a set's own names (here the default '0'..'9')
    argv = ["--model", str(t / "unified"), "--data", f"b={tmp_path / 'b.npz'}", "--class-names", "",
            "--data", f"rev={tmp_path / 'b_rev.npz'}", "--class-names", reverse, "--json", str(out)]
    assert evcli.main_evaluate(argv) == 0
    res = json.loads(out.read_text())
    assert res["b"]["accuracy"] == pytest.approx(want) and res["rev"]["accuracy"] == pytest.approx(want)


def test_class_names_count_must_match_the_data_sets(work, capsys):  # noqa: F811
    t, _ = work
    argv = ["--model", str(t / "unified"), "--data", str(t / "a_test.npz"), "--data", str(t / "a_test.npz"),
            "--class-names", ",".join(str(j) for j in range(10))]
    rc = evcli.main_evaluate(argv)
    out = capsys.readouterr()
    assert rc == 2 and "one --class-names per --data" in out.err and "got 1 --class-names for 2 --data" in out.err
    assert "accuracy" not in out.out


def test_json_output_is_checked_before_the_model_is_rebuilt(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evcli, "load_unified", lambda d: pytest.fail("the model was rebuilt"))
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 8, 8), np.float32), y=np.zeros(2, np.int64))
    rc = evcli.main_evaluate(["--model", str(tmp_path / "u"), "--data", str(tmp_path / "d.npz"), "--json",
                              str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == f"error: --json {tmp_path} is a folder, not a file", err


def test_folder_without_a_finished_result(tmp_path, capsys):
    (tmp_path / "u" / "checkpoints").mkdir(parents=True)
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 8, 8), np.float32), y=np.zeros(2, np.int64))
    rc = evcli.main_evaluate(["--model", str(tmp_path / "u"), "--data", str(tmp_path / "d.npz")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "no finished unified model" in err, err
    rc = evcli.main_evaluate(["--model", str(tmp_path / "nothing"), "--data", str(tmp_path / "d.npz")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "not a unified model folder" in err, err


def test_rgb_image_folder_defaults_to_the_seed_input(tmp_path, capsys):
    """An image folder is read with the seed's channels and image size unless --channels / --image-size say."""
    import yaml
    from PIL import Image

    from metamoe.data.digits import make_digits_domains
    from metamoe.models import create_seed_model, save_seed_model
    from metamoe.unify import train_expert_cli as tecli
    from metamoe.unify.data_loading import load_data

    t = tmp_path
    data = make_digits_domains(0, n_private=20, n_test=10, public_per_domain=10)
    rgb = lambda a: np.repeat(a[:, None], 3, axis=1).astype(np.float32)  # noqa: E731
    vit = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=16, depth=1, num_heads=2, num_classes=10)
    save_seed_model(create_seed_model("timm:vit_tiny_patch16_224", seed=0, **vit), t / "seed")
    np.savez(t / "public.npz", x=rgb(data.public_x), y=data.public_y)
    seed_model = {"name": "timm:vit_tiny_patch16_224", "checkpoint": "seed"}
    for i, c in enumerate(("a", "b")):
        cl = data.clients[i]
        np.savez(t / f"{c}.npz", x=rgb(cl.x_train), y=cl.y_train)
        cfg = {"seed_model": seed_model, "public": "public.npz", "client_name": c, "private": f"{c}.npz",
               "selection": {"method": "dpp", "k": 8}, "output": f"packages/{c}",
               "training": {"lora_rank": 2, "epochs": 1, "lr": 0.003, "batch_size": 16, "seed": 1}}
        (t / f"{c}.yaml").write_text(yaml.safe_dump(cfg))
        assert tecli.main_train_expert(["--config", str(t / f"{c}.yaml"), "--quiet"]) == 0, capsys.readouterr().err
    srv = {"seed_model": seed_model, "packages": ["packages/a", "packages/b"], "public": "public.npz",
           "training": {"epochs": 1, "batch_size": 16}, "output": "unified"}
    (t / "server.yaml").write_text(yaml.safe_dump(srv))
    assert ucli.main_unify(["--config", str(t / "server.yaml"), "--quiet"]) == 0, capsys.readouterr().err
    b = data.clients[1]
    for i, (img, lab) in enumerate(zip(b.x_test, b.y_test)):  # 16 x 16 RGB files, red channel dimmed
        a = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
        a = np.stack([a // 2, a, a], axis=-1).repeat(2, axis=0).repeat(2, axis=1)
        (t / "imgs" / str(int(lab))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(a, mode="RGB").save(t / "imgs" / str(int(lab)) / f"{i}.png")
    out = t / "res.json"
    argv = ["--model", str(t / "unified"), "--data", f"imgs={t / 'imgs'}", "--json", str(out)]
    assert evcli.main_evaluate(argv) == 0, capsys.readouterr().err
    x, y, names = load_data({"path": str(t / "imgs"), "channels": 3, "image_size": 8})
    assert x.shape == (len(b.x_test), 3, 8, 8) and not np.allclose(x[:, 0], x[:, 1])
    model = ucli.load_unified(t / "unified")
    want = evcli.evaluate_model(model, x, y, names)["accuracy"]
    assert json.loads(out.read_text())["imgs"]["accuracy"] == pytest.approx(want)
    # explicit options: the same as the defaults here; a wrong one is refused naming the data set and the fix
    assert evcli.main_evaluate(argv + ["--channels", "3", "--image-size", "8"]) == 0
    assert json.loads(out.read_text())["imgs"]["accuracy"] == pytest.approx(want)
    capsys.readouterr()
    assert evcli.main_evaluate(argv + ["--channels", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--data imgs={t / 'imgs'}: images are 1 x 8 x 8" in err and "--channels 3" in err, err
    assert evcli.main_evaluate(argv + ["--image-size", "8,x"]) == 2
    assert "--image-size must be S or H,W" in capsys.readouterr().err
