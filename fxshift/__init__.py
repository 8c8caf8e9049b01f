"""fxshift: compiler-style torch.fx passes that make networks cheaper to train and run."""
from . import context, errors
from .checkpoint import load, save
from .context import report_of as report
from .costs import macs, parameter_count
from .errors import ConfigError, FxshiftError, RecipeError, TraceError
from .nn.freeze import freeze
from .onnx import ExportOnnxPass, export_onnx
from .passes import (CPDecomposePass, DynamicPrunePass, FreezePass, LayerPrunePass, RecomposePass, ShiftQuantizePass,
                     SpatialSVDPass, TuckerDecomposePass)
from .pipeline import apply
from .plan import Budget
from .prune.dynamic_macs import dynamic_macs
from .report import Report
from .trace import trace

__version__ = "0.1.0"

__all__ = ["apply", "trace", "report", "Report", "save", "load", "macs", "parameter_count", "dynamic_macs", "Budget",
           "TuckerDecomposePass", "CPDecomposePass", "SpatialSVDPass", "RecomposePass", "ShiftQuantizePass",
           "FreezePass", "freeze", "LayerPrunePass", "DynamicPrunePass", "export_onnx", "ExportOnnxPass",
           "FxshiftError", "ConfigError", "TraceError", "RecipeError", "errors", "context"]


def __getattr__(name: str):
    """Subpackages imported on first use: `fxshift.train`."""
    if name == "train":
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
