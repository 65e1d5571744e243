"""Expert packages: round trip, atomic writes, every bad-input case, and that no private sample goes in."""

import dataclasses
import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import metamoe.unify.package as package_mod
import metamoe.unify.package_write as package_write_mod
from metamoe.data.digits import make_digits_domains
from metamoe.models import create_seed_model, ffn_input_hooks, has_lora, weight_hash
from metamoe.unify import (
    PackageError,
    check_package_set,
    embed,
    expert_from_package,
    load_expert_package,
    load_expert_packages,
    train_expert,
    write_expert_package,
)
from metamoe.unify.package import manifest_digest

VIT = "timm:vit_tiny_patch16_224"
# embed_dim 64 = 8 x 8 pixels: a leaked image row would have the same width as every tensor row in a package
VIT_CFG = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=64, depth=2, num_heads=2, num_classes=10)
N_PRIVATE, N_PROXY = 30, 10


# tiny models: one torch thread (see conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    return make_digits_domains(seed=1, n_private=N_PRIVATE, n_test=5, public_per_domain=20)


@pytest.fixture(scope="module")
def seed_model():
    return create_seed_model(VIT, seed=0, **VIT_CFG)


def _spaces(domain):
    return {"private": [f"{domain}/{d}" for d in range(10)], "public": [f"public/{d}" for d in range(10)]}


@pytest.fixture(scope="module")
def proxy_idx():
    return np.array([5, 17, 3, 40, 41, 99, 100, 7, 64, 12], dtype=np.int64)


@pytest.fixture(scope="module")
def expert(seed_model, digits, proxy_idx):
    c = digits.clients[0]
    return train_expert(
        seed_model,
        (c.x_train, c.y_train),
        (digits.public_x[proxy_idx], digits.public_y[proxy_idx]),
        _spaces(c.domain),
        lora_rank=2,
        epochs=1,
        lr=1e-2,
        batch_size=16,
        seed=0,
    )


@pytest.fixture
def pkg(tmp_path, expert, digits, proxy_idx):
    return write_expert_package(
        tmp_path / "client0",
        expert,
        proxy_indices=proxy_idx,
        public_pool_size=len(digits.public_x),
        method="dpp",
        k=12,
    )


def _manifest(path):
    return json.loads((Path(path) / "manifest.json").read_text())


def _write_manifest(path, m):
    """Write an edited manifest with a fresh manifest_sha256, so the loader's field checks are what refuses it
    (the digest alone would refuse every edit: tests/test_package_integrity.py)."""
    if "manifest_sha256" in m:
        m = {**m, "manifest_sha256": manifest_digest(m)}
    (Path(path) / "manifest.json").write_text(json.dumps(m))


# --------------------------------------------------------------------------- round trip


def test_round_trip(pkg, expert, seed_model, digits, proxy_idx):
    assert sorted(p.name for p in pkg.iterdir()) == [
        "head.safetensors",
        "lora.safetensors",
        "manifest.json",
        "prototypes.safetensors",
    ]
    loaded = load_expert_package(pkg, public_pool_size=len(digits.public_x), seed_model=seed_model)
    m = loaded.manifest
    assert m["format_version"] == 2 and loaded.seed_name == VIT and loaded.seed_hash == expert.seed_hash
    assert loaded.method == "dpp" and loaded.k == 12 and loaded.public_pool_size == len(digits.public_x)
    np.testing.assert_array_equal(loaded.proxy_indices, proxy_idx)
    assert loaded.label_space == {"kind": "classes", **_spaces("upright")}
    assert loaded.lora_config == expert.lora_config and loaded.num_layers == 2
    assert m["metrics"]["n_private"] == N_PRIVATE and m["metrics"]["n_proxies"] == N_PROXY
    for name, digest in m["files"].items():
        assert hashlib.sha256((pkg / name).read_bytes()).hexdigest() == digest
    for k, v in expert.lora_state.items():
        assert torch.equal(loaded.lora_state[k], v)
    assert torch.equal(loaded.prototypes, expert.prototypes)
    assert torch.equal(loaded.head_state["weight"], expert.head_state["weight"])
    # rebuilding the expert from the seed + the package gives the trained expert's outputs
    rebuilt = expert_from_package(seed_model, loaded)
    assert weight_hash(seed_model) == loaded.seed_hash and not has_lora(seed_model)  # the seed is untouched
    x = digits.clients[0].x_test
    with torch.no_grad():
        torch.testing.assert_close(
            rebuilt(rebuilt.prepare(x)), expert.model(expert.model.prepare(x)), rtol=0, atol=0
        )


def test_selection_object_and_overwrite(tmp_path, expert, digits, proxy_idx):
    from metamoe.selection import Selection

    sel = Selection(
        indices=proxy_idx,
        gains=np.zeros(len(proxy_idx)),
        objective=0.0,
        backend="torch",
        seconds=0.0,
        method="facility_location",
    )
    p = write_expert_package(tmp_path / "a", expert, proxy_indices=sel, public_pool_size=len(digits.public_x))
    assert (
        _manifest(p)["selection"]["method"] == "facility_location"
        and _manifest(p)["selection"]["k"] == N_PROXY
    )
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_expert_package(p, expert, proxy_indices=sel, public_pool_size=len(digits.public_x))
    write_expert_package(
        p,
        expert,
        proxy_indices=proxy_idx,
        public_pool_size=len(digits.public_x),
        method="random",
        overwrite=True,
    )
    assert _manifest(p)["selection"]["method"] == "random"
    load_expert_package(p)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a"]  # no temporary folders left behind


def test_method_names_written_canonical_and_old_spellings_load(tmp_path, expert, digits, proxy_idx, seed_model):
    """Manifests record canonical method names; a short spelling is accepted on write and in old manifests."""
    from metamoe.selection import SELECTION_METHODS, Selection

    n = len(digits.public_x)
    for spelling, canon in (("topk", "top_relevance"), ("fl", "facility_location"), ("random", "random")):
        p = write_expert_package(tmp_path / spelling, expert, proxy_indices=proxy_idx, public_pool_size=n,
                                 method=spelling)
        assert _manifest(p)["selection"]["method"] == canon and load_expert_package(p).method == canon
    old_selection = Selection(indices=proxy_idx, gains=np.zeros(len(proxy_idx)), objective=0.0, backend="numpy",
                              seconds=0.0, method="topk")  # a selection JSON may record the short spelling
    p = write_expert_package(tmp_path / "sel", expert, proxy_indices=old_selection, public_pool_size=n)
    assert _manifest(p)["selection"]["method"] == "top_relevance"
    # a manifest that records the short spelling "topk" loads, read as top_relevance
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "topk", old)
    m = _manifest(old)
    m["selection"]["method"] = "topk"
    _write_manifest(old, m)
    pkg = load_expert_package(old, public_pool_size=n, seed_model=seed_model)
    assert pkg.manifest["selection"]["method"] == "topk" and pkg.method == "top_relevance"
    assert load_expert_packages([old], seed_model=seed_model)[0].method == "top_relevance"
    assert package_mod.SELECTION_METHODS == SELECTION_METHODS == ("dpp", "facility_location", "top_relevance",
                                                                  "random")


def test_failed_write_leaves_nothing(tmp_path, expert, digits, proxy_idx, monkeypatch):
    calls = []
    real = package_write_mod._save_tensors

    def crash_second(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real(tensors, path)

    monkeypatch.setattr(package_write_mod, "_save_tensors", crash_second)
    with pytest.raises(OSError, match="disk full"):
        write_expert_package(
            tmp_path / "p",
            expert,
            proxy_indices=proxy_idx,
            public_pool_size=len(digits.public_x),
            method="dpp",
        )
    assert list(tmp_path.iterdir()) == []


def test_no_pickle(pkg):
    for f in pkg.iterdir():
        data = f.read_bytes()
        if f.suffix == ".safetensors":
            (n,) = struct.unpack("<Q", data[:8])  # safetensors: u64 header size, then a JSON header
            header = json.loads(data[8 : 8 + n])
            assert header["__metadata__"] == {"format": "pt"}
        else:
            assert f.name == "manifest.json"
            json.loads(data)
        assert not data.startswith(b"\x80") and b"PK\x03\x04" not in data[:4]  # no pickle, no torch zip
    for mod in ("package.py", "package_format.py", "package_read.py", "package_write.py", "client.py"):
        src = (Path(package_mod.__file__).parent / mod).read_text()
        assert "import pickle" not in src and "torch.save" not in src and "torch.load" not in src


# --------------------------------------------------------------------------- bad cases at load


def test_tampered_tensor_file(pkg):
    f = pkg / "lora.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01  # one bit of one weight
    f.write_bytes(bytes(data))
    with pytest.raises(
        PackageError, match=r"lora.safetensors was modified: its sha256 is [0-9a-f]{64}, the manifest"
    ):
        load_expert_package(pkg)


def test_error_names_the_package(pkg):
    (pkg / "prototypes.safetensors").unlink()
    with pytest.raises(PackageError) as info:
        load_expert_package(pkg)
    assert info.value.path == str(pkg) and str(pkg) in str(info.value)
    assert info.value.problem == "missing file prototypes.safetensors"
    assert isinstance(info.value, ValueError)


def test_missing_manifest_and_folder(pkg, tmp_path):
    with pytest.raises(PackageError, match="does not exist or is not a folder"):
        load_expert_package(tmp_path / "nothing")
    (pkg / "manifest.json").unlink()
    with pytest.raises(PackageError, match="missing manifest.json"):
        load_expert_package(pkg)


def test_unexpected_and_unreadable(pkg):
    (pkg / "extra.pt").write_bytes(b"\x80\x04junk")
    with pytest.raises(PackageError, match=r"unexpected file\(s\) \['extra.pt'\]"):
        load_expert_package(pkg)
    (pkg / "extra.pt").unlink()
    (pkg / "manifest.json").write_text("{not json")
    with pytest.raises(PackageError, match="manifest.json is not valid JSON"):
        load_expert_package(pkg)


def _rewrite_tensor_file(pkg, name, tensors):
    """Replace a tensor file and update its recorded hash (hashes alone would not catch this)."""
    save_file(tensors, str(pkg / name))
    m = _manifest(pkg)
    m["files"][name] = hashlib.sha256((pkg / name).read_bytes()).hexdigest()
    _write_manifest(pkg, m)


def test_shapes_checked_beyond_hashes(pkg):
    protos = load_file(str(pkg / "prototypes.safetensors"))["prototypes"]
    _rewrite_tensor_file(pkg, "prototypes.safetensors", {"prototypes": protos[:1].contiguous()})
    with pytest.raises(PackageError, match=r"prototypes must be finite float32 of shape \(2, 64\)"):
        load_expert_package(pkg)
    _rewrite_tensor_file(pkg, "prototypes.safetensors", {"prototypes": torch.full((2, 64), float("nan"))})
    with pytest.raises(PackageError, match="prototypes must be finite"):
        load_expert_package(pkg)
    lora = load_file(str(pkg / "lora.safetensors"))
    lora.pop("layers.1.fc2.lora_B")
    _rewrite_tensor_file(pkg, "lora.safetensors", lora)
    with pytest.raises(
        PackageError,
        match=r"lora.safetensors keys do not match the manifest: missing \['layers.1.fc2.lora_B'\]",
    ):
        load_expert_package(pkg)
    (pkg / "head.safetensors").write_bytes(b"garbage")
    m = _manifest(pkg)
    m["files"]["head.safetensors"] = hashlib.sha256(b"garbage").hexdigest()
    _write_manifest(pkg, m)
    with pytest.raises(PackageError, match="head.safetensors is not a readable safetensors file"):
        load_expert_package(pkg)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["selection"].update(proxy_indices=[]), "has zero proxies"),
        (
            lambda m: m["selection"].update(proxy_indices=[3, 120]),
            "proxy index 120 is out of range for the public pool of 120",
        ),
        (lambda m: m["selection"].update(proxy_indices=[3, -1]), "proxy index -1 is out of range"),
        (lambda m: m["selection"].update(proxy_indices=[3, 3]), "proxy_indices has duplicates"),
        (lambda m: m["selection"].update(proxy_indices=[3, 4.5]), "proxy_indices must be integers"),
        (lambda m: m["selection"].update(k=1), "exceed k=1"),
        (
            lambda m: m["selection"].update(method="magic"),
            "selection.method must be one of dpp, facility_location, top_relevance, random .*got 'magic'",
        ),
        (lambda m: m.update(format_version=99), "format_version 99 is not supported"),
        (lambda m: m.pop("files"), "manifest.json lacks files"),
        (lambda m: m.update(secret=[1, 2]), "unexpected keys \\['secret'\\]"),
        (lambda m: m["label_space"].update(public=["upright/0"]), "label space collision"),
        (lambda m: m["label_space"].update(private=["a", "a"]), "label_space.private has duplicate names"),
        (lambda m: m["head"].update(num_classes=21), "head has 21 classes, the label space 20"),
        (lambda m: m["seed_model"].update(weight_hash="abc"), "64-hex-digit weight_hash"),
        (lambda m: m["files"].update({"../evil.safetensors": "00"}), "unknown files"),
    ],
)
def test_bad_manifest(pkg, edit, message):
    m = _manifest(pkg)
    edit(m)
    _write_manifest(pkg, m)
    with pytest.raises(PackageError, match=message):
        load_expert_package(pkg)


def test_public_pool_size_mismatch(pkg):
    with pytest.raises(
        PackageError, match="was built against a public pool of 120 samples, this pool has 119"
    ):
        load_expert_package(pkg, public_pool_size=119)


def test_wrong_seed_model(pkg, seed_model):
    other_weights = create_seed_model(VIT, seed=1, **VIT_CFG)
    with pytest.raises(PackageError, match="same name, different weights"):
        load_expert_package(pkg, seed_model=other_weights)
    with pytest.raises(PackageError, match="same name, different weights"):
        expert_from_package(other_weights, load_expert_package(pkg))
    other_arch = create_seed_model(VIT, seed=0, **{**VIT_CFG, "depth": 3})
    with pytest.raises(PackageError, match="same name, different weights"):
        load_expert_package(pkg, seed_model=other_arch)
    llama = create_seed_model(
        "hf:llama",
        vocab_size=20,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    with pytest.raises(
        PackageError, match="was trained from seed model 'timm:vit_tiny_patch16_224', not 'hf:llama'"
    ):
        load_expert_package(pkg, seed_model=llama)


# --------------------------------------------------------------------------- bad cases at write


@pytest.mark.parametrize(
    "kwargs, exc, message",
    [
        (dict(proxy_indices=np.zeros(0, np.int64)), ValueError, "zero proxies"),
        (
            dict(proxy_indices=np.arange(10) + 111),
            ValueError,
            r"must lie in \[0, public_pool_size=120\), got \[111, 120\]",
        ),
        (dict(proxy_indices=np.array([1, 2, 2, 3, 4, 5, 6, 7, 8, 9])), ValueError, "duplicates"),
        (dict(proxy_indices=np.arange(10.0)), TypeError, "must be integers"),
        (dict(proxy_indices=np.arange(9)), ValueError, "trained with 10 proxies but 9 proxy_indices"),
        (dict(k=5), ValueError, "10 proxy_indices for k=5"),
        (
            dict(method="similarity"),
            ValueError,
            r"method must be one of dpp, facility_location, top_relevance, random \(short spellings: "
            r"fl = facility_location, topk = top_relevance\), got 'similarity'",
        ),
        (dict(method="fl-private"), ValueError, "method must be one of"),  # not a package's method
        (dict(public_pool_size=0), ValueError, "public_pool_size must be >= 1"),
        (dict(public_pool_size=12.5), TypeError, "public_pool_size must be an integer"),
    ],
)
def test_write_errors(tmp_path, expert, proxy_idx, kwargs, exc, message):
    args = dict(proxy_indices=proxy_idx, public_pool_size=120, method="dpp")
    args.update(kwargs)
    with pytest.raises(exc, match=message):
        write_expert_package(tmp_path / "p", expert, **args)
    assert not (tmp_path / "p").exists()


def test_write_refuses_what_would_not_load(tmp_path, expert, proxy_idx):
    bad = dataclasses.replace(expert, label_space={"kind": "classes", "private": ["a"], "public": []})
    with pytest.raises(
        ValueError,
        match=r"refusing to write an invalid package to .*/p: head has 20 classes, the label space 1",
    ):
        write_expert_package(tmp_path / "p", bad, proxy_indices=proxy_idx, public_pool_size=120, method="dpp")
    assert list(tmp_path.iterdir()) == []


def test_write_refuses_non_finite_metrics(tmp_path, expert, proxy_idx):
    bad = dataclasses.replace(expert, metrics={**expert.metrics, "loss_per_epoch": [float("nan")]})
    with pytest.raises(ValueError, match=r"expert.metrics.loss_per_epoch\[0\] is not finite"):
        write_expert_package(tmp_path / "p", bad, proxy_indices=proxy_idx, public_pool_size=120, method="dpp")


# --------------------------------------------------------------------------- packages as a set


def _write(tmp_path, name, expert, proxy_idx, **replace):
    e = dataclasses.replace(expert, **replace) if replace else expert
    return write_expert_package(
        tmp_path / name, e, proxy_indices=proxy_idx, public_pool_size=120, method="dpp"
    )


def test_package_set(tmp_path, expert, proxy_idx, seed_model):
    a = _write(tmp_path, "a", expert, proxy_idx)
    b = _write(tmp_path, "b", expert, proxy_idx, label_space={"kind": "classes", **_spaces("rotated")})
    pkgs = load_expert_packages([a, b], seed_model=seed_model, public_pool_size=120)
    assert [p.path for p in pkgs] == [a, b]
    # colliding private label spaces (c differs from a in its metrics only: a copy of a is refused as such)
    c = _write(tmp_path, "c", expert, proxy_idx, metrics={**expert.metrics, "seed": 1})
    with pytest.raises(
        PackageError, match=r"label space collision: private class 'upright/0' is also a private class of"
    ):
        load_expert_packages([a, b, c])
    # different public label spaces
    d = _write(
        tmp_path,
        "d",
        expert,
        proxy_idx,
        label_space={
            "kind": "classes",
            "private": [f"x{i}" for i in range(10)],
            "public": [f"pub{i}" for i in range(10)],
        },
    )
    with pytest.raises(PackageError, match="public label space differs"):
        check_package_set([load_expert_package(a), load_expert_package(d)])
    # the same package twice
    with pytest.raises(PackageError, match="is given twice"):
        check_package_set([load_expert_package(a), load_expert_package(a)])
    with pytest.raises(ValueError, match="packages is empty"):
        check_package_set([])


def test_package_set_from_different_seeds(tmp_path, expert, proxy_idx):
    a = _write(tmp_path, "a", expert, proxy_idx)
    other = create_seed_model(VIT, seed=7, **VIT_CFG)
    b = _write(
        tmp_path,
        "b",
        expert,
        proxy_idx,
        seed_hash=weight_hash(other),
        label_space={"kind": "classes", **_spaces("rotated")},
    )
    with pytest.raises(
        PackageError,
        match=r"comes from seed weights .*same name 'timm:vit_tiny_patch16_224', different weights",
    ):
        load_expert_packages([a, b])
    c = _write(
        tmp_path,
        "c",
        expert,
        proxy_idx,
        seed_name="timm:vit_small_patch16_224",
        label_space={"kind": "classes", **_spaces("inverted")},
    )
    with pytest.raises(PackageError, match="comes from seed model 'timm:vit_small_patch16_224', but"):
        load_expert_packages([a, c])
    m = _manifest(c)
    m["selection"]["public_pool_size"] = 500
    m["seed_model"]["name"] = VIT
    _write_manifest(c, m)
    with pytest.raises(PackageError, match="indexes a public pool of 500, but"):
        load_expert_packages([a, c])


# --------------------------------------------------------------------------- privacy


def _private_secrets(expert, seed_model, digits):
    """Everything per-sample about the private data: images, embeddings, per-token and per-sample FFN inputs."""
    x = digits.clients[0].x_train
    secrets = {
        "image": x.reshape(len(x), -1).astype(np.float64),
        "seed embedding": embed(seed_model, x, progress=False).astype(np.float64),
        "expert embedding": embed(expert.model, x, progress=False).astype(np.float64),
    }
    for name, model in (("seed", seed_model), ("expert", expert.model)):
        seen = {}
        layers = model.ffn_layers()
        with (
            torch.no_grad(),
            ffn_input_hooks(
                model.net, layers, lambda i, t, seen=seen: seen.__setitem__(i, t.double().numpy())
            ),
        ):
            model(model.prepare(x))
        for i, h in seen.items():
            secrets[f"{name} FFN input tokens, layer {i}"] = h.reshape(-1, h.shape[-1])
            secrets[f"{name} FFN input per-sample mean, layer {i}"] = h.mean(1)
    return secrets


def _scan(pkg_dir, secrets, tol=1e-5):
    """Names of (file, tensor, secret) where some row (or column) of a stored tensor equals some secret row."""
    hits = []
    for f in sorted(Path(pkg_dir).glob("*.safetensors")):
        for key, t in load_file(str(f)).items():
            arr = t.double().numpy()
            views = [arr.reshape(-1, arr.shape[-1])]
            if arr.ndim == 2:
                views.append(arr.T)
            for sname, s in secrets.items():
                for v in views:
                    if v.shape[1] != s.shape[1]:
                        continue
                    d = np.abs(v[:, None, :] - s[None, :, :]).max(-1)
                    if float(d.min()) < tol:
                        hits.append((f.name, key, sname))
    return hits


def test_no_private_sample_in_package(pkg, expert, seed_model, digits):
    secrets = _private_secrets(expert, seed_model, digits)
    assert all(s.shape[1] == 64 for s in secrets.values())  # every secret has the width of the package's rows
    assert _scan(pkg, secrets) == []
    # the manifest: nothing the length of the private set, no per-sample entries, only aggregate metrics
    m = _manifest(pkg)

    def lists(obj, where=""):
        if isinstance(obj, list):
            yield where, obj
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield from lists(v, f"{where}.{k}")
        if isinstance(obj, list):
            for i, v in enumerate(obj):
                yield from lists(v, f"{where}[{i}]")

    long_lists = [
        w
        for w, v in lists(m)
        if len(v) >= N_PRIVATE and w not in (".label_space.private", ".label_space.public")
    ]
    assert long_lists == []
    assert set(m["metrics"]) == {
        "epochs",
        "steps",
        "batch_size",
        "lr",
        "weight_decay",
        "seed",
        "n_private",
        "n_proxies",
        "loss_per_epoch",
        "train_seconds",
        "private_accuracy",
        "proxy_accuracy",
        "prototype_data",
        "prototype_tokens",
    }
    assert len(m["metrics"]["loss_per_epoch"]) == m["metrics"]["epochs"]
    # proxy indices point into the public pool, not at private samples
    assert max(m["selection"]["proxy_indices"]) < len(digits.public_x)


def test_privacy_scan_catches_a_leak(tmp_path, expert, seed_model, digits, proxy_idx):
    """Negative control: a package whose prototypes hold one private sample's FFN input is flagged."""
    secrets = _private_secrets(expert, seed_model, digits)
    leaked_row = torch.from_numpy(secrets["expert FFN input per-sample mean, layer 1"][4]).float()
    bad = dataclasses.replace(expert, prototypes=torch.stack([expert.prototypes[0], leaked_row]))
    p = write_expert_package(
        tmp_path / "leaky", bad, proxy_indices=proxy_idx, public_pool_size=120, method="dpp"
    )
    hits = _scan(p, secrets)
    assert ("prototypes.safetensors", "prototypes", "expert FFN input per-sample mean, layer 1") in hits
    image_leak = dataclasses.replace(expert, prototypes=torch.from_numpy(secrets["image"][:2]).float())
    p2 = write_expert_package(
        tmp_path / "leaky2", image_leak, proxy_indices=proxy_idx, public_pool_size=120, method="dpp"
    )
    assert ("prototypes.safetensors", "prototypes", "image") in _scan(p2, secrets)
    shutil.rmtree(p)


def test_language_model_package_round_trip(tmp_path):
    """Causal LM expert: no head file, a vocabulary label space, same outputs after rebuilding."""
    seed = create_seed_model(
        "hf:qwen2",
        seed=0,
        vocab_size=30,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    g = torch.Generator().manual_seed(0)
    priv, prox = torch.randint(0, 30, (6, 7), generator=g), torch.randint(0, 30, (3, 7), generator=g)
    ex = train_expert(seed, priv, prox, None, lora_rank=2, epochs=1, batch_size=4, lr=1e-2)
    p = write_expert_package(tmp_path / "lm", ex, proxy_indices=[4, 0, 9], public_pool_size=10, method="topk")
    assert _manifest(p)["selection"]["method"] == "top_relevance"
    assert sorted(x.name for x in p.iterdir()) == [
        "lora.safetensors",
        "manifest.json",
        "prototypes.safetensors",
    ]
    loaded = load_expert_package(p, seed_model=seed, public_pool_size=10)
    assert loaded.head_state is None and loaded.label_space == {"kind": "vocabulary", "size": 30}
    assert loaded.manifest["head"] is None and loaded.lora_config.projections == (
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    rebuilt = expert_from_package(seed, loaded)
    with torch.no_grad():
        torch.testing.assert_close(
            rebuilt(rebuilt.prepare(priv)), ex.model(ex.model.prepare(priv)), rtol=0, atol=0
        )
