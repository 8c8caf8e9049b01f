"""Pruning logic without module swapping: removable blocks found by graph pattern (blocks.py),
block importance criteria (criteria.py), how many blocks to remove (selection.py) and dynamic mask
targets (masks.py)."""
