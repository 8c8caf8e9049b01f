"""ShiftQuantizePass: replace Conv2d and Linear layers by DeepShift layers (docs/methods.md §1)."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..context import example_inputs_of, report_of
from ..costs import input_shapes, layer_macs, parameter_count
from ..errors import ConfigError
from ..nn.frozen_shift import packed_bytes, packing_width
from ..nn.shift import (ActivationBits, check_activation_bits, check_mode, check_rounding, check_weight_bits,
                        shift_layer_from, SHIFT_LAYERS)
from ..quantize.int8_exact import INT8_SHIFTS, is_int8_exact
from ..report import ReportRow
from .shift_calibrate import calibrate_graph, calibration_batches
from ..graph import LayerFilter, Selector, candidate_layers, replace_module


class ShiftQuantizePass(PassBase):
    """Replace every Conv2d (any stride, padding, dilation, groups) and Linear by a ShiftConv2d /
    ShiftLinear whose weights are ±2^p (DeepShift, docs/methods.md §1).

    Args:
        mode: "q" (DeepShift-Q: trains float weights, rounds them in the forward pass) or "ps"
            (DeepShift-PS: trains shifts P and signs S, started at P = round(log2|w|), S = sign(w)).
        weight_bits: 2…8; shift range −(2^(wb−1)−1)…0 for Q and −(2^(wb−1)−2)…0 for PS.
        activation_bits: None (float activations) or (integer_bits, fraction_bits), e.g. (16, 16):
            the input of each shift layer and its bias are rounded to that fixed-point format.
        rounding: "deterministic" (round half to even) or "stochastic" (training mode only).
        include, exclude: name patterns ("layer1.*") or module types choosing the layers.
        freeze_sign: PS only: the signs are not trained (requires_grad=False).
        calibration: mode "q" only: an iterable of input batches (tensors or tuples of tensors, no labels).
            The layers are then converted one by one in graph order, each fed the activations of the
            already-converted layers before it, with a per-output-channel float scale (folded into the
            BatchNorm that follows, else kept as the layer's ``scale``), AdaRound-style choice of the lower
            or upper power of two per weight, and bias correction (fxshift.quantize.shift_calibration).
            Rows gain output_error_before (plain rounding) and output_error_after (relative layer output
            error on the calibration data), scale_in and adaround_rows.
        iterations: AdaRound steps per layer with calibration (0: nearest rounding at the fitted scale).
        progress: show a progress bar while calibrating.
        int8_exact: keep each output channel's shifts within 7 octaves (±1 … ±64 times a per-channel step), so
            that the layer is exact in int8 (``fxshift.export_onnx(..., quantize="int8")``); None (default):
            on for weight_bits ≤ 4, off above. Rows gain ``int8_exact``: whether the converted layer's weights
            are exact in int8 (with the option off, a layer may still happen to be).

    mode "ps" also turns DeepShift-Q shift layers already in the model (e.g. calibrated ones) into
    DeepShift-PS layers (same codes, scale and bias), to train DeepShift-PS from a calibrated model.

    Layers inside modules fxshift inserted (the convs of a TuckerConv2d, the Linears of a
    LowRankLinear) are quantised too. Report rows (action "shifted") carry the extra columns mode,
    bits (the packed width freeze() will use), weight_bytes_before, weight_bytes_after (packed
    bytes of the frozen form) and rel_error = ‖W_q − W‖ / ‖W‖.

    Example:
        >>> gm = fxshift.apply(ShiftQuantizePass(mode="ps", weight_bits=5), model, torch.randn(1, 3, 32, 32))
        >>> # fine-tune gm with fxshift.train.deepshift_param_groups(gm), then
        >>> deployed = fxshift.freeze(gm)
    """

    cli_name = "shift"

    layer_types = (nn.Conv2d, nn.Linear)

    def __init__(self, mode: str = "q", weight_bits: int = 5, activation_bits: ActivationBits = None,
                 rounding: str = "deterministic", include: Selector = None, exclude: Selector = None,
                 freeze_sign: bool = False, calibration: Any = None, iterations: int = 100, progress: bool = True,
                 int8_exact: Optional[bool] = None):
        self.mode = check_mode(mode)
        self.weight_bits = check_weight_bits(weight_bits)
        self.activation_bits = check_activation_bits(activation_bits)
        self.rounding = check_rounding(rounding)
        if freeze_sign and mode != "ps":
            raise ConfigError("freeze_sign=True applies to mode='ps' only (DeepShift-Q has no separate sign)")
        self.freeze_sign = bool(freeze_sign)
        self.filter = LayerFilter(include, exclude)
        if calibration is not None and mode != "q":
            raise ConfigError("calibration applies to mode='q': calibrate with ShiftQuantizePass(mode='q', "
                              "calibration=...) first, then apply ShiftQuantizePass(mode='ps') to the result to "
                              "train DeepShift-PS from the calibrated shifts")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise ConfigError(f"iterations={iterations!r}: give an int ≥ 0 (AdaRound steps per layer; 0: nearest "
                              "rounding at the calibrated scale)")
        self.iterations, self.progress = iterations, bool(progress)
        if int8_exact is not None and not isinstance(int8_exact, bool):
            raise ConfigError(f"int8_exact={int8_exact!r}: give True, False or None (on for weight_bits ≤ 4)")
        exact = self.weight_bits <= 4 if int8_exact is None else int8_exact
        self.channel_shifts = INT8_SHIFTS if exact else None
        self.calibration = None if calibration is None else calibration_batches(calibration)

    def call(self, gm: fx.GraphModule) -> PassResult:
        inputs = example_inputs_of(gm)
        shapes = input_shapes(gm, inputs) if inputs is not None else {}
        rows = report_of(gm)
        modified = False
        if self.mode == "ps":  # DeepShift-Q layers (e.g. calibrated ones) become DeepShift-PS, scale kept
            for name, module in list(gm.named_modules()):
                if isinstance(module, SHIFT_LAYERS) and module.mode == "q" and self.filter(name, module) \
                        and module.weight_bits == self.weight_bits:
                    replace_module(gm, name, module.as_ps(self.freeze_sign))
                    rows.add(ReportRow(layer=name, pass_name=type(self).__name__, action="shifted",
                                       reason="DeepShift-Q layer to DeepShift-PS", extra={"mode": "ps"}))
                    modified = True
        candidates = list(candidate_layers(gm, self.layer_types, self.filter, inside_fxshift=True))
        done: dict[str, ReportRow] = {}
        if self.calibration is not None:
            called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
            names = {name for name, _ in candidates if name in called}

            def convert(name: str, module: nn.Module):
                row = self.visit(gm, name, module, shapes.get(name))
                done[name] = row
                return gm.get_submodule(name), row

            info = calibrate_graph(gm, self.calibration, names, convert, self.weight_bits, self.iterations,
                                   self.progress)
            for name, item in info.items():
                res, row = item["result"], done[name]
                w = candidates_by_name(candidates)[name].weight.detach().float()
                eff = res.codes.float() * res.scale.reshape(-1, *([1] * (w.dim() - 1)))
                norm = torch.linalg.vector_norm(w).item()
                row.rel_error = torch.linalg.vector_norm(eff - w).item() / norm if norm > 0 else 0.0
                row.extra.update({"calibrated": True, "output_error_before": res.error_plain,
                                  "output_error_after": res.error_calibrated, "scale_in": item["scale_in"],
                                  "adaround_rows": res.adaround_rows,
                                  "int8_exact": _int8_exact(gm.get_submodule(name))})
        for name, module in candidates:
            row = done.get(name) or self.visit(gm, name, module, shapes.get(name))
            if self.calibration is not None and name not in done:
                row.extra["calibrated"] = False
                row.reason = "inside an fxshift module (not a graph node): plain rounding"
            modified = modified or row.action == "shifted"
            rows.add(row)
        return PassResult(gm, modified)

    def visit(self, gm: fx.GraphModule, name: str, module: nn.Module, shape: Optional[tuple[int, ...]]) -> ReportRow:
        row = ReportRow(layer=name, pass_name=type(self).__name__, action="skipped",
                        params_before=parameter_count(module))
        weight = module.weight
        if not weight.is_floating_point():
            row.reason = f"weight dtype {weight.dtype} is not floating point"
            return row
        if shape is not None:
            row.macs_before = layer_macs(module, shape)
        layer = shift_layer_from(module, mode=self.mode, weight_bits=self.weight_bits, rounding=self.rounding,
                                 activation_bits=self.activation_bits, freeze_sign=self.freeze_sign)
        layer.channel_shifts = self.channel_shifts
        layer.train(module.training)
        with torch.no_grad():
            was_training = layer.training
            layer.eval()
            quantized = layer.quantized_weight()
            layer.train(was_training)
            w = weight.detach()
            norm = torch.linalg.vector_norm(w).item()
            diff = torch.linalg.vector_norm(quantized - w).item()
            has_zeros = bool((quantized == 0).any())
        replace_module(gm, name, layer)
        bits, has_zero = packing_width(self.mode, self.weight_bits, has_zeros)
        rows_, k = w.shape[0], w[0].numel()
        row.action = "shifted"
        row.params_after = parameter_count(layer)
        row.macs_after = row.macs_before  # one shift-add for each multiply-accumulate it replaces
        row.rel_error = diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))
        row.extra = {"mode": self.mode, "bits": bits, "weight_bytes_before": w.numel() * w.element_size(),
                     "weight_bytes_after": packed_bytes(rows_, k, bits), "int8_exact": is_int8_exact(quantized)}
        return row


def _int8_exact(layer: nn.Module) -> bool:
    """Whether a shift layer's eval-mode weights are exact in int8 (fxshift.quantize.int8_exact)."""
    was_training = layer.training
    layer.eval()
    try:
        with torch.no_grad():
            return is_int8_exact(layer.quantized_weight())
    finally:
        layer.train(was_training)


def candidates_by_name(candidates: list) -> dict:
    return dict(candidates)
