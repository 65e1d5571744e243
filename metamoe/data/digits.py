"""The embedded default data: scikit-learn's bundled handwritten digits, made into several domains.

Each domain is the same digits under a different image transform (upright, rotated, inverted, ...).
Clients own a domain each, with private labelled samples; the public pool mixes the client domains with
distractor domains. Nothing is downloaded: ``sklearn.datasets.load_digits`` ships with scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np


def _blur(x: np.ndarray) -> np.ndarray:
    p = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="edge")
    return (p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:] + 2 * x) / 6.0


TRANSFORMS: Dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "upright": lambda x: x,
    "rotated": lambda x: np.rot90(x, k=1, axes=(1, 2)),
    "inverted": lambda x: 1.0 - x,
    "mirrored": lambda x: x[:, :, ::-1],
    "upside_down": lambda x: x[:, ::-1, :],
    "transposed": lambda x: np.swapaxes(x, 1, 2),
    "blurred": _blur,
    "shifted": lambda x: np.roll(x, shift=2, axis=2),
}


@dataclass
class ClientData:
    """One client's private domain: images (n, 8, 8) float32 in [0, 1] and digit labels (n,) int64."""

    domain: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@dataclass
class DigitsDomains:
    """Client domains plus a public pool (and, optionally, a separate public pre-training set).

    Attributes:
        clients: one :class:`ClientData` per client domain, in order.
        public_x: (N, 8, 8) float32 public images; public_y: (N,) int64 digit labels;
        public_domain: (N,) int64 index into ``domain_names`` (kept for evaluation only: a client never
            sees it, selection works from embeddings alone).
        domain_names: every domain in the pool (client domains first, then distractors).
        pretrain_x, pretrain_y, pretrain_domain: a second public set, (N_pre, 8, 8) / (N_pre,) / (N_pre,),
            drawn from source images disjoint from the pool's, for pre-training the seed model; None when
            :func:`make_digits_domains` was asked for none.
    """

    clients: List[ClientData]
    public_x: np.ndarray
    public_y: np.ndarray
    public_domain: np.ndarray
    domain_names: List[str] = field(default_factory=list)
    pretrain_x: Optional[np.ndarray] = None
    pretrain_y: Optional[np.ndarray] = None
    pretrain_domain: Optional[np.ndarray] = None


def load_digit_images() -> tuple:
    """(images (1797, 8, 8) float32 in [0, 1], labels (1797,) int64) from scikit-learn's bundled copy."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is in the test/models extras
        raise ImportError("the embedded digits data needs scikit-learn: pip install scikit-learn") from exc
    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def _check_count(name: str, val: Any) -> int:
    if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 0:
        raise ValueError(f"{name} must be a non-negative int, got {val!r}")
    return int(val)


def _draw_domains(rng, images, labels, sources, names, counts):
    """One public set: ``counts[d]`` images of domain ``names[d]`` drawn without replacement from ``sources``
    (a domain's draw is independent of the others', so one source image may appear under several transforms),
    transformed, concatenated and shuffled: (x float32, y int64, domain int64)."""
    px, py, pd = [], [], []
    for di, (name, n_dom) in enumerate(zip(names, counts)):
        idx = rng.choice(sources, size=n_dom, replace=False)
        px.append(np.ascontiguousarray(TRANSFORMS[name](images[idx])))
        py.append(labels[idx])
        pd.append(np.full(n_dom, di, dtype=np.int64))
    px, py, pd = np.concatenate(px), np.concatenate(py), np.concatenate(pd)
    shuffle = rng.permutation(len(px))
    return px[shuffle].astype(np.float32), py[shuffle], pd[shuffle]


def make_digits_domains(
    seed: int = 0,
    client_domains: Sequence[str] = ("upright", "rotated", "inverted"),
    distractor_domains: Sequence[str] = ("mirrored", "transposed", "blurred"),
    n_private: int = 120,
    n_test: int = 150,
    public_per_domain: int = 300,
    public_per_client_domain: Optional[int] = None,
    *,
    shared_test: bool = False,
    pretrain_per_domain: int = 0,
    pretrain_per_client_domain: Optional[int] = None,
) -> DigitsDomains:
    """Split the digits into client sets and a public pool, each domain under its own transform.

    Every client's private training images are disjoint from every other set. Test images are disjoint from
    every training set (private sets, public pool, pre-training set); with ``shared_test=False`` each client has
    its own ``n_test`` source images, with ``shared_test=True`` the clients' test sets are the same ``n_test``
    source images, each under its client's transform (so a test set can be larger than the 1,797 images would
    otherwise allow; no test image's source is in any training set either way).

    The public pool holds ``public_per_domain`` images of every distractor domain and
    ``public_per_client_domain`` (default: ``public_per_domain``) of every client domain, drawn from the
    remaining source images, so it can be mostly out-of-domain: the setting MetaMoE is made for, where the
    public data holds only a small relevant share that proxy selection has to find.

    ``pretrain_per_domain > 0`` also builds a second public set for pre-training the seed model
    (``pretrain_per_domain`` images of every distractor domain, ``pretrain_per_client_domain`` (default:
    ``pretrain_per_domain``) of every client domain): the remaining source images are then split into two
    disjoint halves, one for the pool and one for the pre-training set, so that nothing the seed was trained on
    reappears in the pool (as when a seed pre-trained on one public corpus selects proxies from another).
    """
    names = list(client_domains) + list(distractor_domains)
    n_private, n_test = _check_count("n_private", n_private), _check_count("n_test", n_test)
    n_pub = _check_count("public_per_domain", public_per_domain)
    n_client_pub = _check_count(
        "public_per_client_domain", n_pub if public_per_client_domain is None else public_per_client_domain
    )
    n_pre = _check_count("pretrain_per_domain", pretrain_per_domain)
    n_client_pre = _check_count(
        "pretrain_per_client_domain", n_pre if pretrain_per_client_domain is None else pretrain_per_client_domain
    )
    if not isinstance(shared_test, bool):
        raise TypeError(f"shared_test must be a bool, got {type(shared_test).__name__}")
    unknown = [n for n in names if n not in TRANSFORMS]
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; known: {', '.join(TRANSFORMS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"domains must be distinct, got {names}")
    images, labels = load_digit_images()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    C = len(client_domains)
    need = C * n_private + (n_test if shared_test else C * n_test)
    split = n_pre > 0 or n_client_pre > 0
    rest_n = len(images) - need
    pool_n = rest_n - rest_n // 2 if split else rest_n
    test_desc = f"{n_test} shared test" if shared_test else f"{C} x {n_test} test"
    for what, have, want in (
        ("public pool", pool_n, max(n_pub, n_client_pub)),
        ("pre-training set", rest_n // 2 if split else 0, max(n_pre, n_client_pre) if split else 0),
    ):
        if have < want:
            raise ValueError(
                f"{C} clients x {n_private} private + {test_desc} images leave {have} source images for the "
                f"{what}, fewer than the {want} one of its domains needs (public_per_domain={n_pub}, "
                f"public_per_client_domain={n_client_pub}, pretrain_per_domain={n_pre}, "
                f"pretrain_per_client_domain={n_client_pre}"
                f"{', the rest split in two for pool and pre-training' if split else ''})"
            )
    clients = []
    pos = 0
    if shared_test:
        te = order[:n_test]
        pos = n_test
    for name in client_domains:
        tr = order[pos : pos + n_private]
        pos += n_private
        if not shared_test:
            te = order[pos : pos + n_test]
            pos += n_test
        f = TRANSFORMS[name]
        clients.append(
            ClientData(
                name,
                np.ascontiguousarray(f(images[tr])),
                labels[tr],
                np.ascontiguousarray(f(images[te])),
                labels[te],
            )
        )
    rest = order[pos:]
    pool_src = rest[: len(rest) - len(rest) // 2] if split else rest
    counts = [n_client_pub] * C + [n_pub] * len(distractor_domains)
    px, py, pd = _draw_domains(rng, images, labels, pool_src, names, counts)
    out = DigitsDomains(clients, px, py, pd, names)
    if split:
        pre_counts = [n_client_pre] * C + [n_pre] * len(distractor_domains)
        out.pretrain_x, out.pretrain_y, out.pretrain_domain = _draw_domains(
            rng, images, labels, rest[len(pool_src) :], names, pre_counts
        )
    return out
