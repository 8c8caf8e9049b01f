"""Pruning logic without module swapping: removable blocks found by graph pattern (blocks.py), block
importance criteria (criteria.py), the graph side of gated units (gated_graph.py) and their per-sample
cost (dynamic_macs.py). How many blocks to remove is planning: fxshift.plan.block_count."""
