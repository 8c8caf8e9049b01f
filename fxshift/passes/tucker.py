"""TuckerDecomposePass: Tucker-2 (Tucker-1 for few input channels) on Conv2d, SVD on Linear."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from torch import nn

from ..decompose.ranks import (distinct, first_mode, hosvd_errors, mode_rank, mode_ranks, tail_error, tucker1_rank_for_cost,
                               tucker2_ranks_for_cost)
from ..decompose.gram import squared_singular_values
from ..decompose.tucker import TUCKER_METHODS, mode_unfolding, relative_error, tucker1, tucker2, tucker_reconstruct
from ..errors import ConfigError
from ..nn.low_rank_linear import LowRankLinear
from ..nn.tucker import TuckerConv2d
from .decompose_base import Decision, DecompositionPass, linear_candidates, linear_decision
from ..graph import Selector


class TuckerDecomposePass(DecompositionPass):
    """Replace each Conv2d by 1×1 → k×k core → 1×1 (Tucker-2, docs/methods.md §2) and each Linear by two
    Linears (truncated SVD, docs/methods.md §5).

    Args:
        rank: a fraction in (0, 1] of each mode's channels, an int, an (r_out, r_in) tuple, "vbmf",
            "energy:τ", a dict from layer name to any of these, a callable (name, module) -> any
            of these (None leaves the layer alone), or fxshift.Budget(macs=…/params=…/latency=…)
            for per-layer ranks chosen to meet a whole-model target.
        include, exclude: name patterns ("layer1.*") or module types choosing the layers.
        linear: also decompose nn.Linear layers.
        tucker1_max_in: convs with at most this many input channels get Tucker-1 (output mode only).
        only_if_cheaper: leave a layer alone when the decomposition would not cut its MACs.
        method: "hooi" (default): fxshift.decompose.tucker.tucker2_hooi, HOSVD start and a few HOOI
            sweeps, each mode through the eigh of its smaller Gram matrix (within ~0.2% of
            tensorly's converged error on random kernels, equal on structured ones, a fraction of
            the time); "tensorly": tensorly's partial_tucker (the reference).
        n_iter_max, tol: HOOI sweeps and early-stop threshold (defaults: 3 and 1e-3 relative for
            "hooi", 100 and 1e-4 for "tensorly").

    Tucker-2 ranks are clamped to r_out ≤ r_in·kh·kw and r_in ≤ r_out·kh·kw (larger ones add
    nothing); a 1×1 conv gets one rank on both sides (its truncated SVD). The report shows the
    ranks used.

    Grouped and depthwise convs are left as they are; the report says why.
    """

    cli_name = "tucker"

    layer_types = (nn.Conv2d, nn.Linear)

    def __init__(self, rank: Any = 0.5, include: Selector = None, exclude: Selector = None, linear: bool = True, *,
                 tucker1_max_in: int = 4, only_if_cheaper: bool = True, method: str = "hooi",
                 n_iter_max: Optional[int] = None, tol: Optional[float] = None, progress: bool = False):
        super().__init__(rank, include, exclude, only_if_cheaper, progress)
        if method not in TUCKER_METHODS:
            raise ConfigError(f"TuckerDecomposePass: method {method!r} is not one of {', '.join(TUCKER_METHODS)}")
        if n_iter_max is not None and (isinstance(n_iter_max, bool) or not isinstance(n_iter_max, int)
                                       or n_iter_max < 1):
            raise ConfigError(f"TuckerDecomposePass: n_iter_max={n_iter_max!r} must be a positive int")
        if tol is not None and not (isinstance(tol, (int, float)) and tol >= 0):
            raise ConfigError(f"TuckerDecomposePass: tol={tol!r} must be a number ≥ 0")
        self.linear = linear
        self.tucker1_max_in = tucker1_max_in
        self.method = method
        self.n_iter_max = n_iter_max
        self.tol = tol

    def decompose(self, name: str, module: nn.Module, rank: Any) -> Decision:
        if isinstance(module, nn.Linear):
            return self._linear(name, module, rank) if self.linear else Decision(None, "linear=False")
        if type(module) is not nn.Conv2d:
            return Decision(None, f"{type(module).__name__} is not a plain Conv2d")
        if module.groups != 1:
            kind = "depthwise" if module.groups == module.in_channels else "grouped"
            return Decision(None, f"{kind} conv (groups={module.groups})")
        weight = module.weight.detach()
        t, s = weight.shape[:2]
        if s <= self.tucker1_max_in:
            r_out = mode_rank(first_mode(rank, name), t, mode_unfolding(weight, 0), name, "output")
            # The output unfolding has rank at most S·kh·kw: a larger rank would add nothing.
            r_out = min(r_out, weight[0].numel())
            factors = tucker1(weight, r_out)
            ranks: tuple = (r_out, None)
        else:
            ranks = mode_ranks(rank, (t, s), lambda m: mode_unfolding(weight, m), name, ("output", "input"))
            factors = tucker2(weight, ranks, n_iter_max=self.n_iter_max, tol=self.tol, method=self.method)
            ranks = (factors.u_out.shape[1], factors.u_in.shape[1])  # as clamped
        error = factors.error if factors.error is not None else relative_error(weight, tucker_reconstruct(factors))
        return Decision(TuckerConv2d.from_factors(module, factors), rank=list(ranks), rel_error=error)

    def _linear(self, name: str, module: nn.Linear, rank: Any) -> Decision:
        return linear_decision(name, module, rank)

    # Budget support: candidate ranks with their estimated errors, and the structure at a rank.
    def budget_candidates(self, name: str, module: nn.Module,
                          fractions: Sequence[float]) -> Union[str, list[tuple[Any, float]]]:
        if isinstance(module, nn.Linear):
            return linear_candidates(module, fractions) if self.linear else "linear=False"
        if type(module) is not nn.Conv2d or module.groups != 1:
            return self.decompose(name, module, 1).reason
        w = module.weight.detach()
        if w.shape[1] <= self.tucker1_max_in:
            ranks = distinct(tucker1_rank_for_cost(w.shape, f) for f in fractions)
            spectrum = squared_singular_values(mode_unfolding(w, 0)).sqrt()
            return [((r, w.shape[1]), tail_error(spectrum, r)) for r in ranks]
        pairs = distinct(tucker2_ranks_for_cost(w.shape, f) for f in fractions)
        return list(zip(pairs, hosvd_errors(w, pairs)))

    def structure(self, module: nn.Module, rank: Any) -> nn.Module:
        if isinstance(module, nn.Linear):
            return LowRankLinear.from_spec(module, {"rank": rank})
        r_out, r_in = rank
        return TuckerConv2d.from_spec(module, {"ranks": [r_out, None if module.in_channels <= self.tucker1_max_in
                                                         else r_in]})
