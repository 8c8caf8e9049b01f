"""The rank grammar of every decomposition pass, parsed in one place into typed values.

A pass's ``rank=`` option is one of
- a fraction in (0, 1] (:class:`Fraction`), an int ≥ 1 (:class:`Absolute`), ``"vbmf"``
  (:class:`VBMF`), ``"energy:τ"`` with τ in (0, 1] (:class:`Energy`), or a tuple of these, one
  per mode (:class:`PerMode`) — a per-layer value;
- a dict from layer name to a per-layer value, or a callable ``(name, module) -> value``; a layer
  the dict does not name, or for which the callable returns None, is left alone;
- ``fxshift.Budget(...)``: the planner chooses every layer's rank (fxshift.plan.planner).

:func:`parse_rank` turns a per-layer value into its typed form (typed values pass through), and
:func:`rank_for_layer` picks a layer's value out of a pass's setting and parses it. What a value
means for a layer (a fraction of what, the largest int allowed) is the decomposition's business:
fxshift.decompose.ranks for SVD-based ranks, CPDecomposePass for CP.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

from torch import nn

from ..errors import ConfigError
from .budget import Budget

__all__ = ["Fraction", "Absolute", "VBMF", "Energy", "PerMode", "RankSpec", "parse_rank", "rank_for_layer",
           "is_data_driven"]

_FORMS = "a fraction in (0, 1], an int, a tuple, 'vbmf', 'energy:τ', a dict by layer name, a callable " \
         "(name, module) or fxshift.Budget(...)"


@dataclass(frozen=True)
class Fraction:
    """A fraction in (0, 1] of the mode's size (what "size" is depends on the decomposition)."""

    value: float


@dataclass(frozen=True)
class Absolute:
    """An explicit rank."""

    value: int


@dataclass(frozen=True)
class VBMF:
    """The rank EVBMF (Nakajima et al. 2013) estimates from the weight."""


@dataclass(frozen=True)
class Energy:
    """The smallest rank keeping a fraction τ of the weight's energy Σσ²."""

    tau: float


@dataclass(frozen=True)
class PerMode:
    """One setting per mode (e.g. Tucker's (output, input))."""

    modes: tuple[Union[Fraction, Absolute, VBMF, Energy], ...]


RankSpec = Union[Fraction, Absolute, VBMF, Energy, PerMode]
_TYPED = (Fraction, Absolute, VBMF, Energy, PerMode)


def parse_rank(value: Any, layer: str = "") -> RankSpec:
    """The typed form of a per-layer rank value; ConfigError naming `layer` when it is not one."""
    where = f"layer {layer!r}" if layer else "rank"
    if isinstance(value, _TYPED):
        return value
    if isinstance(value, Budget):
        raise ConfigError(f"{where}: a Budget chooses the ranks of the whole model; give it as the pass's rank "
                          "(rank=fxshift.Budget(...)), not per layer")
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"{where}: rank {value!r} is not a valid setting; use {_FORMS}")
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ConfigError(f"{where}: rank fraction {value} must lie in (0, 1]; use an int for an absolute rank")
        return Fraction(value)
    if isinstance(value, int):  # its range (1..largest rank) is checked where the layer is known
        return Absolute(value)
    if isinstance(value, str):
        if value == "vbmf":
            return VBMF()
        if value.startswith("energy"):
            try:
                tau = float(value.split(":", 1)[1])
            except (IndexError, ValueError):
                raise ConfigError(f"{where}: rank {value!r} is not of the form 'energy:0.85'") from None
            if not 0.0 < tau <= 1.0:
                raise ConfigError(f"{where}: energy threshold {tau} must lie in (0, 1]")
            return Energy(tau)
    if isinstance(value, (tuple, list)):
        modes = tuple(parse_rank(v, layer) for v in value)
        if not modes or any(isinstance(m, PerMode) for m in modes):
            raise ConfigError(f"{where}: rank {tuple(value)!r} must be a flat tuple of per-mode settings")
        return PerMode(modes)
    raise ConfigError(f"{where}: unknown rank {value!r}; use {_FORMS}")


def rank_for_layer(setting: Any, name: str, module: nn.Module) -> Optional[RankSpec]:
    """The parsed rank of one layer under a pass's setting, or None when the setting leaves it out."""
    if isinstance(setting, dict):
        value = setting.get(name)
    elif callable(setting) and not isinstance(setting, (type, Budget)):
        value = setting(name, module)
    else:
        value = setting
    return None if value is None else parse_rank(value, name)


def is_data_driven(spec: RankSpec) -> bool:
    """True for the settings read off the weight itself ("vbmf", "energy:τ")."""
    return isinstance(spec, (VBMF, Energy))
