"""metamoe.ops.router_topk: the Triton kernels (under TRITON_INTERPRET=1) and the torch path against float64
references (an independent NumPy one for the torch reference itself), gradients, stats, ties, dispatch,
bad inputs and torch.compile."""

import numpy as np
import pytest
import torch

from metamoe.backends import BackendNotSupportedError, CallSpec, availability
from metamoe.ops import RouterStats, router_topk, router_topk_ref
from metamoe.ops.router_topk import router_topk_op

# (order, renormalize): the three distinct behaviours
MODES = [("softmax_then_topk", True), ("softmax_then_topk", False), ("topk_then_softmax", True)]
MODE_IDS = ["stt-renorm", "stt-plain", "tts"]


def _triton_reason():
    spec = CallSpec("cpu", "float32", {"E": 8, "k": 2})
    reasons = router_topk_op.impls["triton"].not_supported_reasons(spec)
    return "; ".join(reasons)


needs_triton = pytest.mark.skipif(bool(_triton_reason()), reason=_triton_reason() or "")


def np_router(x, k, renormalize, order):
    """Independent float64 NumPy reference, row by row: (weights, indices, counts, prob_sum, lse)."""
    with np.errstate(invalid="ignore"):  # an all -inf row gives NaN probabilities, as torch.softmax does
        return _np_router(x, k, renormalize, order)


def _np_router(x, k, renormalize, order):
    x = np.asarray(x, dtype=np.float64)
    T, E = x.shape
    W = np.zeros((T, k))
    I = np.zeros((T, k), dtype=np.int64)
    counts = np.zeros(E, dtype=np.int64)
    psum = np.zeros(E)
    lse = np.zeros(T)
    for t in range(T):
        row = x[t]
        mx = row.max()
        e = np.exp(row - mx)
        lse[t] = -np.inf if mx == -np.inf else mx + np.log(e.sum())  # an all -inf row: lse -inf, p NaN
        p = e / e.sum()
        psum += p
        sel = np.argsort(-row, kind="stable")[:k]  # descending, ties to the lowest index
        I[t] = sel
        counts[sel] += 1
        if order == "topk_then_softmax":
            s = np.exp(row[sel] - row[sel].max())
            W[t] = s / s.sum()
        else:
            W[t] = p[sel] / (p[sel].sum() if renormalize else 1.0)
    return W, I, counts, psum, lse


def assert_close(actual, expected, atol, rtol, what):
    """allclose with a message naming the first mismatching entries (NaN-aware)."""
    a = actual.detach().double().cpu()
    b = expected.detach().double().cpu()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    bad = ~torch.isclose(a, b, atol=atol, rtol=rtol, equal_nan=True)
    if bad.any():
        where = bad.nonzero()[:5].tolist()
        vals = [(tuple(w), float(a[tuple(w)]), float(b[tuple(w)])) for w in where]
        raise AssertionError(f"{what}: {int(bad.sum())} mismatches (atol={atol}, rtol={rtol}), first: {vals}")


def hf_aux_loss(stats):
    """transformers' load_balancing_loss_func for one layer, from the stats: E * sum_e counts_e / T * P_e."""
    T, E = stats.lse.shape[0], stats.counts.shape[0]
    return (stats.counts.to(stats.prob_mean.dtype) / max(T, 1) * stats.prob_mean).sum() * E


def z_loss(stats):
    return stats.lse.square().sum() / max(stats.lse.shape[0], 1)


def loss_terms(w, stats, gw, gl, gp):
    return (w * gw).sum() + (stats.lse * gl).sum() + (stats.prob_mean * gp).sum()


# --------------------------------------------------------------------------- the torch reference itself


@pytest.mark.parametrize("order,renorm", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("T,E,k", [(9, 1, 1), (17, 6, 3), (12, 40, 7), (5, 600, 20)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_torch_ref_matches_numpy(T, E, k, order, renorm, dtype):
    g = torch.Generator().manual_seed(T * 1000 + E)
    x = torch.randn(T, E, generator=g, dtype=torch.float64)
    x[0, : min(E, 4)] = 0.5  # a tie
    x[-1, ::2] = -0.0  # signed zeros tie with zeros
    x[-1, 1::2] = 0.0
    x[min(1, T - 1), -1] = float("-inf")
    x = x.to(dtype)  # bfloat16: many more ties
    w, i, st = router_topk(x, k, renormalize=renorm, order=order, return_stats=True, backend="torch")
    W, I, C, P, L = np_router(x.double().numpy(), k, renorm, order)
    assert w.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and i.dtype == torch.int64
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    np.testing.assert_array_equal(i.numpy(), I)
    np.testing.assert_allclose(w.double().numpy(), W, rtol=rtol, atol=rtol * 1e-2)
    np.testing.assert_array_equal(st.counts.numpy(), C)
    np.testing.assert_allclose(st.prob_sum.double().numpy(), P, rtol=rtol, atol=rtol * 1e-2)
    np.testing.assert_allclose(st.prob_mean.double().numpy(), P / T, rtol=rtol, atol=rtol * 1e-2)
    np.testing.assert_allclose(st.lse.double().numpy(), L, rtol=rtol)


@pytest.mark.parametrize("order,renorm", MODES, ids=MODE_IDS)
def test_torch_path_gradcheck_float64(order, renorm):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)

    def f(x):
        w, _, st = router_topk(x, 3, renormalize=renorm, order=order, return_stats=True, backend="torch")
        return w, st.prob_mean, st.lse

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-8)


# --------------------------------------------------------------------------- triton forward


SHAPES = [(7, 1, 1), (19, 3, 2), (33, 8, 2), (21, 60, 8), (10, 128, 16), (6, 257, 8), (3, 512, 16)]


@needs_triton
@pytest.mark.parametrize("order,renorm", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("T,E,k", SHAPES)
def test_triton_forward_matches_float64(T, E, k, order, renorm):
    g = torch.Generator().manual_seed(T + 7 * E + k)
    x = torch.randn(T, E, generator=g) * 3
    w, i, st = router_topk(x, k, renormalize=renorm, order=order, return_stats=True, backend="triton")
    rw, ri, rst = router_topk_ref(x.double(), k, renormalize=renorm, order=order, return_stats=True)
    assert w.dtype == torch.float32 and i.dtype == torch.int64 and st.counts.dtype == torch.int64
    # the float32 values are exact in float64, so the order (and the tie rule) must agree exactly
    assert torch.equal(i, ri)
    assert_close(w, rw, 2e-6, 1e-5, "weights")
    assert torch.equal(st.counts, rst.counts)
    assert int(st.counts.sum()) == T * k
    assert_close(st.prob_sum, rst.prob_sum, 1e-5, 1e-5, "prob_sum")
    assert_close(st.prob_mean, rst.prob_mean, 1e-6, 1e-5, "prob_mean")
    assert_close(st.lse, rst.lse, 1e-5, 1e-6, "lse")
    if renorm or order == "topk_then_softmax":
        assert_close(w.sum(1), torch.ones(T), 1e-6, 0, "sum of weights")
    assert all(len(set(r)) == k for r in i.tolist()), "indices repeat within a row"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_ties_go_to_lowest_index(dtype):
    g = torch.Generator().manual_seed(11)
    x = torch.randint(0, 3, (24, 12), generator=g).to(dtype)  # lots of exact ties
    x[0] = 1.0  # a row of equal logits
    x[1] = 2.0
    x[1, 5:] = float("-inf")  # masked experts: k covers some -inf lanes
    x[2, ::2] = -0.0  # signed zeros tie
    x[2, 1::2] = 0.0
    for order, renorm in MODES:
        w, i = router_topk(x, 9, renormalize=renorm, order=order, backend="triton")
        rw, ri = router_topk_ref(x.double(), 9, renormalize=renorm, order=order)
        assert torch.equal(i, ri), order
        assert i[0].tolist() == list(range(9))
        assert i[1].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
        assert i[2].tolist() == list(range(9))
        assert_close(w, rw, 2e-6, 1e-5, f"weights ({order})")
    assert float(w[1, 5:].abs().max()) == 0.0  # -inf experts get weight 0


@needs_triton
def test_triton_invariants_one_expert_takes_all_and_empty_experts():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 10, generator=g)
    x[:, 7] += 100.0  # every token's first choice is expert 7
    x[:, 2] -= 100.0  # nobody picks expert 2
    w, i, st = router_topk(x, 2, return_stats=True, backend="triton")
    assert (i[:, 0] == 7).all()
    assert int(st.counts[7]) == 40 and int(st.counts[2]) == 0
    assert int(st.counts.sum()) == 80
    ref_stats = router_topk_ref(x.double(), 2, return_stats=True)[2]
    assert_close(st.prob_sum, ref_stats.prob_sum, 1e-5, 1e-5, "prob_sum")
    # single expert, k = 1: weight 1 everywhere, counts = T
    w1, i1, st1 = router_topk(torch.randn(9, 1), 1, renormalize=False, return_stats=True, backend="triton")
    assert torch.equal(i1, torch.zeros(9, 1, dtype=torch.int64))
    assert_close(w1, torch.ones(9, 1), 1e-7, 0, "single expert weight")
    assert st1.counts.tolist() == [9]


@needs_triton
def test_triton_non_contiguous_logits():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(24, 15, generator=g, requires_grad=True)
    base_r = base.detach().double().requires_grad_()
    x = base.t()[:, ::2]  # (15, 12), strides (1, 30)
    assert x.stride() == (1, 30)
    w, i, st = router_topk(x, 4, return_stats=True, backend="triton")
    rw, ri, rst = router_topk_ref(base_r.t()[:, ::2], 4, return_stats=True)
    assert torch.equal(i, ri)
    assert_close(w, rw, 2e-6, 1e-5, "weights")
    gw = torch.randn(15, 4, generator=g)
    (w * gw).sum().backward()
    (rw * gw.double()).sum().backward()
    assert_close(base.grad, base_r.grad, 1e-6, 1e-5, "d logits")
    # output gradients with stride 0 (what .sum() hands back: expanded scalars)
    base.grad, base_r.grad = None, None
    w, _, st = router_topk(base.t()[:, ::2], 4, renormalize=False, return_stats=True, backend="triton")
    (w.sum() + st.lse.sum()).backward()
    rw, _, rst = router_topk_ref(base_r.t()[:, ::2], 4, renormalize=False, return_stats=True)
    (rw.sum() + rst.lse.sum()).backward()
    assert_close(base.grad, base_r.grad, 1e-6, 1e-5, "d logits from expanded output gradients")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_zero_tokens(backend):
    x = torch.randn(0, 6, requires_grad=True)
    w, i, st = router_topk(x, 2, return_stats=True, backend=backend)
    assert w.shape == (0, 2) and i.shape == (0, 2) and i.dtype == torch.int64
    assert st.counts.tolist() == [0] * 6 and st.lse.shape == (0,)
    assert torch.equal(st.prob_sum, torch.zeros(6)) and torch.equal(st.prob_mean, torch.zeros(6))
    (w.sum() + st.prob_mean.sum() + z_loss(st)).backward()
    assert x.grad.shape == (0, 6)


# --------------------------------------------------------------------------- triton backward


GRAD_SHAPES = [(13, 1, 1), (19, 5, 2), (11, 60, 8), (6, 200, 16)]


@needs_triton
@pytest.mark.parametrize("order,renorm", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("T,E,k", GRAD_SHAPES)
def test_triton_gradients_match_autograd_through_reference(T, E, k, order, renorm):
    g = torch.Generator().manual_seed(T * E + k)
    x = (torch.randn(T, E, generator=g) * 2).requires_grad_()
    xr = x.detach().double().requires_grad_()
    gw, gl, gp = torch.randn(T, k, generator=g), torch.randn(T, generator=g), torch.randn(E, generator=g)
    kw = dict(renormalize=renorm, order=order, return_stats=True)
    w, _, st = router_topk(x, k, backend="triton", **kw)
    rw, _, rst = router_topk_ref(xr, k, **kw)
    loss_terms(w, st, gw, gl, gp).backward()
    loss_terms(rw, rst, gw.double(), gl.double(), gp.double()).backward()
    assert x.grad.dtype == torch.float32
    assert_close(x.grad, xr.grad, 2e-6, 1e-5, "d logits (weights + lse + prob_mean)")


@needs_triton
@pytest.mark.parametrize("order,renorm", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("T,E,k", [(19, 5, 2), (11, 60, 8)])
@pytest.mark.parametrize("source", ["weights", "lse", "prob_sum"])
def test_triton_each_gradient_source_alone(T, E, k, order, renorm, source):
    # the backward kernel specialises on which output gradients are present
    g = torch.Generator().manual_seed(T * E + k)
    x = (torch.randn(T, E, generator=g) * 2).requires_grad_()
    xr = x.detach().double().requires_grad_()
    gw, gl, gp = torch.randn(T, k, generator=g), torch.randn(T, generator=g), torch.randn(E, generator=g)
    kw = dict(renormalize=renorm, order=order, return_stats=True)
    runs = ((x, lambda t: router_topk(t, k, backend="triton", **kw)),
            (xr, lambda t: router_topk_ref(t, k, **kw)))
    for inp, fn in runs:
        ww, _, ss = fn(inp)
        dt = inp.dtype
        terms = {"weights": ww * gw.to(dt), "lse": ss.lse * gl.to(dt), "prob_sum": ss.prob_sum * gp.to(dt)}
        term = terms[source]
        term.sum().backward()
    assert_close(x.grad, xr.grad, 2e-6, 1e-5, f"d logits from {source} only")


@needs_triton
def test_triton_weights_only_gradient_without_stats():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(17, 9, generator=g, requires_grad=True)
    xr = x.detach().double().requires_grad_()
    gw = torch.randn(17, 3, generator=g)
    for renorm in (True, False):
        x.grad, xr.grad = None, None
        w, idx = router_topk(x, 3, renormalize=renorm, backend="triton")
        (w * gw).sum().backward()
        rw, _ = router_topk_ref(xr, 3, renormalize=renorm)
        (rw * gw.double()).sum().backward()
        assert_close(x.grad, xr.grad, 1e-6, 1e-5, f"d logits (renormalize={renorm})")
        if renorm:  # renormalised weights only depend on the selected logits
            sel = torch.zeros_like(x, dtype=torch.bool).scatter_(1, idx, True)
            assert float(x.grad[~sel].abs().max()) == 0.0


# --------------------------------------------------------------------------- half precision (STYLE 5)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("order,renorm", MODES, ids=MODE_IDS)
def test_triton_half_precision_error_at_most_twice_torch(dtype, order, renorm):
    T, E, k = 48, 64, 8
    g = torch.Generator().manual_seed(21)
    x = (torch.randn(T, E, generator=g) * 2).to(dtype)
    gw = torch.randn(T, k, generator=g)
    xr = x.double().requires_grad_()
    rw, ri, rst = router_topk_ref(xr, k, renormalize=renorm, order=order, return_stats=True)
    (rw * gw.double()).sum().backward()

    xk = x.clone().requires_grad_()
    w, i, st = router_topk(xk, k, renormalize=renorm, order=order, return_stats=True, backend="triton")
    (w * gw).sum().backward()
    assert torch.equal(i, ri)
    assert xk.grad.dtype == dtype

    # plain PyTorch in the same dtype, same (exact) selection
    xt = x.clone().requires_grad_()
    if order == "softmax_then_topk":
        p = torch.softmax(xt, dim=-1)
        tw = p.gather(1, ri)
        if renorm:
            tw = tw / tw.sum(-1, keepdim=True)
    else:
        p = torch.softmax(xt, dim=-1)
        tw = torch.softmax(xt.gather(1, ri), dim=-1)
    (tw * gw.to(dtype)).sum().backward()
    t_lse = torch.logsumexp(xt.detach(), dim=-1)
    t_psum = p.detach().sum(0)

    def err(a, b):
        return float((a.detach().double() - b.detach().double()).abs().max())

    # Triton 3.8's interpreter converts float32 -> bfloat16 by truncation (its cast ignores the RTNE default
    # that compiled kernels use), i.e. up to 1 ulp instead of 0.5: allow twice the factor for the one
    # bfloat16 output (d logits) when the kernel runs in the interpreter.
    trunc = dtype == torch.bfloat16 and availability.triton_interpret()
    tiny = 1e-7
    for name, mine, plain, ref in [
        ("weights", w, tw, rw),
        ("d logits", xk.grad, xt.grad, xr.grad),
        ("lse", st.lse, t_lse, rst.lse),
        ("prob_sum", st.prob_sum, t_psum, rst.prob_sum),
    ]:
        factor = 4 if (trunc and name == "d logits") else 2
        e_k, e_t = err(mine, ref), err(plain, ref)
        assert e_k <= factor * e_t + tiny, (
            f"{name}: kernel error {e_k:.3g} > {factor} x torch {dtype} error {e_t:.3g}"
        )


# --------------------------------------------------------------------------- loss helpers


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_stats_feed_transformers_load_balancing_loss(backend):
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(30, 8, generator=g)
    _, _, st = router_topk(x, 2, return_stats=True, backend=backend)
    expected = mixtral.load_balancing_loss_func((x,), num_experts=8, top_k=2)
    assert float(hf_aux_loss(st)) == pytest.approx(float(expected), rel=1e-5)


@needs_triton
def test_triton_auxiliary_losses_equal_torch_path():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(25, 12, generator=g, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    _, _, st = router_topk(x, 3, return_stats=True, backend="triton")
    _, _, rst = router_topk(xr, 3, return_stats=True, backend="torch")
    a = hf_aux_loss(st) + 1e-2 * z_loss(st)
    b = hf_aux_loss(rst) + 1e-2 * z_loss(rst)
    assert float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-5)
    a.backward()
    b.backward()
    assert_close(x.grad, xr.grad, 1e-6, 1e-5, "d logits of the auxiliary losses")


# --------------------------------------------------------------------------- dispatch and bad input


def test_dispatch_falls_back_and_explains(monkeypatch):
    x = torch.randn(4, 600)
    check = router_topk_op.impls["triton"].check  # the shape limits, whatever this machine has
    assert list(check(CallSpec("cuda", "float32", {"E": 512, "k": 16}))) == []
    assert any("E=600" in r and "512" in r for r in check(CallSpec("cuda", "float32", {"E": 600, "k": 2})))
    assert any("k=17" in r and "16" in r for r in check(CallSpec("cuda", "float32", {"E": 64, "k": 17})))
    w, i = router_topk(x, 17)  # auto: beyond the kernel's limits, the torch path runs
    rw, ri = router_topk_ref(x, 17)
    assert torch.equal(i, ri) and torch.equal(w, rw)
    with pytest.raises(BackendNotSupportedError, match="backend 'triton' cannot run router_topk"):
        router_topk(x, 2, backend="triton")
    with pytest.raises(BackendNotSupportedError, match="float64"):
        router_topk(torch.randn(3, 4, dtype=torch.float64), 2, backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(BackendNotSupportedError, match="TRITON_INTERPRET"):
            router_topk(torch.randn(3, 4), 2, backend="triton")
    monkeypatch.setenv("METAMOE_BACKEND", "torch")
    assert router_topk(torch.randn(3, 4), 2)[0].dtype == torch.float32



@pytest.mark.parametrize("order,renorm", MODES, ids=MODE_IDS)
def test_dispatch_runs_the_registered_torch_backend(monkeypatch, order, renorm):
    """router_topk reaches its reference through the registry: the implementation registered as ``torch``."""
    impl = router_topk_op.impls["torch"]
    assert impl.backend == "torch" and router_topk_op.status()[-1][:2] == ("torch", True)
    calls = []
    registered = impl.fn

    def spy(*args):
        calls.append(args[1:])
        return registered(*args)

    monkeypatch.setattr(impl, "fn", spy)
    x = torch.randn(6, 8, requires_grad=True)
    w, i, st = router_topk(x, 3, renormalize=renorm, order=order, return_stats=True, backend="torch")
    assert calls == [(3, renorm, order, True)]
    rw, ri, rst = router_topk_ref(x, 3, renormalize=renorm, order=order, return_stats=True)
    assert torch.equal(i, ri) and torch.equal(w, rw) and torch.equal(st.prob_sum, rst.prob_sum)
    (w.sum() + st.lse.sum()).backward()  # plain autograd through the registered implementation
    assert x.grad is not None and torch.isfinite(x.grad).all()
    router_topk(torch.randn(4, 600), 17)  # auto beyond the Triton kernel's limits: torch again
    monkeypatch.setenv("METAMOE_BACKEND", "torch")  # and through the environment
    router_topk(torch.randn(4, 8), 2)
    assert [c[0] for c in calls] == [3, 17, 2]


@pytest.mark.parametrize(
    "logits,k,kw,exc,match",
    [
        ([[1.0, 2.0]], 1, {}, TypeError, "logits must be a torch.Tensor"),
        (torch.randn(5), 1, {}, ValueError, r"logits must be 2-D \(T, E\)"),
        (torch.randn(2, 3, 4), 1, {}, ValueError, "logits must be 2-D"),
        (torch.ones(3, 4, dtype=torch.int32), 1, {}, TypeError, "logits must have a floating dtype"),
        (torch.randn(3, 4), 0, {}, ValueError, r"k must satisfy 1 <= k <= E .*E=4.*got k=0"),
        (torch.randn(3, 4), 5, {}, ValueError, r"k must satisfy 1 <= k <= E .*E=4.*got k=5"),
        (torch.randn(3, 0), 1, {}, ValueError, r"E=0"),
        (torch.randn(3, 4), 2.5, {}, TypeError, "k must be an integer"),
        (torch.randn(3, 4), True, {}, TypeError, "k must be an integer"),
        (torch.randn(3, 4), 2, {"order": "topk"}, ValueError, "order must be one of"),
        (torch.randn(3, 4), 2, {"renormalize": 1}, TypeError, "renormalize must be a bool"),
        (torch.randn(3, 4), 2, {"return_stats": None}, TypeError, "return_stats must be a bool"),
        (torch.randn(3, 4), 2, {"backend": "cuda"}, BackendNotSupportedError, "has no implementation of"),
        (torch.randn(3, 4), 2, {"backend": "fast"}, ValueError, "backend must be one of"),
    ],
)
def test_bad_inputs(logits, k, kw, exc, match):
    with pytest.raises(exc, match=match):
        router_topk(logits, k, **kw)


def test_kernel_limits_match_the_dispatch_check():
    rk = pytest.importorskip("metamoe.kernels.router_topk")
    from metamoe.ops.router_topk import TRITON_MAX_EXPERTS, TRITON_MAX_K

    assert (rk.MAX_EXPERTS, rk.MAX_K) == (TRITON_MAX_EXPERTS, TRITON_MAX_K)


def test_numpy_integer_k_is_accepted():
    w, i = router_topk(torch.randn(3, 5), np.int64(2), backend="torch")
    assert w.shape == (3, 2)


# --------------------------------------------------------------------------- torch.library / torch.compile


@needs_triton
def test_custom_op_opcheck():
    x = torch.randn(6, 10, requires_grad=True)
    torch.library.opcheck(torch.ops.metamoe.router_topk.default, (x, 3, True, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_torch_compile_traces_through(backend):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(9)
    x = torch.randn(11, 10, generator=g, requires_grad=True)
    coef = torch.randn(3, generator=g)

    def fn(x):
        w, i, st = router_topk(x, 3, return_stats=True, backend=backend)
        return (w * coef).sum() + hf_aux_loss(st) + 1e-2 * z_loss(st), i

    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    y, i = torch.compile(fn, backend=recording, fullgraph=True)(x)
    targets = " ".join(str(n.target) for gm in graphs for n in gm.graph.nodes)
    if backend == "triton":
        assert "metamoe.router_topk" in targets, targets
    y.backward()
    gc = x.grad.clone()
    x.grad = None
    y2, i2 = torch.compile(fn, backend="aot_eager", fullgraph=True)(x)
    y2.backward()
    ga = x.grad.clone()
    x.grad = None
    ye, ie = fn(x)
    ye.backward()
    assert torch.equal(i, ie) and torch.equal(i2, ie)
    y, y2, ye = float(y.detach()), float(y2.detach()), float(ye.detach())
    assert y == pytest.approx(ye, rel=1e-6) and y2 == pytest.approx(ye, rel=1e-6)
    assert_close(gc, x.grad, 1e-6, 1e-5, "compiled (eager) grad")
    assert_close(ga, x.grad, 1e-6, 1e-5, "compiled (aot_eager) grad")


def test_stats_type():
    out = router_topk(torch.randn(4, 6), 2, return_stats=True, backend="torch")
    assert len(out) == 3 and isinstance(out[2], RouterStats)
    assert len(router_topk(torch.randn(4, 6), 2)) == 2


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_nan_logits_rank_first_and_indices_stay_valid(backend):
    x = torch.randn(6, 9, generator=torch.Generator().manual_seed(1))
    x[2, 4] = float("nan")
    w, i, st = router_topk(x, 3, return_stats=True, backend=backend)
    assert int(i[2, 0]) == 4  # like torch.topk, NaN ranks first
    assert bool(((i >= 0) & (i < 9)).all())
    assert bool(torch.isnan(w[2]).all()) and bool(torch.isnan(st.lse[2]))
    keep = torch.arange(6) != 2
    rw, ri = router_topk_ref(x[keep].double(), 3)
    assert torch.equal(i[keep], ri)
    assert_close(w[keep], rw, 2e-6, 1e-5, "weights of the other rows")


_AOT_SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from metamoe.kernels import router_topk as rk

def compile_(fn, sig, consts):
    sig = dict(sig, **{k: "constexpr" for k in consts})
    k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4})
    assert len(k.asm["cubin"]) > 0

for dt, E, K, BT in (("bf16", 60, 8, 32), ("fp32", 512, 16, 4)):
    BE, BK = triton.next_power_of_2(E), triton.next_power_of_2(K)
    compile_(rk._router_topk_fwd_kernel,
             dict(x_ptr="*" + dt, w_ptr="*fp32", idx_ptr="*i64", lse_ptr="*fp32", pcount_ptr="*i32",
                  pprob_ptr="*fp32", T="i32", E="i32", stride_xt="i32", stride_xe="i32"),
             dict(K=K, BLOCK_T=BT, BLOCK_E=BE, BLOCK_K=BK, NORMALIZE=dt == "fp32", STATS=True))
    compile_(rk._router_topk_bwd_kernel,
             dict(x_ptr="*" + dt, lse_ptr="*fp32", w_ptr="*fp32", idx_ptr="*i64", gw_ptr="*fp32",
                  glse_ptr="*fp32", gpsum_ptr="*fp32", dx_ptr="*" + dt, T="i32", E="i32", stride_xt="i32",
                  stride_xe="i32", stride_dt="i32", stride_de="i32", stride_gwt="i32", stride_gwk="i32",
                  stride_glse="i32"),
             dict(K=K, BLOCK_T=BT, BLOCK_E=BE, BLOCK_K=BK, NORMALIZE=dt == "fp32", HAS_GW=True, HAS_GLSE=True,
                  HAS_GPSUM=True, NEED_P=True))
compile_(rk._router_topk_stats_kernel,
         dict(pcount_ptr="*i32", pprob_ptr="*fp32", counts_ptr="*i64", psum_ptr="*fp32", P="i32", E="i32"),
         dict(BLOCK_P=32, BLOCK_E=64))
print("compiled")
'''


def test_kernels_compile_for_sm90_without_a_gpu():
    # The interpreter never runs the GPU compiler: compile every kernel ahead of time for Hopper (sm_90,
    # ptxas included), which catches what only the real backend rejects. In a subprocess, because under
    # TRITON_INTERPRET=1 @triton.jit yields interpreter functions that cannot be compiled.
    pytest.importorskip("triton")
    from conftest import run_python

    env = {"TRITON_INTERPRET": "0"}
    out = run_python(_AOT_SCRIPT, env_extra=env, timeout=240)
    if "No module named 'triton.backends" in out.stderr or "cannot import name" in out.stderr:
        pytest.skip(f"this Triton has no ahead-of-time compile API: {out.stderr.strip().splitlines()[-1]}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("compiled")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("order,renorm", MODES, ids=MODE_IDS)
def test_cuda_triton_matches_float64(dtype, order, renorm):
    spec = CallSpec("cuda", "float32", {"E": 130, "k": 8})
    reasons = router_topk_op.impls["triton"].not_supported_reasons(spec)
    if reasons:
        pytest.skip("; ".join(reasons))
    g = torch.Generator(device="cuda").manual_seed(0)
    T, E, k = 4099, 130, 8
    x = (torch.randn(T, E, device="cuda", generator=g) * 2).to(dtype).requires_grad_()
    xr = x.detach().double().requires_grad_()
    gw = torch.randn(T, k, device="cuda", generator=g)
    gl, gp = torch.randn(T, device="cuda", generator=g), torch.randn(E, device="cuda", generator=g)
    kw = dict(renormalize=renorm, order=order, return_stats=True)
    w, i, st = router_topk(x, k, backend="triton", **kw)
    rw, ri, rst = router_topk_ref(xr, k, **kw)
    assert torch.equal(i, ri) and torch.equal(st.counts, rst.counts)
    assert_close(w, rw, 2e-6, 1e-5, "weights")
    assert_close(st.prob_sum, rst.prob_sum, 1e-3, 1e-5, "prob_sum")
    assert_close(st.lse, rst.lse, 1e-5, 1e-6, "lse")
    loss_terms(w, st, gw, gl, gp).backward()
    loss_terms(rw, rst, gw.double(), gl.double(), gp.double()).backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close(x.grad, xr.grad, tol, tol, "d logits")


@needs_triton
@pytest.mark.parametrize("stats", [False, True])
def test_eager_path_and_custom_op_give_the_same_results_and_gradients(stats):
    """Eager calls run the launchers under a torch.autograd.Function; torch.compile traces the custom op.
    Both give the same outputs and the same gradient for every differentiable output."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(37, 12, generator=g)
    gw = torch.randn(37, 3, generator=g)
    outs, grads = [], []
    for path in ("eager", "custom_op"):
        xl = x.clone().requires_grad_()
        if path == "eager":
            w, i, st = router_topk(xl, 3, return_stats=True, backend="triton")
            lse, psum = st.lse, st.prob_sum
        else:
            w, i, lse, psum, _ = torch.ops.metamoe.router_topk(xl, 3, True, True)
        loss = (w * gw).sum() + (lse.square().sum() + psum.square().sum() if stats else 0.0)
        grads.append(torch.autograd.grad(loss, xl)[0])
        outs.append((w.detach(), i, lse.detach(), psum.detach()))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert torch.equal(grads[0], grads[1])


def test_host_overhead_bench_runs_and_restores_the_launchers():
    from benchmarks import bench_router_topk_overhead as B
    from metamoe.kernels import router_topk as K

    before = (K.router_topk_triton, K.router_topk_backward_triton)
    rows = B.run(64, 8, 2, warmup=1, rep=3)
    assert [r["entry"] for r in rows][:2] == ["launcher stub", "custom op"]
    assert all(r["median_us"] > 0 for r in rows) and rows[0]["overhead_us"] == 0
    assert (K.router_topk_triton, K.router_topk_backward_triton) == before
