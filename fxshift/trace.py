"""Tracing with fxshift's leaf modules, concrete shapes when example inputs are given, and
errors that name the submodule and the construct that could not be traced."""
from __future__ import annotations

import inspect
import warnings
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.fx as fx
from torch.fx.experimental.meta_tracer import MetaTracer

from .errors import TraceError

LeafSpec = Optional[Iterable[Any]]


def is_fxshift_module(module: torch.nn.Module) -> bool:
    """Modules that fxshift passes insert (all defined in fxshift.nn) stay opaque: passes and
    save/load treat them as units. fxshift's reference models (fxshift.models) are traced through
    like any user model."""
    return type(module).__module__.startswith("fxshift.nn.")


def _split_leaves(leaf_modules: LeafSpec) -> tuple[tuple[type, ...], frozenset[str]]:
    types, names = [], []
    for leaf in leaf_modules or ():
        if isinstance(leaf, type) and issubclass(leaf, torch.nn.Module):
            types.append(leaf)
        elif isinstance(leaf, str):
            names.append(leaf)
        else:
            raise TypeError(f"leaf_modules entries must be nn.Module types or qualified names, got {leaf!r}")
    return tuple(types), frozenset(names)


class _LeafAware:
    """Mixin: fxshift and user leaves, and a record of the innermost submodule being traced."""

    def _setup_leaves(self, leaf_modules: LeafSpec) -> None:
        self.leaf_types, self.leaf_names = _split_leaves(leaf_modules)
        self.failed_in: Optional[str] = None

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        if is_fxshift_module(m) or isinstance(m, self.leaf_types) or module_qualified_name in self.leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module sees the error first
                self.failed_in = self.path_of_module(m) or type(m).__name__
            raise


class FxshiftTracer(_LeafAware, fx.Tracer):
    def __init__(self, leaf_modules: LeafSpec = None):
        super().__init__()
        self._setup_leaves(leaf_modules)


class FxshiftMetaTracer(_LeafAware, MetaTracer):
    def __init__(self, leaf_modules: LeafSpec = None):
        super().__init__()
        self._setup_leaves(leaf_modules)


def _construct(exc: BaseException) -> str:
    text = str(exc)
    if "control flow" in text:
        return "data-dependent control flow (an if/while/assert on a tensor value or shape)"
    if "cannot be iterated" in text:
        return "iteration over a traced tensor (a for loop or unpacking of a tensor)"
    if "len(" in text or "__len__" in text:
        return "len() of a traced tensor"
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _meta_args(model: torch.nn.Module, example_inputs: Sequence[Any]) -> dict[str, Any]:
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(example_inputs) > len(params):
        raise TraceError(f"{type(model).__name__}.forward takes {len(params)} positional inputs, "
                         f"but {len(example_inputs)} example inputs were given")
    return {p.name: (x.to("meta") if isinstance(x, torch.Tensor) else x) for p, x in zip(params, example_inputs)}


def _keep_unused_state(model: torch.nn.Module, gm: fx.GraphModule) -> None:
    """Carry submodules, parameters and buffers the traced forward does not use (for example
    GoogLeNet's auxiliary heads in eval mode) so that the state_dict keeps every key."""
    have = set(gm.state_dict().keys())
    for key in model.state_dict().keys():
        if key in have:
            continue
        owner_path, _, attr = key.rpartition(".")
        owner = model.get_submodule(owner_path)
        try:
            target = gm.get_submodule(owner_path)
        except AttributeError:
            gm.add_submodule(owner_path, owner)
            have.update(f"{owner_path}.{k}" for k in owner.state_dict().keys())
            continue
        value = getattr(owner, attr)
        if isinstance(value, torch.nn.Parameter):
            target.register_parameter(attr, value)
        else:
            target.register_buffer(attr, value, persistent=True)
        have.add(key)


def trace(model: torch.nn.Module, example_inputs: Optional[Sequence[Any]] = None, *, leaf_modules: LeafSpec = None,
          concrete_args: Optional[dict[str, Any]] = None) -> fx.GraphModule:
    """Trace `model` into a GraphModule whose submodules keep their qualified names.

    Plain symbolic tracing is tried first; when it fails and `example_inputs` are given, tracing
    is retried with concrete (meta) shapes, so forwards that read `x.shape` trace too. The model
    itself is not copied: GraphModule shares its submodules (apply() passes a copy).
    """
    tracer = FxshiftTracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as plain_error:
        if example_inputs is None:
            raise _trace_error(model, tracer, plain_error, tried_shapes=False) from plain_error
        tracer = FxshiftMetaTracer(leaf_modules)
        try:
            with warnings.catch_warnings():  # leaves with real weights get no meta values; harmless here
                warnings.filterwarnings("ignore", message="Could not compute metadata")
                graph = tracer.trace(model, meta_args=_meta_args(model, example_inputs), concrete_args=concrete_args)
        except TraceError:
            raise
        except Exception as meta_error:
            raise _trace_error(model, tracer, meta_error, tried_shapes=True) from meta_error
    name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    _keep_unused_state(model, gm)
    return gm


def _trace_error(model: torch.nn.Module, tracer: _LeafAware, exc: BaseException, tried_shapes: bool) -> TraceError:
    where = f"submodule {tracer.failed_in!r}" if tracer.failed_in else f"{type(model).__name__}.forward"
    hints = [f"leaf_modules=[{repr(tracer.failed_in) if tracer.failed_in else 'TheModuleType'}] to keep it opaque",
             "concrete_args={...} to pin the value a branch depends on"]
    if not tried_shapes:
        hints.append("example_inputs=(x,) so that shape-dependent code sees concrete shapes")
    return TraceError(f"cannot trace {where}: {_construct(exc)}. Try " + "; or ".join(hints) + ".")
