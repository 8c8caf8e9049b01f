"""SpatialSVDPass: Tai et al.'s closed-form vertical/horizontal decomposition of every Conv2d."""
from __future__ import annotations

import weakref
from typing import Any, Sequence, Union

import torch
from torch import nn

from ..decompose.ranks import distinct, low_rank, spatial_rank_for_cost, tail_error
from ..decompose.spatial import spatial_max_rank, spatial_reconstruct, spatial_singular_values, spatial_svd
from ..decompose.tucker import relative_error
from ..nn.spatial import SpatialConv2d
from ..nn.low_rank_linear import LowRankLinear
from .decompose_base import Decision, DecompositionPass, linear_candidates, linear_decision
from ..graph import Selector


def spatial_matrices(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-group reshaped kernels M_g[(s,i),(j,t)] = W_g[t,s,i,j], shape (g, S/g·kh, kw·T/g), float64."""
    t, s, kh, kw = weight.shape
    tg = t // groups
    w = weight.detach().double()
    return w.reshape(groups, tg, s, kh, kw).permute(0, 2, 3, 4, 1).reshape(groups, s * kh, kw * tg)


class SpatialSVDPass(DecompositionPass):
    """Replace each Conv2d (T×S/g×kh×kw) by a kh×1 conv S→g·K and a 1×kw conv g·K→T (docs/methods.md §4).

    The kernel reshaped to the (S/g·kh)×(kw·T/g) matrix M[(s,i),(j,t)] = W[t,s,i,j] (per group) is
    truncated by SVD, so for a given K the relative reconstruction error is the Eckart–Young
    optimum √(Σ_{i>K} σ_i² / Σ σ_i²) of M's singular values, and at K = min(S/g·kh, kw·T/g) the
    chain is exact. Stride, padding and dilation go on their own axis (vertical: height,
    horizontal: width); grouped and depthwise convs are decomposed group by group with the same K.

    Args:
        rank: K per group, in any of these forms: an int; a fraction in (0, 1] of the largest K
            (min(S/g·kh, kw·T/g); for a square k×k conv with S = T the chain stops saving cost
            above a fraction of about 1/2, hence the default 0.25); "energy:τ" (the smallest K
            keeping a fraction τ of Σσ², pooled over groups); "vbmf" (the largest EVBMF rank of
            the groups' reshaped matrices); a dict by layer name or a callable (name, module) of
            these; or fxshift.Budget(macs=…/params=…/latency=…).
        include, exclude: name patterns or module types choosing the layers.
        linear: also decompose nn.Linear layers, by the truncated SVD that TuckerDecomposePass uses
            (the same low-rank core: a 1×1 conv's spatial decomposition is that SVD); their rank
            is a fraction of min(T, S), an int, "energy:τ" or "vbmf".
        only_if_cheaper: leave a layer alone when the chain would not cut its MACs.

    Convs with a padding mode other than zeros are left alone (the chain is exact only with zero
    padding); the report says why.
    """

    cli_name = "spatial"

    layer_types = (nn.Conv2d, nn.Linear)

    def __init__(self, rank: Any = 0.25, include: Selector = None, exclude: Selector = None, linear: bool = True, *,
                 only_if_cheaper: bool = True, progress: bool = False):
        super().__init__(rank, include, exclude, only_if_cheaper, progress)
        self.linear = linear
        self._spectra: dict[str, tuple[Any, int, torch.Tensor]] = {}

    def spectrum(self, name: str, module: nn.Conv2d) -> torch.Tensor:
        """The per-group singular values of the reshaped kernel (g, K_max), computed once per weight
        (a Budget asks for them while collecting candidates and again while decomposing)."""
        weight = module.weight
        cached = self._spectra.get(name)
        if cached is not None and cached[0]() is weight and cached[1] == weight._version:
            return cached[2]
        values = spatial_singular_values(weight.detach().double(), module.groups)
        self._spectra[name] = (weakref.ref(weight), weight._version, values)
        return values

    @staticmethod
    def _unsupported(module: nn.Module) -> str:
        if type(module) is not nn.Conv2d:
            return f"{type(module).__name__} is not a plain Conv2d"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}: the spatial chain is exact only with zero padding"
        return ""

    def resolve_rank(self, name: str, module: nn.Conv2d, rank: Any) -> int:
        """K for a rank setting (see the class docstring)."""
        weight, groups = module.weight.detach(), module.groups
        return low_rank(rank, spatial_max_rank(weight, groups), name, spectrum=lambda: self.spectrum(name, module),
                        matrices=lambda: list(spatial_matrices(weight, groups)), what="possible ranks")

    def decompose(self, name: str, module: nn.Module, rank: Any) -> Decision:
        if isinstance(module, nn.Linear):
            return linear_decision(name, module, rank) if self.linear else Decision(None, "linear=False")
        reason = self._unsupported(module)
        if reason:
            return Decision(None, reason)
        k = self.resolve_rank(name, module, rank)
        weight = module.weight.detach()
        factors = spatial_svd(weight, k, module.groups)
        cached = self._spectra.pop(name, None)
        if cached is not None and cached[0]() is module.weight and cached[1] == module.weight._version:
            error = tail_error(cached[2], k)  # the Eckart–Young optimum, from the spectrum a rule computed
        else:  # the same number, without a second SVD
            error = relative_error(weight, spatial_reconstruct(factors, module.groups))
        return Decision(SpatialConv2d.from_factors(module, factors), rank=k, rel_error=error)

    def budget_candidates(self, name: str, module: nn.Module,
                          fractions: Sequence[float]) -> Union[str, list[tuple[Any, float]]]:
        if isinstance(module, nn.Linear):
            return linear_candidates(module, fractions) if self.linear else "linear=False"
        reason = self._unsupported(module)
        if reason:
            return reason
        weight, groups = module.weight.detach(), module.groups
        top = spatial_max_rank(weight, groups)
        ranks = distinct(spatial_rank_for_cost(weight.shape, groups, f, top) for f in fractions)
        spectrum = self.spectrum(name, module)
        return [(k, tail_error(spectrum, k)) for k in ranks]

    def structure(self, module: nn.Module, rank: Any) -> nn.Module:
        if isinstance(module, nn.Linear):
            return LowRankLinear.from_spec(module, {"rank": rank})
        return SpatialConv2d.from_spec(module, {"rank": rank})
