"""Sharded pool embedding (metamoe.unify.pool_embedding, `metamoe embed-pool`) and `metamoe select` over a pool.

A tiny timm ViT embeds a 300-row NumPy pool. In-process runs are compared with :func:`metamoe.unify.embed`; two
gloo ranks are started by hand (RANK/WORLD_SIZE/MASTER_PORT, as in test_distributed_selection.py) so that no
launcher tears a survivor down for us. A crash is simulated by the worker script of this file only: for the rank
named in TEST_CRASH_RANK it replaces SeedModel.features with one that calls os._exit on the second batch.
Every process (and this one: conftest's one_torch_thread) uses one thread, so that files can be compared byte for byte.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from conftest import free_port, rank_env, run_beside_dead_peer  # noqa: E402

from metamoe.models import create_seed_model, weight_hash  # noqa: E402
from metamoe.selection import relevance_scores  # noqa: E402
from metamoe.unify import embed  # noqa: E402
from metamoe.unify.pool_embedding import (  # noqa: E402
    PoolEmbeddings,
    PoolIncompleteError,
    PoolIntegrityError,
    embed_pool_sharded,
    open_pool_embeddings,
    shard_file,
)
from metamoe.unify.pool_embedding_cli import main  # noqa: E402

PY = sys.executable
VIT = "timm:vit_tiny_patch16_224"
VIT_CFG = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=2, num_heads=2)
N, BATCH = 300, 64
WORLD = 2
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the in-process runs, as the ranks: one thread
WORKER = textwrap.dedent(
    """
    import os, sys
    import torch
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    if os.environ.get("TEST_CRASH_RANK") == str(rank):  # this test's crash, not a hook of the library
        from metamoe.models.registry import SeedModel
        orig, calls = SeedModel.features, []
        def features(self, batch):
            calls.append(1)
            if len(calls) == 2:  # one batch is in the temporary file; the shard is never renamed
                sys.stdout.flush(); os._exit(3)
            return orig(self, batch)
        SeedModel.features = features
    d = os.environ.get("TEST_MOMENTS_DIR")
    if d:  # item 4 checks on the same two ranks, before main() (which then reuses the process group)
        import numpy as np
        from metamoe.selection import relevance_scores
        from metamoe.selection.distributed import init_distributed, pool_moments, pool_shard_range
        from metamoe.unify.pool_embedding import open_pool_embeddings
        init_distributed(timeout_s=30)
        X = np.load(os.path.join(d, "X.npy"), mmap_mode="r")
        P = np.load(os.path.join(d, "P.npy"))
        pool = open_pool_embeddings(os.path.join(d, "pool"), verify=False)
        res = {"npy": pool_moments(X, chunk_size=64), "pool": pool_moments(pool, chunk_size=64)}
        res["scores"] = relevance_scores(P, pool, chunk_size=64, progress=False,
                                         score_rows=pool_shard_range(X.shape[0], rank, 2), public_moments=res["pool"])
        Xn = np.array(X)
        Xn[250, 3] = np.nan  # in rank 1's rows
        try:
            pool_moments(Xn, chunk_size=64)
            res["nan"] = "no error"
        except ValueError as exc:
            res["nan"] = str(exc)
        torch.save(res, os.path.join(d, f"moments{rank}.pt"))
    from metamoe.unify.pool_embedding_cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def _model():
    return create_seed_model(VIT, seed=0, num_classes=10, **VIT_CFG)


def _cli_args(raw, out, *more):
    return ["--model", VIT, "--model-seed", "0", "--model-config", json.dumps(VIT_CFG), "--num-classes", "10",
            "--data", str(raw), "--out", str(out), "--batch-size", str(BATCH), "--no-progress", *more]


def _run_ranks(cmd, **extra):
    """``cmd`` as the WORLD ranks of a gloo group, started by hand (conftest's rank_env, as torchrun would, one
    interpreter less); returns [(returncode, stdout, stderr)] per rank. Every rank is killed afterwards."""
    port = free_port()
    procs = [subprocess.Popen(cmd, env=rank_env(r, port, WORLD, **extra), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(WORLD)]
    res = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=90)
            res.append((p.returncode, out, err))
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return res


def _launch(raw, out, timeout_s=30, **extra):
    """Two ranks of `embed-pool --distributed` (this file's worker script); returns [(returncode, stderr)]."""
    worker = out.parent / "worker.py"
    worker.write_text(WORKER)
    res = _run_ranks([PY, str(worker), "--distributed", "--timeout", str(timeout_s), *_cli_args(raw, out)], **extra)
    return [(rc, err) for rc, _, err in res]


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    d = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(0)
    X = rng.random((N, 8, 8), dtype=np.float32)
    np.save(d / "raw.npy", X)
    return d / "raw.npy"


@pytest.fixture(scope="module")
def single(raw, tmp_path_factory, one_torch_thread):
    """The same pool embedded in this process in 2 shards (the reference for the distributed runs)."""
    out = tmp_path_factory.mktemp("single") / "pool"
    res = embed_pool_sharded(_model(), np.load(raw), out, num_shards=WORLD, batch_size=BATCH, progress=False)
    assert res["complete"] and res["this_call"]["embedded"] == [0, 1]
    return out


# --------------------------------------------------------------------------- one process


def test_single_process_equals_embed(raw, tmp_path):
    X = np.load(raw)
    model = _model()
    ref = embed(model, X, batch_size=BATCH, progress=False)
    res = embed_pool_sharded(model, X, tmp_path / "p", num_shards=3, batch_size=BATCH, progress=False)
    res32 = embed_pool_sharded(model, X, tmp_path / "p32", num_shards=3, batch_size=50, dtype="float32",
                               progress=False)
    assert res["complete"] and res["n"] == N and res["d"] == 32 and res["dtype"] == "float16"
    assert res32["complete"] and res32["dtype"] == "float32"
    assert [(s["start"], s["stop"]) for s in res["shards"]] == [(0, 128), (128, 256), (256, 300)]
    assert res["model"] == {"name": VIT, "weight_hash": weight_hash(model)}
    pool = open_pool_embeddings(tmp_path / "p" / "manifest.json")
    assert isinstance(pool, PoolEmbeddings) and pool.shape == (N, 32) and pool.dtype == np.float16
    full = pool.to_array()
    # same batches (64-row boundaries) in both: equal after the float16 cast, bit for bit
    np.testing.assert_array_equal(full, ref.astype(np.float16))
    # float32 store with batches of 50 (other batch boundaries than embed's): equal up to BLAS blocking
    np.testing.assert_allclose(open_pool_embeddings(tmp_path / "p32").to_array(), ref, rtol=1e-5, atol=1e-5)
    # lazy reads
    inside = pool.rows(130, 200)
    assert isinstance(inside, np.memmap) and not inside.flags.writeable  # zero copy, one shard
    np.testing.assert_array_equal(inside, full[130:200])
    np.testing.assert_array_equal(pool.rows(100, 270), full[100:270])  # across three files
    idx = np.array([299, 0, 128, 127, 255, 256, 5, 5, -1])
    np.testing.assert_array_equal(pool[idx], full[idx])
    np.testing.assert_array_equal(pool[torch.tensor([3, 200])], full[[3, 200]])
    np.testing.assert_array_equal(pool[10:290:7], full[10:290:7])
    np.testing.assert_array_equal(pool[257], full[257])
    part = open_pool_embeddings(tmp_path / "p", rows=(128, 256))
    assert isinstance(part, np.memmap)
    np.testing.assert_array_equal(part, full[128:256])
    on_disk = pool.to_array(out=tmp_path / "all.npy")
    np.testing.assert_array_equal(on_disk, full)
    with pytest.raises(TypeError, match="to_array"):
        np.asarray(pool)
    with pytest.raises(IndexError):
        pool[np.array([N])]


def test_rerun_skips_done_shards_and_rejects_other_settings(raw, tmp_path):
    X = np.load(raw)[:100]
    model = _model()
    out = tmp_path / "p"
    embed_pool_sharded(model, X, out, num_shards=2, batch_size=BATCH, progress=False)
    first = (out / shard_file(0, 2)).stat().st_mtime_ns
    res = embed_pool_sharded(model, X, out, batch_size=BATCH, progress=False)  # num_shards from the manifest
    assert res["this_call"] == {"embedded": [], "skipped": [0, 1]}
    assert (out / shard_file(0, 2)).stat().st_mtime_ns == first
    res = embed_pool_sharded(model, X, out, shard=[1], overwrite=True, batch_size=BATCH, progress=False)
    assert res["this_call"] == {"embedded": [1], "skipped": []} and res["complete"]
    X2 = X.copy()
    X2[99] += 1.0  # another pool: the sampled rows include the last one
    with pytest.raises(ValueError, match="source fingerprint"):
        embed_pool_sharded(model, X2, out, batch_size=BATCH, progress=False)
    with pytest.raises(ValueError, match="dtype"):
        embed_pool_sharded(model, X, out, dtype="float32", progress=False)
    with pytest.raises(ValueError, match="model"):
        embed_pool_sharded(create_seed_model(VIT, seed=1, num_classes=10, **VIT_CFG), X, out, progress=False)
    with pytest.raises(ValueError, match="shard must list"):
        embed_pool_sharded(model, X, out, shard=[2], progress=False)
    with pytest.raises(ValueError, match="dtype must be"):
        embed_pool_sharded(model, X, tmp_path / "q", dtype="int8", progress=False)
    with pytest.raises(ValueError, match="exceeds"):
        embed_pool_sharded(model, X[:3], tmp_path / "r", num_shards=4, progress=False)
    big = _model()
    with torch.no_grad():
        big.net.norm.weight.mul_(1e6)  # features beyond float16's range
    with pytest.raises(ValueError, match="overflow float16"):
        embed_pool_sharded(big, X, tmp_path / "s", progress=False)
    assert not list((tmp_path / "s").glob("shard-*")) and not list((tmp_path / "s").glob(".*.tmp"))
    with pytest.raises(PoolIncompleteError, match=r"shard=\[0\]"):  # no CLI command recorded: the Python call
        open_pool_embeddings(tmp_path / "s")
    assert embed_pool_sharded(big, X, tmp_path / "t", dtype="float32", progress=False)["complete"]


def test_tampered_shard_fails_sha256(single, tmp_path):
    out = tmp_path / "pool"
    shutil.copytree(single, out)
    f = out / shard_file(1, WORLD)
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0x40  # one bit of the last row
    f.write_bytes(bytes(raw))
    with pytest.raises(PoolIntegrityError, match=r"shard-00001-of-00002\.npy: sha256 differs"):
        open_pool_embeddings(out)
    with pytest.raises(PoolIntegrityError, match="sha256"):
        open_pool_embeddings(out, rows=(100, 250))
    np.testing.assert_array_equal(open_pool_embeddings(out, rows=(0, 192)),  # shard 0 alone is intact
                                  open_pool_embeddings(single).rows(0, 192))
    assert open_pool_embeddings(out, verify=False).shape == (N, 32)
    # a shard whose shape disagrees with the manifest
    np.save(f, np.zeros((5, 32), np.float16))
    with pytest.raises(PoolIntegrityError, match=r"shape \(5, 32\)"):
        open_pool_embeddings(out, verify=False)


# --------------------------------------------------------------------------- two gloo ranks


@pytest.fixture(scope="module")
def two_ranks(raw, single, private, tmp_path_factory):
    """One 2-rank `embed-pool --distributed` run; before it, the same ranks run the item-4 checks (worker script)."""
    d = tmp_path_factory.mktemp("two")
    mom = d / "moments"
    shutil.copytree(single, mom / "pool")
    for f in ("X.npy", "P.npy"):
        shutil.copy(private / f, mom / f)
    res = _launch(raw, d / "pool", TEST_MOMENTS_DIR=str(mom))
    return {"out": d / "pool", "moments": mom, "res": res}


def test_two_gloo_ranks_write_the_single_process_shards(two_ranks, single):
    out, res = two_ranks["out"], two_ranks["res"]
    assert [rc for rc, _ in res] == [0, 0], "\n".join(err[-2000:] for _, err in res)
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and [s["status"] for s in m["shards"]] == ["done", "done"]
    for i in range(WORLD):
        assert (out / shard_file(i, WORLD)).read_bytes() == (single / shard_file(i, WORLD)).read_bytes()
    assert m["command"][m["command"].index("--num-shards") + 1] == "2"
    np.testing.assert_array_equal(open_pool_embeddings(out).to_array(), open_pool_embeddings(single).to_array())


def test_crashed_rank_shard_is_redone_alone(raw, single, tmp_path, capsys):
    out = tmp_path / "pool"
    t0 = time.monotonic()
    (rc0, err0), (rc1, _) = _launch(raw, out, TEST_CRASH_RANK="1")
    assert time.monotonic() - t0 < 60
    assert rc1 == 3  # the crash
    assert rc0 == 0, err0[-3000:]  # the survivor finishes its own shard: no collective after the start
    assert (out / shard_file(0, WORLD)).is_file() and not (out / shard_file(1, WORLD)).exists()
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    with pytest.raises(PoolIncompleteError) as e:
        open_pool_embeddings(out)
    msg = str(e.value)
    assert "shard 1 (shard-00001-of-00002.npy, rows 192:300): no record" in msg
    cmd = shlex.split(msg.split("Redo it with: ", 1)[1])
    assert cmd[:2] == ["metamoe", "embed-pool"] and cmd[-2:] == ["--shards", "1"] and "--distributed" not in cmd
    np.testing.assert_array_equal(open_pool_embeddings(out, rows=(0, 192)),  # the done shard is readable alone
                                  open_pool_embeddings(single, rows=(0, 192)))
    from metamoe.selection.cli import main as select_main

    assert select_main(
        ["--private", str(raw), "--public", str(out), "--k", "3", "--out", str(tmp_path / "s.json")]
    ) == 2
    assert "--shards 1" in capsys.readouterr().err  # `metamoe select` names the redo command too
    rec0 = (out / "shard-00000-of-00002.json").read_text()
    assert main(cmd[2:]) == 0  # the exact command from the error, in one process, no process group
    assert (out / "shard-00000-of-00002.json").read_text() == rec0  # shard 0 was not redone
    assert not list(out.glob(".*.tmp"))  # the crashed rank's half-written temporary file is gone
    assert json.loads((out / "manifest.json").read_text())["complete"]
    for i in range(WORLD):
        assert (out / shard_file(i, WORLD)).read_bytes() == (single / shard_file(i, WORLD)).read_bytes()
    open_pool_embeddings(out)


def test_rank_dead_before_startup_makes_the_other_fail_not_hang(raw, tmp_path):
    out = tmp_path / "pool"
    peer = ("import os; from metamoe.selection.distributed import init_distributed; "
            "init_distributed(timeout_s=5); os._exit(3)")
    code, err, took = run_beside_dead_peer(
        [PY, "-m", "metamoe", "embed-pool", "--distributed", "--timeout", "5", *_cli_args(raw, out)], peer)
    assert code == 2, err[-3000:]
    assert "metamoe embed-pool (rank 0 of 2): error: embed-pool: the start-up all_gather failed" in err
    assert took < 45


# --------------------------------------------------------------------------- CLI


def test_cli_help_and_errors(raw, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for opt in ("--config", "--model", "--checkpoint", "--model-seed", "--model-config", "--data", "--out",
                "--batch-size", "--dtype", "--num-shards", "--shards", "--overwrite", "--distributed", "--timeout",
                "--dist-backend", "--device", "--no-progress", "seed_model:", "Redoing a crashed rank's shard"):
        assert opt in text, opt
    assert main(["--data", str(raw), "--out", str(tmp_path / "x")]) == 2
    assert "--model timm:<arch>" in capsys.readouterr().err
    assert main(_cli_args(raw, tmp_path / "y", "--shards", "a,b")) == 2
    assert "--shards must be comma-separated" in capsys.readouterr().err
    assert main(_cli_args(tmp_path / "none.npy", tmp_path / "z")) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "afile").write_text("")
    assert main(_cli_args(raw, tmp_path / "afile" / "pool")) == 2  # before any embedding
    assert f"--out {tmp_path / 'afile' / 'pool'} cannot be created: {tmp_path / 'afile'} is a file" in \
        capsys.readouterr().err
    from metamoe.cli import COMMANDS

    assert "embed-pool" in COMMANDS


def test_cli_config_file(raw, single, tmp_path):
    cfg = tmp_path / "pool.yaml"
    cfg.write_text(f"seed_model:\n  name: {VIT}\n  seed: 0\n  num_classes: 10\n  config: {json.dumps(VIT_CFG)}\n"
                   f"data: {raw}\noutput: out\nbatch_size: {BATCH}\nnum_shards: 2\n")
    assert main(["--config", str(cfg), "--no-progress"]) == 0
    for i in range(WORLD):
        assert (tmp_path / "out" / shard_file(i, WORLD)).read_bytes() == (single / shard_file(i, WORLD)).read_bytes()


# --------------------------------------------------------------------------- metamoe select over a pool


@pytest.fixture(scope="module")
def private(single, tmp_path_factory):
    d = tmp_path_factory.mktemp("sel")
    X = open_pool_embeddings(single).to_array().astype(np.float32)
    rng = np.random.default_rng(5)
    P = (X[rng.choice(N, 30, replace=False)] + 0.3 * rng.standard_normal((30, 32))).astype(np.float32)
    np.save(d / "P.npy", P)
    np.save(d / "X.npy", open_pool_embeddings(single).to_array())  # the same float16 pool as one .npy
    return d


def _select(args):
    from metamoe.selection.cli import main as select_main

    assert select_main(args) == 0


@pytest.mark.parametrize("public", ["manifest", "folder"])
def test_select_manifest_equals_npy(single, private, raw, tmp_path, public):
    common = ["--private", str(private / "P.npy"), "--k", "25", "--ridge", "0.01", "--backend", "torch",
              "--no-progress"]
    _select([*common, "--public", str(private / "X.npy"), "--out", str(tmp_path / "npy.json")])
    src = single / "manifest.json" if public == "manifest" else single
    _select([*common, "--public", str(src), "--out", str(tmp_path / "pool.json")])
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("npy.json", "pool.json"))
    assert a["indices"] == b["indices"] and a["gains"] == b["gains"] and len(a["indices"]) == 25
    # a one-shard pool is read as that shard's memmap
    one = tmp_path / "one"
    embed_pool_sharded(_model(), np.load(raw), one, batch_size=BATCH, progress=False)
    _select([*common, "--public", str(one), "--out", str(tmp_path / "one.json")])
    assert json.loads((tmp_path / "one.json").read_text())["indices"] == a["indices"]


def test_select_distributed_manifest_equals_single_process(single, private, tmp_path):
    """2 ranks over the 2-shard pool: each reads one shard file and scores relevance on its own rows
    only (item 4); the picks and gains are those of the single process over the .npy."""
    common = ["--private", str(private / "P.npy"), "--k", "25", "--ridge", "0.01", "--backend", "torch",
              "--no-progress"]
    _select([*common, "--public", str(private / "X.npy"), "--out", str(tmp_path / "single.json")])
    out = tmp_path / "dist.json"
    res = _run_ranks([PY, "-m", "metamoe", "select", "--distributed", "--timeout", "60", *common,
                      "--public", str(single / "manifest.json"), "--out", str(out)])
    assert [rc for rc, _, _ in res] == [0, 0], "\n".join(e[-2000:] for _, _, e in res)
    outs = [(o, e) for _, o, e in res]
    stdout = "".join(o for o, _ in outs)
    a, b = json.loads((tmp_path / "single.json").read_text()), json.loads(out.read_text())
    assert a["indices"] == b["indices"]
    np.testing.assert_allclose(b["gains"], a["gains"], rtol=0, atol=1e-12)
    assert b["backend"] == "torch-distributed" and b["info"]["shard_sizes"] == [192, 108]
    # each rank scored its own rows only
    assert "192 public samples scored (rows 0:192 of 300" in outs[0][0]
    assert "108 public samples scored (rows 192:300 of 300" in outs[1][0]
    assert stdout.count("wrote ") == 1  # rank 0 alone writes


# --------------------------------------------------------------------------- relevance on a shard (item 4)


def test_relevance_score_rows_is_the_slice_of_the_whole_pool(single, private):
    P = np.load(private / "P.npy")
    X = np.load(private / "X.npy", mmap_mode="r")
    pool = open_pool_embeddings(single)
    full = relevance_scores(P, X, chunk_size=64, progress=False)
    assert full.shape == (N,)
    for lo, hi in ((192, 300), (37, 101), (100, 101)):
        part = relevance_scores(P, X, chunk_size=64, progress=False, score_rows=(lo, hi))
        np.testing.assert_array_equal(part, full[lo:hi])  # bit for bit, whatever the range
        np.testing.assert_array_equal(relevance_scores(P, pool, chunk_size=64, progress=False, score_rows=(lo, hi)),
                                      full[lo:hi])  # the sharded pool read row by row: the same bits
    from metamoe.selection.relevance import _moments

    mom = _moments(torch.from_numpy(np.asarray(X)), 64)
    np.testing.assert_array_equal(relevance_scores(P, X, chunk_size=64, progress=False, score_rows=(37, 101),
                                                   public_moments=mom), full[37:101])
    with pytest.raises(ValueError, match="public_moments"):
        relevance_scores(P, X, public_moments=(np.zeros(3), np.ones(3)), progress=False)
    with pytest.raises(TypeError, match="public_moments"):
        relevance_scores(P, X, public_moments=np.zeros(32), progress=False)
    with pytest.raises(ValueError, match="score_rows"):
        relevance_scores(P, X, score_rows=(5, 5), progress=False)
    with pytest.raises(ValueError, match="score_rows"):
        relevance_scores(P, X, score_rows=(0, N + 1), progress=False)
    with pytest.raises(TypeError, match="score_rows"):
        relevance_scores(P, X, score_rows=(0.0, 3), progress=False)



def test_sharded_relevance_moments_and_scores_are_the_single_process_bits(two_ranks, private):
    """Item 4 at the function level (on the two ranks of the embedding run): pool_moments (each rank sums its own
    chunks, one all_reduce) has the bits of relevance's own moments pass, and relevance on a shard with those
    moments has the bits of the whole-pool run."""
    from metamoe.selection.distributed import pool_shard_range
    from metamoe.selection.relevance import _moments

    X = np.load(private / "X.npy")
    ref_mean, ref_sq = _moments(torch.from_numpy(X), 64)
    full = relevance_scores(np.load(private / "P.npy"), X, chunk_size=64, progress=False)
    for r in range(WORLD):
        res = torch.load(two_ranks["moments"] / f"moments{r}.pt", weights_only=False)
        for key in ("npy", "pool"):
            assert torch.equal(res[key][0], ref_mean) and torch.equal(res[key][1], ref_sq), (r, key)
        lo, hi = pool_shard_range(N, r, WORLD)
        np.testing.assert_array_equal(res["scores"], full[lo:hi])
        assert res["nan"] == "the public pool has NaN or inf values in rows 192:256", res["nan"]


def test_multi_shard_pool_larger_than_memory_is_concatenated_on_disk(single, monkeypatch, capsys):
    """One process, a 2-shard pool that 'does not fit': streamed into an unlinked temporary .npy, not RAM."""
    from metamoe.selection import cli as scli
    from metamoe.utils import memory

    in_memory = scli._load_public(str(single), False)
    assert not isinstance(in_memory, np.memmap)
    monkeypatch.setattr(memory, "available_bytes", lambda device: (1024, "host memory"))
    on_disk = scli._load_public(str(single / "manifest.json"), False)
    assert isinstance(on_disk, np.memmap) and not on_disk.flags.writeable
    np.testing.assert_array_equal(np.asarray(on_disk), in_memory)
    assert "concatenated on disk" in capsys.readouterr().out
    assert not list(single.glob(".select-concat-*"))  # unlinked at once; freed when the process exits
