"""Kernels launch on their tensors' GPU, not on the current one: every GPU op on ``cuda:1`` while ``cuda:0`` is
current, against the CPU / torch result (needs two CUDA devices)."""

import numpy as np
import pytest
import torch
from conftest import skip_unavailable

pytestmark = pytest.mark.gpu


@pytest.fixture
def second_gpu():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    torch.cuda.set_device(0)
    return torch.device("cuda:1")


def test_dpp_cuda_on_the_second_device(second_gpu, rng):
    from metamoe.selection import select_dpp

    skip_unavailable("cuda")
    X = rng.standard_normal((3000, 32)).astype(np.float32)
    r = rng.uniform(0.1, 1.0, 3000)
    ref = select_dpp(X, 30, r, ridge=0.01, backend="cpp", progress=False)
    sel = select_dpp(torch.from_numpy(X).to(second_gpu), 30, r, ridge=0.01, backend="cuda", progress=False)
    np.testing.assert_array_equal(sel.indices, ref.indices)
    assert torch.cuda.current_device() == 0


def test_facility_location_cuda_on_the_second_device(second_gpu, rng):
    from metamoe.selection import build_knn_graph, select_facility_location

    skip_unavailable("cuda")
    X = rng.standard_normal((2000, 16)).astype(np.float32)
    g = build_knn_graph(X, 10, method="torch", progress=False)
    ref = select_facility_location(X, 50, graph=g, backend="cpp", progress=False)
    sel = select_facility_location(torch.from_numpy(X).to(second_gpu), 50, graph=g, backend="cuda", progress=False)
    np.testing.assert_array_equal(sel.indices, ref.indices)


def test_moe_and_router_triton_on_the_second_device(second_gpu):
    from metamoe.ops import moe_experts, router_topk

    skip_unavailable("triton")
    g = torch.Generator().manual_seed(0)
    T, d, f, E, k = 64, 64, 96, 8, 2
    logits = torch.randn(T, E, generator=g)
    w_ref, i_ref = router_topk(logits, k, backend="torch")
    w, i = router_topk(logits.to(second_gpu), k, backend="triton")
    assert torch.equal(i.cpu(), i_ref)
    torch.testing.assert_close(w.cpu(), w_ref, rtol=1e-5, atol=1e-6)
    x = torch.randn(T, d, generator=g)
    wgu = torch.randn(E, 2 * f, d, generator=g) / 8
    wd = torch.randn(E, d, f, generator=g) / 8
    y_ref = moe_experts(x, w_ref, i_ref, wgu, wd, backend="torch")
    y = moe_experts(*(t.to(second_gpu) for t in (x, w_ref, i_ref, wgu, wd)), backend="triton")
    torch.testing.assert_close(y.cpu(), y_ref, rtol=1e-4, atol=1e-4)
    assert torch.cuda.current_device() == 0
