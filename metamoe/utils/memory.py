"""How much memory a new workspace may take on a device."""

from __future__ import annotations

import os
from typing import Any, Tuple


def available_bytes(device: Any) -> Tuple[int, str]:
    """(bytes free for new allocations, where): CUDA free memory on a GPU, else the host's MemAvailable.

    Where neither can be read the host's free pages are returned, or 2**62 (unknown: do not refuse)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0]), f"GPU {dev}"
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "host memory (MemAvailable)"
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")), "host memory"
    except (ValueError, OSError, AttributeError):
        return 1 << 62, "host memory (unknown)"
