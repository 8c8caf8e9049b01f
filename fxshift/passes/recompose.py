"""RecomposePass: fold every chain fxshift created back into one layer under the original name."""
from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from torch import nn

from ..context import report_of
from ..costs import parameter_count
from ..errors import FxshiftError
from ..nn.base import RECOMPOSE_RULES
from ..report import ReportRow
from ..graph import replace_module


class RecomposePass(PassBase):
    """Multiply decomposed chains back into single Conv2d / Linear layers (docs/methods.md §6), so that
    `original.load_state_dict(gm.state_dict())` works on a fresh instance of the original model.

    Any module type with a rule in fxshift.nn.RECOMPOSE_RULES is folded; decompositions register
    theirs with `@fxshift.nn.register_recompose_rule(ChainType)` (DecomposedLayer subclasses do so
    automatically through their `recompose` method). Nested chains are folded innermost first.
    """

    cli_name = "recompose"

    def call(self, gm: fx.GraphModule) -> PassResult:
        rows = report_of(gm)
        modified = False
        chains = [name for name, module in gm.named_modules() if name and type(module) in RECOMPOSE_RULES]
        for name in sorted(chains, key=lambda n: n.count("."), reverse=True):
            module = gm.get_submodule(name)
            _check_plain(name, module)
            folded = RECOMPOSE_RULES[type(module)](module)
            folded.train(module.training)
            replace_module(gm, name, folded)
            modified = True
            rows.add(ReportRow(layer=name, pass_name=type(self).__name__, action="recomposed",
                               params_before=parameter_count(module), params_after=parameter_count(folded)))
        return PassResult(gm, modified)


def _check_plain(name: str, chain: nn.Module) -> None:
    """Only float Conv2d/Linear chains fold exactly; a product of power-of-two layers is not one."""
    for child_name, child in chain.named_children():
        if type(child) not in (nn.Conv2d, nn.Linear) and type(child) not in RECOMPOSE_RULES:
            raise FxshiftError(
                f"cannot recompose layer {name!r}: its part {child_name!r} is a {type(child).__name__}, not a float "
                "Conv2d/Linear. Run RecomposePass before ShiftQuantizePass (or on the float model).")
