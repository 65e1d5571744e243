"""The backend registry: auto picks the first that can, explicit ones raise with reasons."""

import pytest

from metamoe.backends import (
    BackendNotSupportedError,
    CallSpec,
    NoBackendError,
    Op,
    resolve_backend,
)
from metamoe.backends import availability


def _op():
    op = Op("toy", priority=("cuda", "triton", "cpp", "torch"))

    @op.register("torch", devices=("cpu", "cuda"), dtypes=("float32", "float16"))
    def t(x):
        return "torch"

    @op.register("cpp", devices=("cpu",), dtypes=("float32",), check=lambda s: ["n must be <= 10"] if s["n"] > 10 else [])
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
