"""Graph helpers every pass and checkpoint.py share: choosing layers by name pattern or module
type, and swapping a submodule in place."""
from __future__ import annotations

import fnmatch
from typing import Iterable, Iterator, Optional, Union

import torch.fx as fx
from torch import nn

from .errors import ConfigError
from .trace import is_fxshift_module

Selector = Union[None, str, type, Iterable[Union[str, type]]]


def _entries(selector: Selector, option: str) -> tuple[list[str], tuple[type, ...]]:
    if selector is None:
        return [], ()
    items = [selector] if isinstance(selector, (str, type)) else list(selector)
    patterns = [i for i in items if isinstance(i, str)]
    types = tuple(i for i in items if isinstance(i, type))
    bad = [i for i in items if not isinstance(i, (str, type))]
    if bad:
        raise ConfigError(f"{option}: entries must be name patterns (str) or module types, got {bad!r}")
    return patterns, types


class LayerFilter:
    """include/exclude by fnmatch-style name pattern ("layer1.*", "features.0") or module type."""

    def __init__(self, include: Selector = None, exclude: Selector = None):
        self.include_all = include is None
        self.include = _entries(include, "include")
        self.exclude = _entries(exclude, "exclude")

    @staticmethod
    def _matches(name: str, module: nn.Module, entries: tuple[list[str], tuple[type, ...]]) -> bool:
        patterns, types = entries
        return (bool(types) and isinstance(module, types)) or any(fnmatch.fnmatchcase(name, p) for p in patterns)

    def __call__(self, name: str, module: nn.Module) -> bool:
        if self._matches(name, module, self.exclude):
            return False
        return self.include_all or self._matches(name, module, self.include)


def candidate_layers(gm: fx.GraphModule, types: tuple[type, ...], selected: Optional[LayerFilter] = None,
                     inside_fxshift: bool = False) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of the standard layers of `types` the graph calls (fxshift.capture.sites), in
    graph order. Layers inside modules fxshift inserted are included only when `inside_fxshift`."""
    for site in layer_sites(gm, types, selected, inside_fxshift):
        if site.module is not None:
            yield site.name, site.module


def layer_sites(gm: fx.GraphModule, types: tuple[type, ...], selected: Optional[LayerFilter] = None,
                inside_fxshift: bool = False) -> list:
    """Every weight site a pass taking layers of `types` must account for (fxshift.capture.sites
    .WeightSite), those not selected by `selected` left out: convertible layers of `types` keep
    their module; others (other layer types, ops without a layer) carry the reason in `reason`."""
    from .capture.sites import weight_sites

    out = []
    for site in weight_sites(gm, inside_fxshift):
        probe = site.module if site.module is not None else nn.Module()
        if selected is not None and not selected(site.name, probe):
            continue
        if site.module is not None and not isinstance(site.module, types):
            site.reason = f"{type(site.module).__name__} layers are not handled by this pass"
            site.module = None
        out.append(site)
    return out


def replace_layer(gm: fx.GraphModule, site, new: nn.Module) -> None:
    """Put `new` under every name the graph calls the layer of `site` by (one module, all call sites)."""
    for name in site.names or [site.name]:
        replace_module(gm, name, new)


def replace_module(gm: fx.GraphModule, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` is; the graph's call_module nodes keep working."""
    parent_name, _, attr = name.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, attr, new)

