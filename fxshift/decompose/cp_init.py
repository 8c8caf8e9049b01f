"""The SVD initialisation of CP-ALS (tensorly's init="svd"), through the smaller Gram matrices.

Factor m starts as the `rank` leading left singular vectors of the mode-m unfolding of the kernel
(the first factor scaled by the singular values); where a mode has fewer than `rank` entries the
missing columns are random (the caller's `fill`, so that each solver keeps its own seeded draws).
tensorly computes those vectors with an SVD of every unfolding (a 512 × 4608 and a 3 × 786432 one
for a 512×512×3×3 kernel); the eigh of the smaller Gram matrix of each (fxshift.decompose.gram)
gives the same subspaces many times faster. Singular vectors are defined up to sign, and ALS
started from sign-flipped columns follows the same path with the same signs flipped, so the
result is the same decomposition.
"""
from __future__ import annotations

from typing import Callable

import torch

from .gram import leading_left_vectors

__all__ = ["cp_svd_init"]


def cp_svd_init(weight: torch.Tensor, rank: int, fill: Callable[[int, int], torch.Tensor]) -> list[torch.Tensor]:
    """Four float64 factors (T×R, S×R, kh×R, kw×R) of tensorly's SVD initialisation of a kernel.

    fill(rows, cols) returns the random columns for a mode with fewer than `rank` entries (called
    in mode order, as tensorly draws them).
    """
    if weight.ndim != 4:
        raise ValueError(f"expected a 4-D conv kernel, got shape {tuple(weight.shape)}")
    w = weight.detach().double()
    factors = []
    for mode in range(4):
        unfolding = w.movedim(mode, 0).reshape(w.shape[mode], -1)
        take = min(rank, *unfolding.shape)
        u, squared = leading_left_vectors(unfolding, take)
        if mode == 0:
            u = u * squared.sqrt()
        if w.shape[mode] < rank:
            u = torch.cat([u, fill(u.shape[0], rank - u.shape[1]).double()], dim=1)
        factors.append(u[:, :rank])
    return factors
