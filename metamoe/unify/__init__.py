"""Unification pipeline: client-side embedding and proxy-aligned expert training, expert packages.

Client: :func:`embed`, :func:`train_expert` (LoRA on every FFN, router prototypes). Package: a folder of
safetensors + JSON manifest (:func:`write_expert_package`, :func:`load_expert_package`, :func:`check_package_set`);
problems raise :class:`PackageError`. Server: :func:`validate_packages`, :func:`build_unified_model` (its
routers: one :class:`RouterConfig`), :func:`train_router` (its options: one :class:`RouterTraining`); the
compared methods in :mod:`.baselines`; the digits experiment of ``metamoe demo`` :func:`run_digits_experiment`.
Importing this package imports torch.
"""

from ..moe.router_config import RouterConfig
from .baselines import METHOD_NAMES, METHODS, MethodSpec, method_spec
from .client import TrainedExpert, compute_prototypes, embed, train_expert
from .evaluate import ExpertEnsemble
from .experiment import DigitsConfig, run_digits_experiment
from .package import (
    ExpertPackage,
    PackageError,
    check_package_set,
    expert_from_package,
    load_expert_package,
    load_expert_packages,
    write_expert_package,
)
from .router_training import RouterTraining, train_router
from .server import LabelSpace, proxy_training_set, unified_label_space, validate_packages
from .unified_model import UnifiedModel, build_soup_model, build_unified_model

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
    "LabelSpace",
    "UnifiedModel",
    "build_soup_model",
    "build_unified_model",
    "proxy_training_set",
    "RouterConfig",
    "RouterTraining",
    "train_router",
    "unified_label_space",
    "validate_packages",
    "METHOD_NAMES",
    "METHODS",
    "MethodSpec",
    "method_spec",
    "ExpertEnsemble",
    "DigitsConfig",
    "run_digits_experiment",
]
