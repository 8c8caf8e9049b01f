"""Rank estimation by Empirical Variational Bayes Matrix Factorisation (EVBMF).

The model of Nakajima, Sugiyama, Babacan and Tomioka (JMLR 2013, "Global analytic solution of
fully-observed variational Bayesian matrix factorization") is ``V = B Aᵀ + E`` with Gaussian noise
``E`` of unknown variance ``σ²`` and Gaussian priors on the factors whose variances are learnt too
(empirical Bayes).  The global analytic solution reduces the free energy to a function of ``σ²``
alone, which is minimised here by a one-dimensional search; the rank is then the number of singular
values above the EVB threshold.

Notation (for an ``L×M`` matrix with ``L ≤ M``; a tall matrix is transposed first)::

    α  = L / M
    τ̄  = 2.5129·√α                       (root of log(1+τ) + α·log(1+τ/α) = τ, approximated)
    x̄  = (1 + τ̄)(1 + α/τ̄)
    x_h = γ_h² / (M σ²)                   (γ_h the singular values)
    τ(x) = ½(x − (1+α) + √((x − (1+α))² − 4α))     for x > x̄

Up to terms that do not depend on ``σ²``, twice the free energy divided by ``M`` is::

    Σ_h ψ(x_h) + residual/(M σ²) + (L − H)·log σ²
    ψ(x) = x − log x                                        if x ≤ x̄
    ψ(x) = x − log x + log(τ+1) + α·log(τ/α + 1) − τ         if x > x̄

with ``H`` the number of singular values used (all of them here, so the last two terms vanish).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from .gram import squared_singular_values

__all__ = ["EVBMFResult", "evbmf", "evbmf_rank", "evbmf_threshold"]

#: Approximation of the constant c in τ̄ = c·√α used by Nakajima et al. (2013).
TAU_BAR_COEFF = 2.5129

# Grid size of the coarse search over log σ²; the best grid point is then refined by Brent's method.
_GRID_POINTS = 256
# Floor of the σ² search relative to the all-noise estimate ||V||²/(LM). Only matters for
# matrices whose trailing singular values are exactly zero (noise-free low rank): there the free
# energy decreases without bound as σ² → 0 and the floor decides where the search stops.
_SIGMA2_FLOOR = 1e-12


class EVBMFResult(NamedTuple):
    """Result of :func:`evbmf`.

    Attributes
    ----------
    rank : int
        Number of singular values above the EVB threshold (may be 0).
    sigma2 : float
        Estimated noise variance σ² of one matrix entry.
    """

    rank: int
    sigma2: float


def _as_matrix(matrix: torch.Tensor) -> np.ndarray:
    if not isinstance(matrix, torch.Tensor):
        raise ValueError(f"EVBMF expects a torch.Tensor, got {type(matrix).__name__}")
    if matrix.ndim != 2:
        raise ValueError(f"EVBMF expects a 2-D matrix, got a tensor of shape {tuple(matrix.shape)}")
    if matrix.numel() == 0:
        raise ValueError(f"EVBMF expects a non-empty matrix, got shape {tuple(matrix.shape)}")
    if matrix.is_complex():
        raise ValueError("EVBMF expects a real matrix, got a complex one")
    v = matrix.detach().to(device="cpu", dtype=torch.float64).numpy()
    if not np.all(np.isfinite(v)):
        raise ValueError("EVBMF expects a finite matrix; it contains NaN or Inf")
    return v


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    b = x - (1.0 + alpha)
    return 0.5 * (b + np.sqrt(np.maximum(b * b - 4.0 * alpha, 0.0)))


def _objective(
    log_sigma2: float,
    gamma2: np.ndarray,
    total2: float,
    L: int,
    M: int,
    alpha: float,
    x_bar: float,
) -> float:
    """σ²-dependent part of 2F/M, written so that zero singular values stay finite.

    Σ_h (x_h − log x_h) + residual/(Mσ²) + (L−H)·log σ² equals, up to a constant,
    ||V||²/(Mσ²) + L·log σ²; the retained components add ψ₁(x) = log(τ+1) + α·log(τ/α+1) − τ.
    """
    sigma2 = math.exp(log_sigma2)
    x = gamma2 / (M * sigma2)
    value = total2 / (M * sigma2) + L * log_sigma2
    big = x[x > x_bar]
    if big.size:
        t = _tau(big, alpha)
        value += float(np.sum(np.log1p(t) + alpha * np.log1p(t / alpha) - t))
    return value


def evbmf_threshold(shape: tuple[int, int], sigma2: float) -> float:
    """Singular-value threshold of EVBMF for a matrix shape and noise variance.

    Parameters
    ----------
    shape : tuple of int
        ``(rows, cols)`` of the matrix; the order does not matter.
    sigma2 : float
        Noise variance σ² of one entry.

    Returns
    -------
    float
        ``√(M·σ²·(1+τ̄)(1+α/τ̄))`` with ``L = min(shape)``, ``M = max(shape)``, ``α = L/M``;
        singular values strictly above it are kept.
    """
    L, M = sorted(int(d) for d in shape)
    if L < 1:
        raise ValueError(f"EVBMF threshold needs a non-empty shape, got {tuple(shape)}")
    if not sigma2 >= 0:
        raise ValueError(f"sigma2 must be >= 0, got {sigma2}")
    alpha = L / M
    tau_bar = TAU_BAR_COEFF * math.sqrt(alpha)
    x_bar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)
    return math.sqrt(M * sigma2 * x_bar)


def evbmf(matrix: torch.Tensor) -> EVBMFResult:
    """Estimate the rank and noise variance of a matrix by EVBMF (Nakajima et al., 2013).

    Parameters
    ----------
    matrix : torch.Tensor
        A real 2-D tensor (any float dtype; computed in float64). A tall matrix is transposed
        first, so the result is the same for ``matrix`` and ``matrix.T``.

    Returns
    -------
    EVBMFResult
        ``(rank, sigma2)``: the number of singular values above
        ``√(M·σ²·(1+τ̄)(1+α/τ̄))`` and the estimated noise variance σ².

    Raises
    ------
    ValueError
        If ``matrix`` is not a non-empty finite real 2-D tensor.

    Notes
    -----
    σ² is searched in ``[σ²_lo, ||V||²/(LM)]``: the upper end is the all-noise estimate, beyond
    which the free energy only grows; the lower end is ``γ²_{K+1}/(M·x̄)`` with
    ``K = ⌈L/(1+α)⌉ − 1``, the largest rank EVB can return (floored at ``1e-12·||V||²/(LM)`` for
    matrices with exactly zero trailing singular values). The search is a grid of 256 points
    over ``log σ²`` followed by a bounded Brent refinement around the best point, so it does not
    depend on a starting guess and is deterministic.

    The rank may be 0: pure Gaussian noise has its largest singular value near
    ``σ√M(1+√α)``, below the threshold ``σ√(M·x̄)``, so EVB says "no signal". Callers that
    build a layer from the rank must clamp it to at least 1. A zero matrix gives ``(0, 0.0)``.
    """
    v = _as_matrix(matrix)
    if v.shape[0] > v.shape[1]:
        v = v.T
    L, M = v.shape
    # γ² descending, length L: eigenvalues of the L×L Gram matrix (the smaller one), far faster than
    # an SVD of the L×M matrix; γ² below ~1e-16·γ₁² are rounding noise, under the σ² floor below.
    gamma2 = squared_singular_values(torch.from_numpy(v)).numpy()
    total2 = float(np.sum(v * v))
    if total2 == 0.0:
        return EVBMFResult(0, 0.0)

    alpha = L / M
    tau_bar = TAU_BAR_COEFF * math.sqrt(alpha)
    x_bar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)

    upper = total2 / (L * M)
    k_max = min(math.ceil(L / (1.0 + alpha)) - 1, L - 1)  # largest EVB rank; index of γ_{K+1}
    lower = max(gamma2[k_max] / (M * x_bar), _SIGMA2_FLOOR * upper)
    lower = min(lower, upper)

    args = (gamma2, total2, L, M, alpha, x_bar)
    lo, hi = math.log(lower), math.log(upper)
    if hi - lo < 1e-12:
        best = hi
    else:
        grid = np.linspace(lo, hi, _GRID_POINTS)
        values = np.array([_objective(u, *args) for u in grid])
        i = int(np.argmin(values))
        a, b = grid[max(i - 1, 0)], grid[min(i + 1, _GRID_POINTS - 1)]
        best, best_value = float(grid[i]), float(values[i])
        res = minimize_scalar(
            _objective, bounds=(a, b), args=args, method="bounded", options={"xatol": 1e-10}
        )
        if res.success and float(res.fun) <= best_value:
            best = float(res.x)
    sigma2 = math.exp(best)

    threshold2 = M * sigma2 * x_bar
    rank = int(np.count_nonzero(gamma2 > threshold2))
    return EVBMFResult(rank, sigma2)


def evbmf_rank(matrix: torch.Tensor) -> int:
    """Rank of a matrix estimated by EVBMF; see :func:`evbmf`.

    Parameters
    ----------
    matrix : torch.Tensor
        A real 2-D tensor.

    Returns
    -------
    int
        The EVB rank, ``0 ≤ rank < min(matrix.shape)``. It is 0 for pure noise or a zero
        matrix; callers that need a usable layer rank clamp it to ``max(1, rank)``.

    Raises
    ------
    ValueError
        If ``matrix`` is not a non-empty finite real 2-D tensor.
    """
    return evbmf(matrix).rank
