"""DynamicPrunePass: per-input filter selection by self-supervised mask prediction (FTWT, docs/methods.md §9).

Each eligible Conv2d, with the BatchNorm2d and activation right after it, becomes one GatedConv2d
(fxshift/nn/gated.py) under the conv's name. The graph is then rewired so that, in "skip" mode,
the compact output of a unit (its active channels plus their indices) flows through channel-wise
ops (pooling, ReLU, dropout) into the next unit, which reads only those input channels; the full
channel layout is restored (scatter_channels) only where a consumer needs it: residual adds,
flatten, non-gated layers, the graph output. The same graph runs in "mask" and training mode,
where units return full-layout tensors and the scatters pass them through.
"""
from __future__ import annotations

from typing import Any, Optional

import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..context import example_inputs_of, report_of
from ..costs import _rule_for, input_shapes, parameter_count
from ..errors import ConfigError
from ..graph import LayerFilter, Selector, layer_sites
from ..nn.gated import GATINGS, check_train_mask
from ..nn.mask_targets import check_target
from ..prune.gated_graph import fuse_unit, match_unit, output_size, rewire
from ..report import ReportRow

PASS_NAME = "DynamicPrunePass"

class DynamicPrunePass(PassBase):
    """Turn each eligible Conv2d (+ BatchNorm2d + activation) into a GatedConv2d with a mask predictor.

    Args:
        target: "mass" (keep the top filters reaching `threshold` of the activation mass, default 0.9)
            or "uniform" (keep the top `ratio` of filters, default 0.5) — the predictors' training targets.
        threshold: for target="mass" only, in (0, 1].
        ratio: for target="uniform" only, in (0, 1).
        include, exclude: name patterns or module types choosing the convs. The first conv (it reads
            the raw input) is gated only when `include` names it.
        decoupled: the predictors read detached inputs, so the mask loss trains only the predictors.
        gating: eval behaviour, "skip" (compute only the selected filters) or "mask" (dense, then zero).
        train_mask: what multiplies each unit's output in training: "predicted" (the predictor's own
            binary selection, no gradient through it: training sees what inference runs; the default,
            as FTWT trains), "target" (the top-k / mass targets) or "none" (dense).
        channel_multiple: with target="uniform", each unit of 4·channel_multiple or more filters keeps
            round(ratio·C) rounded to a multiple of this (default 16: oneDNN convolves channels in
            blocks of 16 with AVX-512, 8 with AVX2, so a ragged count costs the whole next block;
            the report shows each unit's k). 1 keeps round(ratio·C) exactly.

    A BatchNorm2d after the conv (a module, or the F.batch_norm a traced norm + activation module such
    as timm's BatchNormAct2d leaves) and an activation after it, through nn.Identity modules, join the
    unit. Grouped / depthwise convs, convs with non-zero padding modes, convs used at several call
    sites and every other weight layer (Linear, Conv1d, Conv2d subclasses, …) are left alone with the
    reason in the report. Train with
    ``loss = task_loss + λ · fxshift.train.mask_loss(gm)``; count with ``fxshift.dynamic_macs(gm, x)``.
    """

    cli_name = "dynamicprune"

    def __init__(self, target: str = "mass", threshold: Optional[float] = None, ratio: Optional[float] = None,
                 include: Selector = None, exclude: Selector = None, decoupled: bool = True, *,
                 gating: str = "skip", train_mask: Any = "predicted", channel_multiple: int = 16):
        super().__init__()
        self.target, self.threshold, self.ratio = check_target(target, threshold, ratio, PASS_NAME)
        if gating not in GATINGS:
            raise ConfigError(f"{PASS_NAME}: gating must be 'skip' or 'mask', got {gating!r}")
        self.filter = LayerFilter(include, exclude)
        self.include_given = include is not None
        self.decoupled = bool(decoupled)
        self.gating = gating
        self.train_mask = check_train_mask(train_mask, PASS_NAME)
        if not isinstance(channel_multiple, int) or isinstance(channel_multiple, bool) or channel_multiple < 1:
            raise ConfigError(f"{PASS_NAME}: channel_multiple must be a positive int (1: no rounding), "
                              f"got {channel_multiple!r}")
        self.channel_multiple = channel_multiple

    def options(self) -> dict[str, Any]:
        return dict(target=self.target, threshold=self.threshold, ratio=self.ratio, decoupled=self.decoupled,
                    gating=self.gating, train_mask=self.train_mask, channel_multiple=self.channel_multiple)

    def call(self, gm: fx.GraphModule) -> PassResult:
        inputs = example_inputs_of(gm)
        shapes = input_shapes(gm, inputs) if inputs is not None else {}
        report = report_of(gm)
        plans, first = [], True
        called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        for site in layer_sites(gm, (nn.Conv2d,)):  # weight ops without a layer the loop below sees
            if site.name not in called and site.module is None:
                report.add(ReportRow(site.name, PASS_NAME, "skipped", site.reason))
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            module = gm.get_submodule(node.target)
            if type(module) is not nn.Conv2d:
                if _rule_for(module) is not None:
                    report.add(ReportRow(node.target, PASS_NAME, "skipped", self._not_a_conv(module),
                                         params_before=parameter_count(module),
                                         params_after=parameter_count(module)))
                continue
            name, conv = node.target, gm.get_submodule(node.target)
            was_first, first = first, False
            reason = self._ineligible(gm, node, conv, was_first)
            if reason is None:
                plans.append(match_unit(gm, node))
            else:
                report.add(ReportRow(name, PASS_NAME, "skipped", reason, params_before=parameter_count(conv),
                                     params_after=parameter_count(conv)))
        for plan in plans:
            name = plan["layer"]
            conv = gm.get_submodule(name)
            before = parameter_count(conv) + (parameter_count(gm.get_submodule(plan["bn"])) if plan["bn"] else 0)
            unit = fuse_unit(gm, plan, self.options())
            row = ReportRow(name, PASS_NAME, "gated", params_before=before, params_after=parameter_count(unit),
                            extra={"gate": self._setting(unit), "bn": plan["bn"] or "-", "act": plan["act"]})
            if name in shapes:
                out_hw = output_size(conv, shapes[name])
                dense = conv.out_channels * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * \
                    out_hw[0] * out_hw[1]
                row.macs_before, row.macs_after = dense, unit.static_macs(out_hw)
                row.reason = "MACs after: dense + predictor; per-sample MACs: fxshift.dynamic_macs"
            report.add(row)
        if plans:
            rewire(gm)
            for row in report.rows:
                if row.pass_name == PASS_NAME and row.action == "gated":
                    row.extra["reads"] = gm.get_submodule(row.layer).source or "full input"
        return PassResult(gm, bool(plans))

    def _setting(self, unit: nn.Module) -> str:
        return f"mass:{self.threshold}" if self.target == "mass" else f"uniform:{self.ratio} (k={unit.top_k})"

    @staticmethod
    def _not_a_conv(module: nn.Module) -> str:
        kind = type(module).__name__
        if isinstance(module, nn.Conv2d):
            return (f"{kind} is a Conv2d subclass whose forward may differ from nn.Conv2d's: only plain "
                    "nn.Conv2d filters are gated")
        return f"{kind} layer: DynamicPrunePass gates the output filters of nn.Conv2d layers only"

    def _ineligible(self, gm: fx.GraphModule, node: fx.Node, conv: nn.Conv2d, first: bool) -> Optional[str]:
        name = node.target
        if not self.filter(name, conv):
            return "not selected by include/exclude"
        if first and not self.include_given:
            return "first conv (reads the raw input); name it in include= to gate it"
        if conv.groups != 1:
            kind = "depthwise" if conv.groups == conv.in_channels else "grouped"
            return f"{kind} conv (groups={conv.groups}): its filters cannot be skipped independently"
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            return f"padding {conv.padding!r} / mode {conv.padding_mode!r}: only numeric zero padding is supported"
        calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == name]
        if len(calls) != 1:
            return f"the conv is called at {len(calls)} places"
        if len(node.args) != 1 or node.kwargs:
            return "the conv is called with extra arguments"
        return None


