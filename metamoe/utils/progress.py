"""Progress bars (tqdm) for long loops, shown only when asked for."""

from __future__ import annotations


def progress_bar(total: int, enabled: bool, desc: str, unit: str = "pick"):
    """A tqdm bar of ``total`` steps (disabled unless ``enabled``; hidden when the output is not a terminal
    only if tqdm decides so), left off the screen when done."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=(None if enabled else True), leave=False)


def update_every(k: int, per: int, cap: int) -> int:
    """How many picks a greedy loop makes between two bar updates: ``k // per``, within [16, cap]."""
    return int(min(cap, max(16, k // per)))
