"""What every decomposition pass shares: choosing layers, deciding each one, swapping it and
reporting it. A whole-model Budget is planned by fxshift.plan.planner; this class then
decomposes each layer at its planned rank."""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from tqdm.auto import tqdm

from ..context import add_budget_summary, budget_summaries, example_inputs_of, report_of
from ..costs import input_shapes, parameter_count, proxy_input_shape, shape_macs
from ..plan.budget import Budget
from ..decompose.gram import squared_singular_values
from ..plan.planner import plan_budget
from ..plan.rank_setting import rank_for_layer
from ..decompose.ranks import distinct, first_mode, linear_rank_for_cost, mode_rank, tail_error
from ..decompose.svd import svd_factors
from ..decompose.tucker import relative_error
from ..nn.low_rank_linear import LowRankLinear
from ..errors import ConfigError
from ..graph import LayerFilter, Selector, candidate_layers, replace_module
from ..report import ReportRow

_UNSET = object()


@dataclass
class Decision:
    """The outcome for one layer: a replacement module, or None with the reason it was left alone."""

    module: Optional[nn.Module]
    reason: str = ""
    rank: Any = None
    rel_error: Optional[float] = None


def linear_decision(name: str, module: nn.Linear, rank: Any) -> Decision:
    """The truncated SVD of a Linear (docs/methods.md §5) that every decomposition pass shares: rank a
    fraction of min(T, S), an int, "energy:τ" or "vbmf" (the first entry of a tuple)."""
    weight = module.weight.detach()
    r = mode_rank(first_mode(rank, name), min(weight.shape), weight, name)
    factors = svd_factors(weight, r)
    error = relative_error(weight, factors.second @ factors.first)
    return Decision(LowRankLinear.from_factors(module, factors), rank=r, rel_error=error)


def linear_candidates(module: nn.Linear, fractions: Sequence[float]) -> list[tuple[int, float]]:
    """Budget candidates of a Linear: ranks keeping about each fraction of its weights, with their
    exact (Eckart–Young) relative errors."""
    weight = module.weight.detach()
    spectrum = squared_singular_values(weight).sqrt()
    return [(r, tail_error(spectrum, r)) for r in distinct(linear_rank_for_cost(weight.shape, f) for f in fractions)]


class DecompositionPass(PassBase, abc.ABC):
    """Base of the decomposition passes: subclasses say which layer types they take and how one
    layer is decomposed; this class filters, validates, measures, swaps and reports.

    only_if_cheaper: leave a layer as it is when its decomposition would not cut MACs.

    With ``rank=fxshift.Budget(...)`` the planner (fxshift.plan.planner) asks the subclass
    for candidate ranks with estimated errors (`budget_candidates`) and the structure each would
    insert (`structure`), costs them and allocates one rank per layer so that the whole model
    meets the budget with the smallest Σ relative error²; the pass then decomposes each layer at
    its rank. The summary (target, predicted and, for latency, measured fraction) is recorded on
    the GraphModule; see `budget_summary`.
    """

    layer_types: tuple[type, ...] = (nn.Conv2d,)

    def __init__(self, rank: Any, include: Selector = None, exclude: Selector = None, only_if_cheaper: bool = True,
                 progress: bool = False):
        self.rank = rank
        self.filter = LayerFilter(include, exclude)
        self.only_if_cheaper = only_if_cheaper
        self.progress = progress

    @abc.abstractmethod
    def decompose(self, name: str, module: nn.Module, rank: Any) -> Decision:
        """Decompose one layer with its (per-layer) rank setting, or say why not."""

    def budget_candidates(self, name: str, module: nn.Module,
                          fractions: Sequence[float]) -> Union[str, list[tuple[Any, float]]]:
        """For a Budget: (rank, estimated relative error) pairs, about one per cost fraction (the
        rank keeping about that fraction of the layer's parameters), each rank in a form
        `decompose` accepts; or a string saying why the layer cannot be decomposed."""
        raise ConfigError(f"{type(self).__name__} does not support fxshift.Budget ranks")

    def structure(self, module: nn.Module, rank: Any) -> nn.Module:
        """For a Budget: the module `decompose` would insert at `rank`, with placeholder weights
        (used only to measure its cost)."""
        raise ConfigError(f"{type(self).__name__} does not support fxshift.Budget ranks")

    def call(self, gm: fx.GraphModule) -> PassResult:
        pass_name = type(self).__name__
        inputs = example_inputs_of(gm)
        layers = list(candidate_layers(gm, self.layer_types, self.filter))
        plan = None
        if isinstance(self.rank, Budget):
            plan = plan_budget(gm, layers, self.rank, self, inputs, pass_name, self.progress)
        shapes = input_shapes(gm, inputs) if inputs is not None else {}
        rows = report_of(gm)
        modified = False
        for name, module in tqdm(layers, desc=pass_name, disable=not self.progress, leave=False):
            if plan is None:
                row = self.visit(gm, name, module, shapes.get(name))
            else:
                row = self.visit(gm, name, module, shapes.get(name), rank=plan.rank_of(name))
                if plan.rank_of(name) is None:
                    row.reason = plan.reason_of(name)
            modified |= row.action == "decomposed"
            rows.add(row)
        if plan is not None:
            add_budget_summary(gm, plan.summary())
        return PassResult(gm, modified)

    def visit(self, gm: fx.GraphModule, name: str, module: nn.Module, shape: Optional[tuple[int, ...]],
              rank: Any = _UNSET) -> ReportRow:
        """Decide, swap and record one layer (at `rank` when given, else the pass's setting for it)."""
        # A skipped layer keeps its cost: "after" equals "before" so that totals add up.
        params = parameter_count(module)
        row = ReportRow(layer=name, pass_name=type(self).__name__, action="skipped", params_before=params,
                        params_after=params)
        cost_shape = shape or proxy_input_shape(module)
        macs_before = shape_macs(module, cost_shape)
        if shape is not None:
            row.macs_before = row.macs_after = macs_before
        if rank is _UNSET:
            rank = rank_for_layer(self.rank, name, module)
        if rank is None:
            row.reason = "no rank given for this layer"
            return row
        try:
            decision = self.decompose(name, module, rank)
        except ValueError as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"layer {name!r}: {exc}") from exc
        row.rank, row.rel_error = decision.rank, decision.rel_error
        if decision.module is None:
            row.reason = decision.reason
            return row
        macs_after = shape_macs(decision.module, cost_shape)
        if self.only_if_cheaper and macs_after >= macs_before:
            row.reason = f"would not cut MACs ({macs_after} ≥ {macs_before} at this rank)"
            return row
        decision.module.train(module.training)
        replace_module(gm, name, decision.module)
        row.action = "decomposed"
        row.params_after = parameter_count(decision.module)
        if shape is not None:
            row.macs_after = macs_after
        return row


def budget_summary(gm: fx.GraphModule) -> list[dict[str, Any]]:
    """What each Budget run on `gm` aimed at and reached: kind, target, total before/after, fraction
    (after/before), Σ estimated relative error², layers decomposed. For latency, fraction is the
    whole-model measurement the allocation was calibrated to (predicted_fraction: from the layer
    timings alone; calibration: the measured fractions of each allocation tried) and
    measured_fraction a last timing of the planned structure against the original."""
    return budget_summaries(gm)

