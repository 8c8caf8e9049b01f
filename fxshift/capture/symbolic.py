"""torch.fx symbolic tracing with fxshift's leaf modules, and errors that name the submodule, the
construct that could not be traced and the remedies (one of the captures fxshift.capture chooses from)."""
from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import torch
import torch.fx as fx

from ..errors import TraceError

LeafSpec = Optional[Iterable[Any]]


def is_fxshift_module(module: torch.nn.Module) -> bool:
    """Modules that fxshift passes insert (all defined in fxshift.nn) stay opaque: passes and
    save/load treat them as units. fxshift's reference models (fxshift.models) are traced through
    like any user model."""
    return type(module).__module__.startswith("fxshift.nn.")


def split_leaves(leaf_modules: LeafSpec) -> tuple[tuple[type, ...], frozenset[str]]:
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
        self.leaf_types, self.leaf_names = split_leaves(leaf_modules)
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


def _construct(exc: BaseException) -> str:
    text = str(exc)
    if "control flow" in text:
        return "data-dependent control flow (an if/while/assert on a tensor value or shape)"
    if "cannot be iterated" in text:
        return "iteration over a traced tensor (a for loop or unpacking of a tensor)"
    if "len(" in text or "__len__" in text:
        return "len() of a traced tensor"
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def keep_unused_state(model: torch.nn.Module, gm: fx.GraphModule, renamed: Optional[dict[str, str]] = None) -> None:
    """Carry submodules, parameters and buffers the traced forward does not use (for example
    GoogLeNet's auxiliary heads in eval mode) so that the state_dict keeps every key (but those
    canonicalization `renamed`: a packed weight now in a layer of its own)."""
    have = set(gm.state_dict().keys()) | set(renamed or ())
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


def fx_trace(model: torch.nn.Module, *, leaf_modules: LeafSpec = None,
             concrete_args: Optional[dict[str, Any]] = None) -> fx.GraphModule:
    """Symbolically trace `model` into a GraphModule whose submodules keep their qualified names.
    The model is not copied: GraphModule shares its submodules. Raises TraceError naming the
    submodule and the construct when tracing fails."""
    tracer = FxshiftTracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as error:
        raise _trace_error(model, tracer, error) from error
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _trace_error(model: torch.nn.Module, tracer: _LeafAware, exc: BaseException) -> TraceError:
    where = f"submodule {tracer.failed_in!r}" if tracer.failed_in else f"{type(model).__name__}.forward"
    hints = ["capture='export' with example_inputs=(x,) (torch.export handles shape-dependent code)",
             f"leaf_modules=[{repr(tracer.failed_in) if tracer.failed_in else 'TheModuleType'}] to keep it opaque "
             "(its weights are then reported, not converted)",
             "concrete_args={...} to pin the value a branch depends on"]
    return TraceError(f"torch.fx symbolic tracing cannot trace {where}: {_construct(exc)}. Try "
                      + "; or ".join(hints) + ".")
