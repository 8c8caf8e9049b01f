"""What every decomposition pass shares: choosing layers, costing them, swapping, reporting, and
the two-phase flow of a whole-model Budget (collect candidates for every layer, allocate, decompose)."""
from __future__ import annotations

import abc
import copy
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from tqdm.auto import tqdm

from ..costs import input_shapes, layer_macs, macs, parameter_count
from ..decompose.budget import Budget, Candidate, LayerCandidates, allocate
from ..decompose.ranks import distinct, linear_rank_for_cost, mode_rank, rank_for_layer, tail_error
from ..decompose.svd import svd_factors
from ..decompose.tucker import relative_error
from ..nn.low_rank_linear import LowRankLinear
from ..errors import ConfigError
from ..pipeline import example_inputs_of
from ..report import ReportRow, report
from .layers import LayerFilter, Selector, candidate_layers, replace_module

#: gm.meta key of the list of budget summaries (one dict per pass run with a Budget).
BUDGET_KEY = "fxshift_budget"

_UNSET = object()


@dataclass
class Decision:
    """The outcome for one layer: a replacement module, or None with the reason it was left alone."""

    module: Optional[nn.Module]
    reason: str = ""
    rank: Any = None
    rel_error: Optional[float] = None


def linear_decision(name: str, module: nn.Linear, rank: Any) -> Decision:
    """The truncated SVD of a Linear (methods.md §5) that every decomposition pass shares: rank a
    fraction of min(T, S), an int, "energy:τ" or "vbmf" (the first entry of a tuple)."""
    weight = module.weight.detach()
    spec = rank[0] if isinstance(rank, (tuple, list)) else rank
    r = mode_rank(spec, min(weight.shape), weight, name)
    factors = svd_factors(weight, r)
    error = relative_error(weight, factors.second @ factors.first)
    return Decision(LowRankLinear.from_factors(module, factors), rank=r, rel_error=error)


def linear_candidates(module: nn.Linear, fractions: Sequence[float]) -> list[tuple[int, float]]:
    """Budget candidates of a Linear: ranks keeping about each fraction of its weights, with their
    exact (Eckart–Young) relative errors."""
    weight = module.weight.detach()
    spectrum = torch.linalg.svdvals(weight.double())
    return [(r, tail_error(spectrum, r)) for r in distinct(linear_rank_for_cost(weight.shape, f) for f in fractions)]


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` on the meta device: shapes without data, for costing structures quickly."""
    clone = copy.deepcopy(module)
    return clone.to(device="meta")


def shape_macs(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """layer_macs on the meta device: output shapes only, no arithmetic (same count)."""
    if next(module.parameters(), None) is not None and next(module.parameters()).device.type != "meta":
        module = meta_copy(module)
    return layer_macs(module, input_shape)


def proxy_input_shape(module: nn.Module) -> tuple[int, ...]:
    """An input shape to compare costs when no example inputs were given: 32 output pixels a side."""
    if isinstance(module, nn.Linear):
        return (1, module.in_features)
    reach = [(k - 1) * d + 1 for k, d in zip(module.kernel_size, module.dilation)]
    side = [32 * s + r for s, r in zip(module.stride, reach)]
    return (1, module.in_channels, *side)


class DecompositionPass(PassBase, abc.ABC):
    """Base of the decomposition passes: subclasses say which layer types they take and how one
    layer is decomposed; this class filters, validates, measures, swaps and reports.

    only_if_cheaper: leave a layer as it is when its decomposition would not cut MACs.

    With ``rank=fxshift.Budget(...)`` the pass runs in two phases (fxshift.decompose.budget):
    for every layer it may decompose it asks the subclass for candidate ranks with estimated
    errors (`budget_candidates`) and the structure each would insert (`structure`), costs them
    (MACs, parameters or onnxruntime latency), allocates one rank per layer so that the whole
    model meets the budget with the smallest Σ relative error², then decomposes each layer at its
    rank. The summary (target, predicted and, for latency, measured fraction) is appended to
    ``gm.meta["fxshift_budget"]``; see `budget_summary`.
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
        if isinstance(self.rank, Budget):
            return self._call_budget(gm, self.rank)
        inputs = example_inputs_of(gm)
        shapes = input_shapes(gm, inputs) if inputs is not None else {}
        rows = report(gm)
        modified = False
        layers = list(candidate_layers(gm, self.layer_types, self.filter))
        for name, module in tqdm(layers, desc=type(self).__name__, disable=not self.progress, leave=False):
            row = self.visit(gm, name, module, shapes.get(name))
            if row.action == "decomposed":
                modified = True
            rows.add(row)
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

    # ----- Budget: collect candidates for every layer, allocate, decompose --------------------------

    def _call_budget(self, gm: fx.GraphModule, budget: Budget) -> PassResult:
        pass_name = type(self).__name__
        inputs = example_inputs_of(gm)
        if budget.kind in ("macs", "latency") and inputs is None:
            raise ConfigError(f"{pass_name}: {budget!r} needs the model's input shapes; give example_inputs, "
                              f"e.g. fxshift.apply([{pass_name}(rank={budget!r})], model, torch.randn(1, 3, 224, 224))")
        shapes = input_shapes(gm, inputs) if inputs is not None else {}
        layers = list(candidate_layers(gm, self.layer_types, self.filter))
        timer = None
        original_onnx = None
        if budget.kind == "macs":
            total = float(macs(gm, inputs))
        elif budget.kind == "params":
            total = float(parameter_count(gm))
        else:
            from ..decompose.latency import LatencyTimer, model_onnx

            timer = LatencyTimer(budget.threads, budget.cache)
            original_onnx = model_onnx(gm, inputs)
            total = timer.models({"original": original_onnx}, inputs, min_time=0.5)["original"]

        def cost(module: nn.Module, shape: tuple[int, ...]) -> float:
            if budget.kind == "macs":
                return float(shape_macs(module, shape))
            return float(parameter_count(module))

        entries: list[LayerCandidates] = []
        reasons: dict[str, str] = {}
        for name, module in tqdm(layers, desc=f"{pass_name} candidates", disable=not self.progress, leave=False):
            shape = shapes.get(name)
            cost_shape = shape or proxy_input_shape(module)
            try:
                found = self.budget_candidates(name, module, budget.fractions)
            except ValueError as exc:
                if isinstance(exc, ConfigError):
                    raise
                raise ConfigError(f"layer {name!r}: {exc}") from exc
            if isinstance(found, str):
                reasons[name] = found
                continue
            shell = meta_copy(module)
            macs_before = shape_macs(shell, cost_shape)
            kept = []
            for rank, error in found:
                built = self.structure(shell, rank)
                if self.only_if_cheaper and shape_macs(built, cost_shape) >= macs_before:
                    continue
                kept.append((rank, float(error), built))
            if not kept:
                reasons[name] = "no candidate rank would cut its cost"
                continue
            if timer is not None:  # the layer and its candidates timed together, round-robin
                costs = timer.layers([shell] + [built for _, _, built in kept], cost_shape)
            else:
                costs = [cost(shell, cost_shape)] + [cost(built, cost_shape) for _, _, built in kept]
            candidates = [Candidate(rank, c, error) for (rank, error, _), c in zip(kept, costs[1:])]
            entries.append(LayerCandidates(name, costs[0], candidates))
        if timer is not None:
            timer.save()
            # Timed again after the layers, and averaged: the machine's load drifts while layers are timed.
            total = 0.5 * (total + timer.models({"original": original_onnx}, inputs, min_time=0.5)["original"])

        allocation = allocate(entries, total, budget.target, budget.tolerance, unit=budget.kind)
        rows = report(gm)
        modified = False
        for name, module in tqdm(layers, desc=pass_name, disable=not self.progress, leave=False):
            chosen = allocation.choice.get(name)
            if name in reasons or chosen is None:
                row = self.visit(gm, name, module, shapes.get(name), rank=None)
                row.reason = reasons.get(name, f"kept whole by {budget!r}")
            else:
                row = self.visit(gm, name, module, shapes.get(name), rank=chosen.rank)
            modified |= row.action == "decomposed"
            rows.add(row)

        summary = {"pass": pass_name, **budget.to_dict(), "total_before": allocation.total_before,
                   "total_after": allocation.total_after, "fraction": allocation.fraction,
                   "squared_error": allocation.squared_error,
                   "layers_decomposed": sum(c is not None for c in allocation.choice.values())}
        if budget.kind == "latency":
            summary["unit"] = "seconds"
            summary["layer_timings"] = timer.measured
            if budget.verify:
                measured = timer.models({"original": original_onnx, "decomposed": gm}, inputs, min_time=1.0)
                summary["measured_before"] = measured["original"]
                summary["measured_after"] = measured["decomposed"]
                summary["measured_fraction"] = measured["decomposed"] / measured["original"]
        gm.meta.setdefault(BUDGET_KEY, []).append(summary)
        return PassResult(gm, modified)


def budget_summary(gm: fx.GraphModule) -> list[dict[str, Any]]:
    """What each Budget run on `gm` aimed at and reached: kind, target, total before/after, fraction
    (after/before; for latency the prediction from layer timings, and measured_fraction from timing
    both whole models), Σ estimated relative error², layers decomposed."""
    return list(getattr(gm, "meta", {}).get(BUDGET_KEY, []))
