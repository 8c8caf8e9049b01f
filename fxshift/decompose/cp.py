"""CP (canonical polyadic) decomposition of a conv kernel (Lebedev et al., ICLR 2015).

A kernel ``W`` of shape ``T×S×kh×kw`` is approximated by ``R`` rank-one terms::

    W[t, s, i, j] ≈ Σ_r  last[t, r] · first[r, s] · vertical[r, i] · horizontal[r, j]

which replaces the conv by a chain of four cheap convs (the caller builds the modules)::

    1×1 conv S→R        weight first      (R, S, 1, 1)   no bias
    kh×1 conv, groups=R weight vertical   (R, 1, kh, 1)  stride (s_h, 1), padding (p_h, 0), dilation (d_h, 1)
    1×kw conv, groups=R weight horizontal (R, 1, 1, kw)  stride (1, s_w), padding (0, p_w), dilation (1, d_w)
    1×1 conv R→T        weight last       (T, R, 1, 1)   the original bias

Stride, padding and dilation go on the axis they belong to; putting both axes' values on one conv
is the classic bug of public implementations. The factors come from tensorly's ALS ``parafac``
with the SVD initialisation, computed in float64 on the numpy backend.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import tensorly as tl
import torch
from tensorly.decomposition import parafac

from .cp_init import cp_svd_init

__all__ = ["CPFactors", "cp_conv", "cp_max_rank", "cp_reconstruct", "cp_relative_error"]


class CPFactors(NamedTuple):
    """The four conv weights of a CP-decomposed kernel, ready to load into conv modules.

    Attributes
    ----------
    first : torch.Tensor
        ``(R, S, 1, 1)`` pointwise conv S→R (unit-norm rank-one factors).
    vertical : torch.Tensor
        ``(R, 1, kh, 1)`` depthwise conv along the height (unit-norm factors).
    horizontal : torch.Tensor
        ``(R, 1, 1, kw)`` depthwise conv along the width (unit-norm factors).
    last : torch.Tensor
        ``(T, R, 1, 1)`` pointwise conv R→T; carries the CP weights λ.
    """

    first: torch.Tensor
    vertical: torch.Tensor
    horizontal: torch.Tensor
    last: torch.Tensor


def _check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor conv weight, got {type(weight).__name__}")
    if weight.ndim != 4:
        raise ValueError(
            f"CP decomposition expects a conv weight of shape (out, in, kh, kw), "
            f"got a tensor of shape {tuple(weight.shape)}"
        )
    if weight.numel() == 0:
        raise ValueError(f"CP decomposition got an empty weight of shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"CP decomposition expects a floating-point weight, got {weight.dtype}")


def cp_max_rank(shape: tuple[int, ...] | torch.Size | torch.Tensor) -> int:
    """Largest CP rank worth asking for: ``T·S·kh·kw / max(T, S, kh, kw)``.

    Every tensor is a sum of that many rank-one terms (one per fibre along its longest mode), so
    a larger rank can only repeat terms.

    Parameters
    ----------
    shape : tuple of int, torch.Size or torch.Tensor
        The conv weight shape ``(T, S, kh, kw)``, or the weight itself.

    Returns
    -------
    int
        The maximum rank.
    """
    dims = tuple(shape.shape) if isinstance(shape, torch.Tensor) else tuple(int(d) for d in shape)
    if len(dims) != 4 or min(dims) < 1:
        raise ValueError(f"expected a non-empty 4-D conv weight shape, got {dims}")
    return math.prod(dims) // max(dims)


def _check_rank(rank: int, weight: torch.Tensor) -> int:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise ValueError(f"CP rank must be an int, got {rank!r}")
    rank = int(rank)
    max_rank = cp_max_rank(weight.shape)
    if rank < 1 or rank > max_rank:
        raise ValueError(
            f"CP rank must be in [1, {max_rank}] for a weight of shape {tuple(weight.shape)}, "
            f"got {rank}"
        )
    return rank


def _parafac64(
    w: np.ndarray, rank: int, n_iter_max: int, tol: float, seed: int, linesearch: bool
):
    return parafac(
        w,
        rank,
        n_iter_max=n_iter_max,
        init=_svd_init64(w, rank, seed),
        tol=tol,
        random_state=seed,
        normalize_factors=False,
        linesearch=linesearch,
    )


def _svd_init64(w: np.ndarray, rank: int, seed: int) -> tl.cp_tensor.CPTensor:
    """tensorly's init="svd" (same subspaces, same seeded random columns where a mode is shorter
    than the rank), computed from the smaller Gram matrices (fxshift.decompose.cp_init)."""
    rng = np.random.RandomState(seed)
    fill = lambda rows, cols: torch.from_numpy(rng.random_sample((rows, cols)))  # noqa: E731
    factors = [f.numpy() for f in cp_svd_init(torch.from_numpy(w), rank, fill)]
    return tl.cp_tensor.CPTensor((np.ones(rank), factors))


def cp_conv(
    weight: torch.Tensor,
    rank: int,
    n_iter_max: int = 500,
    tol: float = 1e-8,
    seed: int = 0,
    linesearch: bool = True,
) -> CPFactors:
    """CP-decompose a conv kernel into four ready-to-use conv weights.

    Parameters
    ----------
    weight : torch.Tensor
        Conv weight of shape ``(T, S, kh, kw)`` of a conv with ``groups == 1`` (a grouped conv's
        per-group weight would decompose, but the chain above would mix groups; the caller
        rejects grouped convs).
    rank : int
        The CP rank ``R``, in ``[1, cp_max_rank(weight)]``.
    n_iter_max : int, optional
        Maximum number of ALS sweeps (default 500).
    tol : float, optional
        ALS stops when the relative reconstruction error changes by less than this between
        sweeps (default 1e-8).
    seed : int, optional
        Seed for the columns that the SVD initialisation cannot fill (when ``R`` exceeds a mode's
        size); the result is deterministic for a given seed.
    linesearch : bool, optional
        Use tensorly's ALS line search, which usually halves the number of sweeps (default True).

    Returns
    -------
    CPFactors
        ``(first, vertical, horizontal, last)`` of shapes ``(R, S, 1, 1)``, ``(R, 1, kh, 1)``,
        ``(R, 1, 1, kw)`` and ``(T, R, 1, 1)``, in ``weight``'s dtype and device. The first three
        have unit-norm rank-one factors; the CP weights λ are folded into ``last``.

    Raises
    ------
    ValueError
        If ``weight`` is not a non-empty 4-D floating tensor, contains NaN/Inf, or ``rank`` is
        out of range, or ``n_iter_max``/``tol`` are invalid.

    Notes
    -----
    ALS finds a local optimum; unlike the spatial (Tai) and Tucker-via-SVD decompositions, the
    error is not guaranteed optimal, and it need not decrease strictly with the rank.
    """
    _check_weight(weight)
    rank = _check_rank(rank, weight)
    if isinstance(n_iter_max, bool) or not isinstance(n_iter_max, (int, np.integer)) or n_iter_max < 1:
        raise ValueError(f"n_iter_max must be a positive int, got {n_iter_max!r}")
    if not (isinstance(tol, (int, float)) and tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")

    T, S, kh, kw = weight.shape
    w = weight.detach().to(device="cpu", dtype=torch.float64).numpy()
    if not np.all(np.isfinite(w)):
        raise ValueError("CP decomposition got a weight containing NaN or Inf")

    if not np.any(w):
        a = np.zeros((T, rank))
        b, c, d = (np.zeros((n, rank)) for n in (S, kh, kw))
        lam = np.zeros(rank)
    else:
        if tl.get_backend() == "numpy":
            cp = _parafac64(w, rank, int(n_iter_max), float(tol), int(seed), linesearch)
        else:
            with tl.backend_context("numpy", local_threadsafe=True):
                cp = _parafac64(w, rank, int(n_iter_max), float(tol), int(seed), linesearch)
        weights, (a, b, c, d) = cp
        a, b, c, d = (np.asarray(f, dtype=np.float64) for f in (a, b, c, d))
        lam = np.asarray(weights, dtype=np.float64).copy()
        # Give the first three factors unit-norm columns and move their scale into λ.
        for f in (b, c, d):
            norms = np.linalg.norm(f, axis=0)
            safe = np.where(norms > 0, norms, 1.0)
            f /= safe
            lam *= norms
        a = a * lam

    def out(x: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x).reshape(shape)).to(
            device=weight.device, dtype=weight.dtype
        )

    return CPFactors(
        first=out(b.T, (rank, S, 1, 1)),
        vertical=out(c.T, (rank, 1, kh, 1)),
        horizontal=out(d.T, (rank, 1, 1, kw)),
        last=out(a, (T, rank, 1, 1)),
    )


def cp_reconstruct(factors: CPFactors) -> torch.Tensor:
    """Multiply CP conv factors back into one kernel.

    Parameters
    ----------
    factors : CPFactors
        ``(first, vertical, horizontal, last)`` as returned by :func:`cp_conv`.

    Returns
    -------
    torch.Tensor
        ``W[t, s, i, j] = Σ_r last[t, r]·first[r, s]·vertical[r, i]·horizontal[r, j]`` of shape
        ``(T, S, kh, kw)``, computed in float64 and returned in the factors' dtype.

    Raises
    ------
    ValueError
        If the four shapes are not consistent.
    """
    first, vertical, horizontal, last = factors
    for name, f in zip(CPFactors._fields, (first, vertical, horizontal, last)):
        if not isinstance(f, torch.Tensor) or f.ndim != 4:
            raise ValueError(f"CP factor '{name}' must be a 4-D tensor")
    R = first.shape[0]
    ok = (
        first.shape[2:] == (1, 1)
        and vertical.shape[0] == R and vertical.shape[1] == 1 and vertical.shape[3] == 1
        and horizontal.shape[0] == R and horizontal.shape[1] == 1 and horizontal.shape[2] == 1
        and last.shape[1] == R and last.shape[2:] == (1, 1)
    )
    if not ok:
        raise ValueError(
            "inconsistent CP factor shapes: expected (R,S,1,1), (R,1,kh,1), (R,1,1,kw), (T,R,1,1); got "
            + ", ".join(str(tuple(f.shape)) for f in (first, vertical, horizontal, last))
        )
    w = torch.einsum(
        "tr,rs,ri,rj->tsij",
        last[:, :, 0, 0].double(),
        first[:, :, 0, 0].double(),
        vertical[:, 0, :, 0].double(),
        horizontal[:, 0, 0, :].double(),
    )
    return w.to(first.dtype)


def cp_relative_error(weight: torch.Tensor, factors: CPFactors) -> float:
    """Relative Frobenius error ``‖W − Ŵ‖ / ‖W‖`` of a CP decomposition.

    Parameters
    ----------
    weight : torch.Tensor
        The original kernel ``(T, S, kh, kw)``.
    factors : CPFactors
        Its CP factors.

    Returns
    -------
    float
        The relative error (0.0 when both are zero, ``inf`` when only ``W`` is zero).

    Raises
    ------
    ValueError
        If the reconstruction's shape differs from ``weight``'s.
    """
    _check_weight(weight)
    rec = cp_reconstruct(factors).double().cpu()
    w = weight.detach().double().cpu()
    if rec.shape != w.shape:
        raise ValueError(
            f"CP factors reconstruct a kernel of shape {tuple(rec.shape)}, "
            f"but the weight has shape {tuple(w.shape)}"
        )
    num = float(torch.linalg.vector_norm(w - rec))
    den = float(torch.linalg.vector_norm(w))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den
