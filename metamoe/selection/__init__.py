"""Proxy selection: pick public samples that stand in for a client's private data."""

from .baselines import select_random, select_top_relevance
from .distributed import select_dpp_sharded, select_facility_location_greedi, select_facility_location_private_sharded
from .dpp import DppRankWarning, select_dpp
from .facility_location import select_facility_location
from .knn_graph import KnnGraph, build_knn_graph
from .methods import SELECTION_METHODS, canonical_method
from .relevance import relevance_scores
from .result import Selection

__all__ = ["Selection", "select_dpp", "DppRankWarning", "relevance_scores", "select_top_relevance", "select_random",
           "select_facility_location", "build_knn_graph", "KnnGraph",
           "select_dpp_sharded", "select_facility_location_private_sharded", "select_facility_location_greedi",
           "SELECTION_METHODS", "canonical_method"]
