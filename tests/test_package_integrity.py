"""Expert packages as trustworthy artifacts: every file and every manifest field is digest-checked on load,
digests are well-formed and compared in full, the server's public pool must be the one the package indexes
(content and row order, not only size), the same expert cannot be given twice, and format-1 packages (no
manifest digest, no pool fingerprint) still load, with a warning."""

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from metamoe.data.digits import make_digits_domains
from metamoe.unify import PackageError, check_package_set, load_expert_package, train_expert, write_expert_package
from metamoe.unify import cli as ucli
from metamoe.unify.config import seed_model_from_config
from metamoe.unify.package import UnverifiedPackageWarning, manifest_digest, pool_fingerprint
from metamoe.unify.package_format import is_sha256_hex
from metamoe.unify.server import validate_packages

SEED_CFG = {
    "name": "timm:vit_tiny_patch16_224",
    "seed": 0,
    "config": dict(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=2, num_heads=2, num_classes=10),
}
PROXIES = np.array([5, 17, 3, 40, 41, 99, 100, 7], dtype=np.int64)
FILES = ("manifest.json", "lora.safetensors", "prototypes.safetensors", "head.safetensors")

# tiny models: one torch thread (see conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    return make_digits_domains(seed=1, n_private=20, n_test=4, public_per_domain=20)  # a pool of 120


@pytest.fixture(scope="module")
def seed_model():
    return seed_model_from_config({"seed_model": SEED_CFG}, None)


def _spaces(domain):
    return {"private": [f"{domain}:{d}" for d in range(10)], "public": [str(d) for d in range(10)]}


@pytest.fixture(scope="module")
def experts(seed_model, digits):
    out = []
    for i in range(2):
        c = digits.clients[i]
        out.append(
            train_expert(
                seed_model, (c.x_train, c.y_train), (digits.public_x[PROXIES], digits.public_y[PROXIES]),
                _spaces(c.domain), lora_rank=2, epochs=1, lr=1e-2, batch_size=16, seed=i,
            )
        )
    return out


@pytest.fixture(scope="module")
def built(experts, digits, tmp_path_factory):
    """Two packages written with the public pool (so they record its fingerprints), in a module folder."""
    root = tmp_path_factory.mktemp("integrity")
    return [
        write_expert_package(
            root / f"client{i}", ex, proxy_indices=PROXIES, public_x=digits.public_x, public_y=digits.public_y,
            method="dpp", k=10,
        )
        for i, ex in enumerate(experts)
    ]


@pytest.fixture
def pkg(built, tmp_path):
    """A fresh copy of package 0, to tamper with."""
    return Path(shutil.copytree(built[0], tmp_path / "pkg"))


def _manifest(path):
    return json.loads((Path(path) / "manifest.json").read_text())


def _write_manifest(path, m, reseal=False):
    if reseal:
        m = {**m, "manifest_sha256": manifest_digest(m)}
    (Path(path) / "manifest.json").write_text(json.dumps(m, indent=1))


def _flip(path, pos):
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x01
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- (a) every file is digest-checked


@pytest.mark.parametrize("name", FILES)
def test_a_flipped_byte_in_any_file_is_refused_naming_that_file(pkg, name):
    """One flipped bit anywhere in any file of the package fails the load with an error naming that file.

    Every byte of the manifest is tried (it is the file the data-file hashes do not cover); the tensor files
    at 48 positions spread over them, header and data."""
    load_expert_package(pkg)  # intact: loads
    f = pkg / name
    original = f.read_bytes()
    size = len(original)
    positions = range(size) if name == "manifest.json" else sorted(set(np.linspace(0, size - 1, 48).astype(int)))
    for pos in positions:
        _flip(f, pos)
        with pytest.raises(PackageError) as info:
            load_expert_package(pkg)
        assert name in info.value.problem, (pos, info.value.problem)
        f.write_bytes(original)
    if name != "manifest.json":
        _flip(f, size - 3)  # one bit of the last tensor's data
        with pytest.raises(PackageError, match=rf"{name} was modified: its sha256 is [0-9a-f]{{64}}") as info:
            load_expert_package(pkg)
        assert info.value.path == str(pkg)


def test_every_listed_file_is_hashed_on_load(pkg, monkeypatch):
    """The loader hashes every file the manifest lists, and the manifest's own digest covers the manifest."""
    import metamoe.unify.package_read as package_read

    hashed = []
    real = package_read.sha256_file
    monkeypatch.setattr(package_read, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    m = load_expert_package(pkg).manifest
    assert sorted(hashed) == sorted(m["files"]) == sorted(FILES[1:])
    assert m["manifest_sha256"] == manifest_digest(m) and m["format_version"] == 2


# --------------------------------------------------------------------------- (b) the manifest digest


def _set_alpha(m):
    m["lora"]["alpha"] = m["lora"]["alpha"] * 10


def _swap_proxy(m):
    idx = m["selection"]["proxy_indices"]
    idx[2] = next(i for i in range(m["selection"]["public_pool_size"]) if i not in idx)  # another valid index


def _grow_pool(m):
    m["selection"]["public_pool_size"] += 1


def _rename_class(m):
    m["label_space"]["private"][0] = "somewhere-else:0"


def _rewrite_pool_fingerprint(m):
    m["selection"]["public_pool_sha256"] = hashlib.sha256(b"another pool").hexdigest()


def _rewrite_metrics(m):
    m["metrics"]["private_accuracy"] = 1.0


EDITS = [_set_alpha, _swap_proxy, _grow_pool, _rename_class, _rewrite_pool_fingerprint, _rewrite_metrics]


@pytest.mark.parametrize("edit", EDITS, ids=[e.__name__.strip("_") for e in EDITS])
def test_an_edited_manifest_field_is_refused(pkg, edit):
    m = _manifest(pkg)
    edit(m)
    _write_manifest(pkg, m)
    with pytest.raises(
        PackageError, match=r"manifest.json was edited: its content hashes to [0-9a-f]{64}, its manifest_sha256"
    ) as info:
        load_expert_package(pkg)
    assert str(pkg) in str(info.value) and "\n" not in str(info.value)
    # the edit itself is a valid manifest: with a recomputed digest it loads (the digest is what refuses it)
    _write_manifest(pkg, m, reseal=True)
    load_expert_package(pkg)


def test_the_digest_itself_and_its_presence(pkg):
    m = _manifest(pkg)
    _write_manifest(pkg, {**m, "manifest_sha256": hashlib.sha256(b"x").hexdigest()})
    with pytest.raises(PackageError, match="manifest.json was edited"):
        load_expert_package(pkg)
    _write_manifest(pkg, {k: v for k, v in m.items() if k != "manifest_sha256"})
    with pytest.raises(PackageError, match="manifest.json lacks manifest_sha256 \\(required from format_version 2\\)"):
        load_expert_package(pkg)
    # whitespace and key order are not content: the same fields written another way load
    (pkg / "manifest.json").write_text(json.dumps(dict(reversed(list(m.items()))), separators=(",", ":")))
    load_expert_package(pkg)
    # a key given twice (which of the two would a reader use?) is refused
    text = json.dumps(m, indent=1)
    (pkg / "manifest.json").write_text(text.replace('\n "metrics":', '\n "head": null,\n "metrics":', 1))
    with pytest.raises(PackageError, match="manifest.json is not valid JSON \\(duplicate key 'head'\\)"):
        load_expert_package(pkg)


# --------------------------------------------------------------------------- (c) malformed digests


def _malformed(d):
    return {
        "63 characters": d[:63],
        "65 characters": d + "0",
        "uppercase": d.upper(),
        "one uppercase digit": next(
            (d[:i] + d[i].upper() + d[i + 1 :] for i, c in enumerate(d) if c in "abcdef"), d[:-1] + "A"
        ),
        "non-hex": d[:63] + "g",
        "a 32-digit prefix": d[:32],
        "padded": " " + d,
        "a trailing newline": d + "\n",
        "a number": 12345,
        "empty": "",
    }


@pytest.mark.parametrize("kind", list(_malformed("0" * 64)))
def test_malformed_manifest_digest_is_rejected(pkg, kind):
    m = _manifest(pkg)
    bad = _malformed(m["manifest_sha256"])[kind]
    _write_manifest(pkg, {**m, "manifest_sha256": bad})
    with pytest.raises(PackageError, match="manifest_sha256 must be exactly 64 lowercase hex digits") as info:
        load_expert_package(pkg)
    assert info.value.path == str(pkg) and info.value.problem.endswith(f"got {bad!r}")


@pytest.mark.parametrize("kind", list(_malformed("0" * 64)))
def test_malformed_file_digest_is_rejected(pkg, kind):
    m = _manifest(pkg)
    m["files"]["prototypes.safetensors"] = _malformed(m["files"]["prototypes.safetensors"])[kind]
    _write_manifest(pkg, m, reseal=True)  # a consistent manifest: the file digest's form is what is refused
    with pytest.raises(
        PackageError, match="the sha256 of prototypes.safetensors in the manifest must be exactly 64 lowercase hex"
    ):
        load_expert_package(pkg)


@pytest.mark.parametrize("key", ["public_pool_sha256", "proxy_sha256"])
def test_malformed_pool_fingerprint_is_rejected(pkg, key):
    m = _manifest(pkg)
    m["selection"][key] = m["selection"][key].upper()
    _write_manifest(pkg, m, reseal=True)
    with pytest.raises(PackageError, match=f"selection.{key} must be exactly 64 lowercase hex digits"):
        load_expert_package(pkg)
    m["selection"].pop(key)
    _write_manifest(pkg, m, reseal=True)
    with pytest.raises(PackageError, match="public_pool_sha256 and proxy_sha256 together or neither"):
        load_expert_package(pkg)


def test_is_sha256_hex():
    d = hashlib.sha256(b"").hexdigest()
    assert is_sha256_hex(d)
    assert not any(is_sha256_hex(v) for v in _malformed(d).values())
    assert not is_sha256_hex(d.encode()) and not is_sha256_hex(None)


# --------------------------------------------------------------------------- (d) the public pool


def test_package_records_the_pools_fingerprints(built, digits):
    m = _manifest(built[0])["selection"]
    x, y = digits.public_x, digits.public_y
    assert m["public_pool_size"] == len(x)
    assert m["public_pool_sha256"] == pool_fingerprint(x, y)
    assert m["proxy_sha256"] == pool_fingerprint(x[PROXIES], y[PROXIES]) == pool_fingerprint(x, y, rows=PROXIES)
    # nothing per-sample: the fingerprints are one digest each
    assert is_sha256_hex(m["public_pool_sha256"]) and is_sha256_hex(m["proxy_sha256"])


def test_pool_fingerprint_sees_content_order_and_labels(digits):
    x, y = digits.public_x, digits.public_y
    fp = pool_fingerprint(x, y)
    assert pool_fingerprint(torch.from_numpy(x), torch.from_numpy(y)) == fp  # torch or NumPy: same content
    assert pool_fingerprint(x.copy(), y.copy()) == fp
    perm = np.random.default_rng(0).permutation(len(x))
    changed = x.copy()
    changed[77, 3, 4] += 1e-3  # one value of one row
    assert len({
        fp,
        pool_fingerprint(x[perm], y[perm]),  # the same rows in another order
        pool_fingerprint(x[[1, 0, *range(2, len(x))]], y[[1, 0, *range(2, len(x))]]),  # two rows swapped
        pool_fingerprint(changed, y),
        pool_fingerprint(x, (y + 1) % 10),  # other labels
        pool_fingerprint(x),  # no labels
        pool_fingerprint(x.astype(np.float64), y),  # another dtype
    }) == 7
    ids = np.arange(24, dtype=np.int64).reshape(4, 6)
    mask = np.ones_like(ids)
    assert pool_fingerprint({"input_ids": ids, "attention_mask": mask}) == pool_fingerprint(
        {"attention_mask": mask, "input_ids": ids}
    )
    assert pool_fingerprint({"input_ids": ids, "attention_mask": None}) == pool_fingerprint({"input_ids": ids})


def test_a_reordered_pool_is_refused(built, digits, seed_model):
    x, y = digits.public_x, digits.public_y
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # packages with fingerprints: verified, no warning
        pkgs = validate_packages(built, seed_model=seed_model, public_x=x, public_y=y)
    assert [p.public_pool_sha256 for p in pkgs] == [pool_fingerprint(x, y)] * 2
    perm = np.random.default_rng(0).permutation(len(x))
    with pytest.raises(
        PackageError,
        match=r"client0: the public pool differs: same size \(120 samples\) but different content or order",
    ) as info:
        validate_packages(built, seed_model=seed_model, public_x=x[perm], public_y=y[perm])
    assert "\n" not in str(info.value) and isinstance(info.value, ValueError)
    with pytest.raises(PackageError, match="the public pool differs: same size"):
        validate_packages(built, public_x=x, public_y=(y + 1) % 10)  # same images, other labels
    with pytest.raises(
        PackageError,
        match="client0: the public pool differs: the package indexes a pool of 120 samples, this pool has 119",
    ):
        validate_packages(built, public_x=x[:119], public_y=y[:119])


def test_unify_command_refuses_a_reordered_pool(built, digits, tmp_path, capsys):
    """``metamoe unify`` checks the packages against the pool its server.yaml names, before any training."""
    x, y = digits.public_x, digits.public_y
    perm = np.random.default_rng(1).permutation(len(x))
    np.savez(tmp_path / "pool.npz", x=x[perm], y=y[perm])
    cfg = {
        "seed_model": SEED_CFG,
        "packages": [str(p) for p in built],
        "public": str(tmp_path / "pool.npz"),
        "training": {"epochs": 1},
        "output": str(tmp_path / "unified"),
    }
    with pytest.raises(PackageError, match="the public pool differs: same size \\(120 samples\\)"):
        ucli.unify_from_config(cfg, quiet=True)
    assert not (tmp_path / "unified").exists()
    (tmp_path / "server.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    assert ucli.main_unify(["--config", str(tmp_path / "server.yaml"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "client0: the public pool differs: same size" in err


def test_packages_recording_different_pools_are_refused_together(experts, digits, tmp_path):
    x, y = digits.public_x, digits.public_y
    perm = np.random.default_rng(2).permutation(len(x))
    a = write_expert_package(tmp_path / "a", experts[0], proxy_indices=PROXIES, public_x=x, public_y=y, method="dpp")
    b = write_expert_package(
        tmp_path / "b", experts[1], proxy_indices=PROXIES, public_x=x[perm], public_y=y[perm], method="dpp"
    )
    with pytest.raises(PackageError, match=r"b: indexes a different public pool than .*a: same size \(120\)"):
        validate_packages([a, b])


def test_write_checks_the_pool_arguments(experts, digits, tmp_path):
    x, y = digits.public_x, digits.public_y
    with pytest.raises(ValueError, match="public_pool_size=119 but public_x has 120 samples"):
        write_expert_package(
            tmp_path / "p", experts[0], proxy_indices=PROXIES, public_x=x, public_pool_size=119, method="dpp"
        )
    with pytest.raises(ValueError, match="public_y is given without public_x"):
        write_expert_package(
            tmp_path / "p", experts[0], proxy_indices=PROXIES, public_pool_size=120, public_y=y, method="dpp"
        )
    with pytest.raises(TypeError, match="needs public_x .* or public_pool_size"):
        write_expert_package(tmp_path / "p", experts[0], proxy_indices=PROXIES, method="dpp")
    with pytest.raises(ValueError, match=r"pool labels y must be \(120,\)"):
        write_expert_package(
            tmp_path / "p", experts[0], proxy_indices=PROXIES, public_x=x, public_y=y[:5], method="dpp"
        )
    assert not (tmp_path / "p").exists()


# --------------------------------------------------------------------------- (e) the same expert twice


def test_a_copied_package_is_refused_naming_both(built, seed_model, tmp_path, digits):
    copy = Path(shutil.copytree(built[0], tmp_path / "renamed-copy"))
    for run in (
        lambda: validate_packages([built[0], built[1], copy], seed_model=seed_model),
        lambda: validate_packages([built[0], copy], public_x=digits.public_x, public_y=digits.public_y),
        lambda: check_package_set([load_expert_package(p) for p in (copy, built[1], built[0])]),
    ):
        with pytest.raises(PackageError, match="has the same content as") as info:
            run()
        msg = str(info.value)
        assert str(built[0]) in msg and str(copy) in msg and "given twice" in msg and "\n" not in msg
    # the same manifest written with other whitespace is the same content
    m = _manifest(copy)
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackageError, match="has the same content as"):
        validate_packages([built[0], copy])


# --------------------------------------------------------------------------- (f) format 1 packages


def _as_format_1(path):
    """What the writer produced before manifest digests and pool fingerprints: format_version 1, neither field."""
    m = _manifest(path)
    m.pop("manifest_sha256")
    m["format_version"] = 1
    for key in ("public_pool_sha256", "proxy_sha256"):
        m["selection"].pop(key)
    _write_manifest(path, m)
    return m


def test_format_1_package_loads_with_a_warning(pkg, seed_model, digits, built):
    _as_format_1(pkg)
    with pytest.warns(UnverifiedPackageWarning, match="format_version 1 manifest without manifest_sha256"):
        loaded = load_expert_package(pkg, seed_model=seed_model)
    assert loaded.public_pool_sha256 is None and loaded.proxy_sha256 is None and loaded.public_pool_size == 120
    x, y = digits.public_x, digits.public_y
    with pytest.warns(UnverifiedPackageWarning) as record:
        pkgs = validate_packages([pkg, built[1]], seed_model=seed_model, public_x=x, public_y=y)
    assert [p.path for p in pkgs] == [pkg, built[1]]
    messages = [str(w.message) for w in record]
    assert any("records no public pool fingerprint (format_version 1); only the pool's size (120) was checked, its "
               "content could not be verified" in s for s in messages)
    # its pool is still checked by size
    with pytest.warns(UnverifiedPackageWarning), pytest.raises(
        PackageError, match="the package indexes a pool of 120 samples, this pool has 119"
    ):
        validate_packages([pkg], public_x=x[:119], public_y=y[:119])
    # a reordered pool cannot be seen without a fingerprint: the size check passes, the warning says so
    perm = np.random.default_rng(0).permutation(len(x))
    with pytest.warns(UnverifiedPackageWarning) as record:
        validate_packages([pkg], public_x=x[perm], public_y=y[perm])
    assert any("its content could not be verified" in str(w.message) for w in record)
    # its data files are still hashed
    _flip(pkg / "lora.safetensors", 100)
    with pytest.warns(UnverifiedPackageWarning), pytest.raises(PackageError, match="lora.safetensors was modified"):
        load_expert_package(pkg)


def test_format_1_manifest_cannot_carry_a_digest(pkg):
    m = _as_format_1(pkg)
    _write_manifest(pkg, {**m, "manifest_sha256": manifest_digest(m)})
    with pytest.raises(PackageError, match=r"unexpected keys \['manifest_sha256'\]"):
        load_expert_package(pkg)


def test_package_written_without_the_pool(experts, digits, tmp_path):
    """Without public_x the writer records the size only: it loads silently, the server warns at its pool check."""
    p = write_expert_package(tmp_path / "p", experts[0], proxy_indices=PROXIES, public_pool_size=120, method="dpp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_expert_package(p)
    assert loaded.manifest["format_version"] == 2 and loaded.public_pool_sha256 is None
    with pytest.warns(UnverifiedPackageWarning, match=r"records no public pool fingerprint \(format_version 2\)"):
        validate_packages([p], public_x=digits.public_x, public_y=digits.public_y)


# --------------------------------------------------------------------------- (g) what the digests leave to the loader


def _reseal_file(pkg, name, tensors):
    """Replace a tensor file and re-sign the package (its files' and manifest's digests recomputed): a package
    whose digests are all valid, so only the loader's own checks can refuse it."""
    from safetensors.torch import save_file

    from metamoe.utils.files import sha256_file

    save_file(tensors, str(pkg / name))
    m = _manifest(pkg)
    m["files"][name] = sha256_file(pkg / name)
    _write_manifest(pkg, {k: v for k, v in m.items() if k != "manifest_sha256"}, reseal=True)


def test_a_resealed_package_with_a_bad_head_is_refused(pkg):
    from safetensors.torch import load_file

    head = load_file(str(pkg / "head.safetensors"))
    head["weight"][0, 0] = float("nan")
    _reseal_file(pkg, "head.safetensors", head)
    with pytest.raises(PackageError, match="head has NaN or inf values") as info:
        load_expert_package(pkg)
    assert str(info.value).startswith(f"expert package {pkg}: ")
    head["weight"] = head["weight"][:, :-1].contiguous()  # one column short of the manifest's dim
    _reseal_file(pkg, "head.safetensors", head)
    with pytest.raises(PackageError, match=r"head shapes \(\d+, \d+\)/\(\d+,\) do not match"):
        load_expert_package(pkg)


def test_a_format_1_package_first_does_not_end_the_pool_check(pkg, built, digits):
    """The other packages' fingerprints are still checked after a format-1 package (checked by size only)."""
    _as_format_1(pkg)
    x, y = digits.public_x, digits.public_y
    perm = np.random.default_rng(2).permutation(len(x))
    with pytest.warns(UnverifiedPackageWarning), pytest.raises(
        PackageError, match=r"client1: the public pool differs: same size"
    ) as info:
        validate_packages([pkg, built[1]], public_x=x[perm], public_y=y[perm])
    assert info.value.path == str(built[1])


def test_changed_proxy_rows_are_named(built, digits):
    x, y = digits.public_x.copy(), digits.public_y.copy()
    y[PROXIES[0]] = (y[PROXIES[0]] + 1) % 10  # a proxy row's label: the pool fingerprint changes too
    pkgs = [load_expert_package(p) for p in built]
    from metamoe.unify.package_read import check_public_pool

    for p in pkgs:
        p.manifest["selection"]["public_pool_sha256"] = pool_fingerprint(x, y)  # as if it recorded this pool
    with pytest.raises(PackageError, match=r"the proxy rows differ: this pool's rows at the package's proxy "
                                           r"indices hash to [0-9a-f]{64}, the package records [0-9a-f]{64}") as info:
        check_public_pool(pkgs, x, y)
    assert info.value.path == str(built[0])


@pytest.mark.parametrize("size, kind", [("120", "str"), (True, "bool"), (120.0, "float")])
def test_public_pool_size_must_be_an_int(pkg, size, kind):
    with pytest.raises(TypeError, match=f"public_pool_size must be an int, got {kind}"):
        load_expert_package(pkg, public_pool_size=size)


def test_load_errors_name_the_package(pkg, tmp_path):
    m = {k: v for k, v in _manifest(pkg).items() if k != "manifest_sha256"}
    cases = []
    with pytest.raises(PackageError) as info:
        load_expert_package(tmp_path / "nowhere")
    cases.append((info.value, tmp_path / "nowhere", "does not exist or is not a folder"))
    (pkg / "stray.txt").write_text("x")
    with pytest.raises(PackageError) as info:
        load_expert_package(pkg)
    cases.append((info.value, pkg, "unexpected file(s) ['stray.txt'] not listed in the manifest"))
    (pkg / "stray.txt").unlink()
    (pkg / "manifest.json").write_text("{not json")
    with pytest.raises(PackageError) as info:
        load_expert_package(pkg)
    cases.append((info.value, pkg, "manifest.json is not valid JSON"))
    (pkg / "manifest.json").unlink()
    with pytest.raises(PackageError) as info:
        load_expert_package(pkg)
    cases.append((info.value, pkg, "missing manifest.json"))
    (pkg / "manifest.json").write_text(json.dumps({**m, "format_version": 2}))  # format 2 without its digest
    with pytest.raises(PackageError) as info:
        load_expert_package(pkg)
    cases.append((info.value, pkg, "manifest.json lacks manifest_sha256 (required from format_version 2)"))
    for exc, path, problem in cases:
        assert exc.path == str(path) and problem in exc.problem, (exc.path, exc.problem)


def test_load_expert_packages_passes_its_checks_on(built, seed_model):
    from metamoe.unify import load_expert_packages

    assert [p.path for p in load_expert_packages(built, seed_model=seed_model, public_pool_size=120)] == list(built)
    with pytest.raises(PackageError, match="120"):
        load_expert_packages(built, public_pool_size=119)
    other = seed_model_from_config({"seed_model": {**SEED_CFG, "seed": 1}}, None)
    with pytest.raises(PackageError, match="different weights"):
        load_expert_packages(built, seed_model=other)
