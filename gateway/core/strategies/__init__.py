"""Aggregation strategies over spooled delta updates, each bounded in memory (see base.py)."""
