"""Rank rules shared by every SVD-based decomposition: what a parsed rank setting
(fxshift.plan.rank_setting: fraction, int, "energy:τ", "vbmf", per mode) means for a layer.

The truncated-SVD rule (`low_rank`) is shared by the Linear SVD, each Tucker mode and the spatial
decomposition; `tail_error` gives the Eckart–Young error of any rank from the same spectrum.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch

from ..errors import ConfigError
from ..plan.rank_setting import Absolute, Energy, Fraction, PerMode, RankSpec, VBMF, is_data_driven, parse_rank
from .gram import leading_left_vectors, squared_singular_values
from .tucker import clamp_tucker2_ranks


def energy_rank(singular: torch.Tensor, tau: float) -> int:
    """Smallest r with Σ_{i≤r} σ_i² / Σ σ_i² ≥ τ (at least 1)."""
    energy = singular.double() ** 2
    total = energy.sum()
    if total <= 0:
        return 1
    cumulative = torch.cumsum(energy, 0) / total
    return int(min(len(singular), int((cumulative < tau - 1e-12).sum()) + 1))


def _where(layer: str, size: int, mode: str, what: str) -> str:
    return f"layer {layer!r}" + (f" ({mode} mode, {size} {what})" if mode else f" ({size} {what})")


def pooled_singular_values(singular: torch.Tensor) -> torch.Tensor:
    """One spectrum from per-group spectra (g, k): √Σ_g σ_{g,i}², so that energy and tail error
    at rank K count every group truncated to K (a 1-D spectrum is returned as it is)."""
    s = singular.detach().double()
    return s if s.ndim == 1 else s.pow(2).sum(0).sqrt()


def tail_error(singular: torch.Tensor, rank: int) -> float:
    """Relative Frobenius error of the best rank-`rank` approximation (Eckart–Young):
    √(Σ_{i>r} σ_i² / Σ σ_i²), pooled over groups for a (g, k) spectrum; 0 for a zero matrix."""
    energy = pooled_singular_values(singular).pow(2)
    total = float(energy.sum())
    if total <= 0:
        return 0.0
    return math.sqrt(max(float(energy[rank:].sum()), 0.0) / total)


def low_rank(spec: Any, max_rank: int, layer: str, *, spectrum: Optional[Callable[[], torch.Tensor]] = None,
             matrices: Optional[Callable[[], Sequence[torch.Tensor]]] = None, mode: str = "",
             what: str = "channels") -> int:
    """Resolve a rank setting for a truncated SVD with ranks 1..max_rank: the one rank rule that the
    Linear SVD, every Tucker mode and the spatial (Tai) decomposition share.

    spec: a fraction in (0, 1] of max_rank (rounded, at least 1), an int, "energy:τ" (the smallest
    rank keeping a fraction τ of Σσ², pooled over groups) or "vbmf" (the largest EVBMF rank over
    `matrices`, at least 1). `spectrum` returns the singular values (1-D, or (groups, k)) and
    `matrices` the matrices EVBMF looks at; they are called only when the rule needs them.
    Raises ConfigError naming the layer for any invalid setting.
    """
    where = _where(layer, max_rank, mode, what)
    spec = parse_rank(spec, layer)
    if isinstance(spec, (Fraction, Absolute)):
        return fixed_rank(spec, max_rank, max_rank, where)
    if isinstance(spec, VBMF):
        if matrices is None:
            raise ConfigError(f"{where}: rank 'vbmf' needs the layer's weight")
        from .evbmf import evbmf_rank

        # EVBMF may find no signal at all (pure noise); a layer needs at least rank 1.
        found = max(evbmf_rank(m.detach().double()) for m in matrices())
        return max(1, min(max_rank, found))
    if isinstance(spec, Energy):
        if spectrum is None:
            raise ConfigError(f"{where}: rank 'energy:{spec.tau}' needs the layer's weight")
        return min(max_rank, energy_rank(pooled_singular_values(spectrum()), spec.tau))
    raise ConfigError(f"{where}: a per-mode rank {spec} is not a single rank here")


def fixed_rank(spec: Fraction | Absolute, whole: int, top: int, where: str) -> int:
    """A fraction of `whole` (rounded, within 1..top) or an int checked to lie in 1..top."""
    if isinstance(spec, Fraction):
        return max(1, min(top, int(round(spec.value * whole))))
    if not 1 <= spec.value <= top:
        raise ConfigError(f"{where}: rank {spec.value} must lie in 1..{top}")
    return spec.value


def mode_rank(spec: Any, size: int, unfolding: Optional[torch.Tensor], layer: str, mode: str = "") -> int:
    """Resolve one mode's rank setting against a mode of `size` channels (see low_rank).

    `unfolding` (size × rest) is needed only by the data-driven rules ("vbmf", "energy:τ").
    Raises ConfigError naming the layer for any invalid setting.
    """
    spec = parse_rank(spec, layer)
    if is_data_driven(spec) and unfolding is None:
        raise ConfigError(f"{_where(layer, size, mode, 'channels')}: rank {spec} needs the layer's weight")
    spectrum = (lambda: squared_singular_values(unfolding).sqrt()) if unfolding is not None else None
    matrices = (lambda: [unfolding]) if unfolding is not None else None
    return low_rank(spec, size, layer, spectrum=spectrum, matrices=matrices, mode=mode)


def mode_ranks(spec: Any, sizes: tuple[int, ...], unfoldings: Callable[[int], torch.Tensor], layer: str,
               mode_names: tuple[str, ...]) -> tuple[int, ...]:
    """Resolve a setting for several modes: a tuple gives one setting per mode, anything else applies to all."""
    spec = parse_rank(spec, layer)
    if isinstance(spec, PerMode):
        if len(spec.modes) != len(sizes):
            raise ConfigError(f"layer {layer!r}: rank {spec} needs {len(sizes)} entries ({', '.join(mode_names)})")
        specs = spec.modes
    else:
        specs = (spec,) * len(sizes)
    return tuple(mode_rank(s, n, unfoldings(i) if is_data_driven(s) else None, layer, m)
                 for i, (s, n, m) in enumerate(zip(specs, sizes, mode_names)))


def first_mode(spec: Any, layer: str = "") -> RankSpec:
    """The setting of the first mode (the whole setting when it is not per mode): what a
    single-rank decomposition (a Linear's SVD, Tucker-1) takes from a per-mode tuple."""
    spec = parse_rank(spec, layer)
    return spec.modes[0] if isinstance(spec, PerMode) else spec


def hosvd_errors(weight: torch.Tensor, rank_pairs: Sequence[tuple[int, int]]) -> list[float]:
    """Relative error of the truncated HOSVD of a T×S×kh×kw kernel at each (r_out, r_in).

    Projects the kernel onto the leading r_out left singular vectors of its output unfolding and
    r_in of its input unfolding: err² = 1 − ‖U_outᵀ ×₀ W ×₁ U_in‖² / ‖W‖². HOOI (tucker2) starts
    from this point and only lowers the error, so it is an upper bound close to the final error;
    the singular vectors come from the eigh of each unfolding's smaller Gram matrix (at most
    min(T, S·kh·kw) and min(S, T·kh·kw) of them: ranks beyond add nothing), and every pair costs
    one lookup in a 2-D cumulative sum.
    """
    w = weight.detach().double()
    t, s = w.shape[:2]
    total = float(w.pow(2).sum())
    if total <= 0:
        return [0.0 for _ in rank_pairs]
    w0 = w.reshape(t, -1)
    w1 = w.transpose(0, 1).reshape(s, -1)
    u_out, _ = leading_left_vectors(w0, min(w0.shape))
    u_in, _ = leading_left_vectors(w1, min(w1.shape))
    rotated = torch.einsum("ta,tsij,sb->abij", u_out, w, u_in)
    energy = rotated.pow(2).sum(dim=(2, 3)).cumsum(0).cumsum(1)
    k_out, k_in = energy.shape
    return [math.sqrt(max(0.0, 1.0 - float(energy[min(r_out, k_out) - 1, min(r_in, k_in) - 1]) / total))
            for r_out, r_in in rank_pairs]


# ----- Ranks that keep about a given fraction of a layer's parameters (Budget candidates) ----------

def _clamp(value: float, top: int) -> int:
    return max(1, min(top, int(round(value))))


def linear_rank_for_cost(shape: Sequence[int], fraction: float) -> int:
    """r with r·(S + T) ≈ fraction·S·T for a T×S matrix."""
    t, s = int(shape[0]), int(shape[1])
    return _clamp(fraction * s * t / (s + t), min(s, t))


def tucker1_rank_for_cost(shape: Sequence[int], fraction: float) -> int:
    """r_out with r_out·(S·kh·kw + T) ≈ fraction·T·S·kh·kw (Tucker-1: k×k conv S→r_out, then 1×1)."""
    t, s, kh, kw = (int(d) for d in shape)
    return _clamp(fraction * t * s * kh * kw / (s * kh * kw + t), t)


def tucker2_ranks_for_cost(shape: Sequence[int], fraction: float) -> tuple[int, int]:
    """(r_out, r_in) = f·(T, S) with f²·T·S·kh·kw + f·(S² + T²) ≈ fraction·T·S·kh·kw (core plus the
    two 1×1 convs), clamped to ranks the kernel can use; for a 1×1 conv one rank r with
    r² + r·(S + T) ≈ fraction·S·T."""
    t, s, kh, kw = (int(d) for d in shape)
    if kh * kw == 1:  # a 1×1 conv: both ranks clamp to one r (fxshift.decompose.tucker.clamp_tucker2_ranks)
        r = (-(s + t) + math.sqrt((s + t) ** 2 + 4.0 * fraction * s * t)) / 2.0  # r² + r·(S+T) = fraction·S·T
        return _clamp(r, min(s, t)), _clamp(r, min(s, t))
    a, b = t * s * kh * kw, s * s + t * t
    f = (-b + math.sqrt(b * b + 4.0 * a * a * fraction)) / (2.0 * a)
    return clamp_tucker2_ranks((t, s, kh, kw), (_clamp(f * t, t), _clamp(f * s, s)))


def spatial_rank_for_cost(shape: Sequence[int], groups: int, fraction: float, max_rank: int) -> int:
    """K with K·(S·kh + T·kw) ≈ fraction·T·(S/g)·kh·kw for a T×(S/g)×kh×kw kernel (vertical S→g·K,
    horizontal g·K→T, both grouped)."""
    t, s_g, kh, kw = (int(d) for d in shape)
    s = s_g * groups
    return _clamp(fraction * t * s_g * kh * kw / (s * kh + t * kw), max_rank)


def distinct(items: Sequence[Any]) -> list[Any]:
    """Items in order, without repeats."""
    seen, out = set(), []
    for item in items:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out
