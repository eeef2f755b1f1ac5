"""Incremental processing stages and the per-series pipeline that composes them."""
