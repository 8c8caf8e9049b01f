"""ONNX lowering of gated units (fxshift::gated_conv2d, fxshift::scatter_channels) to standard ops.

At batch 1 the exported graph keeps the skipping: the predictor (ReduceMean over H, W → MatMul →
Add), the threshold (logit > 0, or the top logit when none is) and NonZero for the active filter
indices, or TopK for a unit that keeps exactly k filters (target "uniform"), Gather of those weight rows (and, for a compact input, of the active input-channel
columns), and a Conv on the computed weights; ScatterND restores
the full channel layout where the graph needs it. Stock onnxruntime runs it.

`optimize` replaces torch.onnx.export's optimizer for gated graphs: onnxscript's pattern rewriter
there grows faster than linearly with the node count (gated resnet18 at 64×64: about half of a 45 s
export; resnet34 worse), and onnxruntime applies its own graph optimizations to the file anyway.
"""
from __future__ import annotations

import math


def translation_table() -> dict:
    """{torch op overload: onnxscript translation} for torch.onnx.export's custom_translation_table."""
    import onnxscript
    import torch

    from ..ops import gated_ops  # noqa: F401  (defines torch.ops.fxshift.gated_conv2d / scatter_channels)

    op = onnxscript.opset18

    def activation(y, act: str):
        if act == "relu":
            return op.Relu(y)
        if act == "relu6":
            return op.Clip(y, op.Constant(value_float=0.0), op.Constant(value_float=6.0))
        if act == "silu":
            return op.Mul(y, op.Sigmoid(y))
        if act == "hardswish":
            return op.HardSwish(y)
        if act == "gelu":
            half = op.Mul(y, op.Constant(value_float=0.5))
            return op.Mul(half, op.Add(op.Erf(op.Div(y, op.Constant(value_float=math.sqrt(2.0)))),
                                       op.Constant(value_float=1.0)))
        return y

    def gated_conv2d(x, in_idx, weight, scale, shift, predictor_weight_t, predictor_bias, stride, padding, dilation,
                     act, k=0):
        pooled = op.ReduceMean(x, op.Constant(value_ints=[2, 3]), keepdims=0)                 # (1, C_in active)
        pw = predictor_weight_t if in_idx is None else op.Gather(predictor_weight_t, in_idx, axis=0)  # (C_in', C_out)
        logits = op.Add(op.MatMul(pooled, pw), predictor_bias)                             # (1, C_out)
        if k > 0:      # target "uniform": exactly the k highest logits
            _, top_idx = op.TopK(logits, op.Constant(value_ints=[int(k)]), axis=1, largest=1, sorted=0)
            idx = op.Reshape(top_idx, op.Constant(value_ints=[-1]))
        else:
            top = op.ReduceMax(logits, op.Constant(value_ints=[1]), keepdims=1)
            keep = op.Or(op.Greater(logits, op.Constant(value_float=0.0)), op.GreaterOrEqual(logits, top))
            idx = op.Reshape(op.NonZero(op.Squeeze(keep, op.Constant(value_ints=[0]))), op.Constant(value_ints=[-1]))
        w = op.Gather(weight, idx, axis=0)
        if in_idx is not None:
            w = op.Gather(w, in_idx, axis=1)
        if scale is not None:   # fxshift.ops.gated_ops folds the BN scale into the weight and passes None
            w = op.Mul(w, op.Unsqueeze(op.Gather(scale, idx, axis=0), op.Constant(value_ints=[1, 2, 3])))
        pads = [int(p) for p in padding]
        y = op.Conv(x, w, op.Gather(shift, idx, axis=0), strides=[int(s) for s in stride], pads=pads + pads,
                    dilations=[int(d) for d in dilation])
        return activation(y, act), idx

    def scatter_channels(y, idx, channels):
        shape = op.Shape(y)
        full = op.Concat(op.Slice(shape, op.Constant(value_ints=[0]), op.Constant(value_ints=[1])),
                         op.Constant(value_ints=[int(channels)]),
                         op.Slice(shape, op.Constant(value_ints=[2]), op.Constant(value_ints=[4])), axis=0)
        zeros = op.Transpose(op.ConstantOfShape(full), perm=[1, 0, 2, 3])
        rows = op.ScatterND(zeros, op.Unsqueeze(idx, op.Constant(value_ints=[1])), op.Transpose(y, perm=[1, 0, 2, 3]))
        return op.Transpose(rows, perm=[1, 0, 2, 3])

    return {torch.ops.fxshift.gated_conv2d.default: gated_conv2d,
            torch.ops.fxshift.scatter_channels.default: scatter_channels}


def optimize(model) -> None:
    """torch.onnx.export's default optimization (onnxscript.optimizer.optimize_ir) without its pattern
    rewriter and fusions, in place on an onnx_ir Model: inline functions, fold constants, drop unused
    nodes / functions / opsets, lift constants to initializers, deduplicate them, CSE, fix names."""
    import onnx_ir.passes.common as common
    import onnxscript.optimizer as optimizer

    common.InlinePass()(model)
    optimizer.fold_constants(model)
    for step in (common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass(),
                 common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
                 common.DeduplicateInitializersPass(), common.CommonSubexpressionEliminationPass(),
                 common.OutputFixPass(), common.NameFixPass()):
        step(model)
