"""The server's inputs: package validation, the unified label space, the proxies' training set and owners.

The module-scoped fixtures here (a tiny ViT seed, three digit-domain expert packages) also serve
test_unified_model.py and test_router_training.py.
"""

import os

import numpy as np
import pytest

from metamoe.data.digits import make_digits_domains
from metamoe.models import create_seed_model
from metamoe.unify import PackageError, train_expert, write_expert_package
from metamoe.unify.server import proxy_owners, proxy_training_set, unified_label_space, validate_packages

VIT = "timm:vit_tiny_patch16_224"
VIT_CFG = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=2, num_heads=2, num_classes=10)


# tiny models: one torch thread (see conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    return make_digits_domains(seed=0, n_private=24, n_test=8, public_per_domain=16)


@pytest.fixture(scope="module")
def seed_vit():
    return create_seed_model(VIT, seed=0, **VIT_CFG)


def _spaces(domain):
    return {"private": [f"{domain}:{d}" for d in range(10)], "public": [str(d) for d in range(10)]}


def make_package(seed_model, digits, i, path, proxies):
    c = digits.clients[i]
    ex = train_expert(
        seed_model,
        (c.x_train, c.y_train),
        (digits.public_x[proxies], digits.public_y[proxies]),
        _spaces(c.domain),
        lora_rank=2,
        epochs=2,
        lr=2e-2,  # large on purpose: the LoRAs must move far from zero for the equalities below to mean much
        batch_size=16,
        seed=10 + i,
    )
    return write_expert_package(
        path, ex, proxy_indices=proxies, public_pool_size=len(digits.public_x), method="dpp", k=len(proxies)
    )


@pytest.fixture(scope="module")
def paths(seed_vit, digits, tmp_path_factory):
    root = tmp_path_factory.mktemp("pkgs")
    proxies = [np.array([0, 3, 5, 7, 9]), np.array([1, 3, 11, 12]), np.array([2, 20, 21, 22, 5, 30])]
    return [make_package(seed_vit, digits, i, root / c.domain, proxies[i]) for i, c in enumerate(digits.clients)]


@pytest.fixture(scope="module")
def packages(paths, seed_vit, digits):
    return validate_packages(paths, seed_model=seed_vit, public_pool_size=len(digits.public_x))


# --------------------------------------------------------------------------- validation


def test_validate_refuses_mixed_seed_models(seed_vit, digits, paths, tmp_path):
    other_weights = create_seed_model(VIT, seed=1, **VIT_CFG)  # same name, different weights
    bad = make_package(other_weights, digits, 0, tmp_path / "w", np.array([4, 6]))
    with pytest.raises(PackageError, match="different weights"):
        validate_packages([paths[1], bad])
    with pytest.raises(PackageError, match="seed weights"):
        validate_packages([bad], seed_model=seed_vit)
    other_name = create_seed_model("timm:vit_small_patch16_224", seed=0, **VIT_CFG)
    bad2 = make_package(other_name, digits, 0, tmp_path / "n", np.array([4, 6]))
    with pytest.raises(PackageError, match="seed model"):
        validate_packages([paths[1], bad2])


def test_validate_refuses_tampered_and_incomplete_packages(paths, tmp_path):
    import shutil

    t = tmp_path / "tampered"
    shutil.copytree(paths[0], t)
    raw = bytearray((t / "lora.safetensors").read_bytes())
    raw[-3] ^= 0xFF  # flip bits inside the last tensor's data
    (t / "lora.safetensors").write_bytes(bytes(raw))
    with pytest.raises(PackageError, match="was modified"):
        validate_packages([paths[1], t])
    m = tmp_path / "missing"
    shutil.copytree(paths[0], m)
    os.unlink(m / "prototypes.safetensors")
    with pytest.raises(PackageError, match="missing file prototypes.safetensors"):
        validate_packages([m])
    with pytest.raises(PackageError, match="public pool"):
        validate_packages([paths[0]], public_pool_size=10_000)
    with pytest.raises(PackageError, match="given twice"):
        validate_packages([paths[0], paths[0]])
    with pytest.raises(ValueError, match="empty"):
        validate_packages([])
    with pytest.raises(TypeError, match="list of package folders"):
        validate_packages(paths[0])


# --------------------------------------------------------------------------- label space and proxies


def test_unified_label_space(packages):
    space = unified_label_space(packages)
    assert space.names[:10] == tuple(f"upright:{d}" for d in range(10))
    assert space.names[20:30] == tuple(f"inverted:{d}" for d in range(10))
    assert space.names[30:] == tuple(str(d) for d in range(10))
    assert space.private_slices == ((0, 10), (10, 20), (20, 30)) and space.public_slice == (30, 40)
    assert space.kind == "classes" and space.num_classes == 40
    assert space.index("inverted:3") == 23 and space.index("3") == 33
    with pytest.raises(KeyError, match="not in the unified label space"):
        space.index("9:9")
    assert space.to_dict()["private_slices"] == [[0, 10], [10, 20], [20, 30]]


def test_proxy_training_set(packages, digits):
    space = unified_label_space(packages)
    x, y, idx = proxy_training_set(packages, digits.public_x, digits.public_y, space)
    want = [0, 3, 5, 7, 9, 1, 11, 12, 2, 20, 21, 22, 30]  # union, order of first appearance
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_array_equal(x, digits.public_x[want])
    np.testing.assert_array_equal(y, digits.public_y[want] + 30)
    with pytest.raises(PackageError, match="public pool"):
        proxy_training_set(packages, digits.public_x[:50], digits.public_y[:50], space)


def test_proxy_owners(packages, digits):
    space = unified_label_space(packages)
    _, _, idx = proxy_training_set(packages, digits.public_x, digits.public_y, space)
    picks = [set(p.proxy_indices.tolist()) for p in packages]
    want = np.array([[float(i in s) for s in picks] for i in idx.tolist()])
    want /= want.sum(1, keepdims=True)
    got = proxy_owners(packages, idx)
    np.testing.assert_array_equal(got, want)
    assert got[idx.tolist().index(3)].tolist() == [0.5, 0.5, 0.0]  # picked by clients 0 and 1
    assert got[idx.tolist().index(30)].tolist() == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="pool index 4 .* not a proxy"):
        proxy_owners(packages, np.array([0, 4]))
    with pytest.raises(ValueError, match="1-D integer"):
        proxy_owners(packages, idx.astype(np.float64))
