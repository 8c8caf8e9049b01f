"""A torch reference of an int8 QDQ model: the graph run in float32 torch with fake-quantised tensors.

Every QuantizeLinear rounds as onnxruntime does (half to even, then saturate to the 8-bit range), every
DequantizeLinear multiplies back, and the ops between them run in float on those exact grid values, so the
result is what an integer kernel computes up to where a float sum lands on the other side of a rounding
boundary: onnxruntime's int8 kernels agree with it within one quantisation step per requantisation.
Accuracy can be measured in torch (any device, any batch) without onnxruntime:

    ref = fxshift.onnx.int8_reference(gm, x, calibration)      # or QDQReference(onnx.load("m.onnx"))
    accuracy = (ref(images).argmax(1) == labels).float().mean()
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = ["QDQReference", "int8_reference", "quantize_linear", "dequantize_linear"]


def _along(t: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """A per-axis parameter shaped to broadcast along `axis` of x (scalars unchanged)."""
    if t.dim() == 0:
        return t
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return t.reshape(shape)


def quantize_linear(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """ONNX QuantizeLinear as float values: saturate(round_half_even(x / scale) + zero_point)."""
    info = torch.iinfo(zero_point.dtype)
    q = torch.round(x / _along(scale, x, axis)) + _along(zero_point.float(), x, axis)
    return q.clamp(info.min, info.max)


def dequantize_linear(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """ONNX DequantizeLinear: (q − zero_point) · scale."""
    return (q.float() - _along(zero_point.float(), q, axis)) * _along(scale, q, axis)


def _pads(attrs: dict, dims: int) -> tuple[list[int], list[int]]:
    pads = list(attrs.get("pads", [0] * (2 * dims)))
    return pads[:dims], pads[dims:]


def _pad_input(x: torch.Tensor, attrs: dict, value: float = 0.0) -> tuple[torch.Tensor, list[int]]:
    """(x padded where begin and end pads differ, the symmetric padding left for the op)."""
    dims = x.dim() - 2
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        raise ConfigError(f"QDQReference: auto_pad={attrs['auto_pad']!r} is not supported; export with explicit pads")
    begin, end = _pads(attrs, dims)
    if begin == end:
        return x, begin
    flat = []
    for b, e in zip(reversed(begin), reversed(end)):
        flat += [b, e]
    return F.pad(x, flat, value=value), [0] * dims


def _conv(x, w, b=None, **a):
    x, pad = _pad_input(x, a)
    dims = x.dim() - 2
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    return conv(x, w, b, tuple(a.get("strides", [1] * dims)), tuple(pad), tuple(a.get("dilations", [1] * dims)),
                int(a.get("group", 1)))


def _gemm(a_, b_, c=None, **a):
    if a.get("transA", 0):
        a_ = a_.t()
    if a.get("transB", 0):
        b_ = b_.t()
    y = a.get("alpha", 1.0) * (a_ @ b_)
    return y if c is None else y + a.get("beta", 1.0) * c


def _pool(kind: str) -> Callable:
    def run(x, **a):
        x, pad = _pad_input(x, a, value=-math.inf if kind == "max" else 0.0)
        k = tuple(a["kernel_shape"])
        strides = tuple(a.get("strides", [1] * len(k)))
        ceil = bool(a.get("ceil_mode", 0))
        if kind == "max":
            pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(k)]
            return pool(x, k, strides, tuple(pad), tuple(a.get("dilations", [1] * len(k))), ceil)
        pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(k)]
        return pool(x, k, strides, tuple(pad), ceil, bool(a.get("count_include_pad", 0)))
    return run


def _reduce_mean(x, axes=None, **a):
    axes = a.get("axes") if axes is None else [int(v) for v in axes.tolist()]
    keep = bool(a.get("keepdims", 1))
    if axes is None or len(axes) == 0:
        return x.mean() if not keep else x.mean(dim=tuple(range(x.dim())), keepdim=True)
    return x.mean(dim=tuple(axes), keepdim=keep)


def _reshape(x, shape, **a):
    shape = [int(v) for v in shape.tolist()]
    if not a.get("allowzero", 0):
        shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
    return x.reshape(shape)


def _flatten(x, **a):
    axis = int(a.get("axis", 1)) % max(x.dim(), 1)
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _clip(x, lo=None, hi=None, **a):
    lo = a.get("min") if lo is None else float(lo)
    hi = a.get("max") if hi is None else float(hi)
    return x.clamp(lo, hi)


def _q(x, scale, zp=None, **a):
    zp = torch.zeros((), dtype=torch.uint8) if zp is None else zp
    return quantize_linear(x, scale, zp, int(a.get("axis", 1))), zp.dtype


_OPS: dict[str, Callable] = {
    "Conv": _conv, "Gemm": _gemm, "MatMul": lambda a, b: a @ b, "Relu": lambda x: F.relu(x),
    "Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mul": lambda a, b: a * b, "Div": lambda a, b: a / b,
    "MaxPool": _pool("max"), "AveragePool": _pool("avg"), "ReduceMean": _reduce_mean,
    "GlobalAveragePool": lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "Reshape": _reshape, "Flatten": _flatten, "Identity": lambda x: x, "Clip": _clip,
    "Sigmoid": torch.sigmoid, "Concat": lambda *xs, axis: torch.cat(xs, dim=int(axis)),
    "Transpose": lambda x, perm=None: x.permute(*perm) if perm is not None else x.permute(*reversed(range(x.dim()))),
}


class QDQReference(nn.Module):
    """Runs an ONNX QDQ model (onnx.ModelProto) in torch with fake-quantised tensors (module doc).

    Supports the ops fxshift's exports use (Conv, Gemm, MatMul, pooling, ReduceMean, Add/Mul, Relu/Clip,
    Reshape/Flatten, Concat, Transpose, Q/DQ); others raise ConfigError naming the op."""

    def __init__(self, proto: Any):
        super().__init__()
        from onnx import helper, numpy_helper

        self._consts: dict[str, torch.Tensor] = {}
        for init in proto.graph.initializer:
            self._consts[init.name] = torch.from_numpy(numpy_helper.to_array(init).copy())
        self._nodes = []
        for node in proto.graph.node:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type == "Constant":
                self._consts[node.output[0]] = torch.from_numpy(numpy_helper.to_array(attrs["value"]).copy())
                continue
            if node.op_type not in _OPS and node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                raise ConfigError(f"QDQReference: ONNX op {node.op_type} (node {node.name}) is not supported")
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
            self._nodes.append((node.op_type, list(node.input), list(node.output), attrs))
        for k, t in self._consts.items():
            if t.is_floating_point():
                self._consts[k] = t.float()
        self.input_names = [i.name for i in proto.graph.input if i.name not in self._consts]
        self.output_names = [o.name for o in proto.graph.output]

    def forward(self, *inputs: torch.Tensor):
        if len(inputs) != len(self.input_names):
            raise ConfigError(f"QDQReference takes {len(self.input_names)} inputs ({self.input_names}), "
                              f"got {len(inputs)}")
        env: dict[str, Any] = dict(self._consts)
        env.update({n: t.float() for n, t in zip(self.input_names, inputs)})
        qtype: dict[str, torch.dtype] = {}
        for op, ins, outs, attrs in self._nodes:
            args = [env[n] if n else None for n in ins]
            while args and args[-1] is None:
                args.pop()
            if op == "QuantizeLinear":
                env[outs[0]], qtype[outs[0]] = _q(*args, **attrs)
            elif op == "DequantizeLinear":
                q = args[0]
                zp = args[2] if len(args) > 2 else torch.zeros((), dtype=qtype.get(ins[0], q.dtype))
                env[outs[0]] = dequantize_linear(q, args[1], zp, int(attrs.get("axis", 1)))
            else:
                env[outs[0]] = _OPS[op](*args, **attrs)
        out = [env[n] for n in self.output_names]
        return out[0] if len(out) == 1 else tuple(out)


def int8_reference(model: nn.Module, example_inputs: Any, calibration: Any, **options: Any) -> QDQReference:
    """The torch reference of the int8 model fxshift.export_onnx(..., quantize="int8") writes for `model`
    (options as for fxshift.onnx.int8.export_int8); the file itself goes to a temporary folder."""
    import tempfile
    from pathlib import Path

    import onnx

    from .export import export_int8

    with tempfile.TemporaryDirectory(prefix="fxshift-int8-ref-") as tmp:
        result = export_int8(model, example_inputs, Path(tmp) / "int8.onnx", calibration, **options)
        return QDQReference(onnx.load(str(result.path)))
