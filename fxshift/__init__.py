"""fxshift: compiler-style torch.fx passes that make networks cheaper to train and run."""
from . import context, errors
from .checkpoint import load, save
from .context import report_of as report
from .costs import macs, parameter_count
from .decompose.budget import Budget
from .errors import ConfigError, FxshiftError, RecipeError, TraceError
from .nn.freeze import freeze
from .onnx import ExportOnnxPass, export_onnx
from .passes import CPDecomposePass, FreezePass, RecomposePass, ShiftQuantizePass, SpatialSVDPass, TuckerDecomposePass
from .passes import DynamicPrunePass
from .costs import dynamic_macs
from .passes import LayerPrunePass
from .pipeline import apply
from .report import Report
from .trace import trace
from .context import capture_info

__version__ = "0.1.0"

__all__ = ["apply", "report", "Report", "trace", "save", "load", "macs", "parameter_count", "TuckerDecomposePass",
           "RecomposePass", "ShiftQuantizePass", "FreezePass", "freeze", "FxshiftError", "ConfigError", "TraceError",
           "RecipeError", "errors", "context", "CPDecomposePass", "SpatialSVDPass", "Budget", "export_onnx",
           "ExportOnnxPass"]
__all__ += ["DynamicPrunePass", "dynamic_macs", "LayerPrunePass", "capture_info"]


def __getattr__(name: str):
    """Subpackages imported on first use: `fxshift.train`."""
    if name == "train":
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
