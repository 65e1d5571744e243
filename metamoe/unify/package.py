"""Expert packages: what a client ships to the server. A folder, safetensors + JSON only (no pickle anywhere).

The package API in one place; each part lives in its own module:

* :mod:`.package_format`: the layout (file names, manifest keys), :class:`ExpertPackage` (a loaded package),
  :class:`PackageError` (a ``ValueError`` naming the package and the problem), the digests
  (:func:`manifest_digest`, :func:`pool_fingerprint`) and :class:`UnverifiedPackageWarning`;
* :mod:`.package_write`: :func:`write_expert_package`, atomic (temporary folder + rename; what is written
  must pass every reader check first);
* :mod:`.package_read`: :func:`load_expert_package` (manifest digest, files, hashes, manifest, tensors, proxy
  indices), :func:`check_package_set` (packages against each other before unification: same seed model and
  weight hash, same public pool, disjoint private label spaces, matching LoRA layout, no package twice),
  :func:`check_public_pool` (packages against the server's public pool: size, content, order),
  :func:`load_expert_packages` and :func:`expert_from_package` (the client's expert rebuilt from the seed
  and its package).

Selection methods are named as in :mod:`metamoe.selection.methods` (``SELECTION_METHODS``).
"""

from ..selection.methods import SELECTION_METHODS
from .package_format import (
    FORMAT,
    FORMAT_VERSION,
    HEAD_FILE,
    LORA_FILE,
    MANIFEST,
    MANIFEST_KEYS,
    PROTOTYPES_FILE,
    TENSOR_FILES,
    ExpertPackage,
    PackageError,
    UnverifiedPackageWarning,
    manifest_digest,
    pool_fingerprint,
)
from .package_read import (
    check_package_set,
    check_public_pool,
    expert_from_package,
    load_expert_package,
    load_expert_packages,
)
from .package_write import write_expert_package

__all__ = [
    "ExpertPackage",
    "PackageError",
    "write_expert_package",
    "load_expert_package",
    "load_expert_packages",
    "check_package_set",
    "check_public_pool",
    "expert_from_package",
    "UnverifiedPackageWarning",
    "manifest_digest",
    "pool_fingerprint",
    "SELECTION_METHODS",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "MANIFEST_KEYS",
    "LORA_FILE",
    "PROTOTYPES_FILE",
    "HEAD_FILE",
    "TENSOR_FILES",
]
