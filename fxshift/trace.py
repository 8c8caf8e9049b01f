"""fxshift.trace: capture a model into a canonical GraphModule (fxshift.capture)."""
from __future__ import annotations

from typing import Any, Optional

import torch.fx as fx

from .capture import capture as capture_model
from .capture.symbolic import LeafSpec, is_fxshift_module

__all__ = ["trace", "LeafSpec", "is_fxshift_module"]


def trace(model: Any, example_inputs: Any = None, *, leaf_modules: LeafSpec = None,
          concrete_args: Optional[dict[str, Any]] = None, capture: str = "auto") -> fx.GraphModule:
    """Capture `model` into a canonical GraphModule (see fxshift.capture.capture): torch.fx
    symbolic tracing, or torch.export with a symbolic batch when that fails (capture="auto"), or
    the one named by capture="fx" / "export". Example inputs are a tensor, a tuple or a dict of
    keyword inputs. The model is not copied (apply() passes a copy)."""
    return capture_model(model, example_inputs, capture=capture, leaf_modules=leaf_modules,
                         concrete_args=concrete_args)
