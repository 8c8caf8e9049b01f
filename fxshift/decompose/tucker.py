"""Tucker-2 and Tucker-1 of a conv kernel over its channel modes (docs/methods.md §2, §6)."""
from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import tensorly as tl
import torch
from tensorly.decomposition import partial_tucker

from .svd import gram_svd, svd_factors


class TuckerFactors(NamedTuple):
    """W ≈ core ×₀ u_out ×₁ u_in. `u_in` is None for Tucker-1 (output mode only).

    core: (r_out, r_in or S, kh, kw); u_out: (T, r_out); u_in: (S, r_in) or None.
    """

    core: torch.Tensor
    u_out: torch.Tensor
    u_in: Optional[torch.Tensor]


def _unfold(weight: torch.Tensor, mode: int) -> torch.Tensor:
    return weight.movedim(mode, 0).reshape(weight.shape[mode], -1)


def mode_unfolding(weight: torch.Tensor, mode: int) -> torch.Tensor:
    """The mode-`mode` unfolding of a kernel: shape (weight.shape[mode], rest)."""
    return _unfold(weight.detach(), mode)


def tucker2(weight: torch.Tensor, ranks: tuple[int, int], n_iter_max: int = 100, tol: float = 1e-4) -> TuckerFactors:
    """Tucker-2 of a T×S×kh×kw kernel with ranks (r_out, r_in), by HOOI from an SVD start.

    Uses tensorly's partial_tucker (≥ 0.8 return structure) in float64 with `gram_svd` as its
    SVD. HOOI stops when the reconstruction error changes by less than `tol` between iterations.
    """
    if weight.ndim != 4:
        raise ValueError(f"expected a 4-D conv kernel, got shape {tuple(weight.shape)}")
    r_out, r_in = ranks
    t, s = weight.shape[:2]
    if not (1 <= r_out <= t and 1 <= r_in <= s):
        raise ValueError(f"ranks {ranks} are outside 1..{t} × 1..{s}")
    with tl.backend_context("pytorch"), warnings.catch_warnings():
        # tensorly warns when a projected unfolding has fewer columns than the rank; it clamps, as wanted.
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        (core, factors), _ = partial_tucker(
            weight.detach().double(), rank=[r_out, r_in], modes=[0, 1], init="svd", n_iter_max=n_iter_max, tol=tol, svd=gram_svd
        )
    u_out, u_in = factors
    return TuckerFactors(core.to(weight.dtype), u_out.to(weight.dtype), u_in.to(weight.dtype))


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
    return TuckerFactors(core.to(weight.dtype), u_out.to(weight.dtype), None)


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


__all__ = ["TuckerFactors", "tucker2", "tucker1", "tucker_reconstruct", "relative_error", "mode_unfolding", "svd_factors"]
