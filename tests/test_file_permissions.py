"""Files written atomically and expert-package folders get the modes a plain open()/mkdir would give them
(0666 / 0777 less the umask), not tempfile's private 0600 / 0700."""

import os
import stat

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from metamoe.utils.files import atomic_write, atomic_write_text, current_umask, make_temp_dir, write_json

pytestmark = pytest.mark.usefixtures("one_torch_thread")

UMASKS = (0o022, 0o077, 0o002)


@pytest.fixture(params=UMASKS, ids=lambda m: f"umask{m:03o}")
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_current_umask_reads_without_changing(umask):
    assert current_umask() == umask
    assert current_umask() == umask


def test_atomic_write_files_follow_the_umask(umask, tmp_path):
    atomic_write_text(tmp_path / "a.txt", "x")
    write_json(tmp_path / "sub" / "b.json", {"k": 1})
    atomic_write(tmp_path / "c.safetensors", lambda tmp: save_file({"t": torch.zeros(3)}, str(tmp)))
    with open(tmp_path / "plain.txt", "w") as fh:
        fh.write("x")
    want = 0o666 & ~umask
    assert mode(tmp_path / "plain.txt") == want
    for name in ("a.txt", "sub/b.json", "c.safetensors"):
        assert mode(tmp_path / name) == want, name
    atomic_write_text(tmp_path / "a.txt", "replaced")
    assert mode(tmp_path / "a.txt") == want
    assert (tmp_path / "a.txt").read_text() == "replaced"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "c.safetensors", "plain.txt", "sub"]


def test_temp_dir_follows_the_umask(umask, tmp_path):
    d = make_temp_dir(tmp_path, prefix=".x.", suffix=".tmp")
    assert d.parent == tmp_path and d.name.startswith(".x.") and d.name.endswith(".tmp")
    assert mode(d) == 0o777 & ~umask


@pytest.fixture(scope="module")
def expert():
    from metamoe.data.digits import make_digits_domains
    from metamoe.unify import train_expert
    from metamoe.unify.config import seed_model_from_config

    seed = seed_model_from_config(
        {
            "seed_model": {
                "name": "timm:vit_tiny_patch16_224",
                "seed": 0,
                "config": dict(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=1, num_heads=2,
                               num_classes=10),
            }
        },
        None,
    )
    d = make_digits_domains(seed=1, n_private=10, n_test=2, public_per_domain=4)
    c = d.clients[0]
    spaces = {"private": [f"{c.domain}:{k}" for k in range(10)], "public": [str(k) for k in range(10)]}
    ex = train_expert(seed, (c.x_train, c.y_train), (d.public_x[:4], d.public_y[:4]), spaces, lora_rank=2,
                      epochs=1, lr=1e-2, batch_size=8, seed=0)
    return ex, len(d.public_x)


@pytest.mark.parametrize("overwrite", [False, True])
def test_package_folder_and_files_follow_the_umask(umask, expert, tmp_path, overwrite):
    from metamoe.unify import write_expert_package

    ex, pool = expert
    target = tmp_path / "pkg"
    args = dict(proxy_indices=np.arange(4), public_pool_size=pool, method="random", k=4)
    if overwrite:
        write_expert_package(target, ex, **args)
    write_expert_package(target, ex, overwrite=overwrite, **args)
    assert mode(target) == 0o777 & ~umask
    files = sorted(p for p in target.iterdir())
    assert files
    for p in files:
        assert mode(p) == 0o666 & ~umask, p.name
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]


def test_saved_seed_model_files_follow_the_umask(umask, tmp_path):
    from metamoe.models import create_seed_model, save_seed_model

    m = create_seed_model("timm:vit_tiny_patch16_224", seed=0, img_size=8, patch_size=2, in_chans=1, embed_dim=16,
                          depth=1, num_heads=2, num_classes=3)
    save_seed_model(m, tmp_path / "seed")
    files = list((tmp_path / "seed").iterdir())
    assert any(p.suffix == ".safetensors" for p in files)
    for p in files:
        assert mode(p) == 0o666 & ~umask, p.name
