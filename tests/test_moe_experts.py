"""moe_experts (torch and triton backends) against an independent float64 dense per-token reference.

Triton runs on the CPU through its interpreter here (TRITON_INTERPRET=1); shapes stay tiny. Tolerances
follow STYLE 5: in float16 / bfloat16 the kernel's error against float64 must be at most about twice the
error of the plain PyTorch path in the same dtype (plus one unit in the last place at the output's scale).
"""

import math

import pytest
import torch

from metamoe.backends import BackendNotSupportedError, availability
from metamoe.ops import moe_experts, moe_experts_ref, moe_routing

ACTS = ("swiglu", "gelu", "gelu_tanh")
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float64: 2.0**-52}
# torch backend vs float64: |err| <= TORCH_TOL[dtype] * max|ref| (a sum of a few dozen products per output)
TORCH_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def _need_triton():
    reason = availability.backend_unavailable_reason("triton")
    if reason:
        pytest.skip(reason)
    if not availability.triton_interpret():
        pytest.skip("these tests run the Triton kernels on CPU tensors, which needs TRITON_INTERPRET=1; the compiled "
                    "kernels are tested on a GPU by the gpu tests and tests/test_kernel_configs.py")


# --------------------------------------------------------------------------- reference


def reference(x, tw, ids, wgu, wd, activation):
    """float64, dense per token: every (token, slot) multiplies by its own gathered expert weights; no sort."""
    x, tw, wgu, wd = (t.double() for t in (x, tw, wgu, wd))
    ids = ids.long()
    a = torch.einsum("td,tknd->tkn", x, wgu[ids])  # (T, k, 2f or f)
    if activation == "swiglu":
        f = a.shape[-1] // 2
        g, u = a[..., :f], a[..., f:]
        h = g / (1.0 + torch.exp(-g)) * u
    elif activation == "gelu":
        h = 0.5 * a * (1.0 + torch.erf(a / math.sqrt(2.0)))
    else:
        h = 0.5 * a * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (a + 0.044715 * a**3)))
    out = torch.einsum("tkf,tkdf->tkd", h, wd[ids])  # (T, k, d)
    return torch.einsum("tk,tkd->td", tw, out)


def make_inputs(T, d, f, E, k, activation="swiglu", dtype=torch.float32, ids=None, seed=0, tw_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g).to(dtype)
    if ids is None:
        scores = torch.rand(T, E, generator=g)
        ids = scores.topk(k, dim=1).indices
    ids = ids.reshape(T, k)
    tw = torch.rand(T, k, generator=g).to(tw_dtype or dtype) + 0.1
    ngu = 2 * f if activation == "swiglu" else f
    wgu = (torch.randn(E, ngu, d, generator=g) / math.sqrt(d)).to(dtype)
    wd = (torch.randn(E, d, f, generator=g) / math.sqrt(f)).to(dtype)
    gy = torch.randn(T, d, generator=g).to(dtype)
    return x, tw, ids, wgu, wd, gy


def run(backend, x, tw, ids, wgu, wd, gy, activation, **kw):
    """Forward + backward; returns (y, (dx, dtw, dwgu, dwd)) detached."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, tw, wgu, wd)]
    xl, twl, wgul, wdl = leaves
    if backend == "ref":
        y = reference(xl, twl, ids, wgul, wdl, activation)
        grads = torch.autograd.grad(y, leaves, gy.double(), allow_unused=True)
    else:
        y = moe_experts(xl, twl, ids, wgul, wdl, activation=activation, backend=backend, **kw)
        assert y.dtype == x.dtype and y.shape == x.shape
        grads = torch.autograd.grad(y, leaves, gy, allow_unused=True)
    grads = tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves))
    return y.detach(), tuple(g.detach() for g in grads)


def _max_err(a, ref):
    return (a.double() - ref).abs().max().item() if ref.numel() else 0.0


def assert_close_to_ref(name, got, ref, tol_abs):
    """Verbose check: first mismatching index, NaN/inf aware."""
    got = got.double()
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if not got.numel():
        return
    bad = ~torch.isfinite(got)
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(f"{name}: non-finite value {got[tuple(idx)].item()} at {idx}")
    err = (got - ref).abs()
    if err.max().item() > tol_abs:
        idx = (err > tol_abs).nonzero()[:5].tolist()
        ex = ", ".join(f"{i}: got {got[tuple(i)].item():.6g} want {ref[tuple(i)].item():.6g}" for i in idx)
        raise AssertionError(f"{name}: max |err| {err.max().item():.3g} > tol {tol_abs:.3g}; first: {ex}")


NAMES = ("y", "dx", "d topk_weights", "d w_gate_up", "d w_down")


def check_backend_vs_ref(backend, inputs, activation, dtype, **kw):
    x, tw, ids, wgu, wd, gy = inputs
    y_ref, g_ref = run("ref", x, tw, ids, wgu, wd, gy, activation)
    y, g = run(backend, x, tw, ids, wgu, wd, gy, activation, **kw)
    if backend == "torch" or dtype == torch.float64:
        for name, got, ref in zip(NAMES, (y,) + g, (y_ref,) + g_ref):
            scale = ref.abs().max().item() if ref.numel() else 0.0
            assert_close_to_ref(name, got, ref, TORCH_TOL[dtype] * max(scale, 1.0))
        return
    # triton: error <= ~2x the plain torch path's error in the same dtype, + 1 ulp at the output's scale
    y_pt, g_pt = run("torch", x, tw, ids, wgu, wd, gy, activation)
    for name, got, pt, ref in zip(NAMES, (y,) + g, (y_pt,) + g_pt, (y_ref,) + g_ref):
        scale = ref.abs().max().item() if ref.numel() else 0.0
        tol = 2.0 * _max_err(pt, ref) + 4.0 * EPS[dtype] * max(scale, 1.0)
        assert_close_to_ref(f"{name} ({backend}, {dtype})", got, ref, tol)


# --------------------------------------------------------------------------- correctness


# gelu_tanh differs from gelu only in the epilogue formula: float32 covers it; low precision is shared
_MAIN = [(b, a, dt) for b in ("torch", "triton") for a in ACTS
         for dt in (torch.float32, torch.bfloat16, torch.float16) if a != "gelu_tanh" or dt == torch.float32]


@pytest.mark.parametrize("backend,activation,dtype", _MAIN)
def test_forward_backward_vs_float64(backend, activation, dtype):
    if backend == "triton":
        _need_triton()
    inputs = make_inputs(40, 48, 40, 8, 2, activation, dtype)
    check_backend_vs_ref(backend, inputs, activation, dtype)


def test_torch_float64(rng):
    inputs = make_inputs(20, 12, 10, 3, 2, "swiglu", torch.float64)
    check_backend_vs_ref("torch", inputs, "swiglu", torch.float64)


def _ids_empty_expert(T, E, k, empty=(1,)):
    keep = [e for e in range(E) if e not in empty]
    g = torch.Generator().manual_seed(3)
    return torch.stack([torch.tensor(keep)[torch.randperm(len(keep), generator=g)[:k]] for _ in range(T)])


EDGE_CASES = {
    # name: (T, d, f, E, k, ids or None)
    "odd_sizes": (37, 17, 13, 5, 3, None),
    "one_expert": (9, 24, 20, 1, 1, None),
    "all_on_one_expert": (40, 16, 24, 4, 1, torch.full((40, 1), 2)),
    "empty_experts": (30, 16, 16, 6, 2, _ids_empty_expert(30, 6, 2, empty=(0, 3, 5))),
    "top_k_equals_E": (12, 16, 16, 3, 3, None),
    "zero_tokens": (0, 16, 16, 4, 2, torch.zeros(0, 2, dtype=torch.int64)),
    "one_token": (1, 16, 8, 4, 2, None),
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_edge_cases(backend, case):
    if backend == "triton":
        _need_triton()
    T, d, f, E, k, ids = EDGE_CASES[case]
    act = "gelu" if case == "odd_sizes" and backend == "torch" else "swiglu"
    inputs = make_inputs(T, d, f, E, k, act, torch.float32, ids=ids, seed=7)
    check_backend_vs_ref(backend, inputs, act, torch.float32)
    if case == "odd_sizes" and backend == "triton":
        inputs = make_inputs(T, d, f, E, k, "gelu", torch.bfloat16, ids=ids, seed=8)
        check_backend_vs_ref(backend, inputs, "gelu", torch.bfloat16)


def test_empty_expert_gets_zero_weight_grads():
    _need_triton()
    x, tw, ids, wgu, wd, gy = make_inputs(30, 16, 16, 6, 2, ids=_ids_empty_expert(30, 6, 2, empty=(0, 3)))
    _, (_, _, dwgu, dwd) = run("triton", x, tw, ids, wgu, wd, gy, "swiglu")
    for e in (0, 3):
        assert dwgu[e].abs().max() == 0 and dwd[e].abs().max() == 0
    assert dwgu[1].abs().max() > 0 and dwd[1].abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_small_tiles_multi_tile_loops(monkeypatch, dtype):
    """16-wide tiles: several column tiles (partial d topk_weights dots added atomically), several K steps and
    several row tiles per expert, with ragged edges everywhere (the tiling logic does not depend on the dtype;
    bfloat16 also covers the interpreter's widened dot)."""
    _need_triton()
    from metamoe.kernels import moe_experts as K

    monkeypatch.setattr(K, "INTERPRET_BLOCKS", {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16})
    monkeypatch.setattr(K, "INTERPRET_WGRAD_BLOCKS", {"BLOCK_M": 16, "BLOCK_N1": 16, "BLOCK_N2": 16})
    inputs = make_inputs(20, 33, 20, 2, 2, "swiglu", dtype, seed=11)
    check_backend_vs_ref("triton", inputs, "swiglu", dtype)


def test_many_experts_schedule_path():
    """E > 64 takes the tl.cumsum branch of the tile -> expert schedule (most experts empty here). Forward only:
    the backward kernels share the same schedule function, and tl.cumsum is slow under the interpreter."""
    _need_triton()
    x, tw, ids, wgu, wd, _ = make_inputs(5, 16, 16, 65, 2, "swiglu", torch.float32, seed=5)
    y = moe_experts(x, tw, ids, wgu, wd, backend="triton")
    torch.testing.assert_close(y.double(), reference(x, tw, ids, wgu, wd, "swiglu"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixed_dtypes_and_noncontiguous(backend):
    """bf16 activations with float32 router weights and int32 ids; x a strided view; w_down a transposed view."""
    if backend == "triton":
        _need_triton()
    x, tw, ids, wgu, wd, gy = make_inputs(24, 32, 16, 4, 2, "swiglu", torch.bfloat16, tw_dtype=torch.float32)
    ids = ids.to(torch.int32)
    wide = torch.zeros(24, 64, dtype=x.dtype)
    wide[:, ::2] = x
    xv = wide[:, ::2]
    wdv = wd.transpose(1, 2).contiguous().transpose(1, 2)  # same values, (E, d, f) with strides of (E, f, d)
    assert not xv.is_contiguous() and not wdv.is_contiguous()
    y = moe_experts(xv, tw, ids, wgu, wdv, backend=backend)
    y_ref = reference(x, tw, ids, wgu, wd, "swiglu")
    y_pt = moe_experts(x, tw, ids, wgu, wd, backend="torch")
    tol = 2 * _max_err(y_pt, y_ref) + 4 * EPS[torch.bfloat16] * y_ref.abs().max().item()
    assert_close_to_ref("y", y, y_ref, tol)
    twl = tw.clone().requires_grad_()
    y = moe_experts(xv, twl, ids, wgu, wdv, backend=backend)
    (dtw,) = torch.autograd.grad(y, twl, gy)
    assert dtw.dtype == torch.float32


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_matches_transformers_mixtral_experts(backend):
    """Same parameters (no copy) as transformers' MixtralExperts, same output."""
    if backend == "triton":
        _need_triton()
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = MixtralConfig(hidden_size=32, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    experts = MixtralExperts(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=g) * 0.2)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=g) * 0.2)
    x = torch.randn(20, 32, generator=g)
    tw, ids = torch.randn(20, 4, generator=g).softmax(-1).topk(2)
    want = experts(x, ids, tw)
    got = moe_experts(x, tw, ids, experts.gate_up_proj, experts.down_proj, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (gw,) = torch.autograd.grad(got.square().sum(), experts.down_proj)
    (ww,) = torch.autograd.grad(want.square().sum(), experts.down_proj)
    torch.testing.assert_close(gw, ww, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- autograd details


def test_frozen_weights_and_partial_grads():
    """LoRA-style use: base weights frozen; only x and topk_weights get gradients, weights none."""
    _need_triton()
    x, tw, ids, wgu, wd, gy = make_inputs(20, 16, 16, 4, 2)
    xl, twl = x.clone().requires_grad_(), tw.clone().requires_grad_()
    y = moe_experts(xl, twl, ids, wgu, wd, backend="triton")
    y.backward(gy)
    assert wgu.grad is None and wd.grad is None
    xr, twr = x.double().requires_grad_(), tw.double().requires_grad_()
    reference(xr, twr, ids, wgu, wd, "swiglu").backward(gy.double())
    torch.testing.assert_close(xl.grad.double(), xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(twl.grad.double(), twr.grad, rtol=1e-5, atol=1e-5)


def test_no_grad_forward_saves_nothing():
    _need_triton()
    x, tw, ids, wgu, wd, _ = make_inputs(20, 16, 16, 4, 2)
    r = moe_routing(ids, 4)
    y, pre = torch.ops.metamoe.moe_experts_fwd(x, tw, r.sorted_pairs, r.offsets, wgu, wd, 2, "swiglu", False)
    assert pre.shape == (0, 32)
    y2, pre2 = torch.ops.metamoe.moe_experts_fwd(x, tw, r.sorted_pairs, r.offsets, wgu, wd, 2, "swiglu", True)
    assert pre2.shape == (40, 32)
    assert torch.equal(y, y2)
    # the saved pre-activations are x[token] @ w_gate_up[expert]^T in expert-sorted order
    tok = r.sorted_pairs // 2
    exp = ids.reshape(-1)[r.sorted_pairs]
    want = torch.einsum("md,mnd->mn", x[tok], wgu[exp])
    torch.testing.assert_close(pre2, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        y3 = moe_experts(x, tw, ids, wgu, wd, backend="triton")
    torch.testing.assert_close(y3, y)


def test_precomputed_routing_is_used():
    x, tw, ids, wgu, wd, _ = make_inputs(20, 16, 16, 4, 2)
    r = moe_routing(ids, 4)
    torch.testing.assert_close(moe_experts(x, tw, ids, wgu, wd, routing=r, backend="torch"),
                               moe_experts(x, tw, ids, wgu, wd, backend="torch"))
    with pytest.raises(ValueError, match="routing does not match"):
        moe_experts(x, tw, ids, wgu, wd, routing=moe_routing(ids[:5], 4), backend="torch")


def test_torch_compile_traces_triton_custom_ops():
    _need_triton()
    x, tw, ids, wgu, wd, gy = make_inputs(24, 16, 16, 4, 2)

    def fn(x, tw, wgu, wd):
        return moe_experts(x, tw, ids, wgu, wd, backend="triton")

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    leaves_c = [t.clone().requires_grad_() for t in (x, tw, wgu, wd)]
    leaves_e = [t.clone().requires_grad_() for t in (x, tw, wgu, wd)]
    yc = compiled(*leaves_c)
    ye = fn(*leaves_e)
    torch.testing.assert_close(yc, ye)
    for a, b in zip(torch.autograd.grad(yc, leaves_c, gy), torch.autograd.grad(ye, leaves_e, gy)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("deterministic", [False, True])
def test_custom_op_opcheck(deterministic):
    """Schema, fake (meta) implementation and autograd registration, checked by torch.library.opcheck."""
    _need_triton()
    x, tw, ids, wgu, wd, gy = make_inputs(12, 16, 16, 3, 2)
    r = moe_routing(ids, 3)
    args = (x.requires_grad_(), tw.requires_grad_(), r.sorted_pairs, r.offsets, wgu.requires_grad_(),
            wd.requires_grad_(), 2, "swiglu", True, deterministic)
    torch.library.opcheck(torch.ops.metamoe.moe_experts_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    with torch.no_grad():
        _, pre = torch.ops.metamoe.moe_experts_fwd(*args)
    for needs in ((True, True, True, True), (True, False, False, True)):
        bwd_args = (gy, x.detach(), tw.detach(), r.sorted_pairs, r.offsets, wgu.detach(), wd.detach(), pre, 2,
                    "swiglu", *needs, deterministic)
        torch.library.opcheck(torch.ops.metamoe.moe_experts_bwd.default, bwd_args,
                              test_utils=("test_schema", "test_faketensor"))


def test_torch_grouped_mm_forward_path_when_it_runs():
    """torch._grouped_mm branch of the torch backend (forward; its CPU backward is not available in torch)."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch has no _grouped_mm")
    x, tw, ids, wgu, wd, _ = make_inputs(30, 32, 16, 4, 2, dtype=torch.bfloat16)
    try:
        with torch.no_grad():
            y = moe_experts_ref(x, tw, ids, wgu, wd, "swiglu", grouped_mm=True)
    except RuntimeError as exc:  # CPU kernels of _grouped_mm are recent
        pytest.skip(f"torch._grouped_mm does not run here: {exc}")
    y_loop = moe_experts_ref(x, tw, ids, wgu, wd, "swiglu", grouped_mm=False)
    y_ref = reference(x, tw, ids, wgu, wd, "swiglu")
    tol = 2 * _max_err(y_loop, y_ref) + 4 * EPS[torch.bfloat16] * y_ref.abs().max().item()
    assert_close_to_ref("y (_grouped_mm)", y, y_ref, tol)


def test_torch_grouped_mm_forced_where_it_cannot_run_names_the_reason():
    """moe_experts_ref(grouped_mm=True) asks torch's grouped_mm through the one capability check."""
    x, tw, ids, wgu, wd, _ = make_inputs(6, 16, 8, 3, 2, dtype=torch.float64)
    with pytest.raises(BackendNotSupportedError, match=r"grouped_mm=True, but torch's grouped_mm cannot run this "
                                                       r"call: .*not float64"):
        moe_experts_ref(x, tw, ids, wgu, wd, "swiglu", grouped_mm=True)
    # None: the fused kernel only (CUDA 9.x/10.x); on the CPU that is the per-expert loop
    if x.device.type == "cpu":
        assert availability.grouped_mm_reasons(x.device, torch.bfloat16, {"d": 16, "f": 8}, fused=True)


# --------------------------------------------------------------------------- dispatch and bad input


def test_dispatch_auto_and_explicit(monkeypatch):
    x, tw, ids, wgu, wd, _ = make_inputs(8, 16, 16, 3, 2)
    from metamoe.backends import CallSpec
    from metamoe.ops.moe_experts import moe_experts_op

    spec = CallSpec("cpu", "float32", {"E": 3})
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert moe_experts_op.select(spec, "auto").backend == "torch"
    with pytest.raises(BackendNotSupportedError, match="TRITON_INTERPRET"):
        moe_experts(x, tw, ids, wgu, wd, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if availability.backend_unavailable_reason("triton") is None:
        # the interpreter runs only when asked for by name; auto keeps torch on the CPU
        assert moe_experts_op.select(spec, "triton").backend == "triton"
        assert moe_experts_op.select(spec, "auto").backend == "torch"
        assert "experts" in " ".join(moe_experts_op.impls["triton"].not_supported_reasons(
            CallSpec("cpu", "float32", {"E": 5000})))
    # float64 is torch-only: auto falls back, explicit triton refuses
    x64, tw64, ids64, wgu64, wd64, _ = make_inputs(8, 16, 16, 3, 2, dtype=torch.float64)
    torch.testing.assert_close(moe_experts(x64, tw64, ids64, wgu64, wd64),
                               reference(x64, tw64, ids64, wgu64, wd64, "swiglu"))
    with pytest.raises(BackendNotSupportedError, match="float64"):
        moe_experts(x64, tw64, ids64, wgu64, wd64, backend="triton")


def _bad_cases():
    x, tw, ids, wgu, wd, _ = make_inputs(8, 16, 12, 4, 2)
    gelu_wgu = wgu[:, :12]
    return {
        "ids_too_high": ((x, tw, ids.clone().fill_(4), wgu, wd), {}, ValueError,
                         r"topk_ids values .*\[0, num_experts=4\)"),
        "ids_negative": ((x, tw, ids - 5, wgu, wd), {}, ValueError, "topk_ids values"),
        "top_k_gt_E": ((x, torch.rand(8, 5), torch.zeros(8, 5, dtype=torch.int64), wgu, wd), {}, ValueError,
                       "top_k .* <= num_experts = 4"),
        "top_k_zero": ((x, torch.rand(8, 0), torch.zeros(8, 0, dtype=torch.int64), wgu, wd), {}, ValueError, "top_k"),
        "float_ids": ((x, tw, ids.float(), wgu, wd), {}, TypeError, "topk_ids must be an integer"),
        "hidden_mismatch_gate_up": ((x, tw, ids, torch.randn(4, 24, 15), wd), {}, ValueError,
                                    "hidden size mismatch.*w_gate_up"),
        "hidden_mismatch_down": ((x, tw, ids, wgu, torch.randn(4, 15, 12)), {}, ValueError,
                                 "hidden size mismatch.*w_down"),
        "ffn_mismatch": ((x, tw, ids, wgu, torch.randn(4, 16, 11)), {}, ValueError, "ffn size mismatch"),
        "gelu_with_swiglu_weights": ((x, tw, ids, wgu, wd), {"activation": "gelu"}, ValueError, "ffn size mismatch"),
        "swiglu_with_gelu_weights": ((x, tw, ids, gelu_wgu, wd), {}, ValueError, "ffn size mismatch"),
        "expert_count_mismatch": ((x, tw, ids, wgu, wd[:3]), {}, ValueError, "w_down has 3 experts"),
        "dtype_mismatch": ((x, tw, ids, wgu.half(), wd), {}, TypeError, "w_gate_up has dtype torch.float16"),
        "dtype_mismatch_down": ((x.double(), tw, ids, wgu.double(), wd), {}, TypeError, "w_down has dtype"),
        "device_mismatch": ((x, tw, ids, wgu.to("meta"), wd), {}, ValueError, "w_gate_up is on device meta"),
        "rank_gate_up": ((x, tw, ids, wgu[0], wd), {}, ValueError, "w_gate_up must have rank 3"),
        "rank_down": ((x, tw, ids, wgu, wd.reshape(4, -1)), {}, ValueError, "w_down must have rank 3"),
        "rank_x": ((x[None], tw, ids, wgu, wd), {}, ValueError, r"x must have shape \(T, d\)"),
        "int_x": ((x.long(), tw, ids, wgu.long(), wd.long()), {}, TypeError, "x must be float"),
        "tokens_mismatch": ((x, tw[:7], ids[:7], wgu, wd), {}, ValueError, "topk_ids has 7 rows"),
        "weights_shape": ((x, tw[:, :1], ids, wgu, wd), {}, ValueError, "topk_weights must have the shape"),
        "weights_int": ((x, tw.long(), ids, wgu, wd), {}, TypeError, "topk_weights must be a floating"),
        "activation": ((x, tw, ids, wgu, wd), {"activation": "relu"}, ValueError, "activation must be one of"),
        "not_tensor": ((x.tolist(), tw, ids, wgu, wd), {}, TypeError, "x must be a torch.Tensor"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_inputs(case):
    args, kw, exc, match = _bad_cases()[case]
    with pytest.raises(exc, match=match):
        moe_experts(*args, backend="torch", **kw)


# --------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_cuda_bf16_no_host_sync(activation):
    x, tw, ids, wgu, wd, gy = (t.cuda() for t in make_inputs(256, 256, 192, 16, 4, activation, torch.bfloat16))
    leaves = [t.clone().requires_grad_() for t in (x, tw, wgu, wd)]
    r = moe_routing(ids, 16)
    y = moe_experts(*leaves[:2], ids, *leaves[2:], activation=activation, backend="triton", routing=r)  # warm-up
    torch.autograd.grad(y, leaves, gy)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        r = moe_routing(ids, 16)
        y = moe_experts(*leaves[:2], ids, *leaves[2:], activation=activation, backend="triton", routing=r)
        grads = torch.autograd.grad(y, leaves, gy)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    y_pt, g_pt = run("torch", x, tw, ids, wgu, wd, gy, activation)
    y_ref, g_ref = run("ref", x, tw, ids, wgu, wd, gy, activation)
    for name, got, pt, ref in zip(NAMES, (y,) + tuple(grads), (y_pt,) + g_pt, (y_ref,) + g_ref):
        tol = 2.0 * _max_err(pt, ref) + 4.0 * EPS[torch.bfloat16] * ref.abs().max().item()
        assert_close_to_ref(name, got.detach(), ref, tol)


@pytest.mark.gpu
def test_cuda_64bit_offsets():
    """x and y hold T*d > 2^31 elements: the rows of the last tokens start past int32 element offsets."""
    free, _ = torch.cuda.mem_get_info()
    T, d, f, E, k = 2**19 + 3, 4096, 64, 2, 2  # tokens >= 2^19 start at element offset >= 2^31
    if free < 24 * 2**30:
        pytest.skip("needs about 24 GiB of free GPU memory")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, generator=g)
    ids = torch.stack([torch.zeros(T, dtype=torch.int64, device="cuda"),
                       torch.ones(T, dtype=torch.int64, device="cuda")], 1)
    tw = torch.full((T, k), 0.5, device="cuda", dtype=torch.bfloat16)
    wgu = torch.randn(E, 2 * f, d, device="cuda", dtype=torch.bfloat16, generator=g) / 64
    wd = torch.randn(E, d, f, device="cuda", dtype=torch.bfloat16, generator=g) / 8
    y = moe_experts(x, tw, ids, wgu, wd, backend="triton")
    tail = slice(T - 5, T)
    want = reference(x[tail].cpu(), tw[tail].cpu(), ids[tail].cpu(), wgu.cpu(), wd.cpu(), "swiglu")
    scale = want.abs().max().item()
    assert (y[tail].double().cpu() - want).abs().max().item() <= 0.05 * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_mode_matches_reference_and_repeats(dtype, monkeypatch):
    """deterministic=True (and torch.use_deterministic_algorithms) sums the k slots in slot order: forward and
    every gradient close to float64 and bit-identical between runs; the weight gradient's row split is off."""
    _need_triton()
    x, tw, ids, wgu, wd, gy = make_inputs(45, 24, 20, 5, 3, "swiglu", dtype)
    first = run("triton", x, tw, ids, wgu, wd, gy, "swiglu", deterministic=True)
    second = run("triton", x, tw, ids, wgu, wd, gy, "swiglu", deterministic=True)
    y_pt, g_pt = run("torch", x, tw, ids, wgu, wd, gy, "swiglu")
    y_ref, g_ref = run("ref", x, tw, ids, wgu, wd, gy, "swiglu")
    for name, a, b, pt, ref in zip(NAMES, (first[0],) + first[1], (second[0],) + second[1], (y_pt,) + g_pt,
                                   (y_ref,) + g_ref):
        assert torch.equal(a, b), f"{name}: deterministic runs differ"
        tol = 2.0 * _max_err(pt, ref) + 4.0 * EPS[dtype] * ref.abs().max().item()
        assert_close_to_ref(name, a, ref, tol)
    from metamoe.kernels import moe_experts as K

    calls = []
    monkeypatch.setattr(K, "weight_grad_split", lambda M, E, N1, N2, det: calls.append(det) or 1)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    third = run("triton", x, tw, ids, wgu, wd, gy, "swiglu")
    assert torch.equal(third[0], first[0]) and all(torch.equal(a, b) for a, b in zip(third[1], first[1]))
    assert calls == [True, True]  # dW_gate_up and dW_down, both without the row split
