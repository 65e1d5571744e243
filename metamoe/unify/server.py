"""The server's inputs: the expert packages, checked against each other and the seed; the unified label space;
the training set made of every client's proxies.

* :func:`validate_packages` loads every package (:func:`~metamoe.unify.package.load_expert_package`: manifest
  digest, files, sha256, shapes, proxy indices) and checks them against each other and the seed
  (:func:`~metamoe.unify.package.check_package_set`: same seed name and weight hash, same public pool,
  disjoint private label spaces, same LoRA layout, no expert twice) and, given the public pool, against it
  (:func:`~metamoe.unify.package.check_public_pool`: size, and content and order by the recorded
  fingerprints). Any problem is a :class:`~metamoe.unify.PackageError`.
* :func:`unified_label_space`: classification packages declare ``private`` classes (their own, disjoint
  between clients) and the shared ``public`` classes. The unified model predicts over the concatenation
  ``private(package 0) + private(package 1) + ... + public`` (a :class:`LabelSpace`). A causal LM's label
  space is its vocabulary, the same for every client.
* :func:`proxy_training_set`: the union of every package's proxies with their public labels, mapped into
  the unified label space; :func:`proxy_owners`: which clients picked each of them.

The model built from these is in :mod:`.unified_model`, its router training in :mod:`.router_training`
(stage 3 of docs/design.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..models.registry import SeedModel
from .package import ExpertPackage, PackageError, check_package_set, check_public_pool, load_expert_package

PathLike = Union[str, os.PathLike]

__all__ = [
    "LabelSpace",
    "proxy_owners",
    "proxy_training_set",
    "unified_label_space",
    "validate_packages",
]


# --------------------------------------------------------------------------- validation


def validate_packages(
    packages: Sequence[Union[PathLike, ExpertPackage]],
    *,
    seed_model: Optional[SeedModel] = None,
    public_pool_size: Optional[int] = None,
    public_x: Any = None,
    public_y: Any = None,
) -> List[ExpertPackage]:
    """Load (if given as paths) and validate a set of expert packages for unification.

    Args:
        packages: package folders or already loaded :class:`ExpertPackage` objects (a loaded package is
            re-read from its folder, so a file changed since loading is caught).
        seed_model: the shared seed; when given, every package must come from it (name and weight hash) and
            its LoRA / prototype / head shapes must fit it.
        public_pool_size: the public pool's size N; when given, every package must index a pool of size N.
        public_x, public_y: the public pool itself (inputs, and labels or None), as the clients loaded it; when
            given, every package must index it: its size, and, for packages that record a pool fingerprint, its
            content and row order (:func:`~metamoe.unify.package.check_public_pool`; packages without a
            fingerprint are checked by size, with an :class:`~metamoe.unify.package.UnverifiedPackageWarning`).

    Returns:
        The loaded packages, in the given order.

    Raises:
        PackageError (a ValueError) naming the package and the problem: mixed seed models or weights,
        tampered or missing files, an edited manifest, another public pool, the same expert twice, colliding
        private label spaces, zero proxies, indices out of range, ...
        TypeError / ValueError for arguments of the wrong kind or an empty list.
    """
    if isinstance(packages, (str, os.PathLike, ExpertPackage)) or not isinstance(packages, Sequence):
        raise TypeError("packages must be a list of package folders or ExpertPackage objects")
    if len(packages) == 0:
        raise ValueError("packages is empty; unification needs at least one expert package")
    if seed_model is not None and not isinstance(seed_model, SeedModel):
        raise TypeError(f"seed_model must be a SeedModel, got {type(seed_model).__name__}")
    if public_y is not None and public_x is None:
        raise ValueError("public_y is given without public_x; pass the pool's inputs too")
    if public_x is not None:
        n_pool = SeedModel.num_samples(public_x)
        if public_pool_size is not None and public_pool_size != n_pool:
            raise ValueError(f"public_pool_size={public_pool_size} but public_x has {n_pool} samples")
    loaded = []
    for p in packages:
        path = p.path if isinstance(p, ExpertPackage) else p
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"packages must hold paths or ExpertPackage objects, got {type(p).__name__}")
        loaded.append(load_expert_package(path, public_pool_size=public_pool_size, seed_model=seed_model))
    check_package_set(loaded, seed_model=seed_model, public_pool_size=public_pool_size)
    if public_x is not None:
        check_public_pool(loaded, public_x, public_y)
    return loaded


# --------------------------------------------------------------------------- label space


@dataclass(frozen=True)
class LabelSpace:
    """The unified label space.

    Attributes:
        kind: ``"classes"`` or ``"vocabulary"``.
        names: class names in head order (classes: every package's private names in package order, then the
            public names); empty for a vocabulary.
        private_slices: per package, the ``(start, stop)`` rows of its private classes.
        public_slice: ``(start, stop)`` rows of the public classes.
        vocab_size: for a vocabulary.
    """

    kind: str
    names: Tuple[str, ...] = ()
    private_slices: Tuple[Tuple[int, int], ...] = ()
    public_slice: Tuple[int, int] = (0, 0)
    vocab_size: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.names) if self.kind == "classes" else self.vocab_size

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"class {name!r} is not in the unified label space") from None

    def to_dict(self) -> Dict[str, Any]:
        return {
            "kind": self.kind,
            "names": list(self.names),
            "private_slices": [list(s) for s in self.private_slices],
            "public_slice": list(self.public_slice),
            "vocab_size": self.vocab_size,
        }


def unified_label_space(packages: Sequence[ExpertPackage]) -> LabelSpace:
    """The concatenated label space of checked packages: private classes in package order, then public."""
    if not packages:
        raise ValueError("packages is empty")
    first = packages[0].label_space
    if first["kind"] == "vocabulary":
        return LabelSpace("vocabulary", vocab_size=int(first["size"]))
    names: List[str] = []
    slices = []
    for p in packages:
        start = len(names)
        names += list(p.label_space["private"])
        slices.append((start, len(names)))
    start = len(names)
    names += list(first["public"])
    if len(set(names)) != len(names):
        raise ValueError("unified label space has duplicate names (run check_package_set first)")
    return LabelSpace("classes", tuple(names), tuple(slices), (start, len(names)))


def proxy_training_set(
    packages: Sequence[ExpertPackage], public_x: Any, public_y: Any, label_space: LabelSpace
) -> Tuple[Any, Optional[np.ndarray], np.ndarray]:
    """The union of every package's proxies with their public labels, mapped into the unified label space.

    Args:
        packages: the checked packages.
        public_x: the public pool's inputs (N, ...) (array/tensor, or a mapping of them for token inputs).
        public_y: (N,) int public labels in ``[0, len(public classes))``; None for a causal LM.
        label_space: from :func:`unified_label_space`.

    Returns:
        ``(x, y, indices)``: inputs of the union (each public sample once, in order of first appearance
        over the packages), labels (n,) int64 in the unified space (None for a causal LM), and the pool
        indices (n,) int64.
    """
    n_pool = SeedModel.num_samples(public_x)
    order: Dict[int, None] = {}
    for p in packages:
        if p.public_pool_size != n_pool:
            raise PackageError(
                p.path, f"indexes a public pool of {p.public_pool_size}, public_x has {n_pool}"
            )
        for i in p.proxy_indices.tolist():
            order.setdefault(int(i), None)
    idx = np.fromiter(order, dtype=np.int64, count=len(order))
    if len(idx) == 0:
        raise ValueError("the packages declare zero proxies in total")
    x = SeedModel.take(public_x, idx)
    if label_space.kind != "classes":
        return x, None, idx
    if public_y is None:
        raise ValueError("public_y is required for a classification label space")
    y = np.asarray(public_y.cpu() if isinstance(public_y, torch.Tensor) else public_y)
    if y.shape != (n_pool,) or y.dtype.kind not in "iu":
        raise ValueError(f"public_y must be (N={n_pool},) integers, got {y.shape} {y.dtype}")
    n_pub = label_space.public_slice[1] - label_space.public_slice[0]
    yy = y[idx].astype(np.int64)
    if len(yy) and (yy.min() < 0 or yy.max() >= n_pub):
        raise ValueError(f"public_y of the proxies must lie in [0, {n_pub}), got [{yy.min()}, {yy.max()}]")
    return x, yy + label_space.public_slice[0], idx


def proxy_owners(packages: Sequence[ExpertPackage], indices: Any) -> np.ndarray:
    """Routing targets of proxies: (n, E) float64, row i spread evenly over the experts whose clients picked
    public sample ``indices[i]`` as a proxy (one-hot when one client did).

    A client picks its proxies to stand in for its private data, so the server may ask the router to send
    each proxy to its client's expert (``train_router(route_targets=...)``); the picks are public, nothing
    private is used. ``indices`` is the third value of :func:`proxy_training_set`.
    """
    idx = np.asarray(indices)
    if idx.ndim != 1 or idx.dtype.kind not in "iu":
        raise ValueError(f"indices must be a 1-D integer array of pool indices, got {idx.shape} {idx.dtype}")
    out = np.zeros((len(idx), len(packages)), dtype=np.float64)
    for e, p in enumerate(packages):
        out[:, e] = np.isin(idx, p.proxy_indices)
    picked = out.sum(1)
    if len(idx) and picked.min() == 0:
        row = int(np.argmin(picked))
        raise ValueError(f"pool index {int(idx[row])} (indices[{row}]) is not a proxy of any package")
    return out / picked[:, None]
