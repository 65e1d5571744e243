"""The ops' benchmarks as pytest-benchmark tests (shapes and peers: benchmarks/cases.py).

Each test times one implementation at one shape and then checks the result of the timed call against the
reference peer's (cases' ``reference``), so a broken fast path cannot produce a fast number. CPU tests use
the ``quick`` shapes; tests marked ``gpu`` use the ``gpu`` shapes and skip at run time where torch sees no
CUDA device. Triton implementations run only on a GPU: on the CPU Triton runs only in its interpreter,
whose times say nothing about the kernels.

    make bench-quick BENCH_JSON=out.json                        # the CPU half, JSON + autosave
    .venv/bin/pytest benchmarks/suite -m gpu --benchmark-only   # the GPU half (CUDA machine)
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from benchmarks.cases import (
    DPP,
    FACILITY_LOCATION,
    KNN_GRAPH,
    MOE,
    MOE_MODES,
    PATCH_MOE,
    PATCH_MOE_MODES,
    ROUTER,
)

CPU_ROUNDS = {"router_topk": 50, "moe": 20, "patch_moe": 10, "dpp": 5, "facility_location": 5, "knn_graph": 3}
GPU_ROUNDS = {"router_topk": 100, "moe": 10, "patch_moe": 5, "dpp": 3, "facility_location": 3, "knn_graph": 2}


def _sid(shape) -> str:
    return "-".join(f"{k}{v}" for k, v in shape.items() if not isinstance(v, dict))


def params(cases, impls_cpu, impls_gpu, modes=(None,)):
    """pytest params (device, shape, impl, mode): quick shapes on the CPU, gpu shapes (marked gpu) on CUDA."""
    out = []
    for dev, shapes, impls in (("cpu", cases.quick, impls_cpu), ("cuda", cases.gpu, impls_gpu)):
        marks = (pytest.mark.gpu,) if dev == "cuda" else ()
        for shape in shapes:
            for impl in impls:
                for mode in modes:
                    ident = "-".join(filter(None, [dev, impl, mode, _sid(shape)]))
                    out.append(pytest.param(dev, dict(shape), impl, mode, marks=marks, id=ident))
    return out


def need(device: str):
    """Skip (at run time) unless ``device`` is usable."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (none visible)")


def synced(fn, device):
    """``fn`` followed by a device synchronisation on CUDA (pytest-benchmark times with a host clock)."""
    if not device.startswith("cuda"):
        return fn
    import torch

    def call():
        out = fn()
        torch.cuda.synchronize()
        return out

    return call


def run(benchmark, fn, device, op, setup=None, **info):
    rounds = (GPU_ROUNDS if device.startswith("cuda") else CPU_ROUNDS)[op]
    benchmark.group = op
    benchmark.extra_info.update({"device": device, **{k: v for k, v in info.items() if v is not None}})
    return benchmark.pedantic(synced(fn, device), setup=setup, rounds=rounds, iterations=1, warmup_rounds=1)


# --------------------------------------------------------------------------- router top-k


@pytest.mark.parametrize("device,shape,impl,mode",
                         params(ROUTER, ["torch-eager", "metamoe-torch"], list(ROUTER.peers)))
def test_router_topk(benchmark, device, shape, impl, mode, torch_threads):
    need(device)
    import torch

    from benchmarks.bench_router_topk import check_against_eager, eager_router
    from metamoe.ops import router_topk

    T, E, k = shape["T"], shape["E"], shape["k"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T, E, device=device, generator=g).to(dtype)
    if impl == "torch-eager":
        fn = lambda: eager_router(x, k)  # noqa: E731
    else:
        backend = impl.split("-", 1)[1]
        fn = lambda: router_topk(x, k, backend=backend)  # noqa: E731
    out = run(benchmark, fn, device, "router_topk", impl=impl, threads=torch_threads, **shape)
    assert check_against_eager(out, x, k) == ""


# --------------------------------------------------------------------------- MoE experts


@functools.lru_cache(maxsize=4)
def moe_inputs(device, E, k, d, f, T):
    import torch

    from metamoe.ops.moe_experts import moe_experts_ref

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T, d, device=device, dtype=dtype, generator=g)
    tw, ids = torch.randn(T, E, device=device, generator=g).softmax(-1).topk(k, dim=-1)
    tw = (tw / tw.sum(-1, keepdim=True)).to(dtype)
    wgu = (torch.randn(E, 2 * f, d, device=device, generator=g) / d**0.5).to(dtype)
    wd = (torch.randn(E, d, f, device=device, generator=g) / f**0.5).to(dtype)
    gy = torch.randn(T, d, device=device, dtype=dtype, generator=g)
    xr = x.detach().clone().requires_grad_()
    y_ref = moe_experts_ref(xr, tw, ids, wgu, wd, grouped_mm=False)
    y_ref.backward(gy)
    return x, tw, ids, wgu, wd, gy, y_ref.detach().float(), xr.grad.float()


@pytest.mark.parametrize("device,shape,impl,mode",
                         params(MOE, ["hf-eager", "hf-grouped_mm", "metamoe-torch"], list(MOE.peers), MOE_MODES))
def test_moe_experts(benchmark, device, shape, impl, mode, torch_threads):
    need(device)
    import torch

    from benchmarks.bench_moe_experts import make_impls, rel_tolerance

    E, k, d, f, T = shape["E"], shape["k"], shape["d"], shape["f"], shape["T"]
    x, tw, ids, wgu, wd, gy, y_ref, dx_ref = moe_inputs(device, E, k, d, f, T)
    impls, skipped = make_impls([impl], torch.device(device), d, f, x.dtype)
    if impl in skipped:
        pytest.skip(f"{impl}: {skipped[impl]}")
    fn = impls[impl](wgu, wd)
    xg = x.detach().clone().requires_grad_(mode == "fwd+bwd")

    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fn(x, tw, ids), None
        setup = None
    else:
        def call():
            y = fn(xg, tw, ids)
            y.backward(gy)
            return y.detach(), xg.grad

        def setup():
            xg.grad = None

    y, dx = run(benchmark, call, device, "moe", setup=setup, impl=impl, mode=mode, threads=torch_threads, **shape)
    tol = rel_tolerance(x.dtype)
    assert float((y.float() - y_ref).abs().max()) <= tol * float(y_ref.abs().max())
    if dx is not None:
        assert float((dx.float() - dx_ref).abs().max()) <= tol * float(dx_ref.abs().max())


# --------------------------------------------------------------------------- patch_moe (whole model)


@pytest.mark.parametrize("device,shape,impl,mode",
                         params(PATCH_MOE, list(PATCH_MOE.peers), list(PATCH_MOE.peers), PATCH_MOE_MODES))
def test_patch_moe(benchmark, device, shape, impl, mode, torch_threads):
    need(device)
    import torch

    from benchmarks.bench_patch_moe import build_model, grad_rel_err, rel_err, rel_tolerance, use_impl

    dtype = torch.bfloat16
    model = build_model(shape, dtype, device)
    g = torch.Generator(device=device).manual_seed(2)
    ids = torch.randint(3, shape["vocab"], (shape["batch"], shape["seq"]), generator=g, device=device)
    train = mode == "fwd+bwd"
    model.train(train)

    def call():
        if train:
            out = model(input_ids=ids, labels=ids, use_cache=False)
            out.loss.backward()
            return out.logits.detach().float()
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits.float()

    def setup():
        model.zero_grad(set_to_none=True)

    use_impl(model, "hf-eager")  # the reference: the unpatched model, transformers' per-expert loop
    setup()
    ref = call()
    ref_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    use_impl(model, impl)
    logits = run(benchmark, call, device, "patch_moe", setup=setup, impl=impl, mode=mode,
                 threads=torch_threads, **shape)
    assert rel_err(logits, ref) <= rel_tolerance(dtype, "logits")
    if train:
        assert grad_rel_err(model, ref_grads) <= rel_tolerance(dtype, "grads")


# --------------------------------------------------------------------------- DPP


@functools.lru_cache(maxsize=2)
def dpp_data(device, N, D, k):
    from benchmarks.bench_dpp import make_data
    from metamoe.selection import select_dpp

    X, r = make_data(N, D)
    ref = select_dpp(X, k, r, ridge=1e-3, backend="torch", progress=False).indices
    return X, r, ref


@pytest.mark.parametrize("device,shape,impl,mode", params(DPP, ["cpp", "torch"], ["cuda", "torch"]))
def test_dpp(benchmark, device, shape, impl, mode, torch_threads):
    need(device)
    import torch

    from metamoe.backends import availability
    from metamoe.selection import select_dpp

    why = availability.backend_unavailable_reason(impl)
    if why:
        pytest.skip(f"{impl}: {why}")
    N, D, k = shape["N"], shape["D"], shape["k"]
    X, r, ref = dpp_data(device, N, D, k)
    inp = torch.from_numpy(X).to(device) if device == "cuda" else X
    out = run(benchmark, lambda: select_dpp(inp, k, r, ridge=1e-3, backend=impl, progress=False), device, "dpp",
              impl=impl, threads=torch_threads, N=N, D=D, k=k)
    np.testing.assert_array_equal(out.indices, ref)


# --------------------------------------------------------------------------- facility location


@functools.lru_cache(maxsize=2)
def fl_data(n, d, K, k):
    from benchmarks.bench_facility_location import blobs
    from metamoe.selection import build_knn_graph, select_facility_location

    X = blobs(n, d, 100, 0)
    graph = build_knn_graph(X, K, progress=False)
    ref = select_facility_location(X, k, graph=graph, backend="torch", progress=False)
    return X, graph, ref


@pytest.mark.parametrize("device,shape,impl,mode", params(FACILITY_LOCATION, ["cpp", "torch"], ["cuda", "torch"]))
def test_facility_location(benchmark, device, shape, impl, mode, torch_threads):
    need(device)
    import torch

    from metamoe.backends import availability
    from metamoe.selection import select_facility_location

    why = availability.backend_unavailable_reason(impl)
    if why:
        pytest.skip(f"{impl}: {why}")
    n, d, K, k = shape["n"], shape["d"], shape["neighbors"], shape["k"]
    X, graph, ref = fl_data(n, d, K, k)
    inp = torch.from_numpy(X).to(device) if device == "cuda" else X
    out = run(benchmark, lambda: select_facility_location(inp, k, graph=graph, backend=impl, progress=False),
              device, "facility_location", impl=impl, threads=torch_threads, n=n, d=d, neighbors=K, k=k)
    np.testing.assert_array_equal(out.indices, ref.indices)
    assert abs(out.objective - ref.objective) <= 1e-9 * abs(ref.objective)


# --------------------------------------------------------------------------- kNN graph


@functools.lru_cache(maxsize=2)
def knn_data(device, N, D, K):
    from benchmarks.cases import clustered_torch
    from metamoe.selection import build_knn_graph

    X = clustered_torch(N, D, device=device)
    ref = build_knn_graph(X, K, method="torch", progress=False)
    return X, ref


@pytest.mark.parametrize("device,shape,impl,mode",
                         params(KNN_GRAPH, ["torch-exact", "faiss-flat"], ["torch-exact", "faiss-gpu-flat"]))
def test_knn_graph(benchmark, device, shape, impl, mode, torch_threads):
    need(device)
    from benchmarks.bench_knn_graph import METHOD_OF, SIM_TOL, graph_sims, peers_for
    from metamoe.selection import build_knn_graph

    why = dict(peers_for(device)).get(impl, "")
    if why:
        pytest.skip(f"{impl}: {why}")
    N, D, K = shape["N"], shape["D"], shape["K"]
    X, ref = knn_data(device, N, D, K)
    out = run(benchmark, lambda: build_knn_graph(X, K, method=METHOD_OF[impl], progress=False), device,
              "knn_graph", impl=impl, threads=torch_threads, N=N, D=D, K=K)
    assert float(np.abs(graph_sims(out) - graph_sims(ref)).max()) <= SIM_TOL
