"""SVD-decomposed Linear: S→r (no bias) then r→T (the original bias)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from ..decompose.svd import SVDFactors
from .base import DecomposedLayer


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


class LowRankLinear(DecomposedLayer):
    """Children `first` (S→r, weight √Σ·Vᵀ) and `second` (r→T, weight U·√Σ, the bias)."""

    method = "svd"

    @property
    def rank(self) -> int:
        return self.first.out_features

    @classmethod
    def from_factors(cls, linear: nn.Linear, factors: SVDFactors) -> "LowRankLinear":
        return cls(OrderedDict(first=_linear(factors.first, None), second=_linear(factors.second, linear.bias)))

    def spec(self) -> dict[str, Any]:
        return {"method": self.method, "rank": self.rank}

    @classmethod
    def from_spec(cls, original: nn.Linear, spec: dict[str, Any]) -> "LowRankLinear":
        r = spec["rank"]
        w = original.weight
        return cls.from_factors(original, SVDFactors(w.new_zeros(r, w.shape[1]), w.new_zeros(w.shape[0], r)))

    def recompose(self) -> nn.Linear:
        with torch.no_grad():
            weight = self.second.weight @ self.first.weight
        return _linear(weight, self.second.bias)
