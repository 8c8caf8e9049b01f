"""Modules that fxshift passes insert into a model."""
from .base import RECOMPOSE_RULES, STRUCTURES, DecomposedLayer, register_recompose_rule, register_structure
from .cp import CPConv2d
from .gated import GatedConv2d, scatter_channels, set_gating
from .frozen_shift import FrozenShiftConv2d, FrozenShiftLinear
from .low_rank_linear import LowRankLinear
from .shift import ShiftConv2d, ShiftLinear
from .spatial import SpatialConv2d
from .tucker import TuckerConv2d

__all__ = ["DecomposedLayer", "LowRankLinear", "TuckerConv2d", "RECOMPOSE_RULES", "STRUCTURES",
           "register_recompose_rule", "register_structure", "ShiftConv2d", "ShiftLinear", "FrozenShiftConv2d",
           "FrozenShiftLinear", "CPConv2d", "SpatialConv2d"]
__all__ += ["GatedConv2d", "set_gating", "scatter_channels"]
