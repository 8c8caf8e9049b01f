"""One pass per file. Every pass is a torch.fx PassBase: `call(gm) -> PassResult`, and declares the
`cli_name` that `fxshift compress --pass NAME:...` knows it by."""
from .cp import CPDecomposePass
from .decompose_base import DecompositionPass
from .dynamic_prune import DynamicPrunePass
from .freeze import FreezePass
from .layer_prune import LayerPrunePass
from .recompose import RecomposePass
from .shift_quantize import ShiftQuantizePass
from .spatial import SpatialSVDPass
from .tucker import TuckerDecomposePass

__all__ = ["DecompositionPass", "RecomposePass", "TuckerDecomposePass", "ShiftQuantizePass", "FreezePass",
           "CPDecomposePass", "SpatialSVDPass", "DynamicPrunePass", "LayerPrunePass"]
