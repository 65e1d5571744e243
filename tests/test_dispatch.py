"""The backend registry: auto picks the first that can, explicit ones raise with reasons."""

import pytest

from metamoe.backends import (
    BackendNotSupportedError,
    CallSpec,
    NoBackendError,
    Op,
    availability,
    resolve_backend,
)


def _op():
    op = Op("toy", priority=("cuda", "triton", "cpp", "torch"))

    @op.register("torch", devices=("cpu", "cuda"), dtypes=("float32", "float16"))
    def t(x):
        return "torch"

    @op.register("cpp", devices=("cpu",), dtypes=("float32",),
                 check=lambda s: ["n must be <= 10"] if s["n"] > 10 else [])
    def c(x):
        return "cpp"

    @op.register("cuda", devices=("cuda",), dtypes=("float32",))
    def g(x):
        return "cuda"

    return op


def _cpp_ok():
    return availability.backend_unavailable_reason("cpp") is None


def test_auto_picks_fastest_that_can():
    op = _op()
    spec = CallSpec("cpu", "float32", {"n": 5})
    impl = op.select(spec, "auto")
    assert impl.backend == ("cpp" if _cpp_ok() else "torch")


def test_auto_falls_back_on_limits_and_dtype():
    op = _op()
    assert op.select(CallSpec("cpu", "float32", {"n": 50}), "auto").backend == "torch"
    assert op.select(CallSpec("cpu", "float16", {"n": 5}), "auto").backend == "torch"


def test_explicit_backend_that_cannot_run_raises_with_reason():
    op = _op()
    with pytest.raises(BackendNotSupportedError, match=r"backend 'cpp' cannot run toy: .*n must be <= 10"):
        op.select(CallSpec("cpu", "float32", {"n": 50}), "cpp")
    with pytest.raises(BackendNotSupportedError, match=r"backend 'cpp'.*dtype float16 is not supported"):
        op.select(CallSpec("cpu", "float16", {"n": 5}), "cpp")
    with pytest.raises(BackendNotSupportedError, match=r"backend 'cuda' cannot run toy:.*device 'cpu'"):
        op.select(CallSpec("cpu", "float32", {"n": 5}), "cuda")


def test_explicit_backend_without_implementation():
    op = _op()
    with pytest.raises(BackendNotSupportedError, match=r"backend 'triton' has no implementation of toy"):
        op.select(CallSpec("cpu", "float32", {"n": 5}), "triton")


def test_no_backend_lists_every_reason():
    op = _op()
    with pytest.raises(NoBackendError) as err:
        op.select(CallSpec("cpu", "int8", {"n": 5}), "auto")
    msg = str(err.value)
    for b in ("torch", "cpp", "cuda"):
        assert f"  {b}:" in msg
    assert "dtype int8 is not supported" in msg


def test_env_var_selects_backend(monkeypatch):
    op = _op()
    monkeypatch.setenv("METAMOE_BACKEND", "torch")
    assert op.select(CallSpec("cpu", "float32", {"n": 5})).backend == "torch"
    monkeypatch.setenv("METAMOE_BACKEND", "cuda")
    with pytest.raises(BackendNotSupportedError, match="backend 'cuda'"):
        op.select(CallSpec("cpu", "float32", {"n": 5}))
    # an explicit argument wins over the environment
    assert op.select(CallSpec("cpu", "float32", {"n": 5}), "torch").backend == "torch"


def test_bad_backend_names(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of auto, torch, triton, cpp, cuda; got 'gpu'"):
        resolve_backend("gpu")
    with pytest.raises(TypeError, match="backend must be a string"):
        resolve_backend(3)
    monkeypatch.setenv("METAMOE_BACKEND", "fast")
    with pytest.raises(ValueError, match="METAMOE_BACKEND must be one of"):
        resolve_backend(None)


def test_register_unknown_backend():
    op = Op("toy2")
    with pytest.raises(ValueError, match="unknown backend 'opencl'"):
        op.register("opencl", devices=("cpu",), dtypes=("float32",))


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    op = Op("toy3", priority=("triton", "torch"))
    op.register("triton", devices=("cuda",), dtypes=("float32",))(lambda: "triton")
    op.register("torch", devices=("cpu",), dtypes=("float32",))(lambda: "torch")
    if availability.triton_status()[1] is not None:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert op.select(CallSpec("cpu", "float32"), "auto").backend == "torch"
    with pytest.raises(BackendNotSupportedError, match="TRITON_INTERPRET=1"):
        op.select(CallSpec("cpu", "float32"), "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # the interpreter runs when asked for, but auto never picks it over torch on the CPU
    assert op.select(CallSpec("cpu", "float32"), "triton").backend == "triton"
    assert op.select(CallSpec("cpu", "float32"), "auto").backend == "torch"


def _named_op():
    op = Op("toy_named", names=("fast", "slow"), arg="impl")
    op.register("fast", devices=("cpu",), dtypes=("float32",),
                check=lambda s: ["n must be even"] if s["n"] % 2 else [])(lambda: "fast")
    op.register("slow", devices=("cpu", "cuda"), dtypes=("float32", "float64"))(lambda: "slow")
    return op


def test_op_with_names_of_its_own(monkeypatch):
    """Implementations that are strategies, not backends: same walk and errors, chosen by the op's argument."""
    op = _named_op()
    assert op.priority == ("fast", "slow")
    assert op.select(CallSpec("cpu", "float32", {"n": 2})).backend == "fast"
    assert op.select(CallSpec("cpu", "float32", {"n": 3}), "auto").backend == "slow"
    assert op.select(CallSpec("cpu", "float64", {"n": 2})).backend == "slow"
    with pytest.raises(BackendNotSupportedError, match=r"impl 'fast' cannot run toy_named: n must be even"):
        op.select(CallSpec("cpu", "float32", {"n": 3}), "fast")
    with pytest.raises(ValueError, match=r"impl must be one of auto, fast, slow; got 'torch'"):
        op.select(CallSpec("cpu", "float32", {"n": 2}), "torch")
    with pytest.raises(TypeError, match="impl must be a string"):
        op.select(CallSpec("cpu", "float32", {"n": 2}), 1)
    monkeypatch.setenv("METAMOE_BACKEND", "cuda")  # names backends, not this op's implementations
    assert op.select(CallSpec("cpu", "float32", {"n": 2})).backend == "fast"
    assert [row[:2] for row in op.status()] == [("fast", True), ("slow", True)]
    with pytest.raises(ValueError, match="unknown backend 'torch'"):
        op.register("torch", devices=("cpu",), dtypes=("float32",))
    with pytest.raises(ValueError, match="unknown backends in priority"):
        Op("toy_bad", priority=("cuda",), names=("fast",))


def test_check_backend_keeps_none():
    from metamoe.backends import check_backend

    assert check_backend(None) is None
    assert check_backend(" Torch ") == "torch"
    with pytest.raises(ValueError, match="backend must be one of auto, torch, triton, cpp, cuda; got 'cudnn'"):
        check_backend("cudnn")


def test_grouped_mm_capability_is_one_check():
    import torch

    from metamoe.backends import grouped_mm_reasons

    assert grouped_mm_reasons("cpu", torch.float32, {"d": 16}) == []
    assert grouped_mm_reasons("cpu", "bfloat16", {"d": 16, "f": 8}) == []
    assert any("not float64" in r for r in grouped_mm_reasons("cpu", torch.float64))
    assert grouped_mm_reasons("cpu", torch.float32, {"rank": 3}) == [
        "rank=3 is not a multiple of 4 elements (grouped_mm needs 16-byte strides)"]
    assert any("torch.compile" in r for r in grouped_mm_reasons("cpu", torch.float32, compiling=True))
    assert grouped_mm_reasons("cpu", torch.bfloat16, compiling=True) == []
    assert any("fused grouped GEMM kernel needs a CUDA device" in r
               for r in grouped_mm_reasons("cpu", torch.bfloat16, fused=True))
    assert any("device type 'meta'" in r for r in grouped_mm_reasons("meta", torch.float32))


def test_cuda_grouped_mm_rule(monkeypatch):
    """CUDA: bfloat16 on compute capability >= 8.0; the fused kernel on 9.x and 10.x only (no device needed)."""
    import torch

    from metamoe.backends import grouped_mm_reasons

    caps = {0: (8, 0), 1: (9, 0), 2: (7, 5), 3: (12, 0)}
    monkeypatch.setattr(availability, "cuda_capability", lambda i: caps[i])
    assert grouped_mm_reasons("cuda:0", torch.bfloat16) == []
    assert any("9.x or 10.x" in r for r in grouped_mm_reasons("cuda:0", torch.bfloat16, fused=True))
    assert grouped_mm_reasons("cuda:1", torch.bfloat16, fused=True) == []
    assert any(">= 8.0" in r for r in grouped_mm_reasons("cuda:2", torch.bfloat16))
    assert any("9.x or 10.x" in r for r in grouped_mm_reasons("cuda:3", torch.bfloat16, fused=True))
    assert any("takes bfloat16, not float32" in r for r in grouped_mm_reasons("cuda:1", torch.float32))


def test_lora_delta_is_a_registered_op():
    import torch

    from metamoe.backends import get_op
    from metamoe.ops import lora_delta, lora_delta_ref

    op = get_op("lora_delta")
    assert op.arg == "lora_impl" and op.priority == ("grouped", "dense")
    assert op.impls["dense"].fn is lora_delta_ref
    g = torch.Generator().manual_seed(0)
    x, A, B = torch.randn(5, 16, generator=g), torch.randn(3, 4, 16, generator=g), torch.randn(3, 8, 4, generator=g)
    ids = torch.randint(0, 3, (10,), generator=g)
    dense = lora_delta(x, A, B, ids, 2, lora_impl="dense")
    want = torch.stack([B[e] @ A[e] @ x[p // 2] for p, e in enumerate(ids.tolist())])
    torch.testing.assert_close(dense, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora_delta(x, A, B, ids, 2, lora_impl="grouped"), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora_delta(x, A, B, ids, 2), want, rtol=1e-5, atol=1e-5)  # auto
    with pytest.raises(BackendNotSupportedError, match=r"lora_impl 'grouped' cannot run lora_delta: in=15"):
        lora_delta(x[:, :15], A[:, :, :15], B, ids, 2, lora_impl="grouped")
