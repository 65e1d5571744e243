"""``python -m metamoe.info``: what metamoe can run here, and why the rest cannot."""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
from typing import Any, Dict, List, Optional

from .backends import availability
from .backends.registry import BACKENDS, all_ops
from .version import __version__

# Modules that define ops (imported here to list every op and backend).
OP_MODULES = ("metamoe.selection.dpp", "metamoe.ops.router_topk", "metamoe.ops.moe_experts", "metamoe.ops.lora_delta",
              "metamoe.selection.facility_location")

_PACKAGES = ("torch", "triton", "numpy", "faiss", "transformers", "timm", "safetensors", "cupy")


def _version_of(name: str) -> str:
    try:
        mod = importlib.import_module(name)
    except Exception as exc:  # missing, or broken: say which
        return (
            f"not available ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})".rstrip(": )")
            + ")"
        )
    return str(getattr(mod, "__version__", "unknown"))


def _gpu() -> str:
    import torch

    if not torch.cuda.is_available():
        reason = availability.torch_cuda_reason()
        return f"none ({reason})"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return ", ".join(names)


def _seed_models() -> List[Dict[str, Any]]:
    try:
        from .models.registry import supported_seed_architectures

        return supported_seed_architectures()
    except Exception as exc:  # a registry that cannot list itself is itself worth reporting
        return [{"source": None, "family": None, "adapter": None, "tasks": [], "names": [], "refused": {},
                 "note": f"could not list seed models ({type(exc).__name__}: {exc})"}]


def collect() -> Dict[str, Any]:
    """Everything ``metamoe.info`` prints, as a JSON-able dict."""
    load_errors = {}
    for mod in OP_MODULES:
        try:
            importlib.import_module(mod)
        except Exception as exc:  # an op module that fails to import is itself worth reporting
            load_errors[mod] = f"{type(exc).__name__}: {exc}"
    backends = {}
    for b in BACKENDS:
        reason = availability.backend_unavailable_reason(b)
        backends[b] = {"available": reason is None, "reason": reason or _backend_detail(b)}
    ops = {}
    for name, op in all_ops().items():
        ops[name] = [
            {"backend": b, "available": ok, "detail": why} for (b, ok, why) in op.status()
        ]
    return {
        "metamoe": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {p: _version_of(p) for p in _PACKAGES},
        "gpu": _gpu(),
        "triton_interpret": availability.triton_interpret(),
        "build": availability.build_info(),
        "backends": backends,
        "ops": ops,
        "op_module_errors": load_errors,
        "seed_models": _seed_models(),
    }


def _backend_detail(b: str) -> str:
    if b == "torch":
        return "pure PyTorch reference, runs on every device"
    if b == "cpp":
        mod, _ = availability.extension("_C")
        threads = mod.num_threads() if mod is not None else 0
        return f"metamoe._C loaded (OpenMP: {bool(getattr(mod, 'openmp', False))}, {threads} threads)"
    if b == "cuda":
        mod, _ = availability.extension("_C_cuda")
        return f"metamoe._C_cuda loaded, {mod.device_count()[0]} device(s)"
    if b == "triton":
        return "interpreter on the CPU (TRITON_INTERPRET=1)" if availability.triton_interpret() else "GPU kernels"
    return ""


def render(info: Dict[str, Any]) -> str:
    out: List[str] = []
    out.append(f"metamoe {info['metamoe']}  (Python {info['python']}, {info['platform']})")
    out.append("")
    out.append("packages:")
    for name, ver in info["packages"].items():
        out.append(f"  {name:<13} {ver}")
    out.append(f"  {'GPU':<13} {info['gpu']}")
    out.append("")
    build = info["build"]
    out.append("compiled extension (build metadata):")
    if build:
        out.append(f"  compiler    {build.get('cxx_compiler')}  flags: {build.get('cxx_flags')}")
        out.append(f"  OpenMP      {build.get('openmp')} {build.get('openmp_version', '')}".rstrip())
        cuda = (
            f"CUDA {build.get('cuda_version')} archs {', '.join(build.get('cuda_archs', []))}"
            if build.get("cuda_built")
            else f"not built: {build.get('cuda_not_built_reason')}"
        )
        out.append(f"  _C_cuda     {cuda}")
        out.append(
            f"  built       {build.get('built_at')} for metamoe {build.get('version')}, "
            f"pybind11 {build.get('pybind11_version')}"
        )
    else:
        out.append("  none found (the extension was not built; only the torch/triton backends can run)")
    out.append("")
    out.append("backends:")
    for b, st in info["backends"].items():
        out.append(f"  {b:<7} {'available  ' if st['available'] else 'unavailable'}  {st['reason']}")
    out.append("")
    out.append("ops:")
    for name, rows in info["ops"].items():
        out.append(f"  {name}")
        for row in rows:
            mark = "ok " if row["available"] else "-- "
            out.append(f"    {mark}{row['backend']:<7} {row['detail']}")
    for mod, err in info["op_module_errors"].items():
        out.append(f"  (could not import {mod}: {err})")
    out.append("")
    out.extend(render_seed_models(info["seed_models"], every_name=False))
    return "\n".join(out)


def render_seed_models(families: List[Dict[str, Any]], every_name: bool) -> List[str]:
    """The "seed models" section: one line per family; with ``every_name`` each supported name and each refused
    one with its reason."""
    out = ["seed models (seed_model.name; LoRA wraps each FFN):"]
    for fam in families:
        names = fam["names"]
        if fam["family"] is None:
            label = f"{fam['source']}:" if fam["source"] else "?"
        elif len(names) == 1 and not fam["refused"]:
            label = names[0]
        else:
            label = f"{fam['source']}:<arch>"
        out.append(f"  {label:<14} {fam['note']}")
        if every_name:
            out.extend(f"    ok {n}" for n in names if len(names) > 1 or fam["refused"])
            out.extend(f"    -- {n}  {why}" for n, why in fam["refused"].items())
    if not every_name and any(len(f["names"]) > 1 or f["refused"] for f in families):
        out.append("  (metamoe info --seed-models lists every architecture)")
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="metamoe info", description="Show what metamoe can run here and why the rest cannot."
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--seed-models", action="store_true",
        help="print only the supported seed-model architectures, every name (and why the others are refused)",
    )
    args = parser.parse_args(argv)
    if args.seed_models:
        families = _seed_models()
        print(json.dumps(families, indent=1) if args.json else "\n".join(render_seed_models(families, True)))
        return 0
    info = collect()
    print(json.dumps(info, indent=1) if args.json else render(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
