"""Leading singular vectors and singular values of a matrix from its SMALLER Gram matrix.

Conv-kernel unfoldings are far from square (512 × 4608 for a 512×512×3×3 kernel, 2048 × 512 for a
1×1 2048←512 conv). An eigendecomposition of the smaller of A·Aᵀ and Aᵀ·A (torch.linalg.eigh, in
float64) gives the leading singular triplets many times faster than an SVD of A, and far faster
than an eigh of the larger Gram. Squaring the matrix squares its condition number: eigenvalues
below ~1e-16·σ₁² are noise, which only matters for the tail of the spectrum (those singular values
come back as 0 or a few ulps of σ₁; rank rules and errors that add up σ² are unaffected).

The eigendecompositions and QRs run on one thread (`serial_lapack`): LAPACK's tridiagonal
reduction enters one OpenMP parallel region per column, and on a shared machine every region
waits for a descheduled worker. Measured on this 2-core machine at load average 8: eigh of a
128² Gram 1.0 s with 2 threads against 0.016 s with one, 512²: 0.97 s against 0.24 s. The Gram
products themselves (few, large GEMMs) keep every thread.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["gram_eigh", "leading_left_vectors", "squared_singular_values", "truncated_svd", "serial_lapack"]


@contextmanager
def serial_lapack() -> Iterator[None]:
    """Run the enclosed torch calls on one intra-op thread, then restore the thread count."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _check(matrix: torch.Tensor) -> None:
    if not isinstance(matrix, torch.Tensor) or matrix.ndim != 2:
        raise ValueError(f"expected a matrix, got {getattr(matrix, 'shape', type(matrix).__name__)!r}")


def squared_singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """σᵢ² of a matrix, largest first (min(m, n) of them, float64, clamped at 0), from the
    eigenvalues of its smaller Gram matrix."""
    _check(matrix)
    a = matrix.detach().double()
    gram = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
    with serial_lapack():
        values = torch.linalg.eigvalsh(gram)
    return values.flip(0).clamp_min(0.0)


def gram_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Eigendecomposition of the smaller Gram matrix of `matrix` (m × n), largest first.

    Returns (eigenvalues (k,), eigenvectors (k, k), wide) with k = min(m, n): the eigenvectors
    are the left singular vectors when `wide` (m ≤ n, Gram A·Aᵀ), the right ones otherwise.
    Computed in the matrix's dtype (pass float64 where the Gram needs it).
    """
    _check(matrix)
    wide = matrix.shape[0] <= matrix.shape[1]
    gram = matrix @ matrix.T if wide else matrix.T @ matrix
    with serial_lapack():
        values, vectors = torch.linalg.eigh(gram)
    return values.flip(0), vectors.flip(1), wide


def leading_left_vectors(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` leading left singular vectors U (m × k, orthonormal columns) of an m × n matrix and
    its k largest squared singular values, through the smaller Gram matrix.

    For a tall matrix (m > n) U = orthonormalised A·V from the right singular vectors V, so that
    U stays orthonormal when trailing singular values are zero. Needs 1 ≤ k ≤ min(m, n).
    """
    _check(matrix)
    m, n = matrix.shape
    if not 1 <= k <= min(m, n):
        raise ValueError(f"asked for {k} singular vectors of a {m}×{n} matrix (1..{min(m, n)})")
    values, vectors, wide = gram_eigh(matrix)
    values = values[:k].clamp_min(0.0)
    if wide:
        return vectors[:, :k], values
    # A·v_i = σ_i·u_i: orthogonal columns, normalised by the QR.
    return _orthonormal_columns(matrix @ vectors[:, :k]), values


def _orthonormal_columns(product: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning A·V (columns already orthogonal, norms σ_i), signs kept;
    columns with σ_i = 0 are completed by the QR."""
    with serial_lapack():
        q, r = torch.linalg.qr(product)
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)


def truncated_svd(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-k truncated SVD (U (m×k), σ (k,), V (n×k), both factors orthonormal) from one eigh of
    the smaller Gram matrix; the other side's vectors are A·V (or Aᵀ·U) orthonormalised."""
    _check(matrix)
    m, n = matrix.shape
    if not 1 <= k <= min(m, n):
        raise ValueError(f"asked for {k} singular vectors of a {m}×{n} matrix (1..{min(m, n)})")
    values, vectors, wide = gram_eigh(matrix)
    sigma = values[:k].clamp_min(0.0).sqrt()
    if wide:
        u = vectors[:, :k]
        return u, sigma, _orthonormal_columns(matrix.T @ u)
    v = vectors[:, :k]
    return _orthonormal_columns(matrix @ v), sigma, v
