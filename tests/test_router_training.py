"""Router training: task and routing losses against references, options (RouterTraining, one set of defaults)
and errors, checkpoints and exact resume."""

import dataclasses
import json
import re

import numpy as np
import pytest
import test_server
import torch
import yaml

from metamoe.unify import DigitsConfig, RouterTraining
from metamoe.unify.checkpoint import CHECKPOINT_STATE
from metamoe.unify.config import SERVER_YAML
from metamoe.unify.router_training import train_router
from metamoe.unify.server import proxy_owners, proxy_training_set, unified_label_space
from metamoe.unify.unified_model import UnifiedModel, build_soup_model, build_unified_model

# tiny models: one torch thread (see conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the module-scoped fixtures of test_server.py: a tiny ViT seed, the digit domains, three expert packages
digits, seed_vit, paths, packages = test_server.digits, test_server.seed_vit, test_server.paths, test_server.packages


# --------------------------------------------------------------------------- checkpoints and resume


def _params(m: UnifiedModel):
    return {k: v.detach().clone() for k, v in m.named_parameters() if v.requires_grad}


@pytest.mark.parametrize("routed", [False, True])
def test_train_router_resume_equals_uninterrupted(packages, seed_vit, digits, tmp_path, routed):
    space = unified_label_space(packages)
    x, y, idx = proxy_training_set(packages, digits.public_x, digits.public_y, space)
    kw = dict(epochs=3, lr=5e-2, batch_size=5, seed=3, checkpoint_every=2)  # 3 steps/epoch, 9 in all
    if routed:
        kw["route_targets"] = proxy_owners(packages, idx)
    full = build_unified_model(seed_vit, packages)
    before = _params(full)
    r_full = train_router(full, x, y, checkpoint_dir=tmp_path / "a", **kw)
    after = _params(full)
    assert any((after[k] - before[k]).abs().max() > 1e-4 for k in after)  # training moved the router

    class Stop(Exception):
        pass

    def stop_at_5(step, loss):
        if step == 5:
            raise Stop

    part = build_unified_model(seed_vit, packages)
    with pytest.raises(Stop):
        train_router(part, x, y, checkpoint_dir=tmp_path / "b", callback=stop_at_5, **kw)
    state = json.loads((tmp_path / "b" / "state.json").read_text())
    assert state["step"] == 4  # the last checkpoint before the interruption
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["ckpt-00000004.safetensors", "state.json"]
    fresh = build_unified_model(seed_vit, packages)  # a new process would start from the same packages
    r_res = train_router(fresh, x, y, checkpoint_dir=tmp_path / "b", **kw)
    assert r_res["resumed_from"] == 4 and r_full["resumed_from"] is None
    for k, v in _params(fresh).items():
        assert torch.equal(v, after[k]), k
    assert r_res["loss_per_epoch"] == r_full["loss_per_epoch"]
    assert r_res.get("route_loss_per_epoch") == r_full.get("route_loss_per_epoch")
    assert ("route_loss_per_epoch" in r_full) == routed
    # a finished run resumes to itself; a different run refuses the folder
    again = build_unified_model(seed_vit, packages)
    train_router(again, x, y, checkpoint_dir=tmp_path / "a", **kw)
    for k, v in _params(again).items():
        assert torch.equal(v, after[k]), k
    with pytest.raises(ValueError, match="different run"):
        train_router(
            build_unified_model(seed_vit, packages), x, y, checkpoint_dir=tmp_path / "a", **{**kw, "lr": 1e-3}
        )


def test_checkpoint_refuses_other_data_and_damaged_files(packages, seed_vit, digits, tmp_path):
    space = unified_label_space(packages)
    x, y, _ = proxy_training_set(packages, digits.public_x, digits.public_y, space)
    kw = dict(epochs=1, batch_size=5, seed=0, checkpoint_dir=tmp_path)  # 3 steps

    def run(data=x, **extra):
        return train_router(build_unified_model(seed_vit, packages), data, y, **kw, **extra)

    assert run()["resumed_from"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000003.safetensors", CHECKPOINT_STATE]
    assert run()["resumed_from"] == 3
    other = x.copy()
    other[0] += 1.0  # the same shapes and labels, one image changed: the data fingerprint differs
    with pytest.raises(ValueError, match=r"different run \(data differs\)"):
        run(other)
    tensors = tmp_path / "ckpt-00000003.safetensors"
    raw = bytearray(tensors.read_bytes())
    raw[-1] ^= 0xFF
    tensors.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="does not match its recorded sha256"):
        run()
    assert run(resume=False)["resumed_from"] is None  # a fresh run writes a valid checkpoint over it
    assert run()["resumed_from"] == 3
    (tmp_path / CHECKPOINT_STATE).write_text('{"format": "something else"}\n')
    with pytest.raises(ValueError, match="is not a metamoe router checkpoint"):
        run()


# --------------------------------------------------------------------------- options and losses


def test_train_router_options_and_errors(packages, seed_vit, digits):
    space = unified_label_space(packages)
    x, y, _ = proxy_training_set(packages, digits.public_x, digits.public_y, space)
    m = build_unified_model(seed_vit, packages, context_routing=False)
    head0 = m.seed.head().weight.detach().clone()
    lora0 = m.moe_layers[0].lora_B_fc1.detach().clone()
    r = train_router(m, x, y, epochs=1, batch_size=8, train_lora=True, train_head=True)
    assert r["final_lambda"] is None and len(r["loss_per_epoch"]) == 1
    assert (m.seed.head().weight - head0).abs().max() > 0
    assert (m.moe_layers[0].lora_B_fc1 - lora0).abs().max() > 0
    with pytest.raises(ValueError, match=r"y must lie in \[0, 40\)"):
        train_router(m, x, np.full(len(x), 40))
    with pytest.raises(ValueError, match="y is required"):
        train_router(m, x)
    with pytest.raises(ValueError, match="epochs"):
        train_router(m, x, y, epochs=0)
    with pytest.raises(TypeError, match="UnifiedModel"):
        train_router(seed_vit, x, y)
    soup = build_soup_model(seed_vit, packages)
    with pytest.raises(ValueError, match="nothing to train"):
        train_router(soup, digits.public_x[:4], np.full(4, 31))


@pytest.mark.parametrize("block", [None, "public"])
def test_router_task_loss_against_reference(packages, seed_vit, digits, block):
    """One full-batch step: the recorded epoch loss is the cross-entropy of the model before the step."""
    space = unified_label_space(packages)
    x, y, _ = proxy_training_set(packages, digits.public_x, digits.public_y, space)
    lb = space.public_slice if block == "public" else None
    m = build_unified_model(seed_vit, packages)
    with torch.no_grad():
        logits = m(m.prepare(x)).double()
    yt = torch.from_numpy(y)
    if lb is None:
        want = torch.nn.functional.cross_entropy(logits, yt)
    else:
        want = torch.nn.functional.cross_entropy(logits[:, lb[0] : lb[1]], yt - lb[0])
    r = train_router(m, x, y, epochs=1, batch_size=len(x), label_block=lb)
    assert r["loss_per_epoch"][0] == pytest.approx(float(want), rel=1e-5)
    if lb is not None:
        with pytest.raises(ValueError, match="label_block"):
            train_router(m, x, np.zeros(len(x), dtype=np.int64), label_block=lb)


def test_route_loss_against_reference(packages, seed_vit, digits):
    """One full-batch step: the recorded routing loss is the float64 cross-entropy of the targets against each
    sample's mean routing probability per expert, averaged over the layers, of the model before the step."""
    space = unified_label_space(packages)
    x, y, idx = proxy_training_set(packages, digits.public_x, digits.public_y, space)
    t = proxy_owners(packages, idx)
    m = build_unified_model(seed_vit, packages)
    B, E = len(x), len(packages)
    with torch.no_grad():
        m(m.prepare(x))
        want = np.mean(
            [
                float(-(torch.from_numpy(t) * torch.log(
                    torch.softmax(lay.router_logits.double(), -1).reshape(B, -1, E).mean(1))).sum(1).mean())
                for lay in m.moe_layers
            ]
        )
    r = train_router(m, x, y, epochs=1, batch_size=B, route_targets=t, route_loss_coef=0.5)
    assert r["route_loss_per_epoch"][0] == pytest.approx(want, rel=1e-5)
    assert want > 0.1  # the untrained router is far from the targets: the comparison means something


def test_route_loss_teaches_the_router_the_client_domains(packages, seed_vit, digits):
    # proxies drawn from each client's domain, labelled with their public digits (block loss, as the harness
    # trains): the task loss alone barely tells the router which expert owns a domain (the routed head only
    # weighs private classes); the routing loss does, and it carries over to the clients' unseen test images
    space = unified_label_space(packages)
    picks = [np.flatnonzero(digits.public_domain == i)[:12] for i in range(len(packages))]
    x = np.concatenate([digits.public_x[s] for s in picks])
    y = np.concatenate([digits.public_y[s] for s in picks]) + space.public_slice[0]
    t = np.repeat(np.eye(len(packages)), [len(s) for s in picks], axis=0)
    x_test = np.concatenate([c.x_test for c in digits.clients])
    t_test = np.repeat(np.eye(len(packages)), [len(c.x_test) for c in digits.clients], axis=0)
    kw = dict(epochs=10, lr=5e-2, batch_size=12, seed=1, label_block=space.public_slice)
    plain, routed = build_unified_model(seed_vit, packages), build_unified_model(seed_vit, packages)
    train_router(plain, x, y, **kw)
    r = train_router(routed, x, y, route_targets=t, **kw)
    assert r["route_loss_per_epoch"][-1] < r["route_loss_per_epoch"][0]
    own_plain = float((plain.routing_weights(x_test) * t_test).sum(1).mean())
    own_routed = float((routed.routing_weights(x_test) * t_test).sum(1).mean())
    assert own_routed > own_plain + 0.05  # measured: 0.644 vs 0.544


def test_route_targets_errors(packages, seed_vit, digits):
    space = unified_label_space(packages)
    x, y, idx = proxy_training_set(packages, digits.public_x, digits.public_y, space)
    t = proxy_owners(packages, idx)
    m = build_unified_model(seed_vit, packages)
    with pytest.raises(ValueError, match=r"route_targets must be \(n=13, E=3\)"):
        train_router(m, x, y, route_targets=t[:, :2])
    bad = t.copy()
    bad[0] = [1.5, -0.5, 0.0]
    with pytest.raises(ValueError, match="non-negative"):
        train_router(m, x, y, route_targets=bad)
    with pytest.raises(ValueError, match="sum to 1"):
        train_router(m, x, y, route_targets=t * 2)
    with pytest.raises(ValueError, match="route_loss_coef"):
        train_router(m, x, y, route_targets=t, route_loss_coef=0)


# --------------------------------------------------------------------------- RouterTraining: one set of options


@pytest.mark.parametrize(
    "field, bad, err",
    [
        ("epochs", 0, ValueError),
        ("epochs", 1.5, TypeError),
        ("epochs", True, TypeError),
        ("lr", 0.0, ValueError),
        ("lr", float("nan"), ValueError),
        ("lr", "0.1", TypeError),
        ("batch_size", 0, ValueError),
        ("weight_decay", -1e-3, ValueError),
        ("weight_decay", float("inf"), ValueError),
        ("train_lora", "yes", TypeError),
        ("train_head", 1, TypeError),
        ("seed", -1, ValueError),
        ("checkpoint_every", 0, ValueError),
        ("route_loss_coef", 0.0, ValueError),
        ("route_loss_coef", -1.0, ValueError),
    ],
)
def test_router_training_validates_each_field(field, bad, err):
    with pytest.raises(err, match=rf"RouterTraining\.{field}\b"):
        RouterTraining(**{field: bad})
    with pytest.raises(err, match=rf"RouterTraining\.{field}\b"):
        RouterTraining().replace(**{field: bad})


def test_router_training_is_frozen_and_normalised():
    t = RouterTraining(epochs=np.int64(3), lr=1, weight_decay=0, train_lora=np.bool_(True), seed=np.int32(2))
    assert (t.epochs, t.lr, t.weight_decay, t.train_lora, t.seed) == (3, 1.0, 0.0, True, 2)
    assert type(t.epochs) is int and type(t.lr) is float and type(t.train_lora) is bool and type(t.seed) is int
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.epochs = 5  # type: ignore[misc]
    assert t.replace(lr=0.5) == dataclasses.replace(t, lr=0.5) and t.lr == 1.0


@pytest.mark.parametrize("routed", [False, True])
def test_train_router_training_equals_keywords(packages, seed_vit, digits, tmp_path, routed):
    space = unified_label_space(packages)
    x, y, idx = proxy_training_set(packages, digits.public_x, digits.public_y, space)
    kw = dict(epochs=2, lr=3e-2, batch_size=6, weight_decay=1e-2, train_lora=True, train_head=True, seed=5,
              checkpoint_every=2, route_loss_coef=0.5)
    rest = dict(label_block=space.public_slice, route_targets=proxy_owners(packages, idx) if routed else None)
    a, b = build_unified_model(seed_vit, packages), build_unified_model(seed_vit, packages)
    r_a = train_router(a, x, y, checkpoint_dir=tmp_path / "a", **rest, **kw)
    r_b = train_router(b, x, y, training=RouterTraining(**kw), checkpoint_dir=tmp_path / "b", **rest)
    pa, pb = _params(a), _params(b)
    assert sorted(pa) == sorted(pb) and any(k.startswith("seed.") and "lora_" in k for k in pa)
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    assert r_a["loss_per_epoch"] == r_b["loss_per_epoch"] and r_a.get("route_loss_per_epoch") == r_b.get(
        "route_loss_per_epoch"
    )
    # one run as far as the checkpoints are concerned: the recorded config is the same
    state_a = json.loads((tmp_path / "a" / CHECKPOINT_STATE).read_text())
    state_b = json.loads((tmp_path / "b" / CHECKPOINT_STATE).read_text())
    assert state_a["config"] == state_b["config"]
    assert state_a["config"]["route_loss_coef"] == (0.5 if routed else None)


def test_train_router_options_mixed_or_unknown(packages, seed_vit, digits):
    space = unified_label_space(packages)
    x, y, _ = proxy_training_set(packages, digits.public_x, digits.public_y, space)
    m = build_unified_model(seed_vit, packages)
    with pytest.raises(TypeError, match=r"given twice.*\['epochs', 'lr'\]"):
        train_router(m, x, y, training=RouterTraining(epochs=1), epochs=1, lr=1e-3)
    with pytest.raises(TypeError, match="'epoch'"):
        train_router(m, x, y, epoch=1)
    with pytest.raises(TypeError, match="'checkpoint_dirr'"):
        train_router(m, x, y, training=RouterTraining(), checkpoint_dirr="x")
    with pytest.raises(TypeError, match="training must be a RouterTraining"):
        train_router(m, x, y, training={"epochs": 1})
    with pytest.raises(ValueError, match=r"RouterTraining\.lr"):
        train_router(m, x, y, lr=-1.0)
    with pytest.raises(TypeError):
        train_router(m, x, y, RouterTraining())  # keyword-only, as before


def test_train_router_defaults_are_router_training_defaults(packages, seed_vit, digits, tmp_path):
    space = unified_label_space(packages)
    x, y, _ = proxy_training_set(packages, digits.public_x, digits.public_y, space)
    x, y = x[:8], y[:8]  # one step per epoch
    r = train_router(build_unified_model(seed_vit, packages), x, y, checkpoint_dir=tmp_path)
    d = RouterTraining()
    assert r["steps"] == d.epochs == len(r["loss_per_epoch"])
    cfg = json.loads((tmp_path / CHECKPOINT_STATE).read_text())["config"]
    want = {k: v for k, v in dataclasses.asdict(d).items() if k not in ("checkpoint_every", "route_loss_coef")}
    assert {k: cfg[k] for k in want} == want


def _server_yaml_training():
    """{key: value} of the training section of the SERVER_YAML template, values parsed as YAML."""
    lines = SERVER_YAML.splitlines()
    start = next(i for i, ln in enumerate(lines) if re.match(r"^  training:", ln))
    out = {}
    for ln in lines[start + 1 :]:
        if not ln.startswith("    "):
            break
        m = re.match(r"^    (\w+): (\S+)", ln)
        if m:
            out[m.group(1)] = yaml.safe_load(m.group(2))
    return out


def test_one_set_of_router_training_defaults():
    d, demo, tmpl = RouterTraining(), DigitsConfig(), _server_yaml_training()
    # the demo (DigitsConfig) trains its routers with the defaults
    assert (demo.router_epochs, demo.router_lr, demo.router_batch_size, demo.route_loss) == (
        d.epochs, d.lr, d.batch_size, d.route_loss_coef
    )
    assert demo.router_training() == d and demo.router_training(seed=7) == d.replace(seed=7)
    assert DigitsConfig(route_loss=0.0).router_training().route_loss_coef == d.route_loss_coef
    # server.yaml documents them
    assert tmpl == {
        "epochs": d.epochs,
        "lr": d.lr,
        "batch_size": d.batch_size,
        "seed": d.seed,
        "train_lora": d.train_lora,
        "loss": "block",
        "route_loss": d.route_loss_coef,
        "checkpoint_every": d.checkpoint_every,
    }
    # and these are the demo's values (train_router's own defaults were 10 epochs at lr 5e-3 before)
    assert (d.epochs, d.lr, d.batch_size, d.weight_decay, d.route_loss_coef) == (40, 1e-2, 64, 0.0, 1.0)
    assert (d.train_lora, d.train_head, d.seed, d.checkpoint_every) == (False, False, 0, 50)
