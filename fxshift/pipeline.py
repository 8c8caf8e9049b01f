"""apply(pipeline, model): trace once, run passes in order, return a GraphModule with its report."""
from __future__ import annotations

import copy
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .context import as_inputs, copy_report, has_report, set_example_inputs, set_report
from .errors import FxshiftError
from .report import Report
from .trace import LeafSpec, trace

Pass = Union[PassBase, Callable[[fx.GraphModule], Any]]

def pass_name(p: Pass) -> str:
    """A pass's class name, or a function's own name."""
    return getattr(p, "__name__", None) or type(p).__name__


def apply(pipeline: Union[Pass, Sequence[Pass]], model: torch.nn.Module, example_inputs: Any = None, *,
          leaf_modules: LeafSpec = None, concrete_args: Optional[dict[str, Any]] = None) -> fx.GraphModule:
    """Run a pipeline of passes on a copy of `model` and return the rewritten GraphModule.

    Args:
        pipeline: a pass or a list of passes. A pass is a torch.fx PassBase (returning PassResult)
            or any callable taking a GraphModule and returning a GraphModule (or None when it
            changes the module in place).
        model: the nn.Module (or a GraphModule from an earlier apply(), whose report continues).
            It is copied once and never changed.
        example_inputs: a tensor or tuple of tensors. When given, tracing sees concrete shapes and
            the report carries MACs.
        leaf_modules: module types or qualified names that tracing keeps opaque.
        concrete_args: forward arguments to pin while tracing (see torch.fx.symbolic_trace).

    Returns:
        A torch.fx.GraphModule; `fxshift.report(gm)` lists what each pass did.

    Example:
        >>> gm = fxshift.apply([TuckerDecomposePass(rank=0.5)], model, torch.randn(1, 3, 224, 224))
        >>> print(fxshift.report(gm))
    """
    passes = list(pipeline) if isinstance(pipeline, (list, tuple)) else [pipeline]
    inputs = as_inputs(example_inputs)
    if isinstance(model, fx.GraphModule) and has_report(model):
        gm = copy.deepcopy(model)
        copy_report(model, gm)
    else:
        gm = trace(copy.deepcopy(model), inputs, leaf_modules=leaf_modules, concrete_args=concrete_args)
        set_report(gm, Report())
    if inputs is not None:
        set_example_inputs(gm, inputs)
    for p in passes:
        gm = run_pass(p, gm)
    return gm


def run_pass(p: Pass, gm: fx.GraphModule) -> fx.GraphModule:
    """Run one pass, accept any of the result forms, and check and recompile the graph after it."""
    if not callable(p):
        raise FxshiftError(f"pipeline entry {p!r} is not a pass: give a PassBase or a callable GraphModule -> GraphModule")
    meta = dict(gm.meta)
    try:
        result = p(gm)
    except FxshiftError:
        raise
    except Exception as exc:
        raise FxshiftError(f"pass {pass_name(p)} failed: {type(exc).__name__}: {exc}") from exc
    if isinstance(result, PassResult):
        result = result.graph_module
    if result is None:
        result = gm
    if not isinstance(result, fx.GraphModule):
        raise FxshiftError(f"pass {pass_name(p)} returned {type(result).__name__}; a pass must return a GraphModule, "
                           "a PassResult or None")
    for key, value in meta.items():  # a pass that builds a new GraphModule keeps the report and inputs
        result.meta.setdefault(key, value)
    result.graph.lint()
    result.recompile()
    return result
