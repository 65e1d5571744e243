"""The names of the proxy-selection methods, one vocabulary for the API, the command lines and the packages.

Each canonical name is the name of the API function without ``select_``:

====================  =====================================================================
``dpp``               :func:`~metamoe.selection.select_dpp`, the relevance-weighted DPP
``facility_location`` :func:`~metamoe.selection.select_facility_location`
``top_relevance``     :func:`~metamoe.selection.select_top_relevance` (similarity only)
``random``            :func:`~metamoe.selection.select_random`
====================  =====================================================================

``metamoe select`` also runs ``facility_location_private``: facility location covering the client's
private set (``ground=P``, uniform weights), sharded by
:func:`~metamoe.selection.select_facility_location_private_sharded` under ``--distributed``.

Everything written (selection JSON, package manifests, :attr:`Selection.method`) uses the canonical names.
Input (``--method``, a YAML ``method:``, a manifest's or selection JSON's ``method``) may also use the short
spellings in :data:`METHOD_ALIASES`; :func:`canonical_method` maps them.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

SELECTION_METHODS: Tuple[str, ...] = ("dpp", "facility_location", "top_relevance", "random")
FACILITY_LOCATION_PRIVATE = "facility_location_private"
SELECT_COMMAND_METHODS: Tuple[str, ...] = SELECTION_METHODS + (FACILITY_LOCATION_PRIVATE,)
METHOD_ALIASES: Dict[str, str] = {
    "fl": "facility_location",
    "topk": "top_relevance",
    "fl-private": FACILITY_LOCATION_PRIVATE,
}


def canonical_method(name: Any, argname: str = "method", allowed: Sequence[str] = SELECTION_METHODS) -> str:
    """The canonical name of selection method ``name`` (a canonical name or a short spelling).

    Args:
        name: e.g. ``"dpp"``, ``"top_relevance"`` or its short spelling ``"topk"``.
        argname: what ``name`` came from, for the error message (``"--method"``, ``"selection.method"``).
        allowed: the canonical names accepted here (default :data:`SELECTION_METHODS`).

    Returns:
        The canonical name, one of ``allowed``.

    Raises:
        ValueError: ``name`` is neither one of ``allowed`` nor a short spelling of one; the message lists them.
    """
    canon = METHOD_ALIASES.get(name, name) if isinstance(name, str) else name
    if isinstance(canon, str) and canon in allowed:
        return canon
    short = [f"{a} = {c}" for a, c in METHOD_ALIASES.items() if c in allowed]
    also = f" (short spellings: {', '.join(short)})" if short else ""
    raise ValueError(f"{argname} must be one of {', '.join(allowed)}{also}, got {name!r}")


__all__ = [
    "SELECTION_METHODS",
    "FACILITY_LOCATION_PRIVATE",
    "SELECT_COMMAND_METHODS",
    "METHOD_ALIASES",
    "canonical_method",
]
