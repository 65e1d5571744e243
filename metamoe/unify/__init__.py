"""Unification pipeline: client-side embedding and proxy-aligned expert training, expert packages.

Client: :func:`embed`, :func:`train_expert` (LoRA on every FFN, router prototypes). Package: a folder of
safetensors + JSON manifest (:func:`write_expert_package`, :func:`load_expert_package`, :func:`check_package_set`);
problems raise :class:`PackageError`. Importing this package imports torch.
"""

from .client import TrainedExpert, compute_prototypes, embed, train_expert
from .package import (
    ExpertPackage,
    PackageError,
    check_package_set,
    expert_from_package,
    load_expert_package,
    load_expert_packages,
    write_expert_package,
)

__all__ = [
    "TrainedExpert",
    "compute_prototypes",
    "embed",
    "train_expert",
    "ExpertPackage",
    "PackageError",
    "check_package_set",
    "expert_from_package",
    "load_expert_package",
    "load_expert_packages",
    "write_expert_package",
]
