"""ONNX export with fxshift custom ops, and onnxruntime with fxshift's native plugin.

- :func:`export_onnx` (also :class:`ExportOnnxPass` as the last pass of a pipeline) writes a
  model whose frozen shift layers are ``fxshift.ShiftConv2d`` / ``fxshift.ShiftLinear`` nodes,
  each op carried as a model-local function of standard ops too (see :mod:`.functions`).
- :mod:`.sessions` is the one place that builds onnxruntime sessions (:func:`session_options`;
  libfxshift_ort, the custom-op library over fxshift's native kernels, registered); :mod:`.runtime`
  gives :func:`session` (with the per-node lowering choice of :mod:`.lowering`) and
  :func:`compare_in_onnxruntime`. Timing lives in fxshift.measure.
- :mod:`.int8` writes QDQ int8 models for onnxruntime's own kernels (``export_onnx(..., quantize="int8")``);
  :mod:`.qdq_reference` runs such a model in torch with fake-quantised tensors.
"""
from .export import ExportError, export_int8, export_onnx, export_plain, to_model_proto
from .export_pass import ExportOnnxPass
from .functions import DOMAIN, register_schemas
from .int8 import Int8Export
from .qdq_reference import QDQReference, int8_reference
from .runtime import compare_in_onnxruntime, session
from .sessions import PluginNotFound, library_path, plugin_available, session_options

__all__ = ["export_onnx", "export_plain", "to_model_proto", "ExportOnnxPass", "ExportError", "DOMAIN",
           "register_schemas", "library_path", "plugin_available", "session_options", "session",
           "compare_in_onnxruntime", "PluginNotFound", "export_int8", "Int8Export", "QDQReference", "int8_reference"]
