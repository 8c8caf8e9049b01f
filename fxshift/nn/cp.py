"""CP-decomposed Conv2d (Lebedev et al. 2015): 1×1 → kh×1 depthwise → 1×kw depthwise → 1×1."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Union

import torch
from torch import nn

from ..decompose.cp import CPFactors
from ..decompose.cp_als import cp_kernel
from .base import DecomposedLayer, conv_like

Padding = Union[str, tuple[int, int]]


def axis_paddings(conv: nn.Conv2d) -> tuple[Padding, Padding]:
    """The padding of a kh×1 (height) conv and of a 1×kw (width) conv that together pad like `conv`.

    "same" stays "same" on both (each then pads only its own axis); "valid" is no padding.
    """
    if conv.padding == "same":
        return "same", "same"
    ph, pw = (0, 0) if conv.padding == "valid" else conv.padding
    return (ph, 0), (0, pw)


def joined_padding(vertical: nn.Conv2d, horizontal: nn.Conv2d) -> Padding:
    """The padding of the one conv a height conv and a width conv fold into."""
    if vertical.padding == "same":
        return "same"
    return (vertical.padding[0], horizontal.padding[1])


class CPConv2d(DecomposedLayer):
    """Children: `first` (1×1, S→R, no bias), `vertical` (kh×1 depthwise over R channels, the
    original stride, padding and dilation along the height), `horizontal` (1×kw depthwise, those
    along the width), `last` (1×1, R→T, the original bias). Exact for zero padding only."""

    method = "cp"

    @property
    def rank(self) -> int:
        return self.first.out_channels

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, factors: CPFactors) -> "CPConv2d":
        if conv.groups != 1:
            raise ValueError("CP decomposition needs groups=1")
        if conv.padding_mode != "zeros":
            raise ValueError(f"CP decomposition is exact only with zero padding, not {conv.padding_mode!r}")
        first, vertical, horizontal, last = factors
        r = first.shape[0]
        pad_h, pad_w = axis_paddings(conv)
        one = dict(stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros")
        layers = OrderedDict(
            first=conv_like(conv, conv.in_channels, r, first, None, **one),
            vertical=conv_like(conv, r, r, vertical, None, stride=(conv.stride[0], 1), padding=pad_h,
                               dilation=(conv.dilation[0], 1), groups=r),
            horizontal=conv_like(conv, r, r, horizontal, None, stride=(1, conv.stride[1]), padding=pad_w,
                                 dilation=(1, conv.dilation[1]), groups=r),
            last=conv_like(conv, r, conv.out_channels, last, conv.bias, **one),
        )
        return cls(layers)

    def spec(self) -> dict[str, Any]:
        return {"method": self.method, "rank": self.rank}

    @classmethod
    def from_spec(cls, original: nn.Conv2d, spec: dict[str, Any]) -> "CPConv2d":
        r = int(spec["rank"])
        t, s, kh, kw = original.weight.shape
        w = original.weight
        return cls.from_factors(original, CPFactors(w.new_zeros(r, s, 1, 1), w.new_zeros(r, 1, kh, 1),
                                                    w.new_zeros(r, 1, 1, kw), w.new_zeros(t, r, 1, 1)))

    def factors(self) -> CPFactors:
        return CPFactors(self.first.weight, self.vertical.weight, self.horizontal.weight, self.last.weight)

    def recompose(self) -> nn.Conv2d:
        with torch.no_grad():
            weight = cp_kernel(self.factors())
        v, h = self.vertical, self.horizontal
        return conv_like(v, weight.shape[1], weight.shape[0], weight, self.last.bias, groups=1,
                         stride=(v.stride[0], h.stride[1]), padding=joined_padding(v, h),
                         dilation=(v.dilation[0], h.dilation[1]), padding_mode="zeros")
