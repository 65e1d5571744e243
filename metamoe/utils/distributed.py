"""torch.distributed plumbing: joining the process group, contiguous shard ranges, collective errors.

Used by the sharded selection (:mod:`metamoe.selection.distributed`) and the sharded pool embedding
(:mod:`metamoe.unify.pool_embedding`), which must cut a pool into the same shards.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Optional, Tuple

DEFAULT_TIMEOUT_S = 600.0


def init_distributed(backend: Optional[str] = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Tuple[int, int]:
    """Join the default process group (from torchrun's environment) if not joined yet; returns (rank, world).

    ``backend``: None picks ``"nccl"`` when CUDA is available and there is a GPU per local rank, else
    ``"gloo"``. ``timeout_s`` (> 0): collective timeout, so that a rank whose peer died raises instead
    of hanging. With nccl the rank's device is set to ``cuda:LOCAL_RANK``.
    """
    import torch
    import torch.distributed as dist

    if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or not timeout_s > 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise RuntimeError(
            f"--distributed needs torchrun's environment ({', '.join(missing)} not set): run "
            f"`torchrun --nproc_per_node=N -m metamoe select --distributed ...`"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= local_world else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    # torch.distributed.nn.functional binds group.WORLD into default arguments when first imported (torch.optim
    # and torch._dynamo import it). Imported after init_process_group, those defaults hold the default group
    # past destroy_process_group: its gloo worker threads outlive it and race the interpreter's exit (a worker
    # releasing a tensor after finalization began aborts the process). Imported first, they hold None.
    import torch.distributed.nn  # noqa: F401

    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(timeout_s)))
    return dist.get_rank(), dist.get_world_size()


SHARD_ALIGN = 64


def shard_range(n: int, rank: int, world: int, align: int = SHARD_ALIGN) -> Tuple[int, int]:
    """[start, stop) of rank's contiguous shard of n rows: near-equal sizes, every boundary a multiple of ``align``.

    Why align: BLAS matrix-vector kernels (MKL, OpenBLAS) handle rows in small blocks (4 on this CPU) and
    the leftover rows with other code, so ``X[a:b] @ q`` equals ``(X @ q)[a:b]`` bit for bit only when a
    and b sit on block boundaries (or b = n). With 64-row boundaries the sharded DPP's residuals equal
    the single process's exactly, not only its picks. Ranks past the data get empty ranges.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    blocks = -(-int(n) // align)
    base, extra = divmod(blocks, int(world))
    start = (rank * base + min(rank, extra)) * align
    stop = start + (base + (1 if rank < extra else 0)) * align
    return min(start, n), min(stop, n)


def pool_shard_range(n: int, rank: int, world: int) -> Tuple[int, int]:
    """The rows of rank's shard of an n-row pool in ``metamoe select --distributed`` and ``metamoe embed-pool``.

    :func:`shard_range` with 64-row boundaries, or 1-row boundaries when n < 64 x world (so that no rank is
    left without rows). Both commands use it, so a pool embedded with W ranks gives each of W selecting
    ranks exactly one shard file."""
    return shard_range(n, rank, world, SHARD_ALIGN if n >= SHARD_ALIGN * world else 1)


def comm_device(group=None):
    import torch
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard_offsets(n_local: int, group, cdev):
    """(offset of this rank, total rows, sizes of every rank) from one all_gather of the shard sizes."""
    import torch
    import torch.distributed as dist

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    t = torch.tensor([n_local], dtype=torch.int64, device=cdev)
    sizes = [torch.zeros_like(t) for _ in range(world)]
    dist.all_gather(sizes, t, group=group)
    sizes = [int(s.item()) for s in sizes]
    return sum(sizes[:rank]), sum(sizes), sizes


def global_argmax(value: float, index: int, group, cdev) -> Tuple[float, int]:
    """(max value, lowest global index holding it) over ranks; exact (float64 values, indices < 2^53).

    A rank with no candidate left passes value=-inf; NaN never wins."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size(group)
    t = torch.tensor([value, float(index)], dtype=torch.float64, device=cdev)
    out = [torch.zeros_like(t) for _ in range(world)]
    dist.all_gather(out, t, group=group)
    pairs = [(float(o[0]), int(o[1])) for o in (x.cpu() for x in out)]
    # largest value, then lowest index (a rank with nothing left sends -inf and its lowest index)
    best_v, best_i = max(pairs, key=lambda p: (p[0], -p[1]))
    return best_v, best_i


def owner_rank(index: int, sizes) -> int:
    acc = 0
    for r, s in enumerate(sizes):
        if index < acc + s:
            return r
        acc += s
    raise RuntimeError(f"global index {index} is outside the pool of {acc} rows")


@contextlib.contextmanager
def collective_errors(timeout_s: float):
    """Turn a failed collective (gloo: plain RuntimeError; NCCL: DistBackendError) into one clear error."""
    import torch.distributed as dist

    try:
        yield
    except RuntimeError as exc:
        if not (isinstance(exc, dist.DistError) or any(w in str(exc) for w in ("gloo", "Gloo", "NCCL", "c10d"))):
            raise
        raise RuntimeError(
            f"a collective failed: another rank died, hangs or closed its connection (collectives time out "
            f"after --timeout {timeout_s:g} s). Cause: {str(exc).splitlines()[0]}"
        ) from None


def finish(failed: bool = False) -> None:
    """Leave the process group. After a failure inside the group (a peer died or timed out) the group is
    in an undefined state and tearing it down can abort or block, so the process exits at once with
    code 2 (the error was already printed)."""
    import sys

    import torch.distributed as dist

    if failed and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - exiting anyway; the error that matters was already reported
            pass
