"""int8 QDQ lowering: a model on onnxruntime's own int8 kernels (no plugin), shift layers exact.

Entry points: ``fxshift.export_onnx(..., quantize="int8")`` and fxshift.onnx.export.export_int8.

Built on ``onnxruntime.quantization``: the model is exported in float (shift layers as ordinary Conv / Gemm
whose weights are their ±2^p codes times their per-channel scale, BatchNorms folded in first), then
``quant_pre_process`` and ``quantize_static`` write a QDQ model (per-channel symmetric int8 weights, uint8
activations whose ranges come from the calibration batches, MinMax). Each int8-exact shift layer's weight gets
a per-channel ``TensorQuantOverrides`` entry whose scale is its step (2^(p_max − 6) × its calibrated scale ×
the folded BatchNorm's γ/σ), so its int8 weights are its shift codes ±1 … ±64 exactly; the result is checked.
Every other Conv / Gemm / MatMul gets onnxruntime's own per-channel scales. What onnxruntime leaves float is
listed in the result (and the file's metadata, key ``fxshift.int8``).
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..errors import ConfigError
from ..quantize.calibration_batches import calibration_batches
from ..nn.frozen_shift import FrozenShiftConv2d, FrozenShiftLinear
from ..nn.shift import SHIFT_LAYERS, ShiftConv2d
from ..quantize.int8_exact import int8_codes, is_int8_exact

__all__ = ["Int8Export", "deploy_model", "quantize_int8", "ort_int8", "calibration_list", "METADATA_KEY"]

METADATA_KEY = "fxshift.int8"
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


@dataclass
class Int8Export:
    """What export_int8 wrote: the file and one entry per Conv / Gemm / MatMul of the exported graph.

    ``layers``: dicts with ``node`` (ONNX node), ``layer`` (the fxshift layer, shift layers only), ``weight``
    (initializer) and ``status``: "int8 exact" (a shift layer whose int8 weights are its codes), "int8" (
    onnxruntime's per-channel scales), or "float: <why>"."""

    path: Path
    layers: list[dict] = field(default_factory=list)

    @property
    def float_layers(self) -> list[str]:
        return [e["node"] for e in self.layers if e["status"].startswith("float")]

    @property
    def exact_layers(self) -> list[str]:
        return [e["layer"] for e in self.layers if e["status"] == "int8 exact"]


# ------------------------------------------------------------------------------------------------
# the float model onnxruntime quantizes
# ------------------------------------------------------------------------------------------------
def _plain_from_shift(module: nn.Module) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(Conv2d / Linear with weight codes × scale and the layer's bias, codes, factor) of a shift layer."""
    with torch.no_grad():
        if isinstance(module, SHIFT_LAYERS):
            was = module.training
            module.eval()
            codes, bias = module.quantized_weight().detach().float(), module.quantized_bias()
            module.train(was)
        else:  # frozen
            codes, bias = module.unpacked_weight().float(), module.bias
        rows = codes.shape[0]
        factor = torch.ones(rows) if module.scale is None else module.scale.detach().float().cpu()
        codes = codes.cpu()
        if isinstance(module, (ShiftConv2d, FrozenShiftConv2d)):
            plain = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                              module.padding, module.dilation, module.groups, True, module.padding_mode)
        else:
            plain = nn.Linear(module.in_features, module.out_features, True)
        plain.weight.copy_(codes.reshape(plain.weight.shape) * factor.view(-1, *([1] * (codes.dim() - 1))))
        plain.bias.copy_(torch.zeros(rows) if bias is None else bias.detach().float().cpu())
    return plain.eval(), codes, factor


def _last_layer(module: nn.Module) -> Optional[nn.Module]:
    """The Conv2d / Linear whose output is the module's output: itself, or a decomposed chain's last layer."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        return module
    if isinstance(module, nn.Sequential) and len(module) and isinstance(module[-1], (nn.Conv2d, nn.Linear)):
        return module[-1]
    return None


def _fold_batchnorms(gm: fx.GraphModule, factors: dict[int, torch.Tensor]) -> None:
    """Fold every eval BatchNorm that is the sole user of a Conv2d / Linear (or decomposed chain) into it;
    `factors` (by id of the layer) gain the BatchNorm's γ/σ."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), (nn.BatchNorm1d, nn.BatchNorm2d)):
            continue
        bn = gm.get_submodule(node.target)
        src = node.args[0] if node.args else None
        if bn.running_mean is None or len(node.args) != 1 or node.kwargs or not isinstance(src, fx.Node) \
                or src.op != "call_module" or len(src.users) != 1:
            continue
        layer = _last_layer(gm.get_submodule(src.target))
        if layer is None or layer.weight.shape[0] != bn.num_features or \
                isinstance(bn, nn.BatchNorm2d) != isinstance(layer, nn.Conv2d):
            continue
        with torch.no_grad():
            g = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
            beta = bn.bias if bn.affine else torch.zeros_like(g)
            layer.weight.mul_(g.view(-1, *([1] * (layer.weight.dim() - 1))))
            old = layer.bias if layer.bias is not None else torch.zeros_like(g)
            new_bias = (old - bn.running_mean) * g + beta
            if layer.bias is None:
                layer.bias = nn.Parameter(new_bias.clone())
            else:
                layer.bias.copy_(new_bias)
        if id(layer) in factors:
            factors[id(layer)] = factors[id(layer)] * g.detach().float()
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


def deploy_model(model: nn.Module) -> tuple[nn.Module, dict[str, dict[str, torch.Tensor]]]:
    """(a float copy for export, {layer name: {"codes", "factor"}}) of a model: shift layers (trained or frozen)
    become Conv2d / Linear holding codes × scale; eval BatchNorms after convolutions are folded in (needs an
    fx-traceable model or a GraphModule). The model given is not changed."""
    m = copy.deepcopy(model).eval()
    if not isinstance(m, fx.GraphModule):
        try:
            m = fx.symbolic_trace(m)
        except Exception:  # noqa: BLE001 - untraceable: keep the module, BatchNorms are not folded
            pass
    shifts: dict[str, dict[str, torch.Tensor]] = {}
    by_id: dict[int, str] = {}
    for name, module in list(m.named_modules()):
        if isinstance(module, SHIFT_LAYERS + (FrozenShiftConv2d, FrozenShiftLinear)):
            plain, codes, factor = _plain_from_shift(module)
            parent_name, _, attr = name.rpartition(".")
            setattr(m.get_submodule(parent_name) if parent_name else m, attr, plain)
            shifts[name] = {"codes": codes, "factor": factor}
            by_id[id(plain)] = name
    if isinstance(m, fx.GraphModule):
        factors = {i: shifts[n]["factor"] for i, n in by_id.items()}
        _fold_batchnorms(m, factors)
        for i, n in by_id.items():
            shifts[n]["factor"] = factors[i]
    return m, shifts


# ------------------------------------------------------------------------------------------------
# calibration
# ------------------------------------------------------------------------------------------------
def calibration_list(calibration: Any, n_inputs: int) -> list[tuple[torch.Tensor, ...]]:
    """Calibration batches as a list of input tuples (a tensor of stacked samples is one batch per 32)."""
    if calibration is None:
        raise ConfigError("quantize='int8' needs calibration: give calibration=batches (an iterable of input "
                          "tensors, e.g. 128-512 unlabelled images in batches of 32)")
    if isinstance(calibration, torch.Tensor):
        calibration = list(calibration.split(32))
    batches = calibration_batches(calibration)
    for i, b in enumerate(batches):
        if len(b) != n_inputs or not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in b):
            raise ConfigError(f"calibration batch {i}: expected {n_inputs} float tensor(s) (inputs only, no labels), "
                              f"got {[type(t).__name__ for t in b]}")
    return batches


def _reader(batches: list[tuple], names: Sequence[str]):
    from onnxruntime.quantization import CalibrationDataReader

    class _Batches(CalibrationDataReader):
        def __init__(self):
            self._it = iter(batches)

        def get_next(self):
            b = next(self._it, None)
            return None if b is None else {n: t.detach().cpu().float().numpy() for n, t in zip(names, b)}

        def rewind(self):
            self._it = iter(batches)

    return _Batches()


def ort_int8(float_path: Any, out: Any, calibration: Any) -> Path:
    """onnxruntime's own static int8 of a float ONNX file (QDQ, per-channel s8 weights, u8 activations): the
    baseline fxshift's int8 export is compared with. `calibration`: batches as for export_onnx(quantize="int8")."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import onnx

    names = [i.name for i in onnx.load(str(float_path), load_external_data=False).graph.input]
    out = Path(out)
    pre = out.with_name(out.stem + "_pre.onnx")
    quant_pre_process(str(float_path), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), _reader(calibration_list(calibration, len(names)), names),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    return out


# ------------------------------------------------------------------------------------------------
# onnxruntime quantization
# ------------------------------------------------------------------------------------------------
def _weight_axis(node) -> int:
    """The output-channel axis of a Conv / Gemm / MatMul weight (input 1)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 1  # MatMul: (in, out)


def _find_weight(proto, name: str, expected: np.ndarray) -> Optional[tuple[Any, str, int]]:
    """(node, initializer name, axis) of the Conv / Gemm / MatMul whose weight equals `expected` (out-major),
    trying the parameter's name first."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    consumers = [(n, n.input[1]) for n in proto.graph.node if n.op_type in WEIGHT_OPS and len(n.input) > 1
                 and n.input[1] in inits]
    consumers.sort(key=lambda c: c[1] != f"{name}.weight")
    for node, wname in consumers:
        axis = _weight_axis(node)
        arr = numpy_helper.to_array(inits[wname])
        cand = arr if axis == 0 else arr.T
        if cand.shape == expected.shape and np.array_equal(cand, expected):
            return node, wname, axis
    return None


def _dq_weights(proto) -> dict[str, tuple[str, Any]]:
    """Weight-op node name -> (int8 initializer name, the DequantizeLinear node) for quantized weights."""
    inits = {i.name for i in proto.graph.initializer}
    dq_by_out = {n.output[0]: n for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    out = {}
    for n in proto.graph.node:
        if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[1] in dq_by_out:
            dq = dq_by_out[n.input[1]]
            if dq.input[0] in inits:
                out[n.name] = (dq.input[0], dq)
    return out


def quantize_int8(proto: Any, deploy: nn.Module, shifts: dict[str, dict[str, torch.Tensor]], batches: list[tuple],
                  path: Union[str, os.PathLike], *, metadata: Optional[dict] = None, pre_process: bool = True,
                  calibrate_method: str = "MinMax") -> Int8Export:
    """Quantize the float export `proto` of `deploy` (deploy_model's result, with its `shifts`) to a QDQ int8
    file at `path` with onnxruntime (module doc); fxshift.onnx.export.export_int8 is the entry point.

    pre_process: run onnxruntime's quant_pre_process (shape inference, graph optimisation) first.
    calibrate_method: "MinMax", "Entropy" or "Percentile" (onnxruntime.quantization.CalibrationMethod).
    Errors of onnxruntime's quantizer propagate."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = getattr(CalibrationMethod, calibrate_method, None)
    if method is None:
        raise ConfigError(f"calibrate_method={calibrate_method!r}: use MinMax, Entropy or Percentile")
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="fxshift-int8-") as tmp:
        float_path, pre_path = Path(tmp) / "float.onnx", Path(tmp) / "pre.onnx"
        onnx.save(proto, float_path)
        if pre_process:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            try:
                quant_pre_process(str(float_path), str(pre_path), skip_symbolic_shape=True)
            except Exception:  # noqa: BLE001 - pre-processing is an optimisation; quantize the export itself
                pre_path = float_path
        else:
            pre_path = float_path
        pre = onnx.load(str(pre_path))
        overrides, expected, entries = {}, {}, {}
        for name, info in shifts.items():
            layer = deploy.get_submodule(name)
            want = layer.weight.detach().numpy()
            entry = {"node": None, "layer": name, "weight": None, "status": ""}
            entries[name] = entry
            if not is_int8_exact(info["codes"]):
                entry["status"] = "int8 (not exact: a channel spans more than 7 octaves; ShiftQuantizePass(" \
                                  "int8_exact=True) keeps it exact)"
                continue
            q, step = int8_codes(info["codes"], info["factor"])
            found = _find_weight(pre, name, want)
            if found is None:
                entry["status"] = "int8 (not exact: its weight was changed by the ONNX export)"
                continue
            node, wname, axis = found
            entry.update(node=node.name, weight=wname)
            overrides[wname] = [{"axis": axis, "scale": np.float32(s), "zero_point": np.int8(0),
                                 "quant_type": QuantType.QInt8} for s in step.numpy()]
            expected[wname] = (q.numpy().reshape(want.shape[0], -1), step.numpy(), axis)
        names = [i.name for i in pre.graph.input]
        out_path = Path(tmp) / "int8.onnx"
        quantize_static(str(pre_path), str(out_path), _reader(batches, names), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=method,
                        extra_options={"TensorQuantOverrides": overrides, "QDQDisableWeightAdjustForInt32Bias": True})
        result = onnx.load(str(out_path))
    inits = {i.name: i for i in result.graph.initializer}
    quantized = _dq_weights(result)
    layers = []
    by_node = {e["node"]: e for e in entries.values() if e["node"]}
    for node in result.graph.node:
        if node.op_type not in WEIGHT_OPS:
            continue
        entry = by_node.get(node.name) or {"node": node.name, "layer": None, "weight": None, "status": ""}
        if node.name not in quantized:
            entry["status"] = "float: onnxruntime left it unquantized (weight not a constant, or op not supported)"
        elif entry.get("weight") in expected:
            q_name, dq = quantized[node.name]
            q_want, step, axis = expected[entry["weight"]]
            got = numpy_helper.to_array(inits[q_name])
            got = (got if axis == 0 else got.T).reshape(q_want.shape[0], -1)
            scale = numpy_helper.to_array(inits[dq.input[1]])
            exact = got.dtype == np.int8 and np.array_equal(got, q_want) and np.array_equal(scale, step)
            entry["status"] = "int8 exact" if exact else "int8 (not exact: onnxruntime changed the pinned scales)"
        elif not entry["status"]:
            entry["status"] = "int8"
        entry["node"] = node.name
        layers.append(entry)
    listed = {id(e) for e in layers}
    layers += [e for e in entries.values() if id(e) not in listed]  # shift layers whose node was not matched
    meta = {METADATA_KEY: json.dumps([{k: e[k] for k in ("node", "layer", "status")} for e in layers])}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    for key, value in meta.items():
        entry = result.metadata_props.add()
        entry.key, entry.value = key, value
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(result, str(path))
    return Int8Export(path, layers)
