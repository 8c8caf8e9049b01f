"""Example inputs as users give them (a tensor, a tuple, or keywords such as ``{"input_ids": ids}``),
bound to the forward's positional parameters so that the captured GraphModule is called the same
way as the model (``gm(ids)`` or ``gm(input_ids=ids)``)."""
from __future__ import annotations

import inspect
from typing import Any, Optional

import torch

from ..errors import TraceError


def positional_inputs(model: torch.nn.Module, example_inputs: Any) -> Optional[tuple]:
    """`example_inputs` as a positional tuple: a tensor becomes (tensor,), a list a tuple, and a dict
    of keyword inputs is bound to the forward's parameters in order, with the parameters' defaults
    filling the gaps (``{"input_ids": ids, "token_type_ids": t}`` → ``(ids, None, t)`` for a
    forward ``(input_ids, attention_mask=None, token_type_ids=None, ...)``)."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, dict):
        return _bind_keywords(model, example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return (example_inputs,)


def _bind_keywords(model: torch.nn.Module, kwargs: dict[str, Any]) -> tuple:
    forward = model.forward
    params = [p for p in inspect.signature(forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in params]
    unknown = [k for k in kwargs if k not in names]
    if unknown:
        raise TraceError(f"example inputs {unknown} are not positional parameters of {type(model).__name__}.forward "
                         f"({', '.join(names)}); give the inputs as a tuple in the forward's order")
    last = max(names.index(k) for k in kwargs) if kwargs else -1
    out = []
    for p in params[:last + 1]:
        if p.name in kwargs:
            out.append(kwargs[p.name])
        elif p.default is not p.empty:
            out.append(p.default)
        else:
            raise TraceError(f"{type(model).__name__}.forward needs {p.name!r} before "
                             f"{names[last]!r}: add it to the example inputs")
    return tuple(out)


def batched(inputs: tuple, size: int) -> tuple:
    """The inputs with every tensor's dim 0 expanded from 1 to `size` (other values unchanged):
    torch.export treats a dimension of size 1 as a constant, so a symbolic batch is traced at 2."""
    return tuple(x.expand(size, *x.shape[1:]).contiguous() if isinstance(x, torch.Tensor) and x.dim() > 0
                 and x.shape[0] == 1 else x for x in inputs)
