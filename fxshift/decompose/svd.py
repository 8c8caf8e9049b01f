"""Truncated SVD of a matrix, split into two factors (methods.md §5)."""
from __future__ import annotations

from typing import NamedTuple

import torch


class SVDFactors(NamedTuple):
    """W ≈ second @ first: `first` is r×S (√Σ·Vᵀ), `second` is T×r (U·√Σ)."""

    first: torch.Tensor
    second: torch.Tensor


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values of a 2-D tensor, largest first, computed in float64."""
    if matrix.ndim != 2:
        raise ValueError(f"expected a matrix, got a tensor of shape {tuple(matrix.shape)}")
    return torch.linalg.svdvals(matrix.detach().double())


def svd_factors(matrix: torch.Tensor, rank: int) -> SVDFactors:
    """Best rank-`rank` factorisation of a T×S matrix (Eckart–Young), balanced by √Σ.

    Parameters
    ----------
    matrix : Tensor, shape (T, S)
    rank : int, 1 ≤ rank ≤ min(T, S)

    Returns
    -------
    SVDFactors(first (rank, S), second (T, rank)) in the matrix's dtype.
    """
    if matrix.ndim != 2:
        raise ValueError(f"expected a matrix, got a tensor of shape {tuple(matrix.shape)}")
    if not 1 <= rank <= min(matrix.shape):
        raise ValueError(f"rank {rank} is outside 1..{min(matrix.shape)} for a {tuple(matrix.shape)} matrix")
    u, s, vh = torch.linalg.svd(matrix.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    first = root[:, None] * vh[:rank]
    second = u[:, :rank] * root[None, :]
    return SVDFactors(first.to(matrix.dtype), second.to(matrix.dtype))
