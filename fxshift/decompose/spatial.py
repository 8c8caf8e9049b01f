"""Low-rank spatial decomposition of a conv with a closed-form optimum (Tai et al., ICLR 2016).

A kh×kw conv ``W`` (``T×S×kh×kw``) is replaced by a vertical kh×1 conv S→K followed by a
horizontal 1×kw conv K→T::

    W[t, s, i, j] ≈ Σ_k  vertical[k, s, i] · horizontal[t, k, j]

Reshaping ``W`` into the ``(S·kh)×(kw·T)`` matrix ``M[(s,i),(j,t)] = W[t,s,i,j]`` turns this into a
rank-K matrix factorisation, so the truncated SVD ``M ≈ U_K Σ_K V_Kᵀ`` is the global optimum
(Eckart–Young): ``vertical`` comes from ``U_K·√Σ_K`` and ``horizontal`` from ``√Σ_K·V_Kᵀ``.

A grouped conv (``groups = g``, weight ``T×(S/g)×kh×kw``) is decomposed group by group with the
same K per group. The caller builds::

    vertical conv   weight (g·K, S/g, kh, 1)  groups=g  stride (s_h, 1)  padding (p_h, 0)  dilation (d_h, 1)  no bias
    horizontal conv weight (T, K, 1, kw)      groups=g  stride (1, s_w)  padding (0, p_w)  dilation (1, d_w)  the bias

Zero padding composes exactly: the padded rows are seen by the vertical conv, and the padded
columns of its output are zeros, which is what the horizontal conv must see.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "SpatialFactors",
    "spatial_max_rank",
    "spatial_optimal_error",
    "spatial_reconstruct",
    "spatial_singular_values",
    "spatial_svd",
]


class SpatialFactors(NamedTuple):
    """The two conv weights of a spatially decomposed kernel.

    Attributes
    ----------
    vertical : torch.Tensor
        ``(groups·K, S/groups, kh, 1)``: the kh×1 conv, run with ``groups=groups``, no bias.
    horizontal : torch.Tensor
        ``(T, K, 1, kw)``: the 1×kw conv, run with ``groups=groups``, with the original bias.
    """

    vertical: torch.Tensor
    horizontal: torch.Tensor


def _dims(weight, groups) -> tuple[int, int, int, int, int]:
    """Validate and return (T, S_per_group, kh, kw, groups)."""
    if isinstance(weight, torch.Tensor):
        shape = tuple(weight.shape)
    else:
        shape = tuple(int(d) for d in weight)
    if len(shape) != 4:
        raise ValueError(
            f"spatial decomposition expects a conv weight of shape (out, in/groups, kh, kw), "
            f"got shape {shape}"
        )
    if min(shape) < 1:
        raise ValueError(f"spatial decomposition got an empty weight of shape {shape}")
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    T, S, kh, kw = shape
    if T % groups != 0:
        raise ValueError(f"out channels {T} of weight {shape} are not divisible by groups={groups}")
    return T, S, kh, kw, int(groups)


def _check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor conv weight, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise ValueError(f"spatial decomposition expects a floating-point weight, got {weight.dtype}")


def spatial_max_rank(weight: torch.Tensor | tuple[int, ...], groups: int = 1) -> int:
    """Largest rank K of the spatial decomposition: ``min(S/g·kh, kw·T/g)``.

    Parameters
    ----------
    weight : torch.Tensor or tuple of int
        The conv weight ``(T, S/g, kh, kw)`` or its shape.
    groups : int, optional
        The conv's groups ``g`` (default 1).

    Returns
    -------
    int
        The per-group maximum rank; at that rank the decomposition is exact.

    Raises
    ------
    ValueError
        On a shape that is not 4-D, or ``groups`` not dividing the out channels.
    """
    T, S, kh, kw, g = _dims(weight, groups)
    return min(S * kh, kw * (T // g))


def _matrices(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-group matrices M_g[(s,i),(j,t)] = W_g[t,s,i,j], shape (g, S/g·kh, kw·T/g), float64 CPU."""
    _check_weight(weight)
    T, S, kh, kw, g = _dims(weight, groups)
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(w).all():
        raise ValueError("spatial decomposition got a weight containing NaN or Inf")
    tg = T // g
    # (g, tg, S, kh, kw) -> (g, S, kh, kw, tg) -> (g, S*kh, kw*tg)
    return w.reshape(g, tg, S, kh, kw).permute(0, 2, 3, 4, 1).reshape(g, S * kh, kw * tg)


def _check_rank(rank, max_rank: int, shape, groups: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise ValueError(f"spatial rank must be an int, got {rank!r}")
    rank = int(rank)
    if rank < 1 or rank > max_rank:
        raise ValueError(
            f"spatial rank must be in [1, {max_rank}] for a weight of shape {tuple(shape)} "
            f"with groups={groups}, got {rank}"
        )
    return rank


def spatial_singular_values(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Singular values of the per-group reshaped kernels, in descending order.

    Parameters
    ----------
    weight : torch.Tensor
        Conv weight ``(T, S/g, kh, kw)``.
    groups : int, optional
        The conv's groups ``g`` (default 1).

    Returns
    -------
    torch.Tensor
        Shape ``(g, spatial_max_rank(weight, g))``: row ``g`` holds the singular values of
        ``M_g[(s,i),(j,t)] = W_g[t,s,i,j]``, computed in float64, returned in ``weight``'s dtype
        on the CPU.

    Raises
    ------
    ValueError
        On a bad shape, ``groups``, or non-finite weight.
    """
    m = _matrices(weight, groups)
    return torch.linalg.svdvals(m).to(weight.dtype)


def spatial_optimal_error(weight: torch.Tensor, rank: int, groups: int = 1) -> float:
    """Smallest relative error any rank-K spatial decomposition can reach (Eckart–Young).

    Parameters
    ----------
    weight : torch.Tensor
        Conv weight ``(T, S/g, kh, kw)``.
    rank : int
        K per group, in ``[1, spatial_max_rank(weight, groups)]``.
    groups : int, optional
        The conv's groups (default 1).

    Returns
    -------
    float
        ``sqrt(Σ_g Σ_{i>K} σ_{g,i}² / Σ_g Σ_i σ_{g,i}²)`` (0.0 for a zero weight). This is exactly
        the relative Frobenius error of :func:`spatial_svd` at that rank.

    Raises
    ------
    ValueError
        On a bad shape, ``groups``, rank, or non-finite weight.
    """
    m = _matrices(weight, groups)
    rank = _check_rank(rank, min(m.shape[1:]), weight.shape, groups)
    s2 = torch.linalg.svdvals(m) ** 2
    total = float(s2.sum())
    if total == 0.0:
        return 0.0
    tail = float(s2[:, rank:].sum())
    return math.sqrt(max(tail, 0.0) / total)


def spatial_svd(weight: torch.Tensor, rank: int, groups: int = 1) -> SpatialFactors:
    """Decompose a conv kernel into a vertical and a horizontal conv by truncated SVD.

    Parameters
    ----------
    weight : torch.Tensor
        Conv weight ``(T, S/g, kh, kw)``.
    rank : int
        K, the number of intermediate channels per group, in
        ``[1, spatial_max_rank(weight, groups)]``; the intermediate tensor has ``g·K`` channels.
    groups : int, optional
        The conv's groups ``g`` (default 1); each group is decomposed independently.

    Returns
    -------
    SpatialFactors
        ``vertical`` of shape ``(g·K, S/g, kh, 1)`` and ``horizontal`` of shape ``(T, K, 1, kw)``,
        both to be run with ``groups=g``; in ``weight``'s dtype and device. The singular values
        are split evenly (``√σ`` on each side), and each singular vector's sign is fixed so that
        its largest-magnitude entry in ``vertical`` is positive, so the result does not depend on
        the LAPACK sign convention.

    Raises
    ------
    ValueError
        On a bad shape, ``groups``, rank, or non-finite weight.
    """
    m = _matrices(weight, groups)
    T, S, kh, kw, g = _dims(weight, groups)
    rank = _check_rank(rank, min(m.shape[1:]), weight.shape, groups)
    tg = T // g

    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    u, s, vh = u[:, :, :rank], s[:, :rank], vh[:, :rank, :]
    # Deterministic signs: the largest-|.| entry of each left singular vector is positive.
    idx = u.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(torch.gather(u, 1, idx))
    sign[sign == 0] = 1.0
    u = u * sign
    vh = vh * sign.transpose(1, 2)

    root = s.sqrt()
    vert = (u * root[:, None, :]).transpose(1, 2)  # (g, K, S*kh): vert[g,k,(s,i)]
    hor = root[:, :, None] * vh  # (g, K, kw*tg): hor[g,k,(j,t)]
    vertical = vert.reshape(g * rank, S, kh, 1)
    horizontal = hor.reshape(g, rank, kw, tg).permute(0, 3, 1, 2).reshape(T, rank, 1, kw)
    out = dict(device=weight.device, dtype=weight.dtype)
    return SpatialFactors(vertical.contiguous().to(**out), horizontal.contiguous().to(**out))


def spatial_reconstruct(factors: SpatialFactors, groups: int | None = None) -> torch.Tensor:
    """Multiply a vertical/horizontal pair back into one kh×kw kernel.

    Parameters
    ----------
    factors : SpatialFactors
        ``(vertical, horizontal)`` of shapes ``(g·K, S/g, kh, 1)`` and ``(T, K, 1, kw)``.
    groups : int, optional
        The groups ``g`` of both convs. When omitted it is inferred as
        ``vertical.shape[0] // horizontal.shape[1]``; when given it is checked against the shapes.

    Returns
    -------
    torch.Tensor
        ``W[t, s, i, j] = Σ_k vertical[g(t)·K + k, s, i] · horizontal[t, k, j]`` of shape
        ``(T, S/g, kh, kw)``, computed in float64 and returned in the factors' dtype.

    Raises
    ------
    ValueError
        If the shapes are inconsistent with each other or with ``groups``.
    """
    vertical, horizontal = factors
    if not (isinstance(vertical, torch.Tensor) and isinstance(horizontal, torch.Tensor)):
        raise ValueError("spatial factors must be two tensors (vertical, horizontal)")
    if vertical.ndim != 4 or horizontal.ndim != 4 or vertical.shape[3] != 1 or horizontal.shape[2] != 1:
        raise ValueError(
            f"spatial factors must be shaped (g*K, S/g, kh, 1) and (T, K, 1, kw), got "
            f"{tuple(vertical.shape)} and {tuple(horizontal.shape)}"
        )
    gk, S, kh, _ = vertical.shape
    T, K, _, kw = horizontal.shape
    if K < 1 or gk % K != 0:
        raise ValueError(
            f"vertical has {gk} output channels, not a multiple of the horizontal's {K} inputs"
        )
    inferred = gk // K
    if groups is None:
        groups = inferred
    elif isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups != inferred:
        raise ValueError(
            f"groups={groups!r} does not match the factor shapes {tuple(vertical.shape)} and "
            f"{tuple(horizontal.shape)} (which imply groups={inferred})"
        )
    if T % groups != 0:
        raise ValueError(f"out channels {T} are not divisible by groups={groups}")
    tg = T // groups
    v = vertical.detach().double().reshape(groups, K, S, kh)
    h = horizontal.detach().double().reshape(groups, tg, K, kw)
    w = torch.einsum("gksi,gtkj->gtsij", v, h).reshape(T, S, kh, kw)
    return w.to(vertical.dtype)
