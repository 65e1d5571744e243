"""Proxy selection: pick public samples that stand in for a client's private data."""

from .dpp import DppRankWarning, select_dpp
from .result import Selection

__all__ = ["Selection", "select_dpp", "DppRankWarning"]
