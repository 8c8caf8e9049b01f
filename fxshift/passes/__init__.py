"""One pass per file. Every pass is a torch.fx PassBase: `call(gm) -> PassResult`."""
from .decompose_base import DecompositionPass
from .recompose import RecomposePass
from .tucker import TuckerDecomposePass

__all__ = ["DecompositionPass", "RecomposePass", "TuckerDecomposePass"]
