"""Bundled example data (no downloads)."""
