"""Capture a model as the user has it into a canonical GraphModule: torch.fx symbolic tracing or
torch.export (chosen by ``capture="auto" | "fx" | "export"``, recorded on the result), then
canonicalization (fxshift.capture.canonical) so that every weight op is a layer passes know or a
site reported with its reason (fxshift.capture.sites)."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx as fx

from ..context import set_capture_info
from ..errors import ConfigError, TraceError
from .symbolic import LeafSpec, fx_trace, keep_unused_state, split_leaves
from .canonical import canonicalize, opaque_function, opaque_weights
from .export import export_program, graph_module_of
from .inputs import positional_inputs
from .state_names import keep_original_state_names

CAPTURES = ("auto", "fx", "export")


def capture(model: Any, example_inputs: Any = None, *, capture: str = "auto", leaf_modules: LeafSpec = None,
            concrete_args: Optional[dict[str, Any]] = None) -> fx.GraphModule:
    """Capture `model` (an nn.Module, a torch.export ExportedProgram or a GraphModule) and
    canonicalize it. The model is not copied (apply() passes a copy).

    capture="auto" tries torch.fx symbolic tracing, then torch.export (which needs example inputs);
    "fx" and "export" use one. torch.export keeps dim 0 of the inputs symbolic (a batch of any
    size runs) or raises TraceError. `fxshift.capture_info(gm)["method"]` says which one ran.
    """
    if capture not in CAPTURES:
        raise ConfigError(f"capture={capture!r}: give one of {', '.join(map(repr, CAPTURES))}")
    inputs = positional_inputs(model, example_inputs) if isinstance(model, torch.nn.Module) else None
    if isinstance(model, torch.export.ExportedProgram):
        gm, method = graph_module_of(model, training=False, name="ExportedProgram"), "export (given program)"
    elif isinstance(model, fx.GraphModule):
        gm, method = model, "given GraphModule"
    elif not isinstance(model, torch.nn.Module):
        raise TraceError(f"cannot capture a {type(model).__name__}: give an nn.Module, a torch.export "
                         "ExportedProgram or a torch.fx GraphModule")
    elif capture == "export":
        if leaf_modules or concrete_args:
            raise ConfigError("leaf_modules and concrete_args apply to capture='fx' (torch.export traces every module)")
        gm, method = _export(model, inputs), "export"
    else:
        try:
            gm, method = fx_trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args), "fx"
            if capture == "auto" and inputs is not None:
                gm, method = _past_opaque_parts(model, inputs, gm, leaf_modules)
        except TraceError as fx_error:
            if capture == "fx":
                raise
            if inputs is None:
                raise TraceError(f"{fx_error} capture='auto' then tries torch.export, which needs "
                                 "example_inputs=(x,) (or {'name': x}).") from fx_error
            try:
                gm, method = _export(model, inputs), "export"
            except TraceError as export_error:
                raise TraceError(f"capture='auto' tried torch.fx and torch.export; both failed. torch.fx: {fx_error} "
                                 f"torch.export: {export_error}") from export_error
    done = canonicalize(gm)
    if isinstance(model, torch.nn.Module) and not isinstance(model, fx.GraphModule):
        keep_unused_state(model, gm, renamed=done.renamed)
    keep_original_state_names(gm, done.renamed)
    set_capture_info(gm, {"method": method, "layers": done.layers, "skipped": done.skipped,
                          "modules": done.modules})
    return gm


def _past_opaque_parts(model: torch.nn.Module, inputs: tuple, gm: fx.GraphModule,
                       leaf_modules: LeafSpec) -> tuple[fx.GraphModule, str]:
    """When torch.fx kept weights out of sight (a function marked torch.fx.wrap that takes weights,
    or one of torch's attention / transformer modules, which torch.fx keeps as leaves), torch.export
    traces into them: their weight ops become layers passes can convert. If torch.export fails, the
    fx graph stays and those weights are reported as skipped."""
    opaque = [n for n in gm.graph.nodes if opaque_function(n) is not None and opaque_weights(gm, n)]
    if not opaque and not _export_traces_into_a_leaf(gm, leaf_modules):
        return gm, "fx"
    try:
        return _export(model, inputs), "export"
    except TraceError:
        return gm, "fx"


# torch.nn modules torch.fx keeps as leaves although their weights are linear ops torch.export exposes
_ATTENTION_LEAVES = (torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer, torch.nn.TransformerDecoderLayer,
                     torch.nn.TransformerEncoder, torch.nn.TransformerDecoder, torch.nn.Transformer)


def _export_traces_into_a_leaf(gm: fx.GraphModule, leaf_modules: LeafSpec) -> bool:
    """True when the fx graph calls one of _ATTENTION_LEAVES the user did not ask to keep a leaf."""
    kept_types, kept_names = split_leaves(leaf_modules)
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in kept_names:
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, _ATTENTION_LEAVES) and not isinstance(module, kept_types):
            return True
    return False


def _export(model: torch.nn.Module, inputs: Optional[tuple]) -> fx.GraphModule:
    if inputs is None:
        raise TraceError(f"capture='export' needs example inputs to capture {type(model).__name__}: "
                         "give example_inputs=(x,) or {'input_ids': ids}")
    program = export_program(model, inputs)
    return graph_module_of(program, training=model.training, name=type(model).__name__)
