"""The Budget planner: which rank each layer gets so that the whole model meets a Budget.

A decomposition pass given ``rank=fxshift.Budget(...)`` hands its layers to :func:`plan_budget`,
which works in three steps (the allocation method is described in fxshift.plan.allocation):

1. Candidates: for every layer, the pass proposes ranks with estimated errors
   (``proposer.budget_candidates``) and the structure each would insert (``proposer.structure``);
   the planner costs them by MACs, parameters, onnxruntime latency (fxshift.measure.latency) or
   torch training-step time (fxshift.measure.train_step).
2. Allocation: one candidate (or "keep") per layer, least Σ error², whole model within the
   target (:func:`fxshift.plan.allocation.allocate`). For the timed kinds the allocation is
   calibrated against whole-model timings (fxshift.plan.calibration).
3. The pass decomposes each layer at its planned rank; :meth:`Plan.summary` says what the run
   aimed at and reached.

Inside fxshift.train.apply_synced, one rank plans and broadcasts the plan (see
fxshift.context.synced_planning), so every rank builds the same structure.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence, Union

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from ..context import planning_sync
from ..costs import input_shapes, macs, meta_copy, parameter_count, proxy_input_shape, shape_macs
from ..errors import ConfigError
from ..graph import replace_module
from ..measure.train_step import is_channels_last
from .allocation import Allocation, Candidate, LayerCandidates, allocate
from .budget import Budget
from .calibration import calibrate

__all__ = ["Proposer", "Plan", "plan_budget"]


class Proposer(Protocol):
    """What a decomposition pass offers the planner."""

    only_if_cheaper: bool

    def budget_candidates(self, name: str, module: nn.Module,
                          fractions: Sequence[float]) -> Union[str, list[tuple[Any, float]]]:
        """(rank, estimated relative error) pairs, or the reason the layer cannot be decomposed."""

    def structure(self, module: nn.Module, rank: Any) -> nn.Module:
        """The module the pass would insert at `rank` (placeholder weights: only its cost counts)."""


@dataclass
class Plan:
    """The rank chosen for each layer (None: kept whole) and why layers were left out."""

    budget: Budget
    pass_name: str
    ranks: dict[str, Any]
    reasons: dict[str, str]
    allocation: Allocation
    measured: dict[str, Any] = field(default_factory=dict)  # timed kinds only: timings and calibration

    def rank_of(self, name: str) -> Any:
        return self.ranks.get(name)

    def reason_of(self, name: str) -> str:
        return self.reasons.get(name, f"kept whole by {self.budget!r}")

    def summary(self) -> dict[str, Any]:
        """What the run aimed at and reached: kind, target, total before/after, fraction
        (after/before), Σ estimated relative error², layers decomposed; for the timed kinds also the
        layer timings, the calibration and (with verify) the measured fraction."""
        a = self.allocation
        out = {"pass": self.pass_name, **self.budget.to_dict(), "total_before": a.total_before,
               "total_after": a.total_after, "fraction": a.fraction, "squared_error": a.squared_error,
               "layers_decomposed": sum(r is not None for r in self.ranks.values())}
        out.update(self.measured)
        return out


def plan_budget(gm: fx.GraphModule, layers: Sequence[tuple[str, nn.Module]], budget: Budget, proposer: Proposer,
                inputs: Optional[tuple], pass_name: str, progress: bool = False) -> Plan:
    """Choose every layer's rank for `budget` (see the module docstring)."""
    if (budget.kind == "macs" or budget.measured) and inputs is None:
        raise ConfigError(f"{pass_name}: {budget!r} needs the model's input shapes; give example_inputs, "
                          f"e.g. fxshift.apply([{pass_name}(rank={budget!r})], model, torch.randn(1, 3, 224, 224))")
    sync = planning_sync()
    if sync is None:
        return _plan(gm, layers, budget, proposer, inputs, pass_name, progress)
    import torch.distributed as dist

    group, src = sync
    box = [_plan(gm, layers, budget, proposer, inputs, pass_name, progress) if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def _plan(gm: fx.GraphModule, layers: Sequence[tuple[str, nn.Module]], budget: Budget, proposer: Proposer,
          inputs: Optional[tuple], pass_name: str, progress: bool) -> Plan:
    shapes = input_shapes(gm, inputs) if inputs is not None else {}
    timer = original = None
    if budget.kind == "macs":
        total = float(macs(gm, inputs))
    elif budget.kind == "params":
        total = float(parameter_count(gm))
    else:
        timer = budget.timer(channels_last=is_channels_last(gm))
        original = timer.prepared(gm, inputs)
        total = timer.models({"original": original}, inputs, min_time=0.5)["original"]

    entries: list[LayerCandidates] = []
    reasons: dict[str, str] = {}
    for name, module in tqdm(layers, desc=f"{pass_name} candidates", disable=not progress, leave=False):
        found = _layer_candidates(name, module, shapes.get(name) or proxy_input_shape(module), budget, proposer,
                                  timer)
        if isinstance(found, str):
            reasons[name] = found
        else:
            entries.append(found)

    measured: dict[str, Any] = {}
    if timer is not None:
        timer.save()
        # Timed again after the layers, and averaged: the machine's load drifts while layers are timed.
        total = 0.5 * (total + timer.models({"original": original}, inputs, min_time=0.5)["original"])
        def measure(allocation: Allocation) -> float:
            ranks = {name: (c.rank if c is not None else None) for name, c in allocation.choice.items()}
            times = timer.models({"original": original, "trial": _trial(gm, ranks, proposer)}, inputs, min_time=0.5)
            return times["trial"] / times["original"]

        allocation, calibration = calibrate(entries, total, budget, measure)
        allocation.total_after = calibration[-1] * total
        measured = {"unit": "seconds", "layer_timings": timer.measured, "calibration": calibration,
                    "predicted_fraction": 1.0 - sum(e.cost - allocation.choice[e.name].cost for e in entries
                                                    if allocation.choice.get(e.name)) / total}
    else:
        allocation = allocate(entries, total, budget.target, budget.tolerance, unit=budget.kind)
    ranks = {name: (chosen.rank if chosen is not None else None) for name, chosen in allocation.choice.items()}
    plan = Plan(budget, pass_name, ranks, reasons, allocation, measured)
    if timer is not None and budget.verify:
        times = timer.models({"original": original, "decomposed": _trial(gm, plan.ranks, proposer)}, inputs,
                             min_time=1.0)
        measured.update(measured_before=times["original"], measured_after=times["decomposed"],
                        measured_fraction=times["decomposed"] / times["original"])
    return plan


def _layer_candidates(name: str, module: nn.Module, cost_shape: tuple[int, ...], budget: Budget,
                      proposer: Proposer, timer: Any) -> Union[str, LayerCandidates]:
    """One layer's cost and its costed candidates, or the reason it has none."""
    try:
        found = proposer.budget_candidates(name, module, budget.fractions)
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"layer {name!r}: {exc}") from exc
    if isinstance(found, str):
        return found
    shell = meta_copy(module)
    macs_before = shape_macs(shell, cost_shape)
    kept = []
    for rank, error in found:
        built = proposer.structure(shell, rank)
        if proposer.only_if_cheaper and shape_macs(built, cost_shape) >= macs_before:
            continue
        kept.append((rank, float(error), built))
    if not kept:
        return "no candidate rank would cut its cost"
    modules = [shell] + [built for _, _, built in kept]
    if timer is not None:  # the layer and its candidates timed together, round-robin
        costs = timer.layers(modules, cost_shape)
    elif budget.kind == "macs":
        costs = [float(shape_macs(m, cost_shape)) for m in modules]
    else:
        costs = [float(parameter_count(m)) for m in modules]
    return LayerCandidates(name, costs[0], [Candidate(rank, c, error) for (rank, error, _), c in zip(kept, costs[1:])])


def _trial(gm: fx.GraphModule, ranks: dict[str, Any], proposer: Proposer) -> fx.GraphModule:
    """A copy of `gm` with the planned structures (random weights) in place: what a plan will
    cost, measured without decomposing anything."""
    trial = copy.deepcopy(gm)
    for name, rank in ranks.items():
        if rank is None:
            continue
        built = proposer.structure(trial.get_submodule(name), rank)
        with torch.no_grad():
            for p in built.parameters():
                p.normal_(0.0, 0.05)
        replace_module(trial, name, built)
    trial.recompile()
    return trial
