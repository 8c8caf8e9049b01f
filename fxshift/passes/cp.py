"""CPDecomposePass: CP (canonical polyadic) decomposition of every Conv2d into a four-conv chain."""
from __future__ import annotations

import math
from typing import Any, Sequence, Union

from torch import nn

from ..decompose.cp import cp_conv, cp_max_rank
from ..decompose.cp_als import cp_als, cp_break_even_rank, cp_error_curve, cp_kernel
from ..plan.rank_setting import Absolute, Energy, Fraction, VBMF, parse_rank
from ..decompose.ranks import distinct, fixed_rank
from ..decompose.tucker import mode_unfolding, relative_error
from ..errors import ConfigError
from ..nn.cp import CPConv2d
from ..nn.low_rank_linear import LowRankLinear
from .decompose_base import Decision, DecompositionPass, linear_candidates, linear_decision
from ..graph import Selector

#: Ranks tried by "energy:τ", as fractions of the break-even rank, smallest first.
ENERGY_LADDER = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class CPDecomposePass(DecompositionPass):
    """Replace each Conv2d by the CP chain of Lebedev et al. (docs/methods.md §3): 1×1 conv S→R, kh×1
    depthwise conv (stride, padding, dilation of the height axis), 1×kw depthwise conv (those of
    the width axis), 1×1 conv R→T with the original bias. The report carries each layer's relative
    reconstruction error ‖W − Ŵ‖/‖W‖.

    Args:
        rank: R, in any of these forms:
            - a fraction in (0, 1] of the layer's *break-even rank* R_eq = ⌊T·S·kh·kw / (T+S+kh+kw)⌋,
              the rank at which the chain holds as many weights as the conv (and, at stride 1,
              costs as many MACs); rank=0.5 keeps about half of each layer's weights. (CP's
              mathematical maximum rank, T·S·kh·kw / max(T, S, kh, kw), is far above anything
              that compresses, so it is no useful scale.)
            - an int R (1 ≤ R ≤ that maximum);
            - "vbmf": the larger EVBMF rank of the output- and input-channel unfoldings, the rule of
              the public CP code (at least 1);
            - "energy:τ": the smallest rank on a ladder of fractions of R_eq (0.05, 0.1, …, 1.0)
              whose CP keeps a fraction τ of the kernel's energy (1 − err² ≥ τ, estimated by a
              short growing ALS run); a layer that needs more than R_eq is left alone;
            - a dict by layer name or a callable (name, module) of these;
            - fxshift.Budget(macs=…/params=…/latency=…).
        include, exclude: name patterns or module types choosing the layers.
        linear: also decompose nn.Linear layers, by the truncated SVD (a matrix's CP decomposition)
            that TuckerDecomposePass uses; their rank is a fraction of min(T, S), an int,
            "energy:τ" or "vbmf".
        only_if_cheaper: leave a layer alone when the chain would not cut its MACs.
        n_iter_max, tol: ALS sweeps at most, and the relative error change that stops them. The
            default 20 sweeps (with line search) decomposes a random-init ResNet-18 at rank 0.5 in
            well under a minute on two cores; more sweeps lower the error a little further.
        solver: "als" (default): fxshift.decompose.cp_als, ALS with tensorly's SVD initialisation
            and line search and an MTTKRP that never forms the Khatri–Rao product; "tensorly":
            tensorly's parafac through fxshift.decompose.cp.cp_conv (same algorithm; slow and
            memory-hungry on large layers).
        seed: seed of the random start columns (when R exceeds a mode's size).
        probe_sweeps: ALS sweeps per candidate rank when estimating errors for a Budget or "energy:τ".

    Grouped and depthwise convs, and convs whose padding mode is not zeros, are left alone with
    the reason in the report (the chain would mix groups / is exact only with zero padding).
    """

    cli_name = "cp"

    layer_types = (nn.Conv2d, nn.Linear)

    def __init__(self, rank: Any = 0.5, include: Selector = None, exclude: Selector = None, linear: bool = True, *,
                 only_if_cheaper: bool = True, n_iter_max: int = 20, tol: float = 1e-4, solver: str = "als",
                 seed: int = 0, probe_sweeps: int = 2, progress: bool = False):
        super().__init__(rank, include, exclude, only_if_cheaper, progress)
        if solver not in ("als", "tensorly"):
            raise ConfigError(f"CPDecomposePass: solver={solver!r} must be 'als' or 'tensorly'")
        if isinstance(n_iter_max, bool) or not isinstance(n_iter_max, int) or n_iter_max < 1:
            raise ConfigError(f"CPDecomposePass: n_iter_max={n_iter_max!r} must be a positive int")
        if isinstance(probe_sweeps, bool) or not isinstance(probe_sweeps, int) or probe_sweeps < 1:
            raise ConfigError(f"CPDecomposePass: probe_sweeps={probe_sweeps!r} must be a positive int")
        self.linear = linear
        self.n_iter_max = n_iter_max
        self.tol = tol
        self.solver = solver
        self.seed = seed
        self.probe_sweeps = probe_sweeps

    @staticmethod
    def _unsupported(module: nn.Module) -> str:
        if type(module) is not nn.Conv2d:
            return f"{type(module).__name__} is not a plain Conv2d"
        if module.groups != 1:
            kind = "depthwise" if module.groups == module.in_channels else "grouped"
            return f"{kind} conv (groups={module.groups}): the CP chain would mix groups"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}: the CP chain is exact only with zero padding"
        return ""

    def resolve_rank(self, name: str, module: nn.Conv2d, rank: Any) -> Union[int, str]:
        """R for a rank setting, or the reason the layer is left alone."""
        shape = tuple(module.weight.shape)
        top, even = cp_max_rank(shape), cp_break_even_rank(shape)
        where = f"layer {name!r} (CP break-even rank {even}, maximum {top})"
        spec = parse_rank(rank, name)
        if isinstance(spec, Fraction):
            return fixed_rank(spec, even, even, where)
        if isinstance(spec, Absolute):
            return fixed_rank(spec, even, top, where)
        if isinstance(spec, VBMF):
            from ..decompose.evbmf import evbmf_rank

            weight = module.weight.detach().double()
            found = max(evbmf_rank(mode_unfolding(weight, 0)), evbmf_rank(mode_unfolding(weight, 1)))
            return max(1, min(top, found))
        if isinstance(spec, Energy):
            found = self._energy_probe(name, module, spec)
            return found if isinstance(found, str) else found[0]
        raise ConfigError(f"{where}: unknown rank {rank!r} (CP has one rank, not one per mode); use a fraction in "
                          "(0, 1] of the break-even rank, an int, 'vbmf', 'energy:τ', a dict by layer name, a "
                          "callable (name, module) or fxshift.Budget(...)")

    def _energy_probe(self, name: str, module: nn.Conv2d, spec: Energy) -> Union[str, tuple[int, list]]:
        """("energy:τ") the smallest ladder rank whose probe keeps τ, with the probe's ALS factors
        (the final run starts from them, so it keeps τ too), or the reason the layer is left alone."""
        tau = spec.tau
        even = cp_break_even_rank(tuple(module.weight.shape))
        ladder = distinct(max(1, int(round(f * even))) for f in ENERGY_LADDER)
        errors, factors = cp_error_curve(module.weight.detach(), ladder, sweeps=self.probe_sweeps, seed=self.seed,
                                         stop_at=math.sqrt(max(0.0, 1.0 - tau)), return_factors=True)
        for r, err in zip(ladder, errors):
            if math.isfinite(err) and 1.0 - err * err >= tau - 1e-12:
                return r, (factors if factors is not None and factors[0].shape[1] == r else None)
        return f"energy {tau} needs a CP rank above the break-even rank {even}"

    def decompose(self, name: str, module: nn.Module, rank: Any) -> Decision:
        if isinstance(module, nn.Linear):
            return linear_decision(name, module, rank) if self.linear else Decision(None, "linear=False")
        reason = self._unsupported(module)
        if reason:
            return Decision(None, reason)
        probe = None
        spec = parse_rank(rank, name)
        if isinstance(spec, Energy):
            found = self._energy_probe(name, module, spec)
            r, probe = (found, None) if isinstance(found, str) else found
        else:
            r = self.resolve_rank(name, module, rank)
        if isinstance(r, str):
            return Decision(None, r)
        weight = module.weight.detach()
        if self.only_if_cheaper and r * sum(weight.shape) >= weight.numel():
            # The chain would hold at least as many weights (and cost as many MACs): skip the ALS.
            return Decision(None, f"would not cut its cost at rank {r} (break-even rank "
                                  f"{cp_break_even_rank(weight.shape)})", rank=r)
        if self.solver == "als":
            factors, error = cp_als(weight, r, n_iter_max=self.n_iter_max, tol=self.tol, seed=self.seed, init=probe)
        else:
            factors = cp_conv(weight, r, n_iter_max=self.n_iter_max, tol=self.tol, seed=self.seed)
            error = relative_error(weight, cp_kernel(factors))
            if probe is not None:  # a fresh run may land above the probe: then continue from the probe
                refined, refined_error = cp_als(weight, r, n_iter_max=self.n_iter_max, tol=self.tol, init=probe)
                if refined_error < error:
                    factors, error = refined, refined_error
        return Decision(CPConv2d.from_factors(module, factors), rank=r, rel_error=error)

    def budget_candidates(self, name: str, module: nn.Module,
                          fractions: Sequence[float]) -> Union[str, list[tuple[Any, float]]]:
        if isinstance(module, nn.Linear):
            return linear_candidates(module, fractions) if self.linear else "linear=False"
        reason = self._unsupported(module)
        if reason:
            return reason
        weight = module.weight.detach()
        even = cp_break_even_rank(weight.shape)
        ranks = distinct(max(1, min(even, int(round(f * even)))) for f in fractions)
        errors = cp_error_curve(weight, ranks, sweeps=self.probe_sweeps, seed=self.seed)
        return list(zip(ranks, errors))

    def structure(self, module: nn.Module, rank: Any) -> nn.Module:
        if isinstance(module, nn.Linear):
            return LowRankLinear.from_spec(module, {"rank": rank})
        return CPConv2d.from_spec(module, {"rank": rank})
