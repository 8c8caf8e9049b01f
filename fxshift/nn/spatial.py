"""Spatially decomposed Conv2d (Tai et al. 2016): kh×1 (S→g·K) then 1×kw (g·K→T), per group."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from ..decompose.spatial import SpatialFactors, spatial_reconstruct
from .base import DecomposedLayer, conv_like
from .cp import axis_paddings, joined_padding


class SpatialConv2d(DecomposedLayer):
    """Children: `vertical` (kh×1, S→g·K, groups=g, the original stride, padding and dilation along
    the height, no bias) and `horizontal` (1×kw, g·K→T, groups=g, those along the width, the
    original bias). Exact for zero padding only."""

    method = "spatial"

    @property
    def rank(self) -> int:
        """K, the intermediate channels per group."""
        return self.vertical.out_channels // self.vertical.groups

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, factors: SpatialFactors) -> "SpatialConv2d":
        if conv.padding_mode != "zeros":
            raise ValueError(f"the spatial decomposition is exact only with zero padding, not {conv.padding_mode!r}")
        vertical, horizontal = factors
        pad_h, pad_w = axis_paddings(conv)
        layers = OrderedDict(
            vertical=conv_like(conv, conv.in_channels, vertical.shape[0], vertical, None,
                               stride=(conv.stride[0], 1), padding=pad_h, dilation=(conv.dilation[0], 1)),
            horizontal=conv_like(conv, vertical.shape[0], conv.out_channels, horizontal, conv.bias,
                                 stride=(1, conv.stride[1]), padding=pad_w, dilation=(1, conv.dilation[1])),
        )
        return cls(layers)

    def spec(self) -> dict[str, Any]:
        return {"method": self.method, "rank": self.rank}

    @classmethod
    def from_spec(cls, original: nn.Conv2d, spec: dict[str, Any]) -> "SpatialConv2d":
        k = int(spec["rank"])
        t, s, kh, kw = original.weight.shape
        w = original.weight
        return cls.from_factors(original, SpatialFactors(w.new_zeros(original.groups * k, s, kh, 1),
                                                         w.new_zeros(t, k, 1, kw)))

    def factors(self) -> SpatialFactors:
        return SpatialFactors(self.vertical.weight, self.horizontal.weight)

    def recompose(self) -> nn.Conv2d:
        v, h = self.vertical, self.horizontal
        with torch.no_grad():
            weight = spatial_reconstruct(self.factors(), v.groups)
        return conv_like(v, weight.shape[1] * v.groups, weight.shape[0], weight, h.bias,
                         stride=(v.stride[0], h.stride[1]), padding=joined_padding(v, h),
                         dilation=(v.dilation[0], h.dilation[1]), padding_mode="zeros")
