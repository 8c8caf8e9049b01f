"""Capture with torch.export: the batch dimension stays symbolic, parameters stay named attributes
(under the names of model.named_parameters()), and the result is a plain torch.fx GraphModule that
passes can rewrite (ExportedProgram.module() refuses train()/eval())."""
from __future__ import annotations

import re
import warnings
from typing import Any

import torch
import torch.fx as fx

from ..errors import TraceError
from .inputs import batched

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    """`text` without terminal colour codes (torch's exporters colour their messages)."""
    return _ANSI.sub("", text)


def clean_message(exc: BaseException, lines: int = 6) -> str:
    """An exception's text without ANSI escape codes, its first `lines` non-empty lines joined."""
    text = strip_ansi(str(exc)).strip()
    kept = [line.strip() for line in text.splitlines() if line.strip()][:lines]
    return f"{type(exc).__name__}: " + " | ".join(kept) if kept else type(exc).__name__


def batch_shapes(inputs: tuple) -> tuple:
    """dynamic_shapes for torch.export: dim 0 of every tensor input whose dim 0 equals the first
    tensor's is one symbolic "batch" dimension; other inputs stay static."""
    tensors = [x for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0]
    if not tensors:
        return tuple(None for _ in inputs)
    size = tensors[0].shape[0]
    batch = torch.export.Dim("batch", min=1)
    return tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == size else None
                 for x in inputs)


def export_program(model: torch.nn.Module, inputs: tuple) -> torch.export.ExportedProgram:
    """torch.export.export with a symbolic batch (traced at batch 2 when the example has 1 sample).
    Raises TraceError naming the cause and what to try next."""
    shapes = batch_shapes(inputs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(model, batched(inputs, 2), dynamic_shapes=shapes, strict=False)
    except Exception as exc:  # noqa: BLE001 - every export failure becomes one TraceError
        cause = clean_message(exc)
        if "batch" in cause and ("specializ" in cause or "Constraints violated" in cause):
            hint = ("the forward fixes the batch size (a reshape to a constant batch, or a branch on it): make "
                    "it read the batch from x.shape[0], or capture with capture='fx'")
        else:
            hint = ("capture='fx' (torch.fx symbolic tracing, with leaf_modules=[...] for untraceable submodules), "
                    "or fix the construct torch.export names (see torch.export's 'Dynamic shapes' and "
                    "'Control flow' docs)")
        raise TraceError(f"torch.export could not capture {type(model).__name__} with a symbolic batch "
                         f"dimension: {cause}. Try {hint}.") from exc


def graph_module_of(program: torch.export.ExportedProgram, training: bool, name: str) -> fx.GraphModule:
    """A plain GraphModule running `program`: get_attr nodes name the original parameters and
    buffers, the pytree calling convention of the model is kept (keyword calls, HF ModelOutput)."""
    unlifted = program.module()
    gm = fx.GraphModule(unlifted, unlifted.graph, name)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(unlifted, attr):
            setattr(gm, attr, getattr(unlifted, attr))
    gm.train(training)
    return gm
