"""Tests of fxshift.decompose.spatial: Tai et al.'s closed-form vertical/horizontal decomposition."""

import math

import pytest
import torch
import torch.nn.functional as F

from fxshift.decompose.spatial import (
    SpatialFactors,
    spatial_max_rank,
    spatial_optimal_error,
    spatial_reconstruct,
    spatial_singular_values,
    spatial_svd,
)

# (T, S/g, kh, kw, groups)
CASES = [
    (6, 4, 3, 3, 1),
    (5, 7, 1, 3, 1),
    (4, 3, 3, 1, 1),
    (6, 5, 5, 3, 1),
    (8, 2, 3, 3, 4),  # grouped
    (8, 1, 3, 3, 8),  # depthwise
    (16, 1, 5, 3, 8),  # depthwise, channel multiplier 2
    (9, 2, 3, 5, 3),
]


def _rel_err(w, w_hat):
    return float(torch.linalg.vector_norm((w - w_hat).double()) / torch.linalg.vector_norm(w.double()))


def _weight(T, S, kh, kw, seed):
    return torch.randn(T, S, kh, kw, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("T,S,kh,kw,groups", CASES)
def test_shapes_and_exact_at_full_rank(T, S, kh, kw, groups):
    w = _weight(T, S, kh, kw, seed=T + S + kh + kw)
    k = spatial_max_rank(w, groups)
    assert k == min(S * kh, kw * T // groups)
    f = spatial_svd(w, k, groups)
    assert isinstance(f, SpatialFactors)
    assert f.vertical.shape == (groups * k, S, kh, 1)
    assert f.horizontal.shape == (T, k, 1, kw)
    assert f.vertical.dtype == f.horizontal.dtype == torch.float32
    w_hat = spatial_reconstruct(f, groups)
    assert w_hat.shape == w.shape
    assert _rel_err(w, w_hat) < 1e-5
    assert spatial_reconstruct(f).shape == w.shape  # groups inferred


@pytest.mark.parametrize("T,S,kh,kw,groups", CASES)
def test_error_equals_eckart_young_for_every_rank(T, S, kh, kw, groups):
    w = _weight(T, S, kh, kw, seed=100 + T * S)
    sv = spatial_singular_values(w, groups).double()
    assert sv.shape == (groups, spatial_max_rank(w, groups))
    assert bool((sv[:, :-1] >= sv[:, 1:]).all())
    total = float((sv**2).sum())
    previous = math.inf
    for k in range(1, spatial_max_rank(w, groups) + 1):
        expected = math.sqrt(float((sv[:, k:] ** 2).sum()) / total)
        assert spatial_optimal_error(w, k, groups) == pytest.approx(expected, abs=1e-6)
        err = _rel_err(w, spatial_reconstruct(spatial_svd(w, k, groups), groups))
        assert err == pytest.approx(expected, abs=1e-5)
        assert err <= previous + 1e-6
        previous = err


def test_groups_are_independent():
    # Decomposing a grouped weight equals decomposing each group's slice as an ungrouped conv.
    w = _weight(8, 3, 3, 3, seed=5)
    f = spatial_svd(w, 2, groups=2)
    for g in range(2):
        fg = spatial_svd(w[4 * g : 4 * (g + 1)], 2)
        torch.testing.assert_close(f.vertical[2 * g : 2 * (g + 1)], fg.vertical, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(f.horizontal[4 * g : 4 * (g + 1)], fg.horizontal, atol=1e-5, rtol=1e-5)


def test_exact_for_separable_kernel():
    # A kernel that is exactly rank 1 in the (s,i)x(j,t) matrix is recovered at K=1.
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(4, 3, generator=g), torch.randn(3, 5, generator=g)  # (S,kh), (kw,T)
    w = torch.einsum("si,jt->tsij", a, b)
    assert _rel_err(w, spatial_reconstruct(spatial_svd(w, 1))) < 1e-6
    assert spatial_optimal_error(w, 1) < 1e-6


def test_deterministic_and_sign_fixed():
    w = _weight(6, 4, 3, 3, seed=7)
    f1, f2 = spatial_svd(w, 3), spatial_svd(w.clone(), 3)
    for a, b in zip(f1, f2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    v = f1.vertical.flatten(1)
    idx = v.abs().argmax(dim=1)
    assert bool((v.gather(1, idx[:, None]) > 0).all())


def _chain(x, f, bias, groups, stride, padding, dilation):
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    y = F.conv2d(x, f.vertical, stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1), groups=groups)
    return F.conv2d(y, f.horizontal, bias, stride=(1, sw), padding=(0, pw), dilation=(1, dw), groups=groups)


@pytest.mark.parametrize(
    "T,S,kh,kw,groups,stride,padding,dilation",
    [
        (6, 4, 3, 3, 1, (1, 1), (1, 1), (1, 1)),
        (6, 4, 3, 3, 1, (2, 2), (1, 1), (1, 1)),
        (6, 5, 5, 3, 1, (2, 1), (2, 0), (1, 2)),
        (5, 7, 1, 3, 1, (1, 2), (0, 3), (1, 1)),
        (8, 2, 3, 5, 4, (2, 3), (1, 2), (2, 1)),
        (8, 1, 3, 3, 8, (2, 2), (2, 1), (2, 2)),
        (9, 2, 5, 3, 3, (3, 2), (0, 1), (1, 3)),
    ],
)
def test_chain_equals_conv_of_reconstruction(T, S, kh, kw, groups, stride, padding, dilation):
    g = torch.Generator().manual_seed(8)
    w = torch.randn(T, S, kh, kw, generator=g)
    bias = torch.randn(T, generator=g)
    k = max(1, spatial_max_rank(w, groups) // 2)
    f = spatial_svd(w, k, groups)
    w_hat = spatial_reconstruct(f, groups)
    x = torch.randn(2, S * groups, 17, 19, generator=g)
    ref = F.conv2d(x, w_hat, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)
    out = _chain(x, f, bias, groups, stride, padding, dilation)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # and at full rank the chain is the original conv
    f_full = spatial_svd(w, spatial_max_rank(w, groups), groups)
    ref_full = F.conv2d(x, w, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)
    torch.testing.assert_close(_chain(x, f_full, bias, groups, stride, padding, dilation), ref_full,
                               atol=1e-4, rtol=1e-4)


def test_zero_weight():
    w = torch.zeros(4, 3, 3, 3)
    f = spatial_svd(w, 2)
    assert torch.count_nonzero(spatial_reconstruct(f)) == 0
    assert spatial_optimal_error(w, 1) == 0.0


def test_dtype_preserved_and_no_grad():
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    f = spatial_svd(w, 2)
    assert all(t.dtype == torch.float64 and not t.requires_grad for t in f)


@pytest.mark.parametrize("rank", [0, -2, 10, 2.5, True])
def test_bad_rank(rank):
    w = torch.randn(4, 3, 3, 3)  # max rank min(9, 12) = 9
    with pytest.raises(ValueError):
        spatial_svd(w, rank)
    with pytest.raises(ValueError):
        spatial_optimal_error(w, rank)


@pytest.mark.parametrize(
    "weight,groups",
    [
        (torch.randn(4, 3), 1),
        (torch.randn(4, 3, 3, 3, 3), 1),
        (torch.randn(6, 3, 3, 3), 4),  # 6 out channels, 4 groups
        (torch.randn(4, 3, 3, 3), 0),
        (torch.full((4, 3, 3, 3), float("inf")), 1),
        (torch.ones(4, 3, 3, 3, dtype=torch.int32), 1),
    ],
)
def test_bad_weight_or_groups(weight, groups):
    with pytest.raises(ValueError):
        spatial_svd(weight, 1, groups)


def test_bad_factors():
    f = spatial_svd(torch.randn(8, 2, 3, 3), 2, groups=4)
    with pytest.raises(ValueError):
        spatial_reconstruct(f, groups=2)
    with pytest.raises(ValueError):
        spatial_reconstruct(SpatialFactors(f.vertical[:5], f.horizontal))
    with pytest.raises(ValueError):
        spatial_reconstruct(SpatialFactors(f.vertical.transpose(2, 3), f.horizontal))
