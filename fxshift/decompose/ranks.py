"""Rank rules shared by every decomposition: fraction, int, "energy:τ", "vbmf", per layer.

A rank option may be a plain value (float fraction in (0, 1], int, "vbmf", "energy:0.85"), a
tuple of those for multi-mode decompositions, a dict from layer name to any of these, or a
callable (name, module) -> any of these. A dict without the layer, or a callable returning None,
leaves that layer alone.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..errors import ConfigError



def rank_for_layer(rank: Any, name: str, module: torch.nn.Module) -> Any:
    """The rank setting that applies to one layer, or None when the setting leaves it out."""
    if isinstance(rank, dict):
        return rank.get(name)
    if callable(rank) and not isinstance(rank, type):
        return rank(name, module)
    return rank


def parse_energy(spec: str, layer: str) -> float:
    """The τ of an "energy:τ" setting, checked to lie in (0, 1]."""
    try:
        tau = float(spec.split(":", 1)[1])
    except (IndexError, ValueError):
        raise ConfigError(f"layer {layer!r}: rank {spec!r} is not of the form 'energy:0.85'") from None
    if not 0.0 < tau <= 1.0:
        raise ConfigError(f"layer {layer!r}: energy threshold {tau} must lie in (0, 1]")
    return tau


def energy_rank(singular: torch.Tensor, tau: float) -> int:
    """Smallest r with Σ_{i≤r} σ_i² / Σ σ_i² ≥ τ (at least 1)."""
    energy = singular.double() ** 2
    total = energy.sum()
    if total <= 0:
        return 1
    cumulative = torch.cumsum(energy, 0) / total
    return int(min(len(singular), int((cumulative < tau - 1e-12).sum()) + 1))


def mode_rank(spec: Any, size: int, unfolding: Optional[torch.Tensor], layer: str, mode: str = "") -> int:
    """Resolve one mode's rank setting against a mode of `size` channels.

    `unfolding` (size × rest) is needed only by the data-driven rules ("vbmf", "energy:τ").
    Raises ConfigError naming the layer for any invalid setting.
    """
    where = f"layer {layer!r}" + (f" ({mode} mode, {size} channels)" if mode else f" ({size} channels)")
    if isinstance(spec, bool) or spec is None:
        raise ConfigError(f"{where}: rank {spec!r} is not a valid setting; use a fraction, an int, 'vbmf' or 'energy:τ'")
    if isinstance(spec, float):
        if not 0.0 < spec <= 1.0:
            raise ConfigError(f"{where}: rank fraction {spec} must lie in (0, 1]; use an int for an absolute rank")
        return max(1, min(size, int(round(spec * size))))
    if isinstance(spec, int):
        if not 1 <= spec <= size:
            raise ConfigError(f"{where}: rank {spec} must lie in 1..{size}")
        return spec
    if isinstance(spec, str):
        if unfolding is None:
            raise ConfigError(f"{where}: rank {spec!r} needs the layer's weight")
        if spec == "vbmf":
            from .evbmf import evbmf_rank

            # EVBMF may find no signal at all (pure noise); a layer needs at least rank 1.
            return max(1, min(size, evbmf_rank(unfolding.detach().double())))
        if spec.startswith("energy"):
            tau = parse_energy(spec, layer)
            return energy_rank(torch.linalg.svdvals(unfolding.detach().double()), tau)
    raise ConfigError(
        f"{where}: unknown rank {spec!r}; use a fraction in (0, 1], an int, a tuple, 'vbmf', 'energy:τ', "
        "a dict by layer name or a callable (name, module)"
    )


def mode_ranks(spec: Any, sizes: tuple[int, ...], unfoldings: Callable[[int], torch.Tensor], layer: str,
               mode_names: tuple[str, ...]) -> tuple[int, ...]:
    """Resolve a setting for several modes: a tuple gives one setting per mode, anything else applies to all."""
    if isinstance(spec, (tuple, list)):
        if len(spec) != len(sizes):
            raise ConfigError(f"layer {layer!r}: rank {tuple(spec)} needs {len(sizes)} entries ({', '.join(mode_names)})")
        specs = tuple(spec)
    else:
        specs = (spec,) * len(sizes)
    return tuple(mode_rank(s, n, unfoldings(i) if isinstance(s, str) else None, layer, m)
                 for i, (s, n, m) in enumerate(zip(specs, sizes, mode_names)))
