"""The fast Tucker-2 path (Gram-matrix HOOI) against tensorly's partial_tucker, and the Gram helpers."""
import math

import numpy as np
import pytest
import tensorly as tl
import torch

from fxshift.decompose.cp import _svd_init64
from fxshift.decompose.cp_init import cp_svd_init
from fxshift.decompose.evbmf import evbmf
from fxshift.decompose.gram import leading_left_vectors, squared_singular_values, truncated_svd
from fxshift.decompose.ranks import hosvd_errors, tucker2_ranks_for_cost
from fxshift.decompose.tucker import (clamp_tucker2_ranks, relative_error, tucker2, tucker2_hooi, tucker2_tensorly,
                                      tucker1, tucker_reconstruct)


def _orthonormal(n, k, g):
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]


def structured_kernel(t, s, k, true_ranks, noise, seed):
    """A Tucker-structured kernel with decaying mode spectra plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    a, b = true_ranks
    core = torch.randn(a, b, k, k, generator=g, dtype=torch.float64)
    core = core * torch.logspace(0, -1.5, a, dtype=torch.float64)[:, None, None, None]
    core = core * torch.logspace(0, -1.0, b, dtype=torch.float64)[None, :, None, None]
    w = torch.einsum("ta,abij,sb->tsij", _orthonormal(t, a, g), core, _orthonormal(s, b, g))
    w = w / w.norm() + noise * torch.randn(t, s, k, k, generator=g, dtype=torch.float64) / math.sqrt(w.numel())
    return w.float()


def random_kernel(t, s, k, seed):
    return torch.randn(t, s, k, k, generator=torch.Generator().manual_seed(seed))


CASES = [
    ("structured 3x3", lambda: structured_kernel(64, 48, 3, (24, 20), 0.05, 1), (12, 10)),
    ("structured 5x5", lambda: structured_kernel(40, 56, 5, (16, 24), 0.2, 2), (8, 12)),
    ("structured 1x1", lambda: structured_kernel(96, 32, 1, (20, 20), 0.05, 3), (16, 16)),
    ("random 3x3", lambda: random_kernel(32, 40, 3, 4), (16, 20)),
    ("random 3x3 tall", lambda: random_kernel(160, 16, 3, 5), (80, 8)),
    ("random 1x1", lambda: random_kernel(128, 64, 1, 6), (32, 32)),
]


@pytest.mark.parametrize("label, make, ranks", CASES, ids=[c[0] for c in CASES])
def test_error_within_one_percent_of_tensorly(label, make, ranks):
    w = make()
    fast = tucker2(w, ranks)
    reference = tucker2_tensorly(w, clamp_tucker2_ranks(tuple(w.shape), ranks))
    e_fast = relative_error(w, tucker_reconstruct(fast))
    e_ref = relative_error(w, tucker_reconstruct(reference))
    assert e_fast <= 1.01 * e_ref + 1e-6, (label, e_fast, e_ref)
    assert fast.u_out.shape == reference.u_out.shape and fast.u_in.shape == reference.u_in.shape
    # orthonormal factors, shapes as the ranks say
    eye = torch.eye(fast.u_out.shape[1])
    torch.testing.assert_close(fast.u_out.T.double() @ fast.u_out.double(), eye.double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.u_in.T.double() @ fast.u_in.double(), torch.eye(fast.u_in.shape[1]).double(),
                               atol=1e-5, rtol=0)


def test_hooi_sweeps_lower_the_error_below_the_hosvd():
    w = structured_kernel(64, 48, 3, (24, 20), 0.05, 7)
    ranks = (10, 8)
    hosvd = hosvd_errors(w, [ranks])[0]
    one = relative_error(w, tucker_reconstruct(tucker2_hooi(w, ranks, n_iter_max=1, tol=0.0)))
    many = relative_error(w, tucker_reconstruct(tucker2_hooi(w, ranks, n_iter_max=20, tol=0.0)))
    assert many <= one + 1e-9 <= hosvd + 2e-9
    assert many < hosvd - 1e-4  # HOOI does move on a structured kernel


def test_full_ranks_are_exact():
    w = random_kernel(12, 10, 3, 8)
    factors = tucker2(w, (12, 10))
    assert relative_error(w, tucker_reconstruct(factors)) < 1e-6


def test_one_by_one_conv_is_its_truncated_svd():
    w = random_kernel(40, 24, 1, 9)
    factors = tucker2(w, (20, 10))  # clamped to (10, 10)
    assert factors.core.shape == (10, 10, 1, 1)
    s = torch.linalg.svdvals(w[:, :, 0, 0].double())
    best = math.sqrt(float((s[10:] ** 2).sum() / (s ** 2).sum()))
    assert relative_error(w, tucker_reconstruct(factors)) == pytest.approx(best, rel=1e-6)


@pytest.mark.parametrize("shape, ranks, expected", [
    ((2048, 512, 1, 1), (1024, 256), (256, 256)),
    ((64, 64, 1, 1), (10, 40), (10, 10)),
    ((64, 4, 3, 3), (64, 4), (36, 4)),
    ((8, 64, 3, 3), (8, 64), (8, 64)),
    ((8, 64, 3, 3), (1, 64), (1, 9)),
    ((512, 512, 3, 3), (256, 256), (256, 256)),
])
def test_clamp_keeps_ranks_the_kernel_can_use(shape, ranks, expected):
    assert clamp_tucker2_ranks(shape, ranks) == expected


def test_clamped_ranks_lose_nothing():
    w = random_kernel(64, 6, 3, 10)  # r_out ≤ r_in·9 binds: (64, 4) → (36, 4)
    clamped = tucker2(w, (64, 4))
    assert clamped.u_out.shape[1] == 36
    ref = tucker2_tensorly(w, (64, 4))
    assert relative_error(w, tucker_reconstruct(clamped)) <= relative_error(w, tucker_reconstruct(ref)) + 1e-6


def test_tucker2_rejects_bad_ranks_and_methods():
    w = random_kernel(8, 8, 3, 11)
    with pytest.raises(ValueError, match="outside"):
        tucker2(w, (9, 4))
    with pytest.raises(ValueError, match="unknown Tucker method"):
        tucker2(w, (4, 4), method="magic")
    with pytest.raises(ValueError, match="clamp"):
        tucker2_hooi(random_kernel(8, 64, 1, 12), (8, 4))


def test_zero_kernel():
    w = torch.zeros(8, 6, 3, 3)
    factors = tucker2(w, (4, 3))
    assert float(tucker_reconstruct(factors).abs().max()) == 0.0


@pytest.mark.parametrize("shape", [(30, 70), (70, 30), (40, 40)])
def test_gram_helpers_match_the_svd(shape):
    g = torch.Generator().manual_seed(sum(shape))
    a = torch.randn(*shape, generator=g, dtype=torch.float64)
    u_ref, s_ref, vh_ref = torch.linalg.svd(a, full_matrices=False)
    torch.testing.assert_close(squared_singular_values(a), s_ref ** 2, rtol=1e-9, atol=1e-9)
    k = 12
    u, s2 = leading_left_vectors(a, k)
    torch.testing.assert_close(s2, s_ref[:k] ** 2, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(u @ u.T, u_ref[:, :k] @ u_ref[:, :k].T, atol=1e-8, rtol=0)  # same subspace
    u, s, v = truncated_svd(a, k)
    torch.testing.assert_close(u.T @ a @ v, torch.diag(s_ref[:k]), atol=1e-8, rtol=0)


def test_tall_rank_deficient_matrix_gets_orthonormal_vectors():
    g = torch.Generator().manual_seed(13)
    a = torch.randn(50, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 20, generator=g, dtype=torch.float64)
    u, s2 = leading_left_vectors(a, 6)  # 3 nonzero singular values, 3 completed
    torch.testing.assert_close(u.T @ u, torch.eye(6, dtype=torch.float64), atol=1e-10, rtol=0)
    assert float(s2[3:].max()) < 1e-9 * float(s2[0])
    residual = a - u[:, :3] @ (u[:, :3].T @ a)
    assert float(residual.norm()) < 1e-8 * float(a.norm())


def test_hosvd_errors_match_a_direct_truncation_on_tall_unfoldings():
    w = random_kernel(96, 8, 1, 14).double()  # output unfolding 96 × 8: the small Gram is 8 × 8
    pairs = [(4, 4), (8, 8), (20, 6), (96, 8)]
    errors = hosvd_errors(w, pairs)
    u_out = torch.linalg.svd(w.reshape(96, -1))[0]
    u_in = torch.linalg.svd(w.transpose(0, 1).reshape(8, -1))[0]
    for (r_out, r_in), err in zip(pairs, errors):
        p_out = u_out[:, :r_out] @ u_out[:, :r_out].T
        p_in = u_in[:, :r_in] @ u_in[:, :r_in].T
        approx = torch.einsum("ta,asij,sb->tbij", p_out, w, p_in)
        assert err == pytest.approx(float((w - approx).norm() / w.norm()), abs=1e-9)


@pytest.mark.parametrize("shape", [(2048, 512, 1, 1), (512, 512, 3, 3), (256, 64, 3, 3), (64, 32, 7, 7)])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_budget_rank_candidates_are_usable_and_near_the_cost(shape, fraction):
    r_out, r_in = tucker2_ranks_for_cost(shape, fraction)
    assert (r_out, r_in) == clamp_tucker2_ranks(shape, (r_out, r_in))
    t, s, kh, kw = shape
    cost = r_in * s + r_out * r_in * kh * kw + r_out * t
    assert cost == pytest.approx(fraction * t * s * kh * kw, rel=0.1 if kh * kw == 1 else 0.25)


def test_evbmf_from_the_gram_matches_the_svd_spectrum():
    g = torch.Generator().manual_seed(15)
    u = torch.linalg.qr(torch.randn(40, 5, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(300, 5, generator=g, dtype=torch.float64))[0]
    m = (u * torch.linspace(20, 60, 5, dtype=torch.float64)) @ v.T + torch.randn(40, 300, generator=g,
                                                                                 dtype=torch.float64)
    rank, sigma2 = evbmf(m)
    assert rank == 5 and sigma2 == pytest.approx(1.0, rel=0.1)
    assert evbmf(m.T) == (rank, pytest.approx(sigma2, rel=1e-9))


@pytest.mark.parametrize("shape, rank", [((24, 16, 3, 3), 20), ((6, 3, 3, 3), 9), ((4, 30, 3, 3), 12)])
def test_cp_svd_init_spans_tensorlys_subspaces(shape, rank):
    w = random_kernel(shape[0], shape[1], shape[2], 16).double()
    with tl.backend_context("numpy"):
        from tensorly.decomposition._cp import initialize_cp

        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, reference = initialize_cp(w.numpy(), rank, init="svd", random_state=0)
    ours = _svd_init64(w.numpy(), rank, 0).factors
    for mode, (a, b) in enumerate(zip(ours, reference)):
        assert a.shape == b.shape
        n = min(w.shape[mode], rank)
        # same singular-vector columns up to sign, same seeded random columns after them
        np.testing.assert_allclose(np.abs(a[:, :n]), np.abs(b[:, :n]), atol=1e-8)
        np.testing.assert_allclose(a[:, n:], b[:, n:], atol=0)
    fill_calls = []
    cp_svd_init(w, rank, lambda r, c: fill_calls.append((r, c)) or torch.zeros(r, c))
    assert fill_calls == [(w.shape[m], rank - w.shape[m]) for m in range(4) if w.shape[m] < rank]


@pytest.mark.parametrize("shape, ranks, method", [
    ((24, 16, 3, 3), (8, 6), "hooi"), ((24, 16, 3, 3), (8, 6), "tensorly"), ((32, 20, 1, 1), (7, 7), "hooi"),
    ((12, 10, 3, 3), (12, 10), "hooi"),
])
def test_solver_error_equals_the_reconstruction_error(shape, ranks, method):
    # the passes report the solvers' float64 projection error instead of reconstructing the kernel
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    factors = tucker2(w, ranks, method=method)
    assert factors.error is not None
    assert factors.error == pytest.approx(relative_error(w, tucker_reconstruct(factors)), abs=1e-6)
    one = tucker1(w, 5)
    assert one.error == pytest.approx(relative_error(w, tucker_reconstruct(one)), abs=1e-6)
