"""The common shape of every module a decomposition inserts, and the recompose-rule registry.

A decomposed layer is an nn.Sequential of plain layers that replaces one Conv2d or Linear under
the original name. It describes its structure as a JSON-able spec (so save/load can rebuild it
without recomputing anything) and knows how to fold itself back into one layer.
"""
from __future__ import annotations

import abc
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..registry import register_into

RecomposeRule = Callable[[nn.Module], nn.Module]

#: module type -> function folding such a module back into the original layer type.
RECOMPOSE_RULES: dict[type, RecomposeRule] = {}

#: spec "method" -> module type, for rebuilding saved structures.
STRUCTURES: dict[str, type] = {}


#: Decorator: `@register_recompose_rule(MyChain)` makes RecomposePass fold MyChain with the function.
register_recompose_rule: Callable[[type], Callable[[RecomposeRule], RecomposeRule]] = register_into(RECOMPOSE_RULES)


def register_structure(module_type: type) -> type:
    """Class decorator: make a module type rebuildable from its spec() by fxshift.load."""
    STRUCTURES[module_type.method] = module_type
    return module_type


class DecomposedLayer(nn.Sequential, metaclass=abc.ABCMeta):
    """Base of decomposed chains. Subclasses set `method` and implement spec/from_spec/recompose."""

    method: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.method:
            register_structure(cls)
            RECOMPOSE_RULES.setdefault(cls, lambda module: module.recompose())

    @abc.abstractmethod
    def spec(self) -> dict[str, Any]:
        """JSON-able structure (method and ranks), enough to rebuild the chain on the original layer."""

    @classmethod
    @abc.abstractmethod
    def from_spec(cls, original: nn.Module, spec: dict[str, Any]) -> "DecomposedLayer":
        """An uninitialised chain with the saved structure, shaped for `original`."""

    @abc.abstractmethod
    def recompose(self) -> nn.Module:
        """One layer of the original type with the product of the chain's weights."""


def conv_like(conv: nn.Conv2d, in_channels: int, out_channels: int, weight: torch.Tensor,
              bias: torch.Tensor | None, **overrides: Any) -> nn.Conv2d:
    """A Conv2d with `conv`'s geometry (or `overrides`) holding the given weight and bias."""
    options = dict(kernel_size=tuple(weight.shape[2:]), stride=conv.stride, padding=conv.padding,
                   dilation=conv.dilation, groups=conv.groups, padding_mode=conv.padding_mode)
    options.update(overrides)
    layer = nn.Conv2d(in_channels, out_channels, bias=bias is not None, device=weight.device, dtype=weight.dtype,
                      **options)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer
