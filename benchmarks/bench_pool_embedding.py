"""Benchmark sharded pool embedding and sharded relevance on 1, 2 and 4 gloo processes of this machine.

Cases:
  embed      a pool of N random images (C x H x W) through a randomly initialised timm ViT seed model.
             Peer: metamoe.unify.embed over the whole pool in one process (float32 result cast to float16).
             Sharded: embed_pool_sharded under a W-process group (each rank embeds its shard and writes its
             memmap shard + record; the start-up all_gather is included). Checked: the shards, read back
             with open_pool_embeddings, equal the peer's array bit for bit ("same").
  relevance  relevance_scores over an (N, D) float16 memmap pool. Peer: the whole pool in one process.
             Sharded (what `metamoe select --distributed` does): pool_moments (each rank sums its chunks, one
             all_reduce), then relevance_scores(score_rows=this rank's rows, public_moments=...). Checked: the
             ranks' scores, concatenated, equal the peer's bit for bit ("same").
Every process runs 1 thread (OMP_NUM_THREADS=1, torch.set_num_threads(1)), the peers too, so the columns
compare like with like. This machine has 2 cores: 4 processes oversubscribe it (contention, not scaling).
Times: medians over --rep runs (after --warmup), between two barriers on rank 0. Appends rows to
<results-dir>/pool_embedding.csv.

  python benchmarks/bench_pool_embedding.py            # embed N = 8192 (3x32x32, ViT d=192, depth 6);
                                                       # relevance N = 2M, D = 128
  python benchmarks/bench_pool_embedding.py --quick    # embed N = 1024 (d=96, depth 2); relevance N = 200k, D = 64
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: import benchmarks.utils
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.utils import (  # noqa: E402
    append_csv,
    common_parser,
    environment,
    print_table,
    time_fn,
)

VIT = "timm:vit_tiny_patch16_224"


def _model(cfg):
    from metamoe.models import create_seed_model

    return create_seed_model(VIT, seed=0, **cfg["vit"])


def _worker(rank, world, port, tmp, cfg, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from metamoe.selection import relevance_scores
    from metamoe.selection.distributed import init_distributed, pool_moments, pool_shard_range
    from metamoe.unify.pool_embedding import embed_pool_sharded

    init_distributed("gloo", timeout_s=1800)
    res = {}
    if "embed" in cfg["cases"]:
        model = _model(cfg)
        raw = np.load(os.path.join(tmp, "raw.npy"), mmap_mode="r")

        def run_embed():
            embed_pool_sharded(model, raw, os.path.join(tmp, f"pool{world}"), batch_size=cfg["batch"],
                               progress=False, overwrite=True)
            dist.barrier()

        # timed from a barrier (untimed setup) to the barrier after the call
        res["embed"] = time_fn(run_embed, warmup=cfg["warmup"], rep=cfg["rep"], setup=dist.barrier)
    if "relevance" in cfg["cases"]:
        X = np.load(os.path.join(tmp, "X.npy"), mmap_mode="r")
        P = np.load(os.path.join(tmp, "P.npy"))
        rows = pool_shard_range(X.shape[0], rank, world)

        def run_relevance():
            scores = relevance_scores(P, X, progress=False, score_rows=rows, public_moments=pool_moments(X))
            dist.barrier()
            return scores

        res["relevance"] = _timed(run_relevance, cfg["warmup"], cfg["rep"], setup=dist.barrier)
    torch.save(res, out.format(rank=rank))
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(fn, warmup, rep, setup=None):
    """(:func:`benchmarks.utils.time_fn`'s Timing of ``fn()`` on the CPU, the value of its last call)."""
    last = []
    t = time_fn(lambda: last.append(fn()), warmup=warmup, rep=rep, setup=setup)
    return t, last[-1]


def main():
    p = common_parser(__doc__)
    p.add_argument("--n-embed", type=int, default=None, help="images in the embedding pool")
    p.add_argument("--n", type=int, default=None, help="rows of the relevance pool")
    p.add_argument("--d", type=int, default=None, help="embedding dimension of the relevance pool")
    p.add_argument("--procs", default="1,2,4", help="process counts (default: 1,2,4)")
    p.add_argument("--cases", default="embed,relevance")
    args = p.parse_args()
    q = args.quick
    n_embed = args.n_embed or (1024 if q else 8192)
    n = args.n or (200_000 if q else 2_000_000)
    d = args.d or (64 if q else 128)
    vit = dict(img_size=32, patch_size=4, in_chans=3, embed_dim=96 if q else 192, depth=2 if q else 6,
               num_heads=3, num_classes=10)
    warmup = args.warmup if args.warmup is not None else 0
    rep = args.rep or (1 if q else 3)
    cases = [c for c in args.cases.split(",") if c]
    procs = [int(x) for x in args.procs.split(",")]
    cfg = {"vit": vit, "batch": 128, "cases": cases, "warmup": warmup, "rep": rep}
    torch.set_num_threads(1)

    from metamoe.selection import relevance_scores
    from metamoe.unify import embed
    from metamoe.unify.pool_embedding import open_pool_embeddings

    tmp = tempfile.mkdtemp(prefix="bench_pool_")
    rng = np.random.default_rng(0)
    rows, ref = [], {}
    if "embed" in cases:
        np.save(os.path.join(tmp, "raw.npy"), rng.random((n_embed, 3, 32, 32), dtype=np.float32))
        raw = np.load(os.path.join(tmp, "raw.npy"), mmap_mode="r")
        model = _model(cfg)
        t, E = _timed(lambda: embed(model, np.array(raw), batch_size=cfg["batch"], progress=False), warmup, rep)
        ref["embed"] = (E.astype(np.float16), t.median)
        rows.append({"case": "embed", "impl": "embed (1 process)", "procs": 1, "n": n_embed, "d": E.shape[1],
                     "median_s": t.median, "p20_s": t.p20, "p80_s": t.p80, "rows_per_s": n_embed / t.median,
                     "vs_peer": 1.0, "same": "peer"})
    if "relevance" in cases:
        X = np.lib.format.open_memmap(os.path.join(tmp, "X.npy"), mode="w+", dtype=np.float16, shape=(n, d))
        for a in range(0, n, 262144):
            b = min(n, a + 262144)
            X[a:b] = rng.standard_normal((b - a, d)).astype(np.float16)
        X.flush()
        del X
        P = (rng.standard_normal((2000, d)) + 0.3).astype(np.float32)
        np.save(os.path.join(tmp, "P.npy"), P)
        Xm = np.load(os.path.join(tmp, "X.npy"), mmap_mode="r")
        t, r = _timed(lambda: relevance_scores(P, Xm, progress=False), warmup, rep)
        ref["relevance"] = (r, t.median)
        rows.append({"case": "relevance", "impl": "relevance_scores (1 process)", "procs": 1, "n": n, "d": d,
                     "median_s": t.median, "p20_s": t.p20, "p80_s": t.p80, "rows_per_s": n / t.median,
                     "vs_peer": 1.0, "same": "peer"})
    import torch.multiprocessing as mp

    for world in procs:
        out = os.path.join(tmp, f"res{world}-{{rank}}.pt")
        mp.spawn(_worker, args=(world, free_port(), tmp, cfg, out), nprocs=world, join=True)
        res = [torch.load(out.format(rank=r), weights_only=False) for r in range(world)]
        if "embed" in cases:
            t = res[0]["embed"]
            got = open_pool_embeddings(os.path.join(tmp, f"pool{world}")).to_array()
            same = bool(np.array_equal(got, ref["embed"][0]))
            rows.append({"case": "embed", "impl": "embed_pool_sharded", "procs": world, "n": n_embed,
                         "d": got.shape[1], "median_s": t.median, "p20_s": t.p20, "p80_s": t.p80,
                         "rows_per_s": n_embed / t.median, "vs_peer": ref["embed"][1] / t.median, "same": same})
        if "relevance" in cases:
            t = res[0]["relevance"][0]
            got = np.concatenate([res[r]["relevance"][1] for r in range(world)])
            same = bool(np.array_equal(got, ref["relevance"][0]))
            rows.append({"case": "relevance", "impl": "pool_moments + score_rows", "procs": world, "n": n, "d": d,
                         "median_s": t.median, "p20_s": t.p20, "p80_s": t.p80, "rows_per_s": n / t.median,
                         "vs_peer": ref["relevance"][1] / t.median, "same": same})
    cols = ["case", "impl", "procs", "n", "d", "median_s", "p20_s", "p80_s", "rows_per_s", "vs_peer", "same"]
    print_table(rows, cols, title=f"sharded pool embedding and relevance, gloo on the CPU, 1 thread per process "
                f"({os.cpu_count()} cores)")
    print("vs_peer = the one-process peer's median / this median; same = bit-identical to the peer")
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    if not args.no_csv:
        env = environment("cpu")
        env["threads_per_process"] = 1
        env["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)  # the machine is shared: say how busy it was
        print("appended to", append_csv("pool_embedding", rows, env, args.results_dir))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
