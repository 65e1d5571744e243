"""Evaluation of unified models and baselines: probabilities over the unified label space, accuracy.

Every method of the harness (a :class:`~metamoe.unify.server.UnifiedModel`, a Model Soup, the BTM ensemble
:class:`ExpertEnsemble`) answers ``predict_proba(x) -> (n, C)`` over the same unified label space
(:class:`~metamoe.unify.server.LabelSpace`). When several classes of that space mean the same target (the
digits harness: client c's private class ``"rotated:3"`` and the public class ``"3"`` are both the digit 3),
:func:`marginalize` sums their probabilities, so that a prediction never needs to know the test sample's
domain: :func:`accuracy` = argmax of the marginal target distribution equals the true target.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

import numpy as np
import torch

from ..models.registry import SeedModel
from .package import ExpertPackage, expert_from_package
from .server import LabelSpace, unified_label_space

__all__ = ["ExpertEnsemble", "accuracy", "exact_accuracy", "marginalize"]


def marginalize(proba: np.ndarray, class_targets: Any) -> np.ndarray:
    """Sum class probabilities into target probabilities.

    Args:
        proba: (n, C) float, rows are distributions over the unified label space.
        class_targets: (C,) int, the target (e.g. digit) each class stands for, in ``[0, T)``.

    Returns:
        (n, T) float64 with ``out[i, t] = sum_{c: class_targets[c] == t} proba[i, c]``.
    """
    p = np.asarray(proba, dtype=np.float64)
    t = np.asarray(class_targets)
    if p.ndim != 2:
        raise ValueError(f"proba must be (n, C), got shape {p.shape}")
    if t.shape != (p.shape[1],) or t.dtype.kind not in "iu":
        raise ValueError(f"class_targets must be (C={p.shape[1]},) integers, got {t.shape} {t.dtype}")
    if len(t) and t.min() < 0:
        raise ValueError("class_targets must be >= 0")
    T = int(t.max()) + 1 if len(t) else 0
    out = np.zeros((p.shape[0], T), dtype=np.float64)
    np.add.at(out.T, t, p.T)
    return out


def accuracy(proba: np.ndarray, y: Any, class_targets: Any) -> float:
    """Fraction of samples whose most probable target (after :func:`marginalize`) is ``y`` ((n,) int)."""
    y = np.asarray(y)
    m = marginalize(proba, class_targets)
    if y.shape != (m.shape[0],):
        raise ValueError(f"y must be (n={m.shape[0]},), got shape {y.shape}")
    if m.shape[0] == 0:
        raise ValueError("no samples to evaluate")
    return float((m.argmax(1) == y).mean())


def exact_accuracy(proba: np.ndarray, y_class: Any) -> float:
    """Fraction of samples whose most probable unified class is exactly ``y_class`` ((n,) int)."""
    p = np.asarray(proba)
    y = np.asarray(y_class)
    if y.shape != (p.shape[0],) or p.shape[0] == 0:
        raise ValueError(f"y_class must be (n={p.shape[0]},) with n > 0, got shape {y.shape}")
    return float((p.argmax(1) == y).mean())


class ExpertEnsemble:
    """BTM: every client's expert run on its own (seed + its LoRA + its head), predictions averaged.

    Expert e predicts over its own label space (its private classes, then the public ones); its probabilities
    are placed into the unified label space (its private rows, the public rows) and averaged over the
    experts with equal weights. No routing: every expert sees every input (E times the compute of one).
    """

    def __init__(self, seed_model: SeedModel, packages: Sequence[ExpertPackage]):
        if not packages:
            raise ValueError("packages is empty")
        self.label_space: LabelSpace = unified_label_space(packages)
        if self.label_space.kind != "classes":
            raise ValueError("ExpertEnsemble averages class probabilities; the packages declare a vocabulary")
        self.experts = [expert_from_package(seed_model, p) for p in packages]

    @torch.no_grad()
    def predict_proba(self, x: Any, batch_size: int = 256) -> np.ndarray:
        """(n, C) float64 average of the experts' class probabilities in the unified label space."""
        space = self.label_space
        n = SeedModel.num_samples(x)
        out = np.zeros((n, space.num_classes), dtype=np.float64)
        pub = np.arange(*space.public_slice)
        for expert, (s, e) in zip(self.experts, space.private_slices):
            cols = np.concatenate([np.arange(s, e), pub])
            for a in range(0, n, batch_size):
                b = expert.prepare(SeedModel.take(x, slice(a, a + batch_size)))
                p = torch.softmax(expert(b).double(), -1).cpu().numpy()
                out[a : a + len(p), cols] += p
        return out / len(self.experts)


def evaluate_domains(
    model: Any, tests: Dict[str, Any], class_targets: Any, exact_classes: Dict[str, Any] = None
) -> Dict[str, Dict[str, float]]:
    """Accuracy of ``model`` (anything with ``predict_proba``) on each domain's test set.

    Args:
        tests: ``{domain: (x, y_target)}``.
        class_targets: (C,) target of each unified class (:func:`marginalize`).
        exact_classes: optional ``{domain: (n,) int}`` the exact unified class of each test sample.

    Returns:
        ``{"per_domain": {domain: acc}, "per_domain_exact": {...}}`` (the second only with ``exact_classes``).
    """
    per, exact = {}, {}
    for name, (x, y) in tests.items():
        p = model.predict_proba(x)
        per[name] = accuracy(p, y, class_targets)
        if exact_classes is not None:
            exact[name] = exact_accuracy(p, exact_classes[name])
    out = {"per_domain": per}
    if exact_classes is not None:
        out["per_domain_exact"] = exact
    return out
