"""FreezePass and fxshift.freeze: trained shift layers → packed inference layers."""
from __future__ import annotations

import copy
from typing import TypeVar

import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..costs import parameter_count
from ..nn.frozen_shift import freeze_layer
from ..nn.shift import SHIFT_LAYERS
from ..report import ReportRow, report
from .layers import replace_module

M = TypeVar("M", bound=nn.Module)


class FreezePass(PassBase):
    """Replace every ShiftConv2d / ShiftLinear (also inside other fxshift modules) by its frozen form,
    FrozenShiftConv2d / FrozenShiftLinear: weights packed as `bits`-wide sign + shift-magnitude codes
    in int32 words (format in fxshift.nn.frozen_shift), run by the fxshift::shift_conv2d /
    fxshift::shift_linear custom ops. The frozen layer computes the trained layer's eval-mode output.

    Report rows (action "frozen") carry the extra columns mode, bits, has_zero, weight_bytes_before
    (the float weights) and weight_bytes_after (the packed words).
    """

    def call(self, gm: nn.Module) -> PassResult:
        modified = freeze_modules(gm, report(gm) if isinstance(gm, fx.GraphModule) else None, type(self).__name__)
        return PassResult(gm, modified)


def freeze_modules(model: nn.Module, rows=None, pass_name: str = "FreezePass") -> bool:
    """Freeze the shift layers of `model` in place; add one report row each to `rows` when given."""
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
    (which gives its frozen layer). The model given is not changed. A GraphModule from fxshift.apply keeps (a copy of) its report,
    with one "frozen" row per layer added.

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
        meta_report = report(model)
        out.meta["fxshift_report"] = type(meta_report)(list(meta_report.rows))
        freeze_modules(out, report(out))
        out.recompile()
    else:
        freeze_modules(out)
    return out
