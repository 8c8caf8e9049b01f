"""CP-ALS for conv kernels that scales to real layers, and CP error curves for rank selection.

fxshift.decompose.cp.cp_conv runs tensorly's ``parafac``, whose MTTKRP forms the Khatri–Rao
product of three factors explicitly: for a 512×512×3×3 kernel the height mode needs a
786432×R matrix (1.6 GB in float64 at R = 256), and every sweep is a Python-level loop over
tensorly's backend. Decomposing ResNet-18 that way takes many minutes on two cores.

This module runs the same algorithm (alternating least squares from tensorly's SVD
initialisation: the leading left singular vectors of each unfolding, the first scaled by the
singular values, seeded random columns where a mode is shorter than the rank) with an MTTKRP
specialised for 4-way kernels: contract the channel mode first with one matrix product, then
the two small spatial modes elementwise. Memory is O(T·kh·kw·R + S·kh·kw·R); one sweep costs
two (T·S·kh·kw)×R products. The result is a ``CPFactors`` in the same layout as ``cp_conv``, so
``cp_reconstruct`` / ``cp_relative_error`` apply unchanged.

``cp_error_curve`` estimates the error at several ranks in one run by growing the rank: each
rank starts from the previous solution plus new components taken from the residual, and runs a
few sweeps. Those errors are upper bounds of what a full ALS run reaches at each rank; they are
what a Budget needs to compare layers, at a fraction of the cost of separate runs.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from .cp import CPFactors, cp_max_rank
from .cp_init import cp_svd_init

__all__ = ["cp_als", "cp_error_curve", "cp_break_even_rank", "cp_kernel"]


def cp_break_even_rank(shape: Sequence[int]) -> int:
    """The CP rank whose chain has as many parameters as the kernel: ``⌊T·S·kh·kw / (T+S+kh+kw)⌋``.

    The chain 1×1 S→R, kh×1 depthwise, 1×kw depthwise, 1×1 R→T holds R·(S+kh+kw+T) weights,
    so ranks at or above this one cannot make a layer smaller (at stride 1 its MACs scale the
    same way). It is at least 1 and at most ``cp_max_rank``.
    """
    t, s, kh, kw = (int(d) for d in shape)
    return max(1, min(cp_max_rank((t, s, kh, kw)), (t * s * kh * kw) // (t + s + kh + kw)))


class _Kernel:
    """A kernel prepared for fast MTTKRPs: the two channel-major layouts and its squared norm."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        w = weight.detach().to(device="cpu", dtype=dtype)
        self.t, self.s, self.kh, self.kw = w.shape
        self.q = self.kh * self.kw
        self.by_out = w.reshape(self.t, self.s * self.q)  # (T, S·Q)
        self.norm2 = float(w.double().pow(2).sum())
        self.weight = w


def _spatial_kr(c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """(kh·kw, R) with row (i, j) = C[i] ∘ D[j]."""
    return (c[:, None, :] * d[None, :, :]).reshape(-1, c.shape[1])


def _solve(mttkrp: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """X with X·gram = mttkrp for a symmetric PSD float64 gram, with a tiny ridge."""
    g = gram.clone()
    g.diagonal().add_(1e-12 * float(g.diagonal().mean().clamp_min(1e-300)))
    chol, info = torch.linalg.cholesky_ex(g)
    m = mttkrp.double()
    if int(info) == 0:
        x = torch.cholesky_solve(m.t(), chol).t()
    else:
        x = m @ torch.linalg.pinv(g, hermitian=True)
    return x.to(mttkrp.dtype)


def _gram(f: torch.Tensor) -> torch.Tensor:
    f = f.double()
    return f.t() @ f


def _svd_init(k: _Kernel, rank: int, generator: torch.Generator) -> list[torch.Tensor]:
    """tensorly's 'svd' init (fxshift.decompose.cp_init): leading left singular vectors of each
    unfolding (mode 0 scaled by the singular values); seeded uniform random columns where a mode
    is shorter than the rank."""
    fill = lambda rows, cols: torch.rand(rows, cols, generator=generator, dtype=torch.float64)  # noqa: E731
    return [f.to(k.weight.dtype) for f in cp_svd_init(k.weight, rank, fill)]


def _channel_kr(b: torch.Tensor, kr: torch.Tensor) -> torch.Tensor:
    """(S·kh·kw, R) with row (s, q) = B[s] ∘ KR[q]: the Khatri–Rao product of the input factor
    and the spatial ones (small: the kernel's size per output channel, times R)."""
    return (b[:, None, :] * kr[None, :, :]).reshape(-1, b.shape[1])


def _model_error(k: _Kernel, factors: Sequence[torch.Tensor]) -> float:
    """Relative error of a CP model: ‖W‖² − 2⟨W, Ŵ⟩ + ‖Ŵ‖², from one product and the Gram matrices."""
    a, b, c, d = factors
    m0 = k.by_out @ _channel_kr(b, _spatial_kr(c, d))  # (T, R)
    inner = float((m0.double() * a.double()).sum())
    g = [_gram(f) for f in factors]
    approx2 = float((g[0] * g[1] * g[2] * g[3]).sum())
    return math.sqrt(max(k.norm2 - 2.0 * inner + approx2, 0.0) / k.norm2) if k.norm2 > 0 else 0.0


def _sweeps(k: _Kernel, factors: list[torch.Tensor], n_iter_max: int, tol: float, linesearch: bool = True) -> float:
    """Run ALS sweeps on `factors` (replaced in place); return the final relative error.

    Per sweep: one (T × S·Q)·(S·Q × R) product for the output factor, one (S·Q × T)·(T × R)
    product Z = Σ_t W·A shared by the input factor and the two spatial ones (Q = kh·kw), and
    four R×R Cholesky solves. The line search is tensorly's (after Bro, 1998): every other sweep
    past the fifth, try moving further along the last update by a factor iteration^(1/p) and keep
    the move when it lowers the error; p grows after four failures.
    """
    a, b, c, d = factors
    grams = [_gram(f) for f in factors]
    prev = math.inf
    err = math.inf
    acc_pow, acc_fail = 2.0, 0
    for it in range(n_iter_max):
        old = (a, b, c, d)
        kr = _spatial_kr(c, d)  # (Q, R)
        # mode 0 (output channels): W_(0) · (B ⊙ C ⊙ D)
        a = _solve(k.by_out @ _channel_kr(b, kr), grams[1] * grams[2] * grams[3])
        grams[0] = _gram(a)
        # Z[(s,q), r] = Σ_t W[t,s,q] A[t,r]: mode 1 sums it against KR over q, modes 2 and 3 against B over s
        z = (k.by_out.t() @ a).view(k.s, k.q, -1)
        b = _solve((z * kr).sum(1), grams[0] * grams[2] * grams[3])
        grams[1] = _gram(b)
        y = (z * b[:, None, :]).sum(0).view(k.kh, k.kw, -1)
        c = _solve((y * d[None, :, :]).sum(1), grams[0] * grams[1] * grams[3])
        grams[2] = _gram(c)
        m3 = (y * c[:, None, :]).sum(0)
        d = _solve(m3, grams[0] * grams[1] * grams[2])
        grams[3] = _gram(d)
        inner = float((m3.double() * d.double()).sum())
        approx2 = float((grams[0] * grams[1] * grams[2] * grams[3]).sum())
        err = math.sqrt(max(k.norm2 - 2.0 * inner + approx2, 0.0) / k.norm2) if k.norm2 > 0 else 0.0
        if linesearch and it > 5 and it % 2 == 0:
            jump = (it + 1) ** (1.0 / acc_pow)
            moved = tuple(o + (n - o) * jump for o, n in zip(old, (a, b, c, d)))
            moved_err = _model_error(k, moved)
            if moved_err < err:
                a, b, c, d = moved
                err = moved_err
                grams = [_gram(f) for f in moved]
                acc_fail = 0
            else:
                acc_fail += 1
                if acc_fail == 4:
                    acc_pow, acc_fail = acc_pow + 1.0, 0
        if math.isfinite(prev) and abs(prev - err) <= tol * max(prev, 1e-12):
            break
        prev = err
    factors[:] = [a, b, c, d]
    return err


def _to_cp_factors(weight: torch.Tensor, factors: list[torch.Tensor]) -> CPFactors:
    """Unit-norm first/vertical/horizontal columns, the scale folded into `last` (cp_conv's layout)."""
    a, b, c, d = (f.double() for f in factors)
    lam = torch.ones(a.shape[1], dtype=torch.float64)
    unit = []
    for f in (b, c, d):
        n = f.norm(dim=0)
        unit.append(f / torch.where(n > 0, n, torch.ones_like(n)))
        lam = lam * n
    b, c, d = unit
    a = a * lam
    t, s, kh, kw = weight.shape
    r = a.shape[1]
    out = dict(device=weight.device, dtype=weight.dtype)
    return CPFactors(
        first=b.t().reshape(r, s, 1, 1).contiguous().to(**out),
        vertical=c.t().reshape(r, 1, kh, 1).contiguous().to(**out),
        horizontal=d.t().reshape(r, 1, 1, kw).contiguous().to(**out),
        last=a.reshape(t, r, 1, 1).contiguous().to(**out),
    )


def _check(weight: torch.Tensor, rank: int) -> None:
    if not isinstance(weight, torch.Tensor) or weight.ndim != 4 or weight.numel() == 0:
        raise ValueError(f"CP-ALS expects a non-empty 4-D conv kernel, got {getattr(weight, 'shape', weight)!r}")
    if not weight.is_floating_point() or not bool(torch.isfinite(weight).all()):
        raise ValueError("CP-ALS expects a finite floating-point kernel")
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"CP rank must be an int, got {rank!r}")
    top = cp_max_rank(weight.shape)
    if not 1 <= rank <= top:
        raise ValueError(f"CP rank must be in [1, {top}] for a weight of shape {tuple(weight.shape)}, got {rank}")


def cp_als(weight: torch.Tensor, rank: int, n_iter_max: int = 25, tol: float = 1e-4, seed: int = 0,
           dtype: torch.dtype = torch.float32, linesearch: bool = True,
           init: Optional[Sequence[torch.Tensor]] = None) -> tuple[CPFactors, float]:
    """CP-decompose a conv kernel by ALS from the SVD initialisation (or from `init`).

    Parameters
    ----------
    weight : torch.Tensor
        Conv kernel ``(T, S, kh, kw)`` of a conv with ``groups == 1``.
    rank : int
        The CP rank R, in ``[1, cp_max_rank(weight)]``.
    n_iter_max : int
        Maximum number of ALS sweeps (default 25; most of the error drop happens in the first ten).
    tol : float
        Stop when the relative error changes by less than this fraction between sweeps.
    seed : int
        Seed of the random columns the SVD initialisation needs when R exceeds a mode's size.
    dtype : torch.dtype
        Precision of the matrix products (float32 default; the small normal equations are always
        solved in float64).
    linesearch : bool
        tensorly's ALS line search (default True): fewer sweeps for the same error.
    init : sequence of 4 tensors, optional
        Start from these factor matrices ``(T×R, S×R, kh×R, kw×R)``, e.g. a probe's from
        ``cp_error_curve(..., return_factors=True)``; the result is never worse than this start.

    Returns
    -------
    (CPFactors, float)
        The four conv weights in ``cp_conv``'s layout (in ``weight``'s dtype and device) and the
        relative reconstruction error ‖W − Ŵ‖/‖W‖ computed from the factors in float64.
    """
    _check(weight, rank)
    if isinstance(n_iter_max, bool) or not isinstance(n_iter_max, int) or n_iter_max < 1:
        raise ValueError(f"n_iter_max must be a positive int, got {n_iter_max!r}")
    if not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    k = _Kernel(weight, dtype)
    if k.norm2 == 0.0:
        t, s, kh, kw = weight.shape
        zeros = [torch.zeros(n, rank, dtype=dtype) for n in (t, s, kh, kw)]
        return _to_cp_factors(weight, zeros), 0.0
    if init is None:
        factors = _svd_init(k, rank, torch.Generator().manual_seed(seed))
    else:
        start = [f.detach().to(dtype) for f in init]
        if [tuple(f.shape) for f in start] != [(n, rank) for n in weight.shape]:
            raise ValueError(f"init must hold four factor matrices (n, {rank}) for a kernel {tuple(weight.shape)}, "
                             f"got {[tuple(f.shape) for f in start]}")
        factors = [f.clone() for f in start]
    _sweeps(k, factors, n_iter_max, tol, linesearch)
    error = _error(k, factors)
    if init is not None:
        start_error = _error(k, start)
        if start_error < error:  # float32 sweeps or a line-search step may lose a little: keep the start
            factors, error = start, start_error
    return _to_cp_factors(weight, factors), error


def _reconstruct(factors: list[torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
    """Σ_r a_r ∘ b_r ∘ c_r ∘ d_r in float64, as one (T)×(S·kh·kw) matrix product (no T·S·R temporaries)."""
    a, b, c, d = (f.double() for f in factors)
    rest = (b[:, None, :] * _spatial_kr(c, d)[None, :, :]).reshape(-1, a.shape[1])  # (S·Q, R)
    return (a @ rest.t()).reshape(tuple(shape))


def _error(k: _Kernel, factors: list[torch.Tensor]) -> float:
    """‖W − Ŵ‖ / ‖W‖ from the factors, in float64."""
    if k.norm2 == 0.0:
        return 0.0
    diff = k.weight.double() - _reconstruct(factors, k.weight.shape)
    return float(diff.norm()) / math.sqrt(k.norm2)


def _residual_components(k: _Kernel, factors: list[torch.Tensor], extra: int,
                         generator: torch.Generator) -> list[torch.Tensor]:
    """`extra` new rank-one starting components from the residual W − Ŵ (SVD init of the residual)."""
    residual = k.weight.double() - _reconstruct(factors, k.weight.shape)
    rk = _Kernel(residual, k.weight.dtype)
    return _svd_init(rk, extra, generator)


def cp_error_curve(weight: torch.Tensor, ranks: Sequence[int], sweeps: int = 3, seed: int = 0,
                   dtype: torch.dtype = torch.float32, stop_at: float = -1.0, return_factors: bool = False
                   ) -> Union[list[float], tuple[list[float], Optional[list[torch.Tensor]]]]:
    """Estimated relative CP error at each of several ranks, in one growing ALS run.

    The smallest rank starts from the SVD initialisation; each larger rank keeps the previous
    components, adds new ones from the SVD initialisation of the residual, and runs `sweeps` ALS
    sweeps. The estimates are upper bounds of a converged ALS at that rank (ALS only lowers the
    error) and are used to compare layers, not reported as final errors.

    stop_at: stop growing once a rank's error is at most this; larger ranks get ``nan``.
    return_factors: also return the factor matrices of the largest rank reached (the start
        ``cp_als(init=...)`` takes, so a final run keeps at least the probe's accuracy).

    Returns
    -------
    list of float
        One error per entry of `ranks`, in the given order (with return_factors, a pair
        (errors, factors); factors is None for a zero kernel).
    """
    if not ranks:
        return ([], None) if return_factors else []
    order = sorted(set(int(r) for r in ranks))
    _check(weight, order[-1])
    k = _Kernel(weight, dtype)
    if k.norm2 == 0.0:
        zeros = [0.0 for _ in ranks]
        return (zeros, None) if return_factors else zeros
    generator = torch.Generator().manual_seed(seed)
    errors: dict[int, float] = {}
    factors: Optional[list[torch.Tensor]] = None
    for r in order:
        if factors is None:
            factors = _svd_init(k, r, generator)
        else:
            extra = _residual_components(k, factors, r - factors[0].shape[1], generator)
            factors = [torch.cat([f, e.to(f.dtype)], dim=1) for f, e in zip(factors, extra)]
        errors[r] = _sweeps(k, factors, sweeps, 0.0, linesearch=False)
        if errors[r] <= stop_at:
            break
    curve = [errors.get(int(r), math.nan) for r in ranks]
    return (curve, factors) if return_factors else curve


def cp_kernel(factors: CPFactors) -> torch.Tensor:
    """Multiply CP conv factors (``cp_conv``'s layout) back into one T×S×kh×kw kernel.

    Same result as ``cp_reconstruct``, contracted as one (T×R)·(R×S·kh·kw) product so that large
    ranks need no T·S·R temporaries. Computed in float64, returned in the factors' dtype.
    """
    first, vertical, horizontal, last = factors
    r, s = first.shape[:2]
    kh, kw = vertical.shape[2], horizontal.shape[3]
    rest = (first.detach().double().reshape(r, s, 1, 1) * vertical.detach().double().reshape(r, 1, kh, 1)
            * horizontal.detach().double().reshape(r, 1, 1, kw)).reshape(r, -1)
    w = last.detach().double().reshape(-1, r) @ rest
    return w.reshape(-1, s, kh, kw).to(first.dtype)
