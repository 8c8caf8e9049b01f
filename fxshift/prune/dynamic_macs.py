"""dynamic_macs: what a model with gated units (DynamicPrunePass) costs per sample, input by input."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..costs import _as_tuple, _measuring, _rule_for
from ..errors import ConfigError
from ..nn.gated import gated_units

__all__ = ["dynamic_macs"]


@torch.no_grad()
def dynamic_macs(model: nn.Module, example_inputs: Any) -> torch.Tensor:
    """Per-sample MACs (float64 tensor of shape (batch,)) of a model with gated units on `example_inputs`.

    Each gated unit counts its selected filters × the active input channels it reads (those its source
    unit selected for that sample; all channels when it reads a full tensor) × kernel × output size,
    plus its predictor: one add per input value for the pooling and the 1×1 conv. Every other conv and
    linear layer counts densely, as in fxshift.macs (the static count, which counts units densely).
    """
    units = dict(gated_units(model))
    if not units:
        raise ConfigError("dynamic_macs: the model has no gated units; apply fxshift.DynamicPrunePass first "
                          "(fxshift.macs counts a static model)")
    inputs = _as_tuple(example_inputs)
    static = 0
    owners = tuple(name + "." for name in units)

    def hook(module: nn.Module, _args: Any, output: Any) -> None:
        nonlocal static
        if isinstance(output, torch.Tensor):
            static += _rule_for(module)(module, output)

    handles = [m.register_forward_hook(hook) for n, m in model.named_modules()
               if n not in units and not n.startswith(owners) and _rule_for(m) is not None]
    for unit in units.values():
        unit.recording = True
    try:
        with _measuring(model):
            model(*inputs)
        total = torch.zeros(inputs[0].shape[0], dtype=torch.float64) + static
        for unit in units.values():
            source = units.get(unit.source) if unit.source else None
            total += unit.sample_macs(None if source is None else source.last_keep.sum(dim=1))
    finally:
        for h in handles:
            h.remove()
        for unit in units.values():
            unit.recording, unit.last_keep, unit.last_shapes = False, None, None
    return total
