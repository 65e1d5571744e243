"""Every autotune config of every MoE grouped-GEMM kernel, pinned one at a time, against float64 references.

Each launcher of ``metamoe.kernels.moe_experts`` (gather forward, scatter, gather backward, weight
gradient) runs with one config of its autotune list pinned (``config=``), in float32, bfloat16 and float16,
on routings with an empty expert and with every token on one expert, and at ragged sizes. The reference is
the launcher's contract computed in float64 torch, row by row, from the same (rounded) inputs. A config the
shared-memory pruning rejects is reported as skipped with the pruning's reason, never as a failure.

On a GPU (``gpu`` marker; what ``make gpu-check`` runs) every config is compiled and checked. Under
``TRITON_INTERPRET=1`` (``make test``) the smallest config of each kernel runs, so the sweep itself is
checked on the CPU before a GPU sees it.
"""

import math

import pytest
import torch

triton = pytest.importorskip("triton")
K = pytest.importorskip("metamoe.kernels.moe_experts")

from metamoe.backends import availability  # noqa: E402
from metamoe.ops import moe_routing  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
ACC = 2.0 * 2.0**-24  # per-term float32 accumulation error (of the sum of |products|)
MATH = 16 * 2.0**-24  # float32 elementwise activation maths (exp, erf, sigmoid), relative
E = 4
# (name, T, d, f, routing): "empty" leaves expert 3 without rows; "one" sends every token's first pick to
# expert 0 (one long segment of many row tiles). "regular" sizes are multiples of 16 (the JIT's divisibility
# specialisation: the vectorised, pipelined code); "ragged" sizes are odd (masked loads).
CASES = {
    "regular": (300, 64, 128),
    "ragged": (37, 61, 45),
}
ROUTINGS = ("empty", "one")


def _variants(kernel):
    """(variant id, dict) of the constexpr variants that change a kernel's code."""
    if kernel in ("gather_fwd", "gather_bwd"):
        return [("swiglu", {"activation": "swiglu"}), ("gelu", {"activation": "gelu"})]
    if kernel == "scatter":
        return [("down-k2", {"top_k": 2, "transposed": False}), ("dx-k2", {"top_k": 2, "transposed": True}),
                ("down-k1", {"top_k": 1, "transposed": False})]
    return [("dw_gate_up", {"side": "gate_up"}), ("dw_down", {"side": "down"}),
            ("dw_down-split3", {"side": "down", "split": 3})]


def _params():
    interpret = availability.triton_interpret()
    out = []
    for kernel, configs in K.KERNEL_CONFIGS.items():
        smallest = min(range(len(configs)), key=lambda i: math.prod(configs[i].kwargs.values()))
        for ci, _cfg in enumerate(configs):
            for dname in DTYPES:
                for vname, variant in _variants(kernel):
                    for case in CASES:
                        if case == "ragged" and dname != "bf16":
                            continue  # ragged sizes: one dtype keeps the sweep's compile count down
                        marks = [] if (interpret and ci == smallest) else [pytest.mark.gpu]
                        pid = f"{kernel}-c{ci}-{dname}-{vname}-{case}"
                        out.append(pytest.param(kernel, ci, dname, variant, case, id=pid, marks=marks))
    return out


def _device():
    if availability.triton_interpret():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("compiled Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on the CPU)")
    return torch.device("cuda")


def _routing(T, k, kind, g):
    scores = torch.rand(T, E, generator=g)
    if kind == "empty":
        scores[:, E - 1] = -1.0
    else:
        scores[:, 0] = 2.0
    ids = scores.topk(k, dim=1).indices
    return ids, moe_routing(ids, E)


def _act(a, activation):
    if activation == "swiglu":
        f = a.shape[-1] // 2
        g, u = a[..., :f], a[..., f:]
        return g * torch.sigmoid(g) * u
    return 0.5 * a * (1.0 + torch.erf(a / math.sqrt(2.0)))


def _act_grad(a, dh, activation):
    """d pre from d h (float64)."""
    if activation == "swiglu":
        f = a.shape[-1] // 2
        g, u = a[..., :f], a[..., f:]
        s = torch.sigmoid(g)
        return torch.cat([dh * u * (s + g * s * (1 - s)), dh * g * s], dim=-1)
    cdf = 0.5 * (1.0 + torch.erf(a / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
    return dh * (cdf + a * pdf)


def _rows(routing, k):
    """Per sorted row i: (pair p, token t, expert e), float64-friendly int64 tensors on the CPU."""
    pairs = routing.sorted_pairs.cpu()
    offs = routing.offsets.cpu()
    experts = torch.repeat_interleave(torch.arange(E), offs[1:] - offs[:-1])
    return pairs, pairs // k, experts


def _check(name, got, want, bound):
    got = got.detach().double().cpu()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values at {(~torch.isfinite(got)).nonzero()[:5].tolist()}"
    err = (got - want).abs()
    if err.numel() and err.max().item() > bound:
        where = (err > bound).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: max |err| {err.max().item():.3e} > {bound:.3e}; first at {where}")


def _bound(dtype, out_dtype, ref, depth, absprod):
    """Output rounding (out dtype) at the reference's scale + float32 accumulation over ``depth`` terms."""
    scale = ref.abs().max().item() if ref.numel() else 0.0
    acc = absprod.max().item() if absprod.numel() else 0.0
    return 4.0 * EPS[out_dtype] * scale + ACC * depth * acc + 1e-30


@pytest.mark.parametrize("kernel,ci,dname,variant,case", _params())
def test_pinned_config_matches_float64(kernel, ci, dname, variant, case):
    dev = _device()
    dtype = DTYPES[dname]
    cfg = K.KERNEL_CONFIGS[kernel][ci]
    act = variant.get("activation")
    prec = K._dot_prec(dtype)
    _, kept, reason = next(c for c in K.configs_for(kernel, dtype, act, prec) if c[0] is cfg)
    if not kept:
        pytest.skip(f"pruned: {reason}")
    T, d, f = CASES[case]
    k = variant.get("top_k", 2)
    for kind in ROUTINGS:
        g = torch.Generator().manual_seed(1000 * ci + 7 * T + len(dname) + len(kind))
        _run_case(kernel, cfg, dtype, variant, T, d, f, k, kind, dev, g)


def _run_case(kernel, cfg, dtype, variant, T, d, f, k, kind, dev, g):
    act = variant.get("activation")
    ids, routing = _routing(T, k, kind, g)
    if kind == "empty":
        assert routing.offsets[E - 1].item() == routing.offsets[E].item(), "expert E-1 should own no rows"
    else:
        assert routing.offsets[1].item() - routing.offsets[0].item() == T, "expert 0 should own every token"
    pairs, toks, experts = _rows(routing, k)
    M = T * k
    sp, offs = routing.sorted_pairs.to(dev), routing.offsets.to(dev)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    if kernel == "gather_fwd":
        ngu = 2 * f if act == "swiglu" else f
        x, wgu = rnd(T, d), rnd(E, ngu, d, scale=d**-0.5)
        h, pre = K.moe_gather_gemm_fwd(x.to(dev), wgu.to(dev), sp, offs, k, f, act, True, config=cfg)
        x64, w64 = x.double(), wgu.double()
        a = torch.einsum("md,mnd->mn", x64[toks], w64[experts])
        absprod = torch.einsum("md,mnd->mn", x64[toks].abs(), w64[experts].abs())
        _check("pre", pre, a, _bound(dtype, dtype, a, d, absprod))
        h_ref = _act(a, act)
        # accumulation error of A, carried through the activation (|d h / d A| per element), + rounding of h
        dacc = ACC * d * absprod
        if act == "swiglu":
            gate, up = a[:, :f], a[:, f:]
            sg = torch.sigmoid(gate)
            carried = (up * (sg + gate * sg * (1 - sg))).abs() * dacc[:, :f] + (gate * sg).abs() * dacc[:, f:]
        else:
            carried = _act_grad(a, torch.ones_like(a), act).abs() * dacc
        _check("h", h, h_ref, (4.0 * EPS[dtype] + MATH) * h_ref.abs().max().item() + carried.max().item())
    elif kernel == "scatter":
        a_in = rnd(M, d)
        if variant["transposed"]:
            w = rnd(E, d, f, scale=d**-0.5)
            scale = None
            wb = w.double()  # B_e = w[e]: (d, f)
        else:
            w = rnd(E, f, d, scale=d**-0.5)
            scale = (torch.rand(M, generator=g) + 0.1).to(dtype)
            wb = w.double().transpose(1, 2)  # B_e = w[e]^T: (d, f)
        out = K.moe_scatter_gemm(a_in.to(dev), w.to(dev), variant["transposed"], sp, offs, k, T,
                                 scale=None if scale is None else scale.to(dev), config=cfg)
        rows = torch.einsum("md,mdn->mn", a_in.double(), wb[experts])
        absprod = torch.einsum("md,mdn->mn", a_in.double().abs(), wb[experts].abs())
        if scale is not None:
            s = scale.double()[pairs][:, None]
            rows, absprod = rows * s, absprod * s.abs()
        want = torch.zeros(T, f, dtype=torch.float64).index_add_(0, toks, rows)
        absw = torch.zeros(T, f, dtype=torch.float64).index_add_(0, toks, absprod)
        assert out.dtype == torch.float32
        _check("out", out, want, _bound(dtype, torch.float32, want, d * k, absw))
    elif kernel == "gather_bwd":
        ngu = 2 * f if act == "swiglu" else f
        dy, wd = rnd(T, d), rnd(E, d, f, scale=d**-0.5)
        pre = rnd(M, ngu)
        scale = (torch.rand(M, generator=g) + 0.1).to(dtype)
        da, h, dw = K.moe_gather_gemm_bwd(dy.to(dev), wd.to(dev), sp, offs, scale.to(dev), pre.to(dev), k, act,
                                          config=cfg)
        gg = torch.einsum("md,mdf->mf", dy.double()[toks], wd.double()[experts])
        absprod = torch.einsum("md,mdf->mf", dy.double()[toks].abs(), wd.double()[experts].abs())
        pre64 = pre.double()
        h_ref = _act(pre64, act)
        s = scale.double()[pairs][:, None]
        da_ref = _act_grad(pre64, gg * s, act)
        dw_ref = (gg * h_ref).sum(1)
        # G's error: float32 accumulation, then G is rounded to the operand dtype between the two kernels
        dacc = ACC * d * absprod + EPS[dtype] * gg.abs()
        coef = _act_grad(pre64, torch.ones_like(gg), act).abs()  # |d dA / d G| / |w[p]| per element
        carried = coef * torch.cat([dacc, dacc], 1) if act == "swiglu" else coef * dacc
        _check("h", h, h_ref, (4.0 * EPS[dtype] + MATH) * h_ref.abs().max().item() + 1e-30)
        _check("dA", da, da_ref, (4.0 * EPS[dtype] + MATH) * da_ref.abs().max().item()
               + (carried * s.abs()).max().item())
        _check("d topk_weights", dw, dw_ref, (dacc * h_ref.abs()).sum(1).max().item()
               + (ACC * f + MATH) * (gg.abs() * h_ref.abs()).sum(1).max().item())
    else:
        if variant["side"] == "gate_up":  # dW_gate_up[e] = sum dA[i]^T x[t]
            n1, n2 = 2 * f, d
            left, right = rnd(M, n1), rnd(T, n2)
            l_gather, r_gather, scale = False, True, None
        else:  # dW_down[e] = sum (w[p] dy[t])^T h[i]
            n1, n2 = d, f
            left, right = rnd(T, n1), rnd(M, n2)
            l_gather, r_gather = True, False
            scale = (torch.rand(M, generator=g) + 0.1).to(dtype)
        out = K.moe_weight_grad(left.to(dev), l_gather, right.to(dev), r_gather, sp, offs, k, (E, n1, n2), dtype,
                                scale=None if scale is None else scale.to(dev), config=cfg,
                                split=variant.get("split"))
        L = left.double()[toks] if l_gather else left.double()
        R = right.double()[toks] if r_gather else right.double()
        if scale is not None:
            L = L * scale.double()[pairs][:, None]
        want = torch.zeros(E, n1, n2, dtype=torch.float64)
        absw = torch.zeros(E, n1, n2, dtype=torch.float64)
        want.index_add_(0, experts, torch.einsum("mi,mj->mij", L, R))
        absw.index_add_(0, experts, torch.einsum("mi,mj->mij", L.abs(), R.abs()))
        # L times scale is rounded to the operand dtype inside the kernel before the dot
        _check("dW", out, want, _bound(dtype, dtype, want, M, absw) + 2.0 * EPS[dtype] * absw.max().item())


# --------------------------------------------------------------------------- schedule, determinism, tuning keys


@pytest.mark.skipif(not availability.triton_interpret(), reason="runs a probe kernel through TRITON_INTERPRET=1")
@pytest.mark.parametrize("M,E,N,BM,BN,G", [(600, 4, 128, 32, 64, 8), (37, 3, 45, 16, 64, 8), (1, 1, 1, 16, 64, 8),
                                           (1000, 64, 700, 64, 128, 8), (50, 8, 300, 16, 64, 1)])
def test_grouped_tile_order_is_a_bijection_in_groups(M, E, N, BM, BN, G):
    """Every (row tile, column tile) of the launch grid is visited exactly once, and consecutive programs of
    one group share a column tile (the same weight tile)."""
    import triton.language as tl

    @triton.jit
    def _probe(out_ptr, M, E, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        pm, pn = K._grouped_tile(pid, M, E, N, BLOCK_M, BLOCK_N, GROUP_M)
        tl.store(out_ptr + 2 * pid, pm)
        tl.store(out_ptr + 2 * pid + 1, pn)

    n_m = K._row_tiles(M, E, BM)
    n_n = triton.cdiv(N, BN)
    out = torch.full((n_m * n_n, 2), -1, dtype=torch.int32)
    _probe[(n_m * n_n,)](out, M, E, N, BLOCK_M=BM, BLOCK_N=BN, GROUP_M=G)
    pairs = {tuple(r) for r in out.tolist()}
    assert pairs == {(m, n) for m in range(n_m) for n in range(n_n)}
    for pid in range(min(G, n_m) - 1):  # the first group: its programs walk the rows of one column tile
        assert out[pid, 1] == out[pid + 1, 1] and out[pid + 1, 0] == out[pid, 0] + 1


@pytest.mark.skipif(not availability.triton_interpret() and not torch.cuda.is_available(),
                    reason="needs TRITON_INTERPRET=1 or a CUDA device")
@pytest.mark.parametrize("k", [2, 3])
def test_deterministic_scatter_matches_float64_and_repeats_bitwise(k, monkeypatch):
    dev = torch.device("cpu") if availability.triton_interpret() else torch.device("cuda")
    g = torch.Generator().manual_seed(40 + k)
    T, d, f = 53, 40, 24
    ids, routing = _routing(T, k, "empty", g)
    pairs, toks, experts = _rows(routing, k)
    a = torch.randn(T * k, d, generator=g)
    w = torch.randn(E, f, d, generator=g) / 8
    scale = torch.rand(T * k, generator=g) + 0.1
    run = [K.moe_scatter_gemm(a.to(dev), w.to(dev), False, routing.sorted_pairs.to(dev), routing.offsets.to(dev),
                              k, T, scale=scale.to(dev), deterministic=True) for _ in range(2)]
    assert torch.equal(run[0], run[1])
    rows = torch.einsum("md,mfd->mf", a.double(), w.double()[experts]) * scale.double()[pairs][:, None]
    want = torch.zeros(T, f, dtype=torch.float64).index_add_(0, toks, rows)
    _check("deterministic out", run[0], want, 1e-5 * want.abs().max().item())
    # the global switch selects the same path
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    again = K.moe_scatter_gemm(a.to(dev), w.to(dev), False, routing.sorted_pairs.to(dev), routing.offsets.to(dev),
                               k, T, scale=scale.to(dev))
    assert torch.equal(again, run[0])


def test_autotune_keys_name_what_changes_the_best_config():
    for tuner, must in ((K._gather_fwd_tuned, ("ACT", "E", "TOPK", "M_BUCKET", "DOT_PREC")),
                        (K._scatter_tuned, ("E", "TOPK", "ATOMIC", "BY_PAIR", "M_BUCKET")),
                        (K._gather_bwd_tuned, ("E", "TOPK", "M_BUCKET")),
                        (K._wgrad_tuned, ("E", "TOPK", "L_GATHER", "M_BUCKET"))):
        missing = [n for n in must if n not in tuner.keys]
        assert not missing, f"{tuner.fn.__name__}: key lacks {missing}"
        assert all(n in tuner.fn.arg_names for n in tuner.keys)
    assert [K._m_bucket(m) for m in (0, 1, 255, 256, 257, 16384, 16385)] == [256, 256, 256, 256, 512, 16384, 32768]


def test_weight_grad_split_choice():
    assert K.weight_grad_split(32768, 8, 28672, 4096) == 1  # Mixtral's dW_gate_up: 57k output tiles
    assert K.weight_grad_split(32768, 8, 64, 64) == min(triton.cdiv(K.WGRAD_PROGRAMS, 8), 32768 // K.WGRAD_MIN_ROWS)
    assert K.weight_grad_split(32768, 8, 64, 64, deterministic=True) == 1
    assert K.weight_grad_split(100, 8, 64, 64) == 1  # too few rows to share
    with pytest.raises(ValueError, match="split must be an int >= 1"):
        K.moe_weight_grad(torch.zeros(4, 2), False, torch.zeros(4, 2), False, torch.arange(4), torch.tensor([0, 4]),
                          1, (1, 2, 2), torch.float32, split=0)
