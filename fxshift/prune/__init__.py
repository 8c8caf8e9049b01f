"""Pruning logic without module swapping: removable blocks, importance criteria, mask targets."""
