"""Raises while loading."""

raise RuntimeError("this model never loads")
