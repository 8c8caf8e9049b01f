"""export_onnx: a GraphModule (or any nn.Module) → an ONNX file, shift layers as fxshift-domain nodes.

Through torch.onnx.export (the dynamo exporter). Decomposed layers are ordinary Conv2d / Linear
modules and become standard Conv / Gemm nodes. Frozen shift layers call torch.ops.fxshift.*; a
custom translation table turns each call into an ``fxshift.ShiftConv2d`` / ``fxshift.ShiftLinear``
node with the packed words as an int32 initializer and typed attributes, and the file carries each
op's model-local function body (fxshift.onnx.functions), so stock onnxruntime runs it too.
``target="portable"`` inlines those bodies: standard ops only, the packed words still packed.
``quantize="int8"`` writes a QDQ model for onnxruntime's own int8 kernels instead (fxshift.onnx.int8).
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import FxshiftError
from ..nn.freeze import freeze
from ..nn.shift import SHIFT_LAYERS
from . import functions
from . import gated as gated_lowering
from .failure import export_failure

__all__ = ["export_onnx", "export_int8", "export_plain", "to_model_proto", "inline_functions", "TARGETS", "ExportError"]

TARGETS = ("fxshift", "portable")


class ExportError(FxshiftError):
    """Exporting to ONNX failed (the message names the step and what to do)."""


def _op():
    import onnxscript

    functions.register_schemas()
    return onnxscript.values.Opset(functions.DOMAIN, functions.DOMAIN_VERSION)


def _standard_op():
    import onnxscript

    return onnxscript.opset18


def _translation_table() -> dict:
    from ..ops import shift_ops  # noqa: F401  (defines torch.ops.fxshift.*)

    fx = _op()

    def zeros(n: int):
        # A bias-less layer gets a zero bias: with the B input left empty onnxruntime's optimizer does
        # not fuse the (function-body) Conv with the BatchNorm/ReLU after it; n floats cost nothing.
        import numpy as np
        import onnx_ir as ir

        return _standard_op().Constant(value=ir.tensor(np.zeros(int(n), dtype=np.float32)))

    def scaled(y, scale, bias, conv: bool):
        # Per-channel scale after accumulation, then the bias, as standard Mul/Add after the custom node
        # (correct with the plugin and with the function bodies). The plugin also accepts the scale as the
        # nodes' optional 4th input; using it needs the function bodies to take it too (issue 14).
        op = _standard_op()
        if conv:
            import numpy as np
            import onnx_ir as ir

            shape = op.Constant(value=ir.tensor(np.array([-1, 1, 1], dtype=np.int64)))
            scale = op.Reshape(scale, shape)
            bias = None if bias is None else op.Reshape(bias, shape)
        y = op.Mul(y, scale)
        return y if bias is None else op.Add(y, bias)

    def shift_conv2d(x, words, weight_shape, stride, padding, dilation, groups, bits, has_zero, bias=None,
                     scale=None):
        ph, pw = (int(p) for p in padding)
        node_bias = bias if bias is not None and scale is None else zeros(weight_shape[0])
        y = fx.ShiftConv2d(x, words, node_bias, weight_shape=[int(d) for d in weight_shape],
                           strides=[int(s) for s in stride], pads=[ph, pw, ph, pw],
                           dilations=[int(d) for d in dilation], group=int(groups), bits=int(bits),
                           has_zero=int(bool(has_zero)))
        return y if scale is None else scaled(y, scale, bias, True)

    def shift_linear(x, words, out_features, bits, has_zero, bias=None, scale=None):
        in_features = x.shape[-1] if x.shape is not None else None
        if not isinstance(in_features, int):
            raise ExportError(f"fxshift::shift_linear: the input's last dimension must be static, got {in_features}")
        node_bias = bias if bias is not None and scale is None else zeros(out_features)
        y = fx.ShiftLinear(x, words, node_bias, in_features=int(in_features), out_features=int(out_features),
                           bits=int(bits), has_zero=int(bool(has_zero)))
        return y if scale is None else scaled(y, scale, bias, False)

    from .gated import translation_table as gated_table

    return {torch.ops.fxshift.shift_conv2d.default: shift_conv2d,
            torch.ops.fxshift.shift_linear.default: shift_linear, **gated_table()}


def _as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise ExportError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def _frozen(model: nn.Module) -> nn.Module:
    """The model with trained shift layers replaced by their packed form (fxshift.freeze), else itself."""
    if any(isinstance(m, SHIFT_LAYERS) for m in model.modules()):
        return freeze(model)
    return model


def _has_gated_units(model: nn.Module) -> bool:
    from ..nn.gated import GatedConv2d

    return any(isinstance(m, GatedConv2d) for m in model.modules())


#: protobuf cannot serialise a message of 2 GiB or more: larger models keep their weights in a side file.
PROTO_LIMIT = 1_900_000_000


def _check(model):
    """onnx.checker (full check); returns the model. One over PROTO_LIMIT cannot be checked in memory:
    it is written with its weights in a side file to a temporary folder, checked there and read back."""
    import tempfile

    import onnx

    functions.register_schemas()
    try:
        if model.ByteSize() <= PROTO_LIMIT:
            onnx.checker.check_model(model, full_check=True)
            return model
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.onnx"
            _write(model, path)
            onnx.checker.check_model(os.fspath(path), full_check=True)
            return onnx.load(os.fspath(path))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the exported model fails onnx.checker (full check): {exc}") from exc


def _write(model, path: Path) -> None:
    """Write `model`; over PROTO_LIMIT its weights go to "<name>.data" beside it (which moves them out
    of the in-memory model: read the file back to use it again)."""
    import onnx

    if model.ByteSize() > PROTO_LIMIT:
        onnx.save_model(model, os.fspath(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data")
    else:
        onnx.save_model(model, os.fspath(path))


def _save(model, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(model, path)


def to_model_proto(model: nn.Module, example_inputs: Any, *, target: str = "fxshift", dynamic_batch: bool = True,
                   opset: Optional[int] = None, freeze: bool = True, metadata: Optional[dict] = None):
    """Like :func:`export_onnx` but returns the checked ``onnx.ModelProto`` instead of writing a file."""

    if target not in TARGETS:
        raise ExportError(f"target must be one of {TARGETS}, got {target!r}")
    if opset is not None and opset < functions.MIN_OPSET:
        raise ExportError(f"opset must be >= {functions.MIN_OPSET} (the fxshift function bodies use BitwiseAnd), "
                          f"got {opset}")
    inputs = _as_tuple(example_inputs)
    if _has_gated_units(model):  # per-input channel counts: one sample per run
        if any(t.dim() == 0 or t.shape[0] != 1 for t in inputs):
            raise ExportError("a model with gated units (DynamicPrunePass) exports at batch 1: give example inputs "
                              "with one sample (the file then takes batch 1 only)")
        dynamic_batch = False
    frozen = _frozen(model) if freeze else model
    was_training = frozen.training
    try:
        proto = _export(frozen.eval(), inputs, target, dynamic_batch, opset)
    finally:
        frozen.train(was_training)
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    return proto


def _export(model: nn.Module, inputs: tuple, target: str, dynamic_batch: bool, opset: Optional[int]):
    if dynamic_batch and any(t.dim() == 0 for t in inputs):
        raise ExportError("dynamic_batch=True needs inputs with a batch dimension (dim 0); pass dynamic_batch=False")
    # torch.export specialises a dimension of size 1: trace dynamic batches with two samples
    trace_inputs = tuple(t.expand(2, *t.shape[1:]).contiguous() if dynamic_batch and t.shape[0] == 1 else t
                         for t in inputs)
    names = ["input"] if len(inputs) == 1 else [f"input{i}" for i in range(len(inputs))]
    dynamic_shapes = tuple({0: torch.export.Dim("batch", min=1)} for _ in inputs) if dynamic_batch else None
    log = io.StringIO()
    gated = _has_gated_units(model)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, trace_inputs, dynamo=True, verbose=False, input_names=names,
                                        output_names=["output"], opset_version=opset, dynamic_shapes=dynamic_shapes,
                                        custom_translation_table=_translation_table(), optimize=not gated,
                                        external_data=False)
        if gated:   # the exporter's optimizer is superlinear on gated graphs (fxshift/onnx/gated.py)
            gated_lowering.optimize(program.model)
    except ExportError:
        raise
    except Exception as exc:  # the exporter's errors are long: the cause, without colour codes, and a remedy
        raise ExportError(export_failure(exc, dynamic_batch)) from exc
    proto = program.model_proto
    proto.producer_name = "fxshift"
    functions.add_functions(proto)
    if target == "portable":
        proto = inline_functions(proto)
    return _check(proto)


def inline_functions(proto):
    """The model with its fxshift function bodies inlined: standard ops only (what target="portable" writes).

    Stock onnxruntime runs both forms exactly; the inlined one lets its graph optimizer fuse the
    decoded convolutions with the BatchNorm/ReLU after them (it inlines model-local functions only
    after those fusions ran), so it runs at the float model's speed.
    """
    import onnx
    import onnx.inliner

    proto = onnx.inliner.inline_local_functions(proto)
    del proto.functions[:]
    keep = [o for o in proto.opset_import if o.domain != functions.DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)
    return proto


def export_onnx(gm: nn.Module, example_inputs: Any, path: Union[str, os.PathLike], *, target: str = "fxshift",
                dynamic_batch: bool = True, opset: Optional[int] = None, freeze: bool = True,
                metadata: Optional[dict] = None, quantize: Optional[str] = None, calibration: Any = None) -> Path:
    """Export a model (typically the GraphModule of :func:`fxshift.apply`) to an ONNX file.

    Parameters
    ----------
    gm : nn.Module
        The model; it is not changed. Trained shift layers (ShiftConv2d / ShiftLinear) are frozen
        into their packed form first (``freeze=False`` exports them as float ops instead).
    example_inputs : tensor or tuple of tensors
        Inputs to trace with (float32 for shift layers).
    path : str or PathLike
        Where to write the ``.onnx`` file (parent folders are created).
    target : {"fxshift", "portable"}
        ``"fxshift"``: frozen shift layers become ``fxshift.ShiftConv2d`` / ``fxshift.ShiftLinear``
        nodes (packed int32 words as initializers, typed attributes), each op with a model-local
        function body of standard ops, so stock onnxruntime runs the file and fxshift's plugin
        (:func:`fxshift.onnx.session`) replaces the bodies by native kernels. ``"portable"``:
        the bodies are inlined; standard ops only.
    dynamic_batch : bool
        Make dimension 0 of every input (and output) symbolic ("batch").
    opset : int, optional
        Opset of the default domain (>= 18); torch's default when None.
    metadata : dict, optional
        Strings stored in the file's ``metadata_props`` (``fxshift compress`` records the model there).
    quantize : {None, "int8"}
        ``"int8"``: a QDQ model that stock onnxruntime runs on its int8 kernels, no plugin
        (:func:`fxshift.onnx.int8.export_int8`; `target`, `opset` and `freeze` do not apply): shift layers
        become int8 weights equal to their codes (exact when their channels span ≤ 7 octaves, as
        ``ShiftQuantizePass(weight_bits=4)`` keeps them), other Conv / Gemm / MatMul per-channel int8,
        activations uint8 calibrated on `calibration`. Layers left float are named in a warning.
    calibration : iterable of input batches, or a tensor of samples
        Required with ``quantize="int8"`` (128-512 unlabelled samples are usually enough).

    Returns
    -------
    pathlib.Path
        The file written. It passes ``onnx.checker.check_model(full_check=True)``.

    Raises
    ------
    ExportError
        When torch.onnx.export fails (the message keeps its first line) or the result fails the checker.

    Example
    -------
    >>> gm = fxshift.apply([TuckerDecomposePass(0.5), ShiftQuantizePass(weight_bits=5)], model, x)
    >>> fxshift.export_onnx(gm, x, "model.onnx")
    >>> fxshift.onnx.session("model.onnx").run(None, {"input": x.numpy()})
    """
    path = Path(path)
    if quantize is not None:
        if quantize != "int8":
            raise ExportError(f"quantize={quantize!r}: use 'int8' (or None for a float / fxshift-op export)")
        result = export_int8(gm, example_inputs, path, calibration, dynamic_batch=dynamic_batch, metadata=metadata)
        if result.float_layers:
            warnings.warn(f"int8 export: {len(result.float_layers)} layer(s) stay float: "
                          f"{', '.join(result.float_layers)}", stacklevel=2)
        return result.path
    if calibration is not None:
        raise ExportError("calibration is used with quantize='int8' only")
    proto = to_model_proto(gm, example_inputs, target=target, dynamic_batch=dynamic_batch, opset=opset, freeze=freeze,
                           metadata=metadata)
    _save(proto, path)
    return path


def export_int8(model: nn.Module, example_inputs: Any, path: Union[str, os.PathLike], calibration: Any, *,
                dynamic_batch: bool = True, metadata: Optional[dict] = None, pre_process: bool = True,
                calibrate_method: str = "MinMax"):
    """Write a QDQ int8 ONNX file of `model` that stock onnxruntime runs on its own int8 kernels
    (fxshift.onnx.int8; what ``export_onnx(..., quantize="int8")`` writes).

    Parameters
    ----------
    model : the model (typically the GraphModule of fxshift.apply); not changed.
    example_inputs : tensor or tuple of tensors to trace with.
    path : the .onnx file to write.
    calibration : iterable of input batches (tensors or tuples, no labels), or one tensor of samples;
        activation ranges (uint8) come from running them. 128-512 samples are usually enough.
    pre_process : run onnxruntime's quant_pre_process (shape inference, graph optimisation) first.
    calibrate_method : "MinMax", "Entropy" or "Percentile" (onnxruntime.quantization.CalibrationMethod).

    Returns
    -------
    fxshift.onnx.int8.Int8Export: the path and, per Conv / Gemm / MatMul, whether it is int8 (exact for
    shift layers) or float.
    """
    from . import int8

    inputs = _as_tuple(example_inputs)
    batches = int8.calibration_list(calibration, len(inputs))
    deploy, shifts = int8.deploy_model(model)
    proto = to_model_proto(deploy, inputs, target="portable", dynamic_batch=dynamic_batch, freeze=False)
    try:
        return int8.quantize_int8(proto, deploy, shifts, batches, path, metadata=metadata, pre_process=pre_process,
                                  calibrate_method=calibrate_method)
    except FxshiftError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime's quantizer raises many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"onnxruntime quantize_static failed: {type(exc).__name__}: {first}") from exc


def export_plain(model: nn.Module, example_inputs: Sequence[torch.Tensor],
                 path: Union[str, os.PathLike, None] = None, *, dynamic_batch: bool = True) -> bytes:
    """A model of standard ops only (the TorchScript exporter: fast, for timing studies and float
    baselines), written to `path` when given; returns the serialized model. Falls back to the
    dynamo exporter where the TorchScript one is gone. The model is exported in eval mode and left
    in the mode it was in."""
    import tempfile

    names = [f"input{i}" for i in range(len(example_inputs))]
    axes = {n: {0: "batch"} for n in names} if dynamic_batch else None
    was_training = model.training
    model.eval()
    try:
        with tempfile.TemporaryDirectory() as folder:
            target = Path(path) if path is not None else Path(folder) / "model.onnx"
            target.parent.mkdir(parents=True, exist_ok=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    torch.onnx.export(model, tuple(example_inputs), os.fspath(target), dynamo=False, input_names=names,
                                      output_names=["output"], dynamic_axes=axes, opset_version=17)
                except Exception:  # the legacy exporter may be gone in a later torch
                    torch.onnx.export(model, tuple(example_inputs), os.fspath(target), input_names=names,
                                      output_names=["output"], external_data=False)
            return target.read_bytes()
    finally:
        model.train(was_training)

