"""Tucker-2 and Tucker-1 of a conv kernel over its channel modes (docs/methods.md §2, §6)."""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Optional

import tensorly as tl
import torch
from tensorly.decomposition import partial_tucker

from .gram import leading_left_vectors, truncated_svd
from .svd import gram_svd, svd_factors


#: Tucker-2 solvers: the fast Gram-matrix HOOI and tensorly's partial_tucker (the reference).
TUCKER_METHODS = ("hooi", "tensorly")


class TuckerFactors(NamedTuple):
    """W ≈ core ×₀ u_out ×₁ u_in. `u_in` is None for Tucker-1 (output mode only).

    core: (r_out, r_in or S, kh, kw); u_out: (T, r_out); u_in: (S, r_in) or None.
    error: ‖W − Ŵ‖/‖W‖, computed in float64 by the solver (None when it did not).
    """

    core: torch.Tensor
    u_out: torch.Tensor
    u_in: Optional[torch.Tensor]
    error: Optional[float] = None


def projection_error(weight: torch.Tensor, core: torch.Tensor) -> float:
    """‖W − Ŵ‖/‖W‖ of a Tucker approximation whose factors are orthonormal and whose core is the
    projection of W on them: then ‖W − Ŵ‖² = ‖W‖² − ‖G‖², with no reconstruction (pass the
    float64 core; the difference loses precision only below about 1e-8)."""
    total = float(weight.detach().double().pow(2).sum())
    if total == 0.0:
        return 0.0
    return math.sqrt(max(total - float(core.double().pow(2).sum()), 0.0) / total)


def _unfold(weight: torch.Tensor, mode: int) -> torch.Tensor:
    return weight.movedim(mode, 0).reshape(weight.shape[mode], -1)


def mode_unfolding(weight: torch.Tensor, mode: int) -> torch.Tensor:
    """The mode-`mode` unfolding of a kernel: shape (weight.shape[mode], rest)."""
    return _unfold(weight.detach(), mode)


def clamp_tucker2_ranks(shape: tuple[int, ...], ranks: tuple[int, int]) -> tuple[int, int]:
    """Tucker-2 ranks that can all be used: r_out ≤ r_in·kh·kw and r_in ≤ r_out·kh·kw.

    Once the input mode is projected on r_in vectors, the output unfolding has rank at most
    r_in·kh·kw (and the other way round), so larger ranks only add zero rows to the core; for a
    1×1 conv both ranks become their minimum (Tucker-2 of a matrix is its truncated SVD).
    """
    t, s, kh, kw = (int(d) for d in shape)
    r_out, r_in = int(ranks[0]), int(ranks[1])
    q = kh * kw
    r_out, r_in = min(r_out, t, r_in * q), min(r_in, s, r_out * q)
    return min(r_out, r_in * q), r_in


def _check_ranks(weight: torch.Tensor, ranks: tuple[int, int]) -> None:
    if weight.ndim != 4:
        raise ValueError(f"expected a 4-D conv kernel, got shape {tuple(weight.shape)}")
    t, s = weight.shape[:2]
    if not (1 <= ranks[0] <= t and 1 <= ranks[1] <= s):
        raise ValueError(f"ranks {tuple(ranks)} are outside 1..{t} × 1..{s}")


def tucker2(weight: torch.Tensor, ranks: tuple[int, int], n_iter_max: Optional[int] = None, tol: Optional[float] = None,
            method: str = "hooi") -> TuckerFactors:
    """Tucker-2 of a T×S×kh×kw kernel over its channel modes, ranks (r_out, r_in) clamped by
    `clamp_tucker2_ranks` (the factors' shapes give the ranks used).

    method "hooi" (default): `tucker2_hooi`, HOSVD start and at most `n_iter_max` (default 3)
    HOOI sweeps, each mode through the eigh of its smaller Gram matrix, stopping when the
    relative error changes by less than `tol` (default 1e-3, relative) between sweeps.
    method "tensorly": tensorly's partial_tucker (the reference; default 100 iterations, tol 1e-4).
    """
    _check_ranks(weight, ranks)
    ranks = clamp_tucker2_ranks(tuple(weight.shape), ranks)
    if method == "hooi":
        return tucker2_hooi(weight, ranks, 3 if n_iter_max is None else n_iter_max, 1e-3 if tol is None else tol)
    if method == "tensorly":
        return tucker2_tensorly(weight, ranks, 100 if n_iter_max is None else n_iter_max, 1e-4 if tol is None else tol)
    raise ValueError(f"unknown Tucker method {method!r}; use 'hooi' or 'tensorly'")


def tucker2_tensorly(weight: torch.Tensor, ranks: tuple[int, int], n_iter_max: int = 100,
                     tol: float = 1e-4) -> TuckerFactors:
    """Tucker-2 by tensorly's partial_tucker (≥ 0.8 return structure) in float64, with `gram_svd`
    as its SVD: HOOI from an SVD start, stopping when the reconstruction error changes by less
    than `tol` between iterations. Ranks are used as given."""
    _check_ranks(weight, ranks)
    r_out, r_in = ranks
    with tl.backend_context("pytorch"), warnings.catch_warnings():
        # tensorly warns when a projected unfolding has fewer columns than the rank; it clamps, as wanted.
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        (core, factors), _ = partial_tucker(
            weight.detach().double(), rank=[r_out, r_in], modes=[0, 1], init="svd", n_iter_max=n_iter_max, tol=tol, svd=gram_svd
        )
    u_out, u_in = factors
    return TuckerFactors(core.to(weight.dtype), u_out.to(weight.dtype), u_in.to(weight.dtype),
                         projection_error(weight, core))


def tucker2_hooi(weight: torch.Tensor, ranks: tuple[int, int], n_iter_max: int = 3, tol: float = 1e-3,
                 dtype: torch.dtype = torch.float64) -> TuckerFactors:
    """Tucker-2 by HOOI (higher-order orthogonal iteration) with every mode solved through the
    eigendecomposition of the smaller Gram matrix of its unfolding (fxshift.decompose.gram).

    Start: U_in from the HOSVD (leading left singular vectors of the input unfolding). Each sweep
    then sets U_out to the best r_out vectors for W ×₁ U_inᵀ and U_in to the best r_in vectors for
    W ×₀ U_outᵀ; every half-sweep is optimal given the other factor, so the error never rises and
    the first one already beats the plain HOSVD. With orthonormal factors ‖W − Ŵ‖² = ‖W‖² − ‖G‖²
    and ‖G‖² is the sum of the kept eigenvalues, so the error costs nothing to track; the sweeps
    stop after `n_iter_max`, or when the relative error changed by at most `tol` (relative).
    Ranks must satisfy 1 ≤ r_out ≤ min(T, r_in·kh·kw), 1 ≤ r_in ≤ min(S, r_out·kh·kw)
    (see `clamp_tucker2_ranks`). Computed in `dtype` (float64 by default); returned in W's dtype.
    """
    _check_ranks(weight, ranks)
    r_out, r_in = int(ranks[0]), int(ranks[1])
    if (r_out, r_in) != clamp_tucker2_ranks(tuple(weight.shape), (r_out, r_in)):
        raise ValueError(f"ranks {tuple(ranks)} exceed what a {tuple(weight.shape)} kernel can use; "
                         f"clamp them with clamp_tucker2_ranks first")
    if n_iter_max < 1:
        raise ValueError(f"n_iter_max must be at least 1, got {n_iter_max}")
    t, s, kh, kw = weight.shape
    q = kh * kw
    w = weight.detach().to(dtype).reshape(t, s, q)
    out = weight.dtype
    if q == 1:  # a 1×1 conv: Tucker-2 of a matrix is its truncated SVD (r_out = r_in here)
        u_out, sigma, u_in = truncated_svd(w[:, :, 0], r_out)
        core = (u_out.T @ w[:, :, 0] @ u_in).reshape(r_out, r_in, 1, 1)
        return TuckerFactors(core.to(out), u_out.to(out), u_in.to(out), projection_error(w, core))
    total = float(w.double().pow(2).sum())
    by_out = w.reshape(t, s * q)  # (T, S·Q): output unfolding
    by_tq = w.transpose(1, 2).reshape(t * q, s).contiguous()  # (T·Q, S): the input mode last
    u_in, _ = leading_left_vectors(w.transpose(0, 1).reshape(s, t * q), r_in)
    previous = math.inf
    for _ in range(n_iter_max):
        # W ×₁ U_inᵀ as a T × (Q·r_in) matrix (column order does not change its left singular vectors)
        u_out, _ = leading_left_vectors((by_tq @ u_in).reshape(t, q * r_in), r_out)
        # W ×₀ U_outᵀ: (r_out, S, Q), and its input unfolding S × (r_out·Q)
        z = (u_out.T @ by_out).reshape(r_out, s, q).transpose(0, 1).reshape(s, r_out * q)
        u_in, kept = leading_left_vectors(z, r_in)
        error = math.sqrt(max(total - float(kept.double().sum()), 0.0) / total) if total > 0 else 0.0
        if error == 0.0 or (math.isfinite(previous) and abs(previous - error) <= tol * previous):
            break
        previous = error
    core = (u_in.T @ z).reshape(r_in, r_out, kh, kw).transpose(0, 1)
    return TuckerFactors(core.to(out).contiguous(), u_out.to(out), u_in.to(out), projection_error(w, core))


def tucker1(weight: torch.Tensor, r_out: int) -> TuckerFactors:
    """Tucker-1 over the output mode: the optimum is the truncated SVD of the mode-0 unfolding."""
    if weight.ndim != 4:
        raise ValueError(f"expected a 4-D conv kernel, got shape {tuple(weight.shape)}")
    t, s, kh, kw = weight.shape
    if not 1 <= r_out <= t:
        raise ValueError(f"rank {r_out} is outside 1..{t}")
    # W₀ (T × S·kh·kw) ≈ U (T×r) · C (r × S·kh·kw); keep U orthonormal so the core carries the scale.
    u, sv, vh = torch.linalg.svd(_unfold(weight.detach().double(), 0), full_matrices=False)
    u_out = u[:, :r_out]
    core = (sv[:r_out, None] * vh[:r_out]).reshape(r_out, s, kh, kw)
    return TuckerFactors(core.to(weight.dtype), u_out.to(weight.dtype), None, projection_error(weight, core))


def tucker_reconstruct(factors: TuckerFactors) -> torch.Tensor:
    """Multiply the factors back into one T×S×kh×kw kernel."""
    w = torch.einsum("ta,abij->tbij", factors.u_out, factors.core)
    if factors.u_in is not None:
        w = torch.einsum("tbij,sb->tsij", w, factors.u_in)
    return w


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """‖W − Ŵ‖ / ‖W‖ (0 for an all-zero W approximated exactly)."""
    norm = weight.detach().double().norm()
    diff = (weight.detach().double() - approx.detach().double()).norm()
    return float(diff / norm) if norm > 0 else float(diff)


__all__ = ["TuckerFactors", "projection_error", "tucker2", "tucker2_hooi", "tucker2_tensorly", "clamp_tucker2_ranks", "TUCKER_METHODS", "tucker1", "tucker_reconstruct", "relative_error", "mode_unfolding", "svd_factors"]
