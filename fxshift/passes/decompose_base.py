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
from ..decompose.budget import Allocation, Budget, Candidate, LayerCandidates, allocate
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

        calibration: list[float] = []
        if budget.kind == "latency":
            allocation, calibration = self._calibrated(gm, entries, total, budget, timer, original_onnx, inputs)
        else:
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
                   "total_after": allocation.total_after, "fraction": allocation.fraction,  # latency: see below
                   "squared_error": allocation.squared_error,
                   "layers_decomposed": sum(c is not None for c in allocation.choice.values())}
        if budget.kind == "latency":
            summary["unit"] = "seconds"
            summary["layer_timings"] = timer.measured
            summary["predicted_fraction"] = 1.0 - sum(
                e.cost - allocation.choice[e.name].cost for e in entries if allocation.choice.get(e.name)) / total
            summary["calibration"] = calibration
            summary["fraction"] = calibration[-1]
            summary["total_after"] = calibration[-1] * total
            if budget.verify:
                measured = timer.models({"original": original_onnx, "decomposed": gm}, inputs, min_time=1.0)
                summary["measured_before"] = measured["original"]
                summary["measured_after"] = measured["decomposed"]
                summary["measured_fraction"] = measured["decomposed"] / measured["original"]
        gm.meta.setdefault(BUDGET_KEY, []).append(summary)
        return PassResult(gm, modified)


    def _trial(self, gm: fx.GraphModule, choice: dict[str, Optional[Candidate]]) -> fx.GraphModule:
        """A copy of `gm` with the chosen structures (random weights) in place: what a choice will
        cost, measured without decomposing anything."""
        trial = copy.deepcopy(gm)
        for name, chosen in choice.items():
            if chosen is None:
                continue
            built = self.structure(trial.get_submodule(name), chosen.rank)
            with torch.no_grad():
                for p in built.parameters():
                    p.normal_(0.0, 0.05)
            replace_module(trial, name, built)
        trial.recompile()
        return trial

    def _calibrated(self, gm: fx.GraphModule, entries: list[LayerCandidates], total: float, budget: Budget,
                    timer: Any, original_onnx: bytes, inputs: tuple, rounds: int = 6) -> tuple[Any, list[float]]:
        """Allocate for a latency budget, checking each allocation against the whole model.

        Layers timed alone do not add up to the model: onnxruntime fuses neighbours, keeps
        blocked layouts between convs and schedules differently, and the gap depends on the
        layer and the input size (on ResNet-18 at 112×112 the isolated timings predicted a
        50% latency where the model measured 16%). So the allocation is computed for an
        internal target t (first the real one), its structure is timed as a whole model next to
        the original (round-robin, placeholder weights: nothing is decomposed yet), and t is
        moved by the secant method, bracketing the measured fraction around the target, until
        it is within the tolerance (at most `rounds` timings). The allocation measured closest
        to the target without exceeding target × (1 + tolerance) is kept; ConfigError when even
        the cheapest choice measures above that. Returns the allocation and the measured fractions.
        """
        unit = budget.kind
        target, tol = budget.target, budget.tolerance
        lowest = {e.name: min(e.candidates, key=lambda c: c.cost) for e in entries}
        cheapest = Allocation(lowest, total, total - sum(e.cost - lowest[e.name].cost for e in entries), target * total,
                              sum(c.error ** 2 for c in lowest.values()))
        floor = cheapest.total_after / total  # the smallest internal target the timings allow

        def allocation_for(t: float) -> Any:
            if t <= floor:
                return cheapest
            try:
                return allocate(entries, total, t, 0.0, unit=unit)
            except ConfigError:
                return cheapest

        tried: list[tuple[Any, float]] = []
        below: Optional[tuple[float, float]] = None  # (t, measured) with measured < target
        above: Optional[tuple[float, float]] = None
        t = target
        for _ in range(rounds):
            allocation = allocation_for(t)
            times = timer.models({"original": original_onnx, "trial": self._trial(gm, allocation.choice)}, inputs,
                                 min_time=0.5)
            fraction = times["trial"] / times["original"]
            tried.append((allocation, fraction))
            if abs(fraction - target) <= tol * target:
                break
            if fraction < target:
                below = (t, fraction)
            else:
                if allocation is cheapest:
                    raise ConfigError(
                        f"the budget of {target:.1%} of the model's latency cannot be met: decomposing every layer "
                        f"this pass may decompose at its cheapest candidate measured {fraction:.1%} of the original "
                        "latency. Raise the target, include more layers, or add smaller fractions to "
                        "Budget(fractions=...)")
                above = (t, fraction)
            if below and above:  # secant inside the bracket
                (t0, f0), (t1, f1) = below, above
                t = t0 + (target - f0) * (t1 - t0) / (f1 - f0) if f1 > f0 else 0.5 * (t0 + t1)
                t = min(max(t, min(t0, t1) + 0.1 * abs(t1 - t0)), max(t0, t1) - 0.1 * abs(t1 - t0))
            else:  # no bracket yet: assume the measured fraction scales with t
                t = min(0.999, max(floor, t * target / max(fraction, 1e-6)))
        feasible = [pair for pair in tried if pair[1] <= target * (1.0 + tol)]
        best = min(feasible or tried, key=lambda pair: abs(pair[1] - target))
        measured = [f for _, f in tried]
        if best is not tried[-1]:
            measured.append(best[1])
        return best[0], measured


def budget_summary(gm: fx.GraphModule) -> list[dict[str, Any]]:
    """What each Budget run on `gm` aimed at and reached: kind, target, total before/after, fraction
    (after/before), Σ estimated relative error², layers decomposed. For latency, fraction is the
    whole-model measurement the allocation was calibrated to (predicted_fraction: from the layer
    timings alone; calibration: the measured fractions of each allocation tried) and
    measured_fraction a last timing of the decomposed model against the original."""
    return list(getattr(gm, "meta", {}).get(BUDGET_KEY, []))
