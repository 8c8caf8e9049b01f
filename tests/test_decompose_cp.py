"""Tests of fxshift.decompose.cp: CP decomposition of conv kernels and its four-conv chain."""

import pytest
import torch
import torch.nn.functional as F

from fxshift.decompose.cp import (
    CPFactors,
    cp_conv,
    cp_max_rank,
    cp_reconstruct,
    cp_relative_error,
)


def _rank_r_kernel(shape, rank, seed):
    g = torch.Generator().manual_seed(seed)
    T, S, kh, kw = shape
    a, b, c, d = (torch.randn(n, rank, generator=g, dtype=torch.float64) for n in (T, S, kh, kw))
    return torch.einsum("tr,sr,ir,jr->tsij", a, b, c, d).float()


@pytest.mark.parametrize(
    "shape,rank",
    [
        ((8, 6, 3, 3), 4),
        ((8, 6, 1, 5), 3),
        ((6, 5, 5, 3), 5),
        ((4, 3, 7, 7), 6),
        ((5, 7, 3, 3), 1),
    ],
)
def test_exact_recovery_of_rank_r_kernel(shape, rank):
    w = _rank_r_kernel(shape, rank, seed=sum(shape) + rank)
    f = cp_conv(w, rank, n_iter_max=2000, tol=1e-12)
    T, S, kh, kw = shape
    assert isinstance(f, CPFactors)
    assert f.first.shape == (rank, S, 1, 1)
    assert f.vertical.shape == (rank, 1, kh, 1)
    assert f.horizontal.shape == (rank, 1, 1, kw)
    assert f.last.shape == (T, rank, 1, 1)
    assert all(t.dtype == torch.float32 for t in f)
    assert cp_reconstruct(f).shape == w.shape
    assert cp_relative_error(w, f) < 1e-4


def test_lambda_folded_into_last():
    w = _rank_r_kernel((6, 4, 3, 3), 3, seed=1)
    f = cp_conv(w, 3)
    for t in (f.first, f.vertical, f.horizontal):
        norms = t.flatten(1).norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)


def test_error_non_increasing_with_rank():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 6, 3, 3, generator=g)
    errors = [cp_relative_error(w, cp_conv(w, r, n_iter_max=300, tol=1e-9)) for r in (1, 2, 4, 8, 16, 32)]
    for lo, hi in zip(errors[1:], errors[:-1]):
        assert lo <= hi + 1e-3, errors
    assert errors[-1] < errors[0]


def test_deterministic():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 4, 3, 3, generator=g)
    f1, f2 = cp_conv(w, 10, n_iter_max=50), cp_conv(w, 10, n_iter_max=50)  # 10 > every mode
    for a, b in zip(f1, f2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _cp_chain(x, f, bias, stride, padding, dilation):
    """The four-conv replacement, each spatial hyper-parameter on its own axis."""
    R = f.first.shape[0]
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    y = F.conv2d(x, f.first)
    y = F.conv2d(y, f.vertical, stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1), groups=R)
    y = F.conv2d(y, f.horizontal, stride=(1, sw), padding=(0, pw), dilation=(1, dw), groups=R)
    return F.conv2d(y, f.last, bias)


@pytest.mark.parametrize(
    "kernel,stride,padding,dilation",
    [
        ((3, 3), (1, 1), (1, 1), (1, 1)),
        ((3, 3), (2, 2), (1, 1), (1, 1)),
        ((5, 3), (2, 1), (2, 0), (1, 2)),
        ((1, 5), (1, 2), (0, 3), (1, 1)),
        ((3, 5), (2, 3), (1, 2), (2, 1)),
        ((7, 7), (2, 2), (3, 1), (2, 2)),
    ],
)
def test_chain_equals_conv_of_reconstruction(kernel, stride, padding, dilation):
    g = torch.Generator().manual_seed(4)
    T, S = 6, 5
    w = torch.randn(T, S, *kernel, generator=g)
    bias = torch.randn(T, generator=g)
    f = cp_conv(w, 4, n_iter_max=100)
    w_hat = cp_reconstruct(f)
    x = torch.randn(2, S, 17, 19, generator=g)
    ref = F.conv2d(x, w_hat, bias, stride=stride, padding=padding, dilation=dilation)
    out = _cp_chain(x, f, bias, stride, padding, dilation)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_zero_weight():
    f = cp_conv(torch.zeros(4, 3, 3, 3), 2)
    assert all(torch.count_nonzero(t) == 0 for t in f)
    assert cp_relative_error(torch.zeros(4, 3, 3, 3), f) == 0.0


def test_dtype_preserved_and_no_grad():
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    f = cp_conv(w, 2, n_iter_max=20)
    assert all(t.dtype == torch.float64 and not t.requires_grad for t in f)


def test_max_rank():
    assert cp_max_rank((8, 6, 3, 3)) == 8 * 6 * 3 * 3 // 8
    assert cp_max_rank(torch.zeros(2, 16, 3, 3)) == 2 * 3 * 3


@pytest.mark.parametrize("rank", [0, -1, 55, 2.0, True])
def test_bad_rank(rank):
    with pytest.raises(ValueError):
        cp_conv(torch.randn(8, 6, 3, 3), rank)


@pytest.mark.parametrize(
    "weight",
    [torch.randn(4, 3), torch.randn(2, 4, 3, 3, 3), torch.zeros(0, 3, 3, 3),
     torch.full((2, 2, 3, 3), float("nan")), torch.ones(2, 2, 3, 3, dtype=torch.int64)],
)
def test_bad_weight(weight):
    with pytest.raises(ValueError):
        cp_conv(weight, 1)


def test_bad_factors():
    f = cp_conv(torch.randn(4, 3, 3, 3), 2, n_iter_max=10)
    with pytest.raises(ValueError):
        cp_reconstruct(CPFactors(f.first, f.vertical, f.horizontal, f.last[:, :1]))
    with pytest.raises(ValueError):
        cp_relative_error(torch.randn(4, 3, 5, 3), f)
