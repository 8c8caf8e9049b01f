"""One pass per file. Every pass is a torch.fx PassBase: `call(gm) -> PassResult`."""
from .cp import CPDecomposePass
from .decompose_base import DecompositionPass
from .export import ExportOnnxPass
from .freeze import FreezePass, freeze
from .recompose import RecomposePass
from .shift_quantize import ShiftQuantizePass
from .spatial import SpatialSVDPass
from .tucker import TuckerDecomposePass

__all__ = ["DecompositionPass", "RecomposePass", "TuckerDecomposePass", "ShiftQuantizePass", "FreezePass", "freeze",
           "CPDecomposePass", "SpatialSVDPass"]
__all__ += ["ExportOnnxPass"]
