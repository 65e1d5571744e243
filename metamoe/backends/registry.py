"""Per-call backend dispatch from declared capabilities.

Every op (``dpp_greedy``, ``router_topk``, ...) has up to four implementations: ``torch`` (the pure
PyTorch reference, always available), ``triton`` (``kernels/``), ``cpp`` and ``cuda`` (``csrc/``).
Each declares, as data, the devices and dtypes it takes, plus an optional ``check`` for shape limits,
and answers :meth:`Implementation.not_supported_reasons` in words.

``backend="auto"`` walks the op's implementations from fastest to slowest and takes the first that
can run the call. An explicit backend (argument, or the ``METAMOE_BACKEND`` environment variable)
that cannot run raises :class:`BackendNotSupportedError` naming the backend and every reason.

An op whose implementations are strategies of one backend rather than backends (the LoRA experts' low-rank
deltas: ``grouped`` on torch's grouped GEMM, or ``dense``, both plain PyTorch) names them itself
(``define_op(..., names=("grouped", "dense"), arg="lora_impl")``): the same declared capabilities, the same
``"auto"`` walk and the same errors, chosen by the op's own argument ``arg``, never by ``METAMOE_BACKEND``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from . import availability

BACKENDS: Tuple[str, ...] = ("torch", "triton", "cpp", "cuda")
ENV_VAR = "METAMOE_BACKEND"

# Default preference when an op does not state its own: compiled / fused code first, torch last.
DEFAULT_PRIORITY: Tuple[str, ...] = ("cuda", "triton", "cpp", "torch")


class BackendError(RuntimeError):
    """Base class of dispatch errors."""


class BackendNotSupportedError(BackendError, ValueError):
    """An explicitly requested backend cannot run this call (the message says why)."""


class NoBackendError(BackendError):
    """No implementation of the op can run this call (the message lists each one's reasons)."""


@dataclass(frozen=True)
class CallSpec:
    """What an implementation needs to know about a call to decide whether it can take it.

    ``device`` is a device type (``"cpu"``, ``"cuda"``); ``dtype`` a short dtype name (``"float32"``,
    ``"bfloat16"``, ...); ``extra`` holds op-specific facts (sizes, flags) for the ``check`` hooks.
    """

    device: str
    dtype: str
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.extra[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.extra.get(key, default)


@dataclass
class Implementation:
    """One backend's implementation of one op, with its declared capabilities."""

    op: str
    backend: str
    fn: Callable[..., Any]
    devices: Tuple[str, ...]
    dtypes: Tuple[str, ...]
    check: Optional[Callable[[CallSpec], Iterable[str]]] = None
    doc: str = ""

    def unavailable_reason(self) -> Optional[str]:
        """Why this backend cannot run at all on this machine (None if it can)."""
        if self.backend not in BACKENDS:  # an op's own implementation name: its ``check`` says what it needs
            return None
        return availability.backend_unavailable_reason(self.backend)

    def devices_now(self) -> Tuple[str, ...]:
        # Triton takes CPU tensors only through its interpreter (TRITON_INTERPRET=1).
        if self.backend == "triton" and availability.triton_interpret():
            return tuple(dict.fromkeys(self.devices + ("cpu",)))
        return self.devices

    def not_supported_reasons(self, spec: CallSpec) -> List[str]:
        """Every reason this implementation cannot take ``spec``; empty when it can."""
        reasons: List[str] = []
        unavailable = self.unavailable_reason()
        if unavailable:
            reasons.append(unavailable)
        devices = self.devices_now()
        if spec.device not in devices:
            hint = ""
            if self.backend == "triton" and spec.device == "cpu":
                hint = " (set TRITON_INTERPRET=1 to run Triton kernels on the CPU through the interpreter)"
            reasons.append(f"inputs are on device '{spec.device}', it takes {'/'.join(devices)}{hint}")
        if spec.dtype not in self.dtypes:
            reasons.append(f"dtype {spec.dtype} is not supported, it takes {', '.join(self.dtypes)}")
        if self.check is not None and not reasons:
            reasons.extend(self.check(spec))
        return reasons


class Op:
    """An op and its implementations; ``Op.register`` is a decorator, ``Op.select`` picks one per call.

    ``names``: what its implementations are called, the four :data:`BACKENDS` by default; an op with names of
    its own is chosen through the argument ``arg`` (named in its errors) and ignores ``METAMOE_BACKEND``.
    ``priority``: fastest first; default :data:`DEFAULT_PRIORITY`, or ``names`` in order for an op's own names.
    """

    def __init__(
        self,
        name: str,
        priority: Optional[Sequence[str]] = None,
        doc: str = "",
        *,
        names: Sequence[str] = BACKENDS,
        arg: str = "backend",
    ):
        names = tuple(names)
        if not names or "auto" in names:
            raise ValueError(f"op {name!r}: names must be non-empty and may not contain 'auto', got {names}")
        if priority is None:
            priority = DEFAULT_PRIORITY if names == BACKENDS else names
        unknown = [b for b in priority if b not in names]
        if unknown:
            raise ValueError(f"op {name!r}: unknown backends in priority {unknown}; known: {names}")
        self.name = name
        self.names = names
        self.arg = arg
        self.priority = tuple(priority)
        self.doc = doc
        self.impls: Dict[str, Implementation] = {}

    def register(
        self,
        backend: str,
        *,
        devices: Sequence[str],
        dtypes: Sequence[str],
        check: Optional[Callable[[CallSpec], Iterable[str]]] = None,
        doc: str = "",
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        if backend not in self.names:
            raise ValueError(f"op {self.name!r}: unknown backend {backend!r}; known: {', '.join(self.names)}")

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.impls[backend] = Implementation(
                self.name, backend, fn, tuple(devices), tuple(dtypes), check, doc or (fn.__doc__ or "").strip()
            )
            return fn

        return deco

    def ordered(self) -> List[Implementation]:
        order = [b for b in self.priority if b in self.impls]
        order += [b for b in self.impls if b not in order]
        return [self.impls[b] for b in order]

    def resolve(self, backend: Optional[str]) -> str:
        """The implementation a call asks for, or ``"auto"``: :func:`resolve_backend` for an op of backends;
        for an op with names of its own, ``backend`` itself (None means ``"auto"``), checked against them."""
        if self.names == BACKENDS:
            return resolve_backend(backend)
        if backend is None:
            return "auto"
        choices = ", ".join(("auto",) + self.names)
        if not isinstance(backend, str):
            raise TypeError(f"{self.arg} must be a string, one of {choices}; got {type(backend).__name__}")
        requested = backend.strip().lower()
        if requested != "auto" and requested not in self.names:
            raise ValueError(f"{self.arg} must be one of {choices}; got {backend!r}")
        return requested

    def select(self, spec: CallSpec, backend: Optional[str] = None) -> Implementation:
        """The implementation that runs ``spec``: the requested one, or the fastest that can."""
        requested = self.resolve(backend)
        if requested != "auto":
            impl = self.impls.get(requested)
            if impl is None:
                have = ", ".join(i.backend for i in self.ordered())
                raise BackendNotSupportedError(
                    f"{self.arg} '{requested}' has no implementation of {self.name} (it has: {have})"
                )
            reasons = impl.not_supported_reasons(spec)  # the availability reason, if any, comes first
            if reasons:
                head = f"{requested} is not available here: " if impl.unavailable_reason() else ""
                raise BackendNotSupportedError(
                    f"{self.arg} '{requested}' cannot run {self.name}: {head}" + "; ".join(reasons)
                )
            return impl
        all_reasons = []
        for impl in self.ordered():
            reasons = impl.not_supported_reasons(spec)
            if not reasons and impl.backend == "triton" and spec.device == "cpu":
                # The interpreter runs Triton kernels on the CPU for testing, far slower than torch:
                # it runs when asked for by name, never as the automatic choice.
                reasons = ["the Triton interpreter (TRITON_INTERPRET=1) runs only when backend='triton' is asked for"]
            if not reasons:
                return impl
            all_reasons.append(f"  {impl.backend}: " + "; ".join(reasons))
        raise NoBackendError(
            f"no {self.arg} can run {self.name} on device={spec.device}, dtype={spec.dtype}:\n"
            + "\n".join(all_reasons)
        )

    def status(self, spec: Optional[CallSpec] = None) -> List[Tuple[str, bool, str]]:
        """``(backend, ok, reason)`` per implementation: whether it can run here at all (or run ``spec``)."""
        rows = []
        for impl in self.ordered():
            reasons = [impl.unavailable_reason()] if spec is None else impl.not_supported_reasons(spec)
            reasons = [r for r in reasons if r]
            if reasons:
                rows.append((impl.backend, False, "; ".join(reasons)))
            else:
                detail = f"devices {'/'.join(impl.devices_now())}; dtypes {', '.join(impl.dtypes)}"
                rows.append((impl.backend, True, detail))
        return rows


_OPS: Dict[str, Op] = {}


def define_op(
    name: str,
    priority: Optional[Sequence[str]] = None,
    doc: str = "",
    *,
    names: Sequence[str] = BACKENDS,
    arg: str = "backend",
) -> Op:
    """Create (once) and return the op named ``name`` (arguments as for :class:`Op`)."""
    if name in _OPS:
        return _OPS[name]
    op = Op(name, priority, doc, names=names, arg=arg)
    _OPS[name] = op
    return op


def get_op(name: str) -> Op:
    try:
        return _OPS[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}; known: {', '.join(sorted(_OPS))}") from None


def all_ops() -> Dict[str, Op]:
    """Every op defined so far (importing :mod:`metamoe` defines them all)."""
    return dict(sorted(_OPS.items()))


def check_backend(backend: Optional[str]) -> Optional[str]:
    """A backend argument checked (``"auto"`` or one of :data:`BACKENDS`, normalised) but not resolved: None
    stays None, so that each call reads ``METAMOE_BACKEND`` then (what layers and patched blocks store)."""
    return None if backend is None else resolve_backend(backend)


def resolve_backend(backend: Optional[str]) -> str:
    """The backend a call asks for: the argument, else ``METAMOE_BACKEND``, else ``"auto"``."""
    source = "backend"
    if backend is None:
        backend = os.environ.get(ENV_VAR, "").strip() or "auto"
        source = ENV_VAR
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, one of auto, {', '.join(BACKENDS)}; got {type(backend).__name__}")
    backend = backend.strip().lower()
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"{source} must be one of auto, {', '.join(BACKENDS)}; got {backend!r}")
    return backend
