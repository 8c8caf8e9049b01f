"""What every decomposition pass shares: choosing layers, costing them, swapping, reporting."""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Optional

import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from tqdm.auto import tqdm

from ..costs import input_shapes, layer_macs, parameter_count
from ..decompose.ranks import rank_for_layer
from ..errors import ConfigError
from ..pipeline import example_inputs_of
from ..report import ReportRow, report
from .layers import LayerFilter, Selector, candidate_layers, replace_module


@dataclass
class Decision:
    """The outcome for one layer: a replacement module, or None with the reason it was left alone."""

    module: Optional[nn.Module]
    reason: str = ""
    rank: Any = None
    rel_error: Optional[float] = None


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

    def call(self, gm: fx.GraphModule) -> PassResult:
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

    def visit(self, gm: fx.GraphModule, name: str, module: nn.Module, shape: Optional[tuple[int, ...]]) -> ReportRow:
        """Decide, swap and record one layer."""
        # A skipped layer keeps its cost: "after" equals "before" so that totals add up.
        params = parameter_count(module)
        row = ReportRow(layer=name, pass_name=type(self).__name__, action="skipped", params_before=params,
                        params_after=params)
        cost_shape = shape or proxy_input_shape(module)
        macs_before = layer_macs(module, cost_shape)
        if shape is not None:
            row.macs_before = row.macs_after = macs_before
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
        macs_after = layer_macs(decision.module, cost_shape)
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
