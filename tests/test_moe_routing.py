"""moe_routing: expert-sorted order of the (token, slot) pairs, checked by invariants and a NumPy reference."""

import numpy as np
import pytest
import torch

from metamoe.ops import MoERouting, moe_routing


def _check_invariants(r: MoERouting, ids: torch.Tensor, E: int):
    T, k = ids.shape
    n = T * k
    flat = ids.reshape(-1).to(torch.int64)
    for name in ("sorted_pairs", "inverse", "counts", "offsets"):
        t = getattr(r, name)
        assert t.dtype == torch.int64, name
        assert t.device == ids.device, name
    assert r.sorted_pairs.shape == (n,) and r.inverse.shape == (n,)
    assert r.counts.shape == (E,) and r.offsets.shape == (E + 1,)
    # sorted_pairs is a permutation and inverse is its inverse
    assert torch.equal(torch.sort(r.sorted_pairs).values, torch.arange(n))
    assert torch.equal(r.sorted_pairs[r.inverse], torch.arange(n))
    assert torch.equal(r.inverse[r.sorted_pairs], torch.arange(n))
    # offsets difference to counts; counts sum to T*k; counts are the true histogram
    assert int(r.offsets[0]) == 0 and int(r.offsets[-1]) == n
    assert torch.equal(r.offsets[1:] - r.offsets[:-1], r.counts)
    assert int(r.counts.sum()) == n
    assert torch.equal(r.counts, torch.bincount(flat, minlength=E))
    # experts non-decreasing along sorted order, each expert's rows inside its offsets range
    experts = flat[r.sorted_pairs]
    assert bool((experts[1:] >= experts[:-1]).all())
    for e in range(E):
        lo, hi = int(r.offsets[e]), int(r.offsets[e + 1])
        assert bool((experts[lo:hi] == e).all())
        # stable: within an expert in increasing pair id
        seg = r.sorted_pairs[lo:hi]
        assert bool((seg[1:] > seg[:-1]).all())


def _numpy_reference(ids: np.ndarray, E: int):
    flat = ids.reshape(-1).astype(np.int64)
    order = np.argsort(flat, kind="stable")
    counts = np.array([(flat == e).sum() for e in range(E)], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return order, counts, offsets


def _random_ids(rng, T, E, k):
    # k distinct experts per token, like a top-k router
    return torch.from_numpy(np.stack([rng.permutation(E)[:k] for _ in range(T)]).reshape(T, k))


@pytest.mark.parametrize("T,E,k", [(1, 1, 1), (7, 4, 2), (64, 8, 3), (33, 5, 5), (200, 16, 4)])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_matches_numpy_and_invariants(T, E, k, dtype, rng):
    ids = _random_ids(rng, T, E, k).to(dtype)
    r = moe_routing(ids, E)
    _check_invariants(r, ids, E)
    order, counts, offsets = _numpy_reference(ids.numpy(), E)
    np.testing.assert_array_equal(r.sorted_pairs.numpy(), order)
    np.testing.assert_array_equal(r.counts.numpy(), counts)
    np.testing.assert_array_equal(r.offsets.numpy(), offsets)


def test_repeated_ids_are_stable(rng):
    # not a top-k output (duplicates in a row), still a valid grouping: ties resolved by pair id
    ids = torch.from_numpy(rng.integers(0, 3, size=(50, 3)))
    r = moe_routing(ids, 3)
    _check_invariants(r, ids, 3)
    np.testing.assert_array_equal(r.sorted_pairs.numpy(), np.argsort(ids.numpy().reshape(-1), kind="stable"))


def test_empty_expert(rng):
    E = 6
    ids = _random_ids(rng, 40, E - 2, 2)  # experts 4 and 5 get nothing
    ids = torch.where(ids >= 2, ids + 1, ids)  # and expert 2 gets nothing either
    r = moe_routing(ids, E)
    _check_invariants(r, ids, E)
    assert r.counts[2] == 0 and r.counts[5] == 0
    assert int(r.counts[[0, 1, 3, 4]].min()) > 0


def test_single_expert():
    ids = torch.zeros(9, 1, dtype=torch.int64)
    r = moe_routing(ids, 1)
    _check_invariants(r, ids, 1)
    assert r.offsets.tolist() == [0, 9]
    assert r.sorted_pairs.tolist() == list(range(9))


def test_all_tokens_on_one_expert():
    ids = torch.full((12, 1), 3, dtype=torch.int64)
    r = moe_routing(ids, 5)
    _check_invariants(r, ids, 5)
    assert r.counts.tolist() == [0, 0, 0, 12, 0]
    assert r.offsets.tolist() == [0, 0, 0, 0, 12, 12]


def test_zero_tokens():
    ids = torch.zeros(0, 2, dtype=torch.int64)
    r = moe_routing(ids, 4)
    _check_invariants(r, ids, 4)
    assert r.offsets.tolist() == [0, 0, 0, 0, 0]


def test_traced_by_torch_compile_fullgraph(rng):
    ids = _random_ids(rng, 30, 6, 2)
    compiled = torch.compile(lambda t: tuple(moe_routing(t, 6)), backend="aot_eager", fullgraph=True)
    got = compiled(ids)
    want = moe_routing(ids, 6)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.gpu
def test_no_host_sync_on_cuda(rng):
    ids = _random_ids(rng, 1000, 64, 8).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        r = moe_routing(ids, 64)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _check_invariants(MoERouting(*(t.cpu() for t in r)), ids.cpu(), 64)


@pytest.mark.parametrize(
    "ids,E,exc,match",
    [
        (torch.zeros(4, 2), 4, TypeError, "integer"),
        (torch.zeros(4, dtype=torch.int64), 4, ValueError, r"shape \(T, k\)"),
        (torch.zeros(4, 0, dtype=torch.int64), 4, ValueError, "top_k"),
        (torch.zeros(4, 3, dtype=torch.int64), 2, ValueError, "top_k .* <= num_experts"),
        (torch.tensor([[0, 4]]), 4, ValueError, r"\[0, num_experts=4\)"),
        (torch.tensor([[-1, 0]]), 4, ValueError, r"\[0, num_experts=4\)"),
        (torch.zeros(4, 1, dtype=torch.int64), 0, ValueError, "num_experts must be >= 1"),
        (torch.zeros(4, 1, dtype=torch.int64), 2.0, TypeError, "num_experts must be an int"),
        ([[0, 1]], 2, TypeError, "topk_ids must be a torch.Tensor"),
    ],
)
def test_bad_inputs(ids, E, exc, match):
    with pytest.raises(exc, match=match):
        moe_routing(ids, E)
