"""The digests a package records, against independent computations of their documented byte layouts: the
manifest's canonical JSON (keys sorted, no whitespace, ASCII, numbers as spelled) and the pool fingerprint
(a header, each array's name, dtype and shape, its bytes in row order, then the labels as int64)."""

import hashlib
import json

import numpy as np
import pytest
import torch

import metamoe.unify.package_format as pf


def _manifest():
    return {
        "format": "metamoe-expert",
        "format_version": 2,
        "lora": {"r": 4, "alpha": 16.0, "dropout": 0.0, "targets": ["fc1", "fc2"]},
        "selection": {"method": "dpp", "k": 3, "proxy_indices": [5, 17, 3], "public_pool_size": 120},
        "labels": ["zéro", "one", "two \"quoted\""],
        "metrics": {"acc": 0.8125, "loss": 1e-3, "flag": True, "none": None},
        "manifest_sha256": "0" * 64,
    }


def test_canonical_manifest_is_sorted_compact_ascii_json_without_its_own_digest():
    m = _manifest()
    want = json.dumps({k: v for k, v in m.items() if k != "manifest_sha256"}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True).encode("ascii")
    assert pf.canonical_manifest(m) == want
    assert pf.manifest_digest(m) == hashlib.sha256(want).hexdigest()
    m2 = dict(m, manifest_sha256="f" * 64)  # the digest field itself is not hashed
    assert pf.manifest_digest(m2) == pf.manifest_digest(m)


def test_numbers_keep_their_spelling_and_repeated_keys_are_refused():
    text = '{"b": [1e3, 2, -0.50], "a": 1.50, "s": "x"}'
    parsed = pf.parse_manifest(text, numbers_as_written=True)
    assert pf.canonical_manifest(parsed) == b'{"a":1.50,"b":[1e3,2,-0.50],"s":"x"}'
    assert pf.canonical_manifest(pf.parse_manifest(text)) == b'{"a":1.5,"b":[1000.0,2,-0.5],"s":"x"}'
    with pytest.raises(ValueError, match="duplicate key 'a'"):
        pf.parse_manifest('{"a": 1, "a": 2}')
    with pytest.raises(ValueError, match="duplicate key 'k'"):
        pf.parse_manifest('{"x": {"k": 1, "k": 1}}', numbers_as_written=True)


@pytest.mark.parametrize("value,ok", [("a" * 64, True), ("0123456789abcdef" * 4, True), ("a" * 63, False),
                                      ("a" * 65, False), ("A" * 64, False), ("g" * 64, False),
                                      (" " + "a" * 63, False), (None, False), (int("1" * 20), False)])
def test_sha256_hex_format(value, ok):
    assert pf.is_sha256_hex(value) is ok


def _reference_fingerprint(arrays, y=None):
    """The documented layout, written out: header with N, then per array (sorted by name) |name|dtype|shape|
    and its C-order bytes, then |y|int64| and the labels as int64."""
    n = len(next(iter(arrays.values())))
    h = hashlib.sha256(f"metamoe-pool-fingerprint-1|n={n}".encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"|{name}|{a.dtype.str}|{tuple(a.shape)}|".encode())
        h.update(a.tobytes())
    if y is not None:
        h.update(b"|y|int64|")
        h.update(np.asarray(y, dtype=np.int64).tobytes())
    return h.hexdigest()


def test_pool_fingerprint_equals_the_documented_layout(rng, monkeypatch):
    X = rng.standard_normal((37, 3, 4)).astype(np.float32)
    y = rng.integers(0, 10, 37).astype(np.int32)
    want = _reference_fingerprint({"x": X}, y)
    assert pf.pool_fingerprint(X, y) == want
    assert pf.pool_fingerprint(torch.from_numpy(X), torch.from_numpy(y)) == want  # tensors: same bytes
    monkeypatch.setattr(pf, "_POOL_CHUNK_BYTES", 100)  # several blocks of rows, one of a single row
    assert pf.pool_fingerprint(X, y) == want
    assert pf.pool_fingerprint(X) == _reference_fingerprint({"x": X})
    rows = np.array([4, 0, 36, 4])
    assert pf.pool_fingerprint(X, y, rows=rows) == _reference_fingerprint({"x": X[rows]}, y[rows])
    tokens = {"input_ids": rng.integers(0, 100, (37, 5)), "attention_mask": np.ones((37, 5), np.int8), "z": None}
    assert pf.pool_fingerprint(tokens) == _reference_fingerprint(
        {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]})


def test_pool_fingerprint_sees_order_values_dtype_and_labels(rng):
    X = rng.standard_normal((20, 6)).astype(np.float32)
    y = np.arange(20) % 3
    base = pf.pool_fingerprint(X, y)
    swapped = X.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    one_bit = X.copy()
    one_bit.view(np.uint32)[19, 5] ^= 1
    others = [pf.pool_fingerprint(swapped, y), pf.pool_fingerprint(one_bit, y),
              pf.pool_fingerprint(X.astype(np.float64), y), pf.pool_fingerprint(X, (y + 1) % 3),
              pf.pool_fingerprint(X), pf.pool_fingerprint(X[:19], y[:19])]
    assert len({base, *others}) == 1 + len(others)
    bf = torch.from_numpy(X).to(torch.bfloat16)  # hashed as its bits under the name "bfloat16"
    h = hashlib.sha256(b"metamoe-pool-fingerprint-1|n=20")
    h.update(b"|x|bfloat16|(20, 6)|")
    h.update(bf.view(torch.int16).numpy().tobytes())
    assert pf.pool_fingerprint(bf) == h.hexdigest()
    assert pf.pool_fingerprint(bf) != pf.pool_fingerprint(bf.view(torch.int16))


def test_pool_fingerprint_refuses_what_it_cannot_hash(rng):
    X = rng.standard_normal((5, 2)).astype(np.float32)
    with pytest.raises(ValueError, match="differ in length"):
        pf.pool_fingerprint({"a": X, "b": X[:4]})
    with pytest.raises(ValueError, match="1-D integer indices"):
        pf.pool_fingerprint(X, rows=np.array([0.0, 1.0]))
    with pytest.raises(TypeError, match="labels y must be integers"):
        pf.pool_fingerprint(X, np.zeros(5))
    with pytest.raises(ValueError, match=r"must be \(5,\)"):
        pf.pool_fingerprint(X, np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="no arrays"):
        pf.pool_fingerprint({"a": None})
    with pytest.raises(TypeError, match="numeric array"):
        pf.pool_fingerprint(np.array(["a", "b"]))
