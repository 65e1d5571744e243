"""Autotune configs of the MoE grouped GEMMs (``moe_experts``) and the rules that prune them.

Each kernel's config list (``KERNEL_CONFIGS``) is what the autotuner tries on a GPU. Before anything compiles,
a config is dropped when its shared memory (``shared_memory_estimate``: num_stages buffers of the operand
tiles in the operands' element size) cannot fit an H200 block (``SHARED_MEMORY_LIMIT``), when its float32
accumulators exceed ``ACC_REGISTERS_PER_THREAD`` values per thread (they spill), or, for float32 IEEE dots,
when its output tile exceeds ``IEEE_MAX_TILE`` elements. ``configs_for`` lists every config with the decision
and its reason; benchmarks/compile_report.py checks the estimate and the spills against the compiler's.
"""

from __future__ import annotations

import torch
import triton

ACT_SWIGLU = 0
ACT_GELU = 1
ACT_GELU_TANH = 2
ACTIVATIONS = {"swiglu": ACT_SWIGLU, "gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH}
"""Activation codes of the kernels' ACT constexpr."""

_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (128, 128, 64, 8, 3),
        (128, 64, 64, 8, 4),
        (64, 128, 64, 8, 4),
        (64, 256, 64, 8, 3),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 64, 32, 4, 4),
        (32, 64, 64, 4, 3),
        (16, 64, 64, 4, 3),
    ]
]
_WGRAD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N1": b1, "BLOCK_N2": b2}, num_warps=w, num_stages=s)
    for bm, b1, b2, w, s in [
        (64, 128, 128, 8, 3),
        (32, 128, 256, 8, 3),
        (64, 128, 64, 4, 4),
        (32, 64, 64, 4, 4),
        (16, 64, 64, 4, 3),
    ]
]

KERNEL_CONFIGS = {
    "gather_fwd": _GEMM_CONFIGS,
    "scatter": _GEMM_CONFIGS,
    "gather_bwd": _GEMM_CONFIGS,
    "weight_grad": _WGRAD_CONFIGS,
}
"""The autotune config list of each kernel, by the kernel names ``configs_for`` and the compile report use."""

SHARED_MEMORY_LIMIT = 232448
"""Bytes of shared memory one block may use on an H200 (sm_90: 227 KiB, the opt-in maximum per block)."""

# Per kernel: the meta-parameters giving the main-loop dot's (rows of A, depth, columns of B) and the launch
# argument whose tensor is A, resp. B (weight_grad's dot is trans(L) @ R over BLOCK_M rows).
DOT_TILES = {
    "gather_fwd": (("BLOCK_M", "BLOCK_K", "BLOCK_N"), "x_ptr", "w_ptr"),
    "scatter": (("BLOCK_M", "BLOCK_K", "BLOCK_N"), "a_ptr", "w_ptr"),
    "gather_bwd": (("BLOCK_M", "BLOCK_K", "BLOCK_N"), "dy_ptr", "w_ptr"),
    "weight_grad": (("BLOCK_N1", "BLOCK_M", "BLOCK_N2"), "l_ptr", "r_ptr"),
}
_ELEMENT_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


def _element_bytes(dtype) -> int:
    """Bytes per element of an operand dtype: a torch dtype or one of the names fp32/bf16/fp16."""
    if isinstance(dtype, torch.dtype):
        name = str(dtype).replace("torch.", "")
    else:
        name = str(dtype)
    if name not in _ELEMENT_BYTES:
        raise ValueError(f"dtype must be float32, bfloat16 or float16 (a torch dtype or fp32/bf16/fp16), "
                         f"got {dtype!r}")
    return _ELEMENT_BYTES[name]


def _check_kernel(kernel: str) -> None:
    if kernel not in KERNEL_CONFIGS:
        raise ValueError(f"kernel must be one of {sorted(KERNEL_CONFIGS)}, got {kernel!r}")


def _two_b_tiles(kernel: str, activation) -> bool:
    """The SwiGLU gather forward loads a gate and an up tile of the weight per step; None means "either"."""
    if kernel != "gather_fwd":
        return False
    if activation is None:
        return True
    act = ACTIVATIONS.get(activation, activation) if isinstance(activation, str) else activation
    if act not in ACTIVATIONS.values():
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)} or None, got {activation!r}")
    return act == ACT_SWIGLU


def shared_memory_estimate(kernel: str, config, a_dtype, b_dtype=None, activation=None) -> int:
    """Upper bound on the shared memory, in bytes per block, that ``config`` of ``kernel`` compiles to on sm_90.

    The main loop is software-pipelined with ``config.num_stages`` buffers of each operand tile of one step:
    the A tile (rows x depth) in ``a_dtype`` and the B tile (depth x columns) in ``b_dtype`` (default
    ``a_dtype``); the SwiGLU gather forward loads two B tiles (``activation=None`` assumes SwiGLU for
    that kernel). The epilogue may stage the float32 (rows x columns) accumulator tile through shared memory
    once the loop's buffers are free, so the bound is the larger of the two. The compile report
    (benchmarks/compile_report.py) checks this bound against the compiler's allocation of every config.
    """
    _check_kernel(kernel)
    (rows, depth, cols), _, _ = DOT_TILES[kernel]
    meta = config.kwargs
    missing = [n for n in (rows, depth, cols) if n not in meta]
    if missing:
        raise ValueError(f"config of kernel {kernel!r} lacks {missing}: {config}")
    a_bytes = _element_bytes(a_dtype)
    b_bytes = _element_bytes(b_dtype if b_dtype is not None else a_dtype)
    n_b = 2 if _two_b_tiles(kernel, activation) else 1
    per_stage = meta[rows] * meta[depth] * a_bytes + n_b * meta[depth] * meta[cols] * b_bytes
    epilogue = meta[rows] * meta[cols] * 4
    return max(config.num_stages * per_stage, epilogue)


def _config_str(config) -> str:
    tiles = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{tiles} num_warps={config.num_warps} num_stages={config.num_stages}"


def over_limit_reason(kernel: str, config, need: int) -> str:
    return (f"kernel {kernel!r} config {_config_str(config)} needs {need} bytes of shared memory per block "
            f"(estimate), over the {SHARED_MEMORY_LIMIT} an H200 allows")


def configs_for(kernel: str, dtype, activation=None, dot_prec=None):
    """Every config of ``kernel``'s autotune list as ``(config, kept, reason)``: ``kept`` is whether the
    pruning lets the autotuner pick it for ``dtype`` operands (a torch dtype or fp32/bf16/fp16) and
    ``activation`` (gather_fwd only; None assumes SwiGLU, the larger): the shared memory must fit
    ``SHARED_MEMORY_LIMIT``, the float32 accumulators ``ACC_REGISTERS_PER_THREAD`` values per thread, and
    with ``dot_prec="ieee"`` (float32 without TF32) the output tile ``IEEE_MAX_TILE`` elements. ``reason``
    says which rule drops it, "" when kept."""
    _check_kernel(kernel)
    out = []
    for cfg in KERNEL_CONFIGS[kernel]:
        need = shared_memory_estimate(kernel, cfg, dtype, dtype, activation)
        acc = acc_per_thread(kernel, cfg, activation)
        if need > SHARED_MEMORY_LIMIT:
            out.append((cfg, False, over_limit_reason(kernel, cfg, need)))
        elif acc > ACC_REGISTERS_PER_THREAD:
            out.append((cfg, False, f"kernel {kernel!r} config {_config_str(cfg)}: {acc} float32 accumulator "
                                    f"values per thread, over {ACC_REGISTERS_PER_THREAD} (it would spill)"))
        elif _too_large_for_ieee(kernel, cfg, dot_prec):
            out.append((cfg, False, f"kernel {kernel!r} config {_config_str(cfg)}: float32 IEEE dots (no TF32) "
                                    f"take output tiles of at most {IEEE_MAX_TILE} elements"))
        else:
            out.append((cfg, True, ""))
    return out


ACC_REGISTERS_PER_THREAD = 64
"""Most float32 accumulator values one thread may hold (of its 255 registers): past it the operand addresses,
the pipeline and the epilogue no longer fit and the compiler spills (checked by the compile report)."""


def _accumulators(kernel: str, activation) -> int:
    return 2 if _two_b_tiles(kernel, activation) else 1


def acc_per_thread(kernel: str, config, activation) -> int:
    (rows, _, cols), _, _ = DOT_TILES[kernel]
    return _accumulators(kernel, activation) * config.kwargs[rows] * config.kwargs[cols] // (32 * config.num_warps)


IEEE_MAX_TILE = 64 * 64
"""Largest output tile (elements) the autotuner tries for float32 IEEE dots: they run on the FMA units, not the
tensor cores, so large tiles gain nothing and cost long compiles and register spills."""


def _too_large_for_ieee(kernel: str, config, dot_prec) -> bool:
    (rows, _, cols), _, _ = DOT_TILES[kernel]
    return dot_prec == "ieee" and config.kwargs[rows] * config.kwargs[cols] > IEEE_MAX_TILE


def shared_memory_pruner(kernel: str):
    """``early_config_prune`` for ``kernel``: drops the configs that cannot fit before any of them compiles."""
    _, a_arg, b_arg = DOT_TILES[kernel]

    def prune(configs, named_args, **kwargs):
        a_dtype, b_dtype = named_args[a_arg].dtype, named_args[b_arg].dtype
        act = kwargs.get("ACT")
        kept = [c for c in configs
                if shared_memory_estimate(kernel, c, a_dtype, b_dtype, act) <= SHARED_MEMORY_LIMIT
                and acc_per_thread(kernel, c, act) <= ACC_REGISTERS_PER_THREAD
                and not _too_large_for_ieee(kernel, c, kwargs.get("DOT_PREC"))]
        if not kept:
            raise ValueError(f"no config of kernel {kernel!r} fits {SHARED_MEMORY_LIMIT} bytes of shared memory "
                             f"for {a_dtype} x {b_dtype} operands")
        return kept

    return prune
