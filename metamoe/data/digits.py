"""The embedded default data: scikit-learn's bundled handwritten digits, made into several domains.

Each domain is the same digits under a different image transform (upright, rotated, inverted, ...).
Clients own a domain each, with private labelled samples; the public pool mixes the client domains with
distractor domains. Nothing is downloaded: ``sklearn.datasets.load_digits`` ships with scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

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
    """Client domains plus a public pool.

    Attributes:
        clients: one :class:`ClientData` per client domain, in order.
        public_x: (N, 8, 8) float32 public images; public_y: (N,) int64 digit labels;
        public_domain: (N,) int64 index into ``domain_names`` (kept for evaluation only: a client never
            sees it, selection works from embeddings alone).
        domain_names: every domain in the pool (client domains first, then distractors).
    """

    clients: List[ClientData]
    public_x: np.ndarray
    public_y: np.ndarray
    public_domain: np.ndarray
    domain_names: List[str] = field(default_factory=list)


def load_digit_images() -> tuple:
    """(images (1797, 8, 8) float32 in [0, 1], labels (1797,) int64) from scikit-learn's bundled copy."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is in the test/models extras
        raise ImportError("the embedded digits data needs scikit-learn: pip install scikit-learn") from exc
    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def make_digits_domains(
    seed: int = 0,
    client_domains: Sequence[str] = ("upright", "rotated", "inverted"),
    distractor_domains: Sequence[str] = ("mirrored", "transposed", "blurred"),
    n_private: int = 120,
    n_test: int = 150,
    public_per_domain: int = 300,
    public_per_client_domain: Optional[int] = None,
) -> DigitsDomains:
    """Split the digits into disjoint client sets and a public pool, each domain under its own transform.

    Client images (private train and test) are disjoint from each other and from the public pool's
    source images; the public pool holds ``public_per_domain`` images of every domain (client domains
    and distractors) drawn from the remaining images, so it is ``len(domains) * public_per_domain``
    samples, at least 10x a client's private set with the defaults.

    ``public_per_client_domain`` (default: ``public_per_domain``) sets the number of public samples of each
    *client* domain separately, so that the pool can be mostly out-of-domain: the setting MetaMoE is made
    for, where the public data holds only a small relevant share that proxy selection has to find.
    """
    names = list(client_domains) + list(distractor_domains)
    n_client_pub = public_per_domain if public_per_client_domain is None else public_per_client_domain
    for arg, val in (("public_per_domain", public_per_domain), ("public_per_client_domain", n_client_pub)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 0:
            raise ValueError(f"{arg} must be a non-negative int, got {val!r}")
    unknown = [n for n in names if n not in TRANSFORMS]
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; known: {', '.join(TRANSFORMS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"domains must be distinct, got {names}")
    images, labels = load_digit_images()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    need = len(client_domains) * (n_private + n_test)
    rest_n = len(images) - need
    if rest_n < max(public_per_domain, n_client_pub):
        raise ValueError(
            f"{len(client_domains)} clients x ({n_private} private + {n_test} test) leave {rest_n} images for the "
            f"public pool, fewer than public_per_domain={public_per_domain} / public_per_client_domain={n_client_pub}"
        )
    clients = []
    pos = 0
    for name in client_domains:
        tr = order[pos : pos + n_private]
        te = order[pos + n_private : pos + n_private + n_test]
        pos += n_private + n_test
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
    px, py, pd = [], [], []
    for di, name in enumerate(names):
        n_dom = n_client_pub if di < len(client_domains) else public_per_domain
        idx = rng.choice(rest, size=n_dom, replace=False)
        px.append(np.ascontiguousarray(TRANSFORMS[name](images[idx])))
        py.append(labels[idx])
        pd.append(np.full(n_dom, di, dtype=np.int64))
    px, py, pd = np.concatenate(px), np.concatenate(py), np.concatenate(pd)
    shuffle = rng.permutation(len(px))
    return DigitsDomains(clients, px[shuffle].astype(np.float32), py[shuffle], pd[shuffle], names)
