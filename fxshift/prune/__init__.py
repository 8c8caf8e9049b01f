"""Pruning logic without module swapping: removable blocks found by graph pattern (blocks.py) and
block importance criteria (criteria.py)."""
