"""kernels.interpreter_compat: a loop bound from a kernel argument works under the Triton interpreter of
every supported Triton (its one-element 1-D argument arrays converted through ``__index__``)."""

import numpy as np
import pytest

from metamoe.kernels import interpreter_compat


class _Handle:
    def __init__(self, data):
        self.data = data


class _Tensor:
    def __init__(self, data):
        self.handle = _Handle(data)


@pytest.mark.parametrize("data", [np.array([7], dtype=np.int32), np.array(7, dtype=np.int64),
                                  np.array([[7]], dtype=np.int32)])
def test_index_of_one_element_arrays(data):
    assert interpreter_compat._index(_Tensor(data)) == 7
    assert list(range(0, interpreter_compat._index(_Tensor(data)), 3)) == [0, 3, 6]


def test_index_refuses_blocks():
    with pytest.raises(TypeError):
        interpreter_compat._index(_Tensor(np.arange(4)))


def test_ensure_is_idempotent_and_keeps_a_squeezing_interpreter():
    triton = pytest.importorskip("triton")
    from triton.runtime import interpreter

    before = interpreter._patch_lang_tensor
    interpreter_compat.ensure()
    once = interpreter._patch_lang_tensor
    interpreter_compat.ensure.cache_clear()
    interpreter_compat.ensure()
    assert interpreter._patch_lang_tensor is once
    if getattr(before, "_metamoe_index", False) or "int(self.handle.data)" not in _source(before):
        assert once is before, f"triton {triton.__version__}: an interpreter that squeezes must stay as it is"


def _source(fn):
    import inspect

    return inspect.getsource(fn)


@pytest.mark.skipif("not __import__('os').environ.get('TRITON_INTERPRET')", reason="needs TRITON_INTERPRET=1")
def test_kernel_loop_bound_from_an_argument():
    torch = pytest.importorskip("torch")
    import triton
    import triton.language as tl

    @triton.jit
    def _sum_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for n0 in range(0, N, BLOCK):
            offs = n0 + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + offs, mask=offs < N, other=0.0)
        tl.store(out_ptr, tl.sum(acc, axis=0))

    x = torch.arange(37, dtype=torch.float32)
    out = torch.empty(1)
    _sum_kernel[(1,)](x, out, 37, BLOCK=8)
    assert out.item() == float(x.sum())
