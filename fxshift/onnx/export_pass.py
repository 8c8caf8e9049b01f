"""ExportOnnxPass: export the pipeline's result to ONNX (fxshift.export_onnx) as its last step."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..context import example_inputs_of, set_onnx_path
from ..errors import ConfigError
from .export import TARGETS, export_onnx


class ExportOnnxPass(PassBase):
    """Writes the GraphModule it is given to an ONNX file and returns it unchanged.

    Args:
        path: the ``.onnx`` file to write.
        example_inputs: inputs to trace with; default: the example inputs given to ``fxshift.apply``.
        target, dynamic_batch, opset, freeze, metadata, quantize, calibration: as for :func:`fxshift.export_onnx`.

    After the pass ``fxshift.context.onnx_path_of(gm)`` gives the path written.

    Example:
        >>> gm = fxshift.apply([TuckerDecomposePass(rank=0.5), ShiftQuantizePass(weight_bits=5),
        ...                     ExportOnnxPass("model.onnx")], model, x)
    """

    def __init__(self, path: Union[str, os.PathLike], example_inputs: Any = None, *, target: str = "fxshift",
                 dynamic_batch: bool = True, opset: Optional[int] = None, freeze: bool = True,
                 metadata: Optional[dict] = None, quantize: Optional[str] = None, calibration: Any = None):
        if target not in TARGETS:
            raise ConfigError(f"ExportOnnxPass: target must be one of {TARGETS}, got {target!r}")
        self.path = Path(path)
        self.example_inputs = example_inputs
        self.target, self.dynamic_batch, self.opset, self.freeze = target, dynamic_batch, opset, freeze
        self.metadata = metadata
        if quantize not in (None, "int8"):
            raise ConfigError(f"ExportOnnxPass: quantize={quantize!r}: use 'int8' or None")
        if quantize == "int8" and calibration is None:
            raise ConfigError("ExportOnnxPass(quantize='int8') needs calibration=batches of inputs")
        self.quantize, self.calibration = quantize, calibration

    def call(self, gm: fx.GraphModule) -> PassResult:
        inputs = self.example_inputs if self.example_inputs is not None else example_inputs_of(gm)
        if inputs is None:
            raise ConfigError("ExportOnnxPass needs example inputs: give them to fxshift.apply(pipeline, model, x) "
                              "or to ExportOnnxPass(path, example_inputs=x)")
        was_training = gm.training
        try:
            written = export_onnx(gm, inputs, self.path, target=self.target, dynamic_batch=self.dynamic_batch,
                                  opset=self.opset, freeze=self.freeze, metadata=self.metadata,
                                  quantize=self.quantize, calibration=self.calibration)
        finally:
            gm.train(was_training)
        set_onnx_path(gm, written)
        return PassResult(gm, False)
