"""FreezePass: trained shift layers → packed inference layers, as a pipeline step."""
from __future__ import annotations

import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..context import report_of
from ..nn.freeze import freeze_modules


class FreezePass(PassBase):
    """Replace every ShiftConv2d / ShiftLinear (also inside other fxshift modules) by its frozen form,
    FrozenShiftConv2d / FrozenShiftLinear: weights packed as `bits`-wide sign + shift-magnitude codes
    in int32 words (format in fxshift.nn.frozen_shift), run by the fxshift::shift_conv2d /
    fxshift::shift_linear custom ops. The frozen layer computes the trained layer's eval-mode output.

    Report rows (action "frozen") carry the extra columns mode, bits, has_zero, weight_bytes_before
    (the float weights) and weight_bytes_after (the packed words). See fxshift.freeze for the
    function form, which works on a copy.
    """

    cli_name = "freeze"

    def call(self, gm: nn.Module) -> PassResult:
        modified = freeze_modules(gm, report_of(gm) if isinstance(gm, fx.GraphModule) else None, type(self).__name__)
        return PassResult(gm, modified)
