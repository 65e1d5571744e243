import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(config, items):
    # GPU tests are skipped where torch sees no CUDA device. The check runs once, after collection,
    # never at import time of a test module.
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none visible)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one intra-op thread is as fast, and far faster when the CPU is shared (no OpenMP spin)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def run_python(code: str, env_extra=None, timeout=300):
    """Run ``code`` in a fresh interpreter (for import-time behaviour); returns CompletedProcess."""
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT
    )


# --------------------------------------------------------------------------- torch.distributed tests


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, port: int, world: int = 2, **extra) -> dict:
    """The environment torchrun gives rank ``rank`` of ``world`` (one OMP thread, no Triton interpreter)."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
               LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1", **extra)
    env.pop("TRITON_INTERPRET", None)
    return env


def run_beside_dead_peer(survivor_cmd, peer_code: str, timeout: float = 60):
    """Start ``survivor_cmd`` as rank 0 and ``python -c peer_code`` as rank 1 of 2 (the peer that dies or
    hangs); returns (survivor's exit code, its stderr, seconds it took). Both are killed afterwards."""
    port = free_port()
    survivor = subprocess.Popen(survivor_cmd, env=rank_env(0, port), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    other = subprocess.Popen([sys.executable, "-c", peer_code], env=rank_env(1, port),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    try:
        _, err = survivor.communicate(timeout=timeout)
    finally:
        survivor.kill()
        other.kill()
        other.wait()
    return survivor.returncode, err, time.monotonic() - t0


def skip_unavailable(backend: str) -> None:
    """Skip the calling test when ``backend`` cannot run here (the reason comes from the backend registry)."""
    from metamoe.backends import availability

    reason = availability.backend_unavailable_reason(backend)
    if reason:
        pytest.skip(f"{backend} backend unavailable: {reason}")
