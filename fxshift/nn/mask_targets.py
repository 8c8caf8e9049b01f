"""Per-sample filter-mask targets for dynamic pruning (FTWT, docs/methods.md §9).

Given a unit's output activations (B, C, H, W), a target marks, per sample, the filters worth
computing. The mask predictors learn these targets; at inference their own prediction replaces them.

- "mass": a_c = spatial max of |output_c|, p_c = a_c / Σ a; the largest filters are kept until their
  cumulative p reaches `threshold`, so the count differs per sample. Filters with a_c = 0 are never
  kept (they contribute nothing), and a sample whose output is all zero keeps none.
- "uniform": the top `ratio` of filters by a_c (at least one), the same count for every sample.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..errors import ConfigError

TARGETS = ("mass", "uniform")
DEFAULT_THRESHOLD = 0.9
DEFAULT_RATIO = 0.5


def check_target(target: str, threshold: Optional[float], ratio: Optional[float], where: str = "DynamicPrunePass"
                 ) -> tuple[str, Optional[float], Optional[float]]:
    """Validate a target setting and fill in its default; returns (target, threshold, ratio)."""
    if target not in TARGETS:
        raise ConfigError(f"{where}: unknown target {target!r}; use 'mass' (with threshold) or 'uniform' (with ratio)")
    if target == "mass":
        if ratio is not None:
            raise ConfigError(f"{where}: ratio={ratio!r} belongs to target='uniform'; with target='mass' give "
                              "threshold (the cumulative activation mass to keep) instead")
        threshold = DEFAULT_THRESHOLD if threshold is None else threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
                or not 0 < threshold <= 1:
            raise ConfigError(f"{where}: threshold must be a number in (0, 1] (the fraction of activation mass the "
                              f"kept filters must reach), got {threshold!r}")
        return target, float(threshold), None
    if threshold is not None:
        raise ConfigError(f"{where}: threshold={threshold!r} belongs to target='mass'; with target='uniform' give "
                          "ratio (the fraction of filters to keep) instead")
    ratio = DEFAULT_RATIO if ratio is None else ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or not 0 < ratio < 1:
        raise ConfigError(f"{where}: ratio must be a number in (0, 1) (the fraction of filters kept per sample), "
                          f"got {ratio!r}")
    return target, None, float(ratio)


def filter_activity(output: torch.Tensor) -> torch.Tensor:
    """a_c: the spatial max of |output_c| per sample, shape (B, C)."""
    if output.ndim != 4:
        raise ConfigError(f"mask targets need (batch, channels, height, width) activations, got shape "
                          f"{tuple(output.shape)}")
    return output.detach().abs().amax(dim=(2, 3))


def mass_targets(output: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """Float 0/1 targets (B, C): per sample, the top filters whose cumulative mass p reaches `threshold`."""
    a = filter_activity(output)
    total = a.sum(dim=1, keepdim=True)
    p = a / total.clamp_min(torch.finfo(a.dtype).tiny)
    p_sorted, order = p.sort(dim=1, descending=True)
    before = p_sorted.cumsum(dim=1) - p_sorted        # mass of the filters ranked above each one
    keep_sorted = (before < threshold) & (p_sorted > 0)
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    return keep.to(output.dtype)


def uniform_targets(output: torch.Tensor, ratio: float = DEFAULT_RATIO, count: Optional[int] = None) -> torch.Tensor:
    """Float 0/1 targets (B, C): per sample, the `count` filters (default round(ratio·C), at least one)
    with the largest a_c."""
    a = filter_activity(output)
    k = count if count else uniform_count(a.shape[1], ratio)
    top = a.topk(k, dim=1).indices
    return torch.zeros_like(a).scatter(1, top, 1.0).to(output.dtype)


def uniform_count(channels: int, ratio: float, multiple: int = 1) -> int:
    """How many of `channels` filters the uniform target keeps: round(ratio·channels), at least one;
    with `multiple` > 1 and at least 4·multiple channels, rounded to a multiple of it instead (oneDNN
    computes output and input channels in blocks of 16 with AVX-512, 8 with AVX2: a ragged count
    costs as much as the next whole block)."""
    if multiple > 1 and channels >= 4 * multiple:
        return min(channels, max(multiple, multiple * int(round(ratio * channels / multiple))))
    return min(channels, max(1, int(round(ratio * channels))))


def mask_targets(output: torch.Tensor, target: str, threshold: Optional[float] = None,
                 ratio: Optional[float] = None, count: Optional[int] = None) -> torch.Tensor:
    """The targets of `target` ("mass" or "uniform", keeping `count` filters when given) for `output`,
    as float 0/1 of shape (B, C)."""
    target, threshold, ratio = check_target(target, threshold, ratio, "mask_targets")
    return mass_targets(output, threshold) if target == "mass" else uniform_targets(output, ratio, count)
