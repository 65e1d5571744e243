"""Selection from a pool larger than memory: every method on a float16 ``np.memmap`` (issue 6, item 5).

Data: a clustered synthetic pool written once in chunks to ``--path`` (default
/tmp/metamoe_pool_10M_768_fp16.npy: 10,000,000 x 768 float16 = 14.3 GiB, more than half of a 24 GiB
machine), a seeded Gaussian mixture of ``--clusters`` (1,000) centres; plus a small "private" set
(``--private`` rows) drawn around ``--private-clusters`` of the same centres, so that relevance and the
kNN graph mean something. The file is reused when present (same shape, dtype and generator version);
delete it with ``rm`` after the run, ``--generate-only`` writes it again.

Every method runs in its OWN subprocess, on ``np.load(path, mmap_mode="r")``, so that its peak memory
is its own. Per method the child reports wall seconds, ``peak_rss_gib`` (VmHWM: includes the pages of
the memmapped file that are resident while it runs, i.e. page cache that the kernel can drop) and
``peak_anon_gib`` (RssAnon sampled every 50 ms: the process's own memory, the number that must stay
far below the pool's size), next to ``pool_gib`` (the file) and ``pool_f32_gib`` (what one float32
copy of the pool would take).

Methods (``--methods``, default all):
  random          select_random(N, k)
  relevance       relevance_scores(private, pool): the domain classifier, trained by streaming
                  mini-batches, then the pool scored in chunks; its scores are saved for the next ones
  top_relevance   select_top_relevance(relevance, k)
  dpp_cpp         select_dpp(pool, k_dpp, relevance), cosine kernel over the WHOLE pool, C++ backend
                  (reads the float16 memmap in place; one pass over the pool per pick)
  dpp_torch       the same on the torch backend (the peer), with a smaller k (--k-dpp-torch)
  dpp_candidates  the paper's protocol: top M = 20,000 by relevance, then k = 2,000 DPP picks (C++)
  fl_private      facility location with ground = the private set: exact kNN graph of the private rows
                  among the pool (faiss Flat, pool streamed in blocks), then lazy greedy
  fl_private_dense  the same objective on every similarity (graph="dense", computed on the fly; the pool is
                  read tile by tile, never copied): exact, k = --k-fl-dense picks
  fl_knn          facility location with ground = pool on a faiss IVF kNN graph (float16 lists by default);
                  the graph is built on the first --knn-n rows (default 1M: the full 10M graph is hours on
                  2 cores, and even its float16 IVF lists are 14 GiB), and the build rate is extrapolated to N
                  (marked as such in the note)

Prints a table and appends rows to <results-dir>/large_pool.csv; the full log (with the machine
load and the command line) goes to <results-dir>/cpu_large_pool_<date>.log.

  python benchmarks/bench_large_pool.py --quick            # 200k x 768 pool in /tmp, minutes
  python benchmarks/bench_large_pool.py                    # 10M x 768 (15 GB file; slow on 2 cores)
  python benchmarks/bench_large_pool.py --generate-only    # just write the pool
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: import benchmarks.utils

from benchmarks.utils import add_results_dir, append_csv, environment, fmt, print_table  # noqa: E402

GEN_VERSION = 1
DEFAULT_PATH = "/tmp/metamoe_pool_10M_768_fp16.npy"
QUICK_PATH = "/tmp/metamoe_pool_200k_768_fp16.npy"
METHODS = ("random", "relevance", "top_relevance", "dpp_cpp", "dpp_torch", "dpp_candidates", "fl_private",
           "fl_private_dense", "fl_knn")
NOISE = 0.5  # per-coordinate noise around a unit-variance centre: within-cluster cosine ~0.8, across ~0


# --------------------------------------------------------------------------- data


def _centres(d: int, clusters: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 0]).standard_normal((clusters, d), dtype=np.float32)


def _meta_path(path: str) -> Path:
    return Path(path + ".json")


def pool_is_ready(path: str, n: int, d: int, clusters: int, seed: int) -> bool:
    meta = _meta_path(path)
    if not (Path(path).exists() and meta.exists()):
        return False
    want = {"n": n, "d": d, "clusters": clusters, "seed": seed, "version": GEN_VERSION, "dtype": "float16"}
    try:
        have = json.loads(meta.read_text())
    except (OSError, ValueError):
        return False
    if any(have.get(key) != val for key, val in want.items()):
        return False
    arr = np.load(path, mmap_mode="r")
    return arr.shape == (n, d) and arr.dtype == np.float16


def generate_pool(path: str, n: int, d: int, clusters: int, seed: int, chunk: int = 100_000, log=print) -> None:
    """Write an (n, d) float16 .npy of a seeded Gaussian mixture, ``chunk`` rows at a time (never whole in memory).

    Row i belongs to cluster c_i (drawn with Dirichlet(2) weights, so clusters differ in size) and is
    centre[c_i] + NOISE * N(0, I). Chunk j uses the generator seeded by (seed, 1, j), so the file does not
    depend on anything but (n, d, clusters, seed, chunk).
    """
    centres = _centres(d, clusters, seed)
    weights = np.random.default_rng([seed, 2]).dirichlet(np.full(clusters, 2.0))
    tmp = path + ".partial"
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False, "shape": (n, d)}
    t0 = time.perf_counter()
    with open(tmp, "wb") as fh:
        np.lib.format.write_array_header_2_0(fh, header)
        for j, a in enumerate(range(0, n, chunk)):
            rows = min(chunk, n - a)
            rng = np.random.default_rng([seed, 1, j])
            lab = rng.choice(clusters, size=rows, p=weights)
            x = rng.standard_normal((rows, d), dtype=np.float32)
            x *= NOISE
            x += centres[lab]
            fh.write(x.astype(np.float16).tobytes())
            if j % 10 == 0:
                log(f"  generate: {a + rows:,} / {n:,} rows, {time.perf_counter() - t0:.0f} s")
    os.replace(tmp, path)
    _meta_path(path).write_text(json.dumps(
        {"n": n, "d": d, "clusters": clusters, "seed": seed, "version": GEN_VERSION, "dtype": "float16",
         "chunk": chunk, "noise": NOISE, "seconds": round(time.perf_counter() - t0, 1)}))


def private_set(m: int, d: int, clusters: int, private_clusters: int, seed: int) -> np.ndarray:
    """(m, d) float32 rows around ``private_clusters`` of the pool's centres (the client's domain)."""
    centres = _centres(d, clusters, seed)
    rng = np.random.default_rng([seed, 3])
    chosen = rng.choice(clusters, size=private_clusters, replace=False)
    lab = chosen[rng.integers(0, private_clusters, size=m)]
    return (centres[lab] + NOISE * rng.standard_normal((m, d), dtype=np.float32)).astype(np.float32)


# --------------------------------------------------------------------------- memory


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (0 when absent)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class AnonSampler:
    """Peak RssAnon (private memory, not the memmap's page cache), sampled every ``period`` seconds."""

    def __init__(self, period: float = 0.05):
        self.period, self.peak, self._stop = period, _status("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _status("RssAnon"))
            time.sleep(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status("RssAnon"))


# --------------------------------------------------------------------------- one method (child process)


def run_method(args) -> dict:
    import torch

    from metamoe.selection import (
        relevance_scores,
        select_dpp,
        select_facility_location,
        select_random,
        select_top_relevance,
    )
    from metamoe.selection.knn_graph import build_knn_graph

    X = np.load(args.path, mmap_mode="r")
    n, d = X.shape
    P = private_set(args.private, d, args.clusters, args.private_clusters, args.seed)
    rel_path = args.path + ".relevance.npy"
    method = args.run_method
    rss0, anon0 = _status("VmRSS"), _status("RssAnon")
    out = {"method": method, "N": n, "D": d, "dtype": str(X.dtype), "threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    with AnonSampler() as sampler:
        if method == "random":
            sel = select_random(n, args.k)
            out.update(k=args.k, backend=sel.backend)
        elif method == "relevance":
            r = relevance_scores(P, X, epochs=args.rel_epochs, seed=args.seed, chunk_size=8192, progress=False)
            np.save(rel_path, r)
            inside = _cluster_labels_private(args, n)
            out.update(k="", backend="torch", note=f"epochs={args.rel_epochs}, chunk_size=8192; {inside}")
        elif method == "top_relevance":
            sel = select_top_relevance(np.load(rel_path), args.k)
            out.update(k=args.k, backend=sel.backend)
        elif method in ("dpp_cpp", "dpp_torch"):
            k = args.k_dpp if method == "dpp_cpp" else args.k_dpp_torch
            sel = select_dpp(X, k, np.load(rel_path), backend=method.split("_")[1], progress=False)
            out.update(k=k, backend=sel.backend, objective=sel.objective,
                       note=f"picks[:5]={sel.indices[:5].tolist()}")
        elif method == "dpp_candidates":
            sel = select_dpp(X, args.k_cand, np.load(rel_path), candidates=args.candidates, ridge=1e-3,
                             backend="cpp", progress=False)
            out.update(k=args.k_cand, backend=sel.backend, objective=sel.objective,
                       note=f"candidates={args.candidates}, ridge=1e-3")
        elif method == "fl_private":
            tg = time.perf_counter()
            g = build_knn_graph(X, args.neighbors, queries=P, method="exact", progress=False)
            graph_s = time.perf_counter() - tg
            sel = select_facility_location(X, args.k_fl, ground=P, graph=g, progress=False)
            out.update(k=args.k_fl, backend=sel.backend, objective=sel.objective,
                       note=f"M={len(P)} private, K={args.neighbors}, exact graph {graph_s:.1f} s "
                            f"({g.info['method']}), greedy {sel.info['select_seconds']:.2f} s")
        elif method == "fl_private_dense":
            sel = select_facility_location(X, args.k_fl_dense, ground=P, graph="dense", progress=False)
            out.update(k=args.k_fl_dense, backend=sel.backend, objective=sel.objective,
                       note=f"M={len(P)} private, every similarity (on the fly, pool read tile by tile), "
                            f"candidate evaluations {sel.info.get('candidate_evaluations')}")
        elif method == "fl_knn":
            m = min(n, args.knn_n)
            Xs = X[:m]
            tg = time.perf_counter()
            g = build_knn_graph(Xs, args.neighbors, method="ivf", nlist=args.nlist, nprobe=args.nprobe,
                                recall_sample=args.recall_sample, storage=args.ivf_storage,
                                quantizer=args.quantizer, progress=False)
            graph_s = time.perf_counter() - tg
            sel = select_facility_location(Xs, args.k_fl, graph=g, progress=False)
            rate = m / graph_s
            item_bytes = 4 if args.ivf_storage == "float32" else 2 if args.ivf_storage == "float16" else 1
            out.update(N=m, k=args.k_fl, backend=sel.backend, objective=sel.objective,
                       note=(f"IVF {args.ivf_storage} nlist={g.info['nlist']} nprobe={g.info['nprobe']} "
                             f"quantizer={g.info['quantizer']} "
                             f"recall@{args.neighbors}="
                             f"{g.info.get('recall', float('nan')):.3f}; graph {graph_s:.1f} s = {rate:,.0f} rows/s; "
                             f"greedy {sel.info['select_seconds']:.2f} s"
                             + (f"; EXTRAPOLATION, not measured: the full N={n:,} graph at this rate, lists kept "
                                f"this size (nlist x {n / m:g}), >= {n / rate / 3600:.2f} h (the coarse quantizer "
                                f"and training grow too), and its {args.ivf_storage} lists would hold "
                                f"{n * d * item_bytes / 2**30:.1f} GiB"
                                if m < n else "")))
        else:
            raise SystemExit(f"unknown method {method!r}")
    seconds = time.perf_counter() - t0
    out.update(
        seconds=round(seconds, 2),
        peak_rss_gib=round(_status("VmHWM") / 2**30, 3),
        peak_anon_gib=round(sampler.peak / 2**30, 3),
        start_rss_gib=round(rss0 / 2**30, 3),
        start_anon_gib=round(anon0 / 2**30, 3),
    )
    if method.startswith("dpp") and out.get("k"):
        out["s_per_pick"] = round(seconds / out["k"], 4)
    return out


def _cluster_labels_private(args, n: int) -> str:
    return f"private: {args.private} rows around {args.private_clusters} of {args.clusters} centres"


# --------------------------------------------------------------------------- driver


def _loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="200k x 768 pool (CI-sized), smaller k")
    p.add_argument("--n", type=int, default=None, help="pool rows (default 10,000,000; --quick 200,000)")
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--path", default=None, help=f"pool file (default {DEFAULT_PATH}; --quick {QUICK_PATH})")
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--private", type=int, default=500, help="rows of the private set")
    p.add_argument("--private-clusters", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=2000, help="picks for random / top_relevance")
    p.add_argument("--k-dpp", type=int, default=None, help="picks of the full-pool DPP, C++ (default 50; quick 100)")
    p.add_argument("--k-dpp-torch", type=int, default=None,
                   help="picks of the full-pool DPP, torch (default 4; quick 20)")
    p.add_argument("--candidates", type=int, default=20000)
    p.add_argument("--k-cand", type=int, default=2000)
    p.add_argument("--k-fl", type=int, default=None, help="facility-location picks (default 500; quick 200)")
    p.add_argument("--neighbors", type=int, default=20)
    p.add_argument("--k-fl-dense", type=int, default=5, help="picks of facility location on the dense graph")
    p.add_argument("--knn-n", type=int, default=1_000_000, help="rows of the prefix the IVF kNN graph is built on")
    p.add_argument("--nlist", type=int, default=1000, help="IVF lists (default 1000: faiss trains on 64 x nlist rows)")
    p.add_argument("--ivf-storage", default="float16", choices=("float32", "float16", "int8"),
                   help="what the IVF lists hold per row (float16: half the float32 index)")
    p.add_argument("--nprobe", type=int, default=4)
    p.add_argument("--quantizer", default="auto", choices=("auto", "flat", "hnsw"),
                   help="IVF coarse quantizer (auto: HNSW over the centroids from 4096 lists)")
    p.add_argument("--recall-sample", type=int, default=200)
    p.add_argument("--rel-epochs", type=int, default=1)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--threads", type=int, default=2, help="OMP/torch threads of every child")
    p.add_argument("--generate-only", action="store_true")
    p.add_argument("--no-csv", action="store_true")
    p.add_argument("--note", default="", help="free text for the log (e.g. 'machine shared with 2 other jobs')")
    p.add_argument("--run-method", default=None, help=argparse.SUPPRESS)
    add_results_dir(p)
    args = p.parse_args(argv)
    n = args.n or (200_000 if args.quick else 10_000_000)
    args.n = n
    args.path = args.path or (QUICK_PATH if args.quick else DEFAULT_PATH)
    args.k_dpp = args.k_dpp or (100 if args.quick else 50)
    args.k_dpp_torch = args.k_dpp_torch or (20 if args.quick else 4)
    args.k_fl = args.k_fl or (200 if args.quick else 500)
    if args.quick:
        args.knn_n = min(args.knn_n, n)

    if args.run_method:
        print("RESULT " + json.dumps(run_method(args)), flush=True)
        return 0

    stamp = _dt.datetime.now(_dt.timezone.utc)
    log_path = args.results_dir / f"cpu_large_pool_{stamp:%Y-%m-%d}.log"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    logf = open(log_path, "a")

    def log(msg: str = "") -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    log(f"==== {stamp:%Y-%m-%dT%H:%M:%SZ} {' '.join([sys.executable, *sys.argv])}")
    log(f"load average at start: {_loadavg()} ({os.cpu_count()} cores); {args.note}")
    if not pool_is_ready(args.path, n, args.d, args.clusters, args.seed):
        log(f"writing the pool {args.path}: {n:,} x {args.d} float16 ({n * args.d * 2 / 2**30:.2f} GiB)")
        generate_pool(args.path, n, args.d, args.clusters, args.seed, log=log)
    else:
        log(f"reusing the pool {args.path}")
    meta = json.loads(_meta_path(args.path).read_text())
    log(f"pool: {json.dumps(meta)}")
    if args.generate_only:
        return 0

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    # every child parses the same command line (its --methods is ignored) and runs one method
    child = [sys.executable, str(Path(__file__).resolve()), *(sys.argv[1:] if argv is None else argv)]
    rows = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        if method not in METHODS:
            raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        log(f"-- {method} (load average {_loadavg()})")
        t0 = time.perf_counter()
        proc = subprocess.run([*child, "--run-method", method], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        res = None
        for line in proc.stdout.splitlines():
            if line.startswith("RESULT "):
                res = json.loads(line[len("RESULT "):])
        if proc.returncode != 0 or res is None:
            log(f"   FAILED (rc={proc.returncode}, {wall:.0f} s):\n{proc.stderr[-3000:]}")
            rows.append({"method": method, "N": n, "D": args.d, "dtype": "float16", "note": "FAILED"})
            continue
        rows_used = int(res.get("N", n))  # fl_knn runs on a prefix: compare with what it read
        res["pool_gib"] = round(rows_used * args.d * 2 / 2**30, 3)
        res["pool_f32_gib"] = round(rows_used * args.d * 4 / 2**30, 3)
        res["process_wall_s"] = round(wall, 1)
        log("   " + json.dumps(res))
        rows.append(res)
    cols = ["method", "N", "D", "dtype", "k", "backend", "seconds", "s_per_pick", "peak_rss_gib", "peak_anon_gib",
            "pool_gib", "pool_f32_gib", "note"]
    print_table(rows, cols, title=f"selection from a {n:,} x {args.d} float16 memmap ({args.path})")
    for r in rows:
        logf.write(" | ".join(fmt(r.get(c, "")) for c in cols) + "\n")
    log(f"load average at end: {_loadavg()}")
    if not args.no_csv:
        env_cols = environment("cpu")
        env_cols["threads"] = args.threads
        env_cols["numpy"] = np.__version__
        try:
            import faiss

            env_cols["faiss"] = faiss.__version__
        except ImportError:
            env_cols["faiss"] = "not installed"
        out = append_csv("large_pool", [{c: r.get(c, "") for c in cols} for r in rows], env_cols, args.results_dir)
        log(f"appended {len(rows)} rows to {out}")
    logf.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
