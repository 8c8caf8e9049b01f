"""Every weight-bearing op of a captured graph, as the passes see it: a standard layer they may
convert (with every name the graph calls it under), or a site no pass can convert, with the reason.
Passes take their layers from here and report the rest, so no weight op is silent."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch.fx as fx
from torch import nn

from .symbolic import is_fxshift_module
from .canonical import OPAQUE_KEY, SITE_KEY, SKIP_KEY, bind, site_name, source_of, unsupported_op, weight_op

_NOT_WEIGHTS = (nn.Embedding, nn.EmbeddingBag)


@dataclass
class WeightSite:
    """One weight-bearing layer or op. `module` is set for a standard nn.Conv2d / nn.Linear that
    passes may convert; then `names` lists every path the graph calls it under. Otherwise `reason`
    says why no pass converts it."""

    name: str
    module: Optional[nn.Module] = None
    names: list[str] = field(default_factory=list)
    calls: int = 0
    reason: Optional[str] = None


def is_standard_layer(module: nn.Module) -> bool:
    """An nn.Conv2d or nn.Linear whose forward is torch's own (subclasses that only add attributes
    qualify; those with their own forward do not: replacing them would drop that forward)."""
    if isinstance(module, nn.Conv2d):
        return type(module).forward is nn.Conv2d.forward and type(module)._conv_forward is nn.Conv2d._conv_forward
    if isinstance(module, nn.Linear):
        return type(module).forward is nn.Linear.forward
    return False


def _leaf_reason(target: str, module: nn.Module) -> str:
    kind = "Conv2d" if isinstance(module, nn.Conv2d) else "Linear" if isinstance(module, nn.Linear) else None
    if kind:
        return (f"{type(module).__name__} is an nn.{kind} subclass with its own forward, kept as a leaf: converting it "
                f"would drop that forward (leave it out of leaf_modules so that capture rewrites it into a pad/"
                f"standard {kind})")
    return f"inside leaf module {target!r} ({type(module).__name__}), whose forward fxshift does not rewrite"


def _leaf_weights(target: str, module: nn.Module) -> list[str]:
    """Parameter names of a leaf module that act as weights (matrices and kernels, embeddings excluded)."""
    out = []
    for owner_name, owner in module.named_modules():
        if isinstance(owner, _NOT_WEIGHTS) or is_fxshift_module(owner):
            continue
        for pname, p in owner.named_parameters(recurse=False):
            if p.dim() >= 2:
                path = ".".join(x for x in (target, owner_name, pname) if x)
                out.append(path)
    return out


def weight_sites(gm: fx.GraphModule, inside_fxshift: bool = False) -> list[WeightSite]:
    """The weight sites of `gm` in graph order (layers inside modules fxshift inserted, e.g. the
    convs of a TuckerConv2d, only when `inside_fxshift`)."""
    layers: dict[int, WeightSite] = {}
    sites: dict[str, WeightSite] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if is_fxshift_module(module):
                if inside_fxshift:
                    for sub, inner in module.named_modules():
                        if sub and is_standard_layer(inner):
                            name = f"{node.target}.{sub}"
                            sites.setdefault(name, WeightSite(name, inner, [name], 1))
                continue
            if is_standard_layer(module):
                site = layers.get(id(module))
                if site is None:
                    site = layers[id(module)] = sites.setdefault(node.target, WeightSite(node.target, module))
                if node.target not in site.names:
                    site.names.append(node.target)
                site.calls += 1
                continue
            for path in _leaf_weights(node.target, module):
                name = site_name(path)
                sites.setdefault(name, WeightSite(name, reason=_leaf_reason(node.target, module)))
        elif OPAQUE_KEY in node.meta:
            for name, reason in node.meta[OPAQUE_KEY].items():
                sites.setdefault(name, WeightSite(name, reason=reason))
        elif SKIP_KEY in node.meta and SITE_KEY in node.meta:
            name = node.meta[SITE_KEY]
            sites.setdefault(name, WeightSite(name, reason=node.meta[SKIP_KEY]))
        elif weight_op(node) is not None or unsupported_op(node) is not None:
            _unmarked(gm, node, sites)
    return list(sites.values())


def _unmarked(gm: fx.GraphModule, node: fx.Node, sites: dict[str, WeightSite]) -> None:
    """A weight op canonicalize did not see (added by a pass): reported when its weight is a parameter."""
    op = weight_op(node)
    weight = bind(node, op[1]).get("weight") if op else (node.args[1] if len(node.args) > 1 else None)
    src = source_of(gm, weight)
    if src.params and not src.from_inputs:
        name = site_name(src.params[0])
        sites.setdefault(name, WeightSite(name, reason="weight op without a layer"))
