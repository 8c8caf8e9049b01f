"""Truncated SVD of a matrix, split into two factors (docs/methods.md §5)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .gram import serial_lapack


class SVDFactors(NamedTuple):
    """W ≈ second @ first: `first` is r×S (√Σ·Vᵀ), `second` is T×r (U·√Σ)."""

    first: torch.Tensor
    second: torch.Tensor


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values of a 2-D tensor, largest first, computed in float64."""
    if matrix.ndim != 2:
        raise ValueError(f"expected a matrix, got a tensor of shape {tuple(matrix.shape)}")
    return torch.linalg.svdvals(matrix.detach().double())


def gram_svd(matrix: torch.Tensor, n_eigenvecs: Optional[int] = None, **_: object):
    """Truncated SVD through the eigen-decomposition of the small Gram matrix A·Aᵀ.

    HOOI only needs the leading left singular vectors of fat unfoldings (channels × the rest); an
    eigh of a channels×channels matrix gets them many times faster than a full SVD. Returns
    (U, S, Vᵀ) in tensorly's convention so that partial_tucker can use it as its `svd`.
    """
    transpose = matrix.shape[0] > matrix.shape[1]
    a = matrix.T if transpose else matrix
    k = min(a.shape) if n_eigenvecs is None else min(n_eigenvecs, min(a.shape))
    with serial_lapack():  # see fxshift.decompose.gram
        eigenvalues, vectors = torch.linalg.eigh(a @ a.T)
    order = torch.argsort(eigenvalues, descending=True)[:k]
    s = eigenvalues[order].clamp_min(0).sqrt()
    u = vectors[:, order]
    v = (u.T @ a) / s.clamp_min(torch.finfo(s.dtype).tiny)[:, None]
    return (v.T, s, u.T) if transpose else (u, s, v)


def svd_factors(matrix: torch.Tensor, rank: int) -> SVDFactors:
    """Best rank-`rank` factorisation of a T×S matrix (Eckart–Young), balanced by √Σ.

    Parameters
    ----------
    matrix : Tensor, shape (T, S)
    rank : int, 1 ≤ rank ≤ min(T, S)

    Returns
    -------
    SVDFactors(first (rank, S), second (T, rank)) in the matrix's dtype. Computed through the
    Gram matrix of the smaller side in float64: several times faster than a full SVD on large
    classifier layers, and accurate for the well-conditioned weights of trained networks.
    """
    if matrix.ndim != 2:
        raise ValueError(f"expected a matrix, got a tensor of shape {tuple(matrix.shape)}")
    if not 1 <= rank <= min(matrix.shape):
        raise ValueError(f"rank {rank} is outside 1..{min(matrix.shape)} for a {tuple(matrix.shape)} matrix")
    u, s, vh = gram_svd(matrix.detach().double(), rank)
    root = s.sqrt()
    first = root[:, None] * vh
    second = u * root[None, :]
    return SVDFactors(first.to(matrix.dtype), second.to(matrix.dtype))
