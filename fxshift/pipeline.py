"""apply(pipeline, model): trace once, run passes in order, return a GraphModule with its report."""
from __future__ import annotations

import copy
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .capture.inputs import positional_inputs
from .context import capture_info, copy_report, has_report, set_example_inputs, set_report
from .errors import FxshiftError
from .report import Report
from .trace import LeafSpec, trace

Pass = Union[PassBase, Callable[[fx.GraphModule], Any]]

def pass_name(p: Pass) -> str:
    """A pass's class name, or a function's own name."""
    return getattr(p, "__name__", None) or type(p).__name__


def apply(pipeline: Union[Pass, Sequence[Pass]], model: Any, example_inputs: Any = None, *,
          leaf_modules: LeafSpec = None, concrete_args: Optional[dict[str, Any]] = None,
          capture: str = "auto") -> fx.GraphModule:
    """Run a pipeline of passes on a copy of `model` and return the rewritten GraphModule.

    Args:
        pipeline: a pass or a list of passes. A pass is a torch.fx PassBase (returning PassResult)
            or any callable taking a GraphModule and returning a GraphModule (or None when it
            changes the module in place).
        model: the nn.Module, a torch.export ExportedProgram or a GraphModule (one from an earlier
            apply() continues its report). It is copied once and never changed.
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs
            ({"input_ids": ids}). When given, the report carries MACs, and torch.export can capture.
        leaf_modules: module types or qualified names that torch.fx keeps opaque (their weights are
            reported, not converted).
        concrete_args: forward arguments to pin while tracing (see torch.fx.symbolic_trace).
        capture: "auto" (torch.fx, then torch.export with a symbolic batch), "fx" or "export";
            `fxshift.capture_info(gm)["method"]` and the report say which one ran.

    Returns:
        A torch.fx.GraphModule; `fxshift.report(gm)` lists what each pass did.

    Example:
        >>> gm = fxshift.apply([TuckerDecomposePass(rank=0.5)], model, torch.randn(1, 3, 224, 224))
        >>> print(fxshift.report(gm))
    """
    passes = list(pipeline) if isinstance(pipeline, (list, tuple)) else [pipeline]
    if isinstance(model, fx.GraphModule) and has_report(model):
        inputs = positional_inputs(model, example_inputs)
        gm = copy.deepcopy(model)
        copy_report(model, gm)
    else:
        gm = trace(copy.deepcopy(model), example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args,
                   capture=capture)
        inputs = positional_inputs(model if isinstance(model, torch.nn.Module) else gm, example_inputs)
        report = Report()
        report.capture = capture_info(gm).get("method")
        set_report(gm, report)
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
