"""Tests of fxshift.decompose.evbmf: EVBMF rank estimation on structured and noise matrices."""

import math

import numpy as np
import pytest
import torch

from fxshift.decompose.evbmf import (
    EVBMFResult,
    _objective,
    TAU_BAR_COEFF,
    evbmf,
    evbmf_rank,
    evbmf_threshold,
)


def _low_rank_plus_noise(L, M, r, noise, seed, gap=3.0):
    """Rank-r signal with singular values gap·threshold … 3·gap·threshold, plus N(0, noise²)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(L, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(M, r, generator=g, dtype=torch.float64))
    thr = evbmf_threshold((L, M), noise**2)
    s = torch.linspace(gap * thr, 3 * gap * thr, r, dtype=torch.float64)
    m = (u * s) @ v.T + noise * torch.randn(L, M, generator=g, dtype=torch.float64)
    return m.float()


@pytest.mark.parametrize(
    "L,M,r",
    [(20, 50, 5), (50, 20, 5), (64, 64, 10), (30, 300, 7), (100, 40, 12), (16, 144, 3), (8, 8, 2)],
)
@pytest.mark.parametrize("noise", [1e-2, 1.0])
def test_recovers_rank_of_structured_matrix(L, M, r, noise):
    m = _low_rank_plus_noise(L, M, r, noise, seed=L * 1000 + M + r)
    rank, sigma2 = evbmf(m)
    assert rank == r
    assert evbmf_rank(m) == r
    # the noise variance estimate is close to the true one (loosely on tiny matrices)
    assert sigma2 == pytest.approx(noise**2, rel=0.2 if min(L, M) >= 16 else 0.6)


def test_noise_free_low_rank():
    g = torch.Generator().manual_seed(3)
    m = torch.randn(20, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, 40, generator=g, dtype=torch.float64
    )
    assert evbmf_rank(m) == 3
    assert evbmf_rank(m.float()) == 3


def test_pure_noise_gives_zero_or_one():
    # Pure noise is "no signal": almost always 0 (the largest noise singular value
    # σ√M(1+√α) lies below the threshold σ√(M x̄)), occasionally 1 by chance on small matrices.
    g = torch.Generator().manual_seed(4)
    ranks = []
    for _ in range(10):
        for L, M in [(10, 10), (20, 50), (64, 64), (3, 100), (100, 7)]:
            ranks.append(evbmf_rank(torch.randn(L, M, generator=g)))
    assert max(ranks) <= 1
    assert ranks.count(0) >= 0.9 * len(ranks)


def test_zero_matrix():
    assert evbmf(torch.zeros(4, 6)) == EVBMFResult(0, 0.0)


@pytest.mark.parametrize("L,M", [(40, 12), (100, 30), (9, 2)])
def test_tall_equals_transpose(L, M):
    m = _low_rank_plus_noise(L, M, 2, 0.1, seed=7)
    a, b = evbmf(m), evbmf(m.T)
    assert a.rank == b.rank
    assert a.sigma2 == pytest.approx(b.sigma2, rel=1e-12)


def test_deterministic():
    m = _low_rank_plus_noise(30, 70, 4, 0.5, seed=9)
    results = {evbmf(m.clone()) for _ in range(3)}
    assert len(results) == 1


def test_rank_is_bounded_by_evb_limit():
    # EVB never keeps more than ceil(L/(1+α)) - 1 components.
    g = torch.Generator().manual_seed(11)
    m = torch.randn(12, 12, generator=g) @ torch.diag(torch.logspace(3, 0, 12)) @ torch.randn(
        12, 12, generator=g
    )
    assert evbmf_rank(m) <= math.ceil(12 / 2) - 1


def test_minimiser_is_global_on_a_wide_grid():
    # The bounded search agrees with brute force over a much wider σ² interval.
    m = _low_rank_plus_noise(24, 60, 4, 1.0, seed=12, gap=1.05)
    v = m.double().numpy()
    L, M = v.shape
    alpha = L / M
    tb = TAU_BAR_COEFF * math.sqrt(alpha)
    xb = (1 + tb) * (1 + alpha / tb)
    g2 = np.linalg.svd(v, compute_uv=False) ** 2
    tot = float((v * v).sum())
    grid = np.linspace(math.log(tot / (L * M) * 1e-8), math.log(tot / (L * M)), 20001)
    vals = [_objective(u, g2, tot, L, M, alpha, xb) for u in grid]
    s2 = math.exp(grid[int(np.argmin(vals))])
    res = evbmf(m)
    assert res.sigma2 == pytest.approx(s2, rel=1e-3)
    assert res.rank == int((g2 > M * s2 * xb).sum())


def test_tau_bar_root():
    # τ̄ = 2.5129·√α approximately solves log(1+τ) + α·log(1+τ/α) = τ (continuity at x̄).
    for alpha in [0.05, 0.3, 1.0]:
        t = TAU_BAR_COEFF * math.sqrt(alpha)
        assert math.log1p(t) + alpha * math.log1p(t / alpha) == pytest.approx(t, rel=2e-2)


@pytest.mark.parametrize(
    "bad",
    [torch.zeros(3), torch.zeros(2, 3, 4), torch.zeros(0, 3), torch.tensor([[1.0, float("nan")]])],
)
def test_bad_input(bad):
    with pytest.raises(ValueError):
        evbmf_rank(bad)


def test_threshold():
    # α = 1: τ̄ = 2.5129, x̄ = (1+τ̄)(1+1/τ̄) = (1+τ̄)²/τ̄ ; threshold √(M σ² x̄)
    t = TAU_BAR_COEFF
    assert evbmf_threshold((10, 10), 1.0) == pytest.approx(math.sqrt(10 / t) * (1 + t))
    assert evbmf_threshold((10, 40), 2.0) == evbmf_threshold((40, 10), 2.0)
    with pytest.raises(ValueError):
        evbmf_threshold((3, 3), -1.0)
