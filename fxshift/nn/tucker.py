"""Tucker-decomposed Conv2d: 1×1 reduce → k×k core → 1×1 restore (Tucker-1 drops the reduce)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional

import torch
from torch import nn

from ..decompose.tucker import TuckerFactors, tucker_reconstruct
from .base import DecomposedLayer, conv_like


class TuckerConv2d(DecomposedLayer):
    """Children: `reduce` (1×1, S→r_in, no bias; absent for Tucker-1), `core` (the original
    kernel size, stride, padding and dilation, r_in→r_out), `restore` (1×1, r_out→T, the bias)."""

    method = "tucker"

    def __init__(self, layers: "OrderedDict[str, nn.Conv2d]"):
        super().__init__(layers)

    @property
    def ranks(self) -> tuple[int, Optional[int]]:
        """(r_out, r_in); r_in is None for Tucker-1."""
        return self.core.out_channels, (self.reduce.out_channels if "reduce" in self._modules else None)

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, factors: TuckerFactors) -> "TuckerConv2d":
        if conv.groups != 1:
            raise ValueError("Tucker decomposition needs groups=1")
        core, u_out, u_in = factors.core, factors.u_out, factors.u_in
        layers: OrderedDict[str, nn.Conv2d] = OrderedDict()
        if u_in is not None:
            layers["reduce"] = conv_like(conv, conv.in_channels, u_in.shape[1], u_in.t()[:, :, None, None], None,
                                         stride=1, padding=0, dilation=1, padding_mode="zeros")
        layers["core"] = conv_like(conv, core.shape[1], core.shape[0], core, None)
        layers["restore"] = conv_like(conv, core.shape[0], conv.out_channels, u_out[:, :, None, None], conv.bias,
                                      stride=1, padding=0, dilation=1, padding_mode="zeros")
        return cls(layers)

    def spec(self) -> dict[str, Any]:
        r_out, r_in = self.ranks
        return {"method": self.method, "ranks": [r_out, r_in]}

    @classmethod
    def from_spec(cls, original: nn.Conv2d, spec: dict[str, Any]) -> "TuckerConv2d":
        r_out, r_in = spec["ranks"]
        t, s, kh, kw = original.weight.shape
        like = original.weight
        factors = TuckerFactors(
            like.new_zeros(r_out, r_in if r_in is not None else s, kh, kw),
            like.new_zeros(t, r_out),
            like.new_zeros(s, r_in) if r_in is not None else None,
        )
        return cls.from_factors(original, factors)

    def factors(self) -> TuckerFactors:
        u_in = self.reduce.weight[:, :, 0, 0].t() if "reduce" in self._modules else None
        return TuckerFactors(self.core.weight, self.restore.weight[:, :, 0, 0], u_in)

    def recompose(self) -> nn.Conv2d:
        with torch.no_grad():
            weight = tucker_reconstruct(self.factors())
        core = self.core
        return conv_like(core, weight.shape[1], weight.shape[0], weight, self.restore.bias)
