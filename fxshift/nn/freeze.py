"""fxshift.freeze: trained shift layers → their packed inference form (FrozenShiftConv2d /
FrozenShiftLinear, fxshift.nn.frozen_shift), in place or on a copy, with one report row each."""
from __future__ import annotations

import copy
from typing import Optional, TypeVar

import torch.fx as fx
from torch import nn

from ..context import copy_report, report_of
from ..costs import parameter_count
from ..graph import replace_module
from ..report import Report, ReportRow
from .frozen_shift import freeze_layer
from .shift import SHIFT_LAYERS

M = TypeVar("M", bound=nn.Module)


def freeze_modules(model: nn.Module, rows: Optional[Report] = None, pass_name: str = "FreezePass") -> bool:
    """Freeze the shift layers of `model` in place; add one report row each to `rows` when given.

    Rows (action "frozen") carry the extra columns mode, bits, has_zero, weight_bytes_before (the
    float weights) and weight_bytes_after (the packed words). Returns whether anything was frozen.
    """
    names = [name for name, module in model.named_modules() if name and isinstance(module, SHIFT_LAYERS)]
    for name in names:
        layer = model.get_submodule(name)
        frozen = freeze_layer(layer)
        replace_module(model, name, frozen)
        if rows is not None:
            before = sum(p.numel() * p.element_size() for n, p in layer.named_parameters() if n != "bias")
            if layer.mode == "ps":  # P and S stand for one float weight
                before //= 2
            rows.add(ReportRow(layer=name, pass_name=pass_name, action="frozen", params_before=parameter_count(layer),
                               params_after=0,
                               extra={"mode": layer.mode, "bits": frozen.bits, "has_zero": frozen.has_zero,
                                      "weight_bytes_before": before, "weight_bytes_after": frozen.weight_bytes}))
    return bool(names)


def freeze(model: M) -> M:
    """A copy of `model` with every trained shift layer replaced by its packed inference form.

    `model` may be a GraphModule, any nn.Module holding shift layers, or a single shift layer
    (which gives its frozen layer). The model given is not changed. A GraphModule from
    fxshift.apply keeps (a copy of) its report, with one "frozen" row per layer added.

    Example:
        >>> gm = fxshift.apply(ShiftQuantizePass(mode="q", weight_bits=5), model, x)
        >>> ...  # fine-tune gm
        >>> deployed = fxshift.freeze(gm).eval()
        >>> deployed(x)  # runs fxshift::shift_conv2d / fxshift::shift_linear
    """
    if isinstance(model, SHIFT_LAYERS):
        return freeze_layer(model)
    out = copy.deepcopy(model)
    if isinstance(out, fx.GraphModule):
        copy_report(model, out)
        freeze_modules(out, report_of(out))
        out.recompile()
    else:
        freeze_modules(out)
    return out
