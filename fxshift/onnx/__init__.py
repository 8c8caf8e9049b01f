"""ONNX export with fxshift custom ops, and onnxruntime with fxshift's native plugin.

- :func:`export_onnx` (also :class:`ExportOnnxPass` as the last pass of a pipeline) writes a
  model whose frozen shift layers are ``fxshift.ShiftConv2d`` / ``fxshift.ShiftLinear`` nodes,
  each op carried as a model-local function of standard ops too (see :mod:`.functions`).
- :func:`library_path`, :func:`session_options`, :func:`session` register libfxshift_ort, the
  onnxruntime custom-op library over fxshift's native kernels.
"""
from .export import ExportError, export_onnx, to_model_proto
from .functions import DOMAIN, register_schemas
from .runtime import PluginNotFound, compare_in_onnxruntime, library_path, plugin_available, session, session_options

__all__ = ["export_onnx", "to_model_proto", "ExportOnnxPass", "ExportError", "DOMAIN", "register_schemas",
           "library_path", "plugin_available", "session_options", "session", "compare_in_onnxruntime",
           "PluginNotFound"]


def __getattr__(name: str):
    if name == "ExportOnnxPass":  # lazy: fxshift.passes imports this package's siblings
        from ..passes.export import ExportOnnxPass

        return ExportOnnxPass
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
