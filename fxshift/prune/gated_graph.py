"""The graph side of DynamicPrunePass, shared with fxshift.load: matching a conv with its BatchNorm
and activation, fusing them into one GatedConv2d, rewiring the graph so compact outputs flow into
the next unit (scattered back to the full channel layout only where a consumer needs it), and the
recipe entries that rebuild the units on a fresh model without recomputing anything.
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import RecipeError
from ..graph import replace_module
from ..nn.gated import ACTIVATIONS, GatedConv2d, gated_units, scatter_channels

#: Modules and functions that act on each channel alone and map zero to zero: they run on compact tensors.
#: (Adaptive pooling is left out: torch.export cannot trace it on a data-dependent channel count.)
CHANNELWISE_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, nn.Dropout2d, nn.Identity, nn.ReLU, nn.ReLU6,
                       nn.SiLU, nn.Hardswish, nn.GELU, nn.Tanh)
CHANNELWISE_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.relu, torch.relu, F.relu6, F.dropout, F.silu, F.hardswish,
                         F.gelu, torch.tanh}

#: Activation functions that fuse into a unit (module activations: fxshift.nn.gated.ACTIVATIONS).
ACTIVATION_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.silu: "silu",
                        F.hardswish: "hardswish"}


def output_size(conv: nn.Conv2d, shape: tuple[int, ...]) -> tuple[int, int]:
    """(height, width) of `conv`'s output for an input of `shape`."""
    out = []
    for i in range(2):
        k, s, p, d = conv.kernel_size[i], conv.stride[i], conv.padding[i], conv.dilation[i]
        out.append((shape[2 + i] + 2 * p - d * (k - 1) - 1) // s + 1)
    return out[0], out[1]


def _activation_of(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    """The activation name of `node` when it is one a unit can absorb (applied to its first argument alone)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        for name, factory in ACTIVATIONS.items():
            if type(module) is factory and (name != "gelu" or module.approximate == "none"):
                return name if len(node.args) == 1 and not node.kwargs else None
        return None
    if node.op == "call_function" and node.target in ACTIVATION_FUNCTIONS:
        extra = set(node.kwargs) - {"inplace"}
        return ACTIVATION_FUNCTIONS[node.target] if len(node.args) == 1 and not extra else None
    return None


def match_unit(gm: fx.GraphModule, conv_node: fx.Node) -> dict[str, Any]:
    """The conv's unit: {"layer", "bn" (module name or None), "act" (activation name or "none")}."""
    plan: dict[str, Any] = {"layer": conv_node.target, "bn": None, "act": "none"}
    tail = conv_node
    users = list(tail.users)
    if len(users) == 1 and users[0].op == "call_module" and users[0].args == (tail,) and not users[0].kwargs:
        bn = gm.get_submodule(users[0].target)
        if type(bn) is nn.BatchNorm2d and bn.track_running_stats and \
                sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == users[0].target) == 1:
            plan["bn"], tail = users[0].target, users[0]
    users = list(tail.users)
    if len(users) == 1 and users[0].args and users[0].args[0] is tail:
        act = _activation_of(gm, users[0])
        if act is not None:
            plan["act"] = act
    return plan


def fuse_unit(gm: fx.GraphModule, plan: dict[str, Any], options: dict[str, Any]) -> GatedConv2d:
    """Replace conv (+ bn + act) nodes of `plan` by one call of a new GatedConv2d under the conv's name."""
    conv_node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == plan["layer"])
    conv = gm.get_submodule(plan["layer"])
    tail, bn = conv_node, None
    if plan["bn"]:
        bn_node = next(iter(tail.users))
        if bn_node.op != "call_module" or bn_node.target != plan["bn"]:
            raise RecipeError(f"layer {plan['layer']!r}: expected BatchNorm {plan['bn']!r} after it")
        bn, tail = gm.get_submodule(plan["bn"]), bn_node
    act = None
    if plan["act"] != "none":
        act_node = next(iter(tail.users))
        if _activation_of(gm, act_node) != plan["act"]:
            raise RecipeError(f"layer {plan['layer']!r}: expected activation {plan['act']!r} after it")
        act, tail = ACTIVATIONS[plan["act"]](), act_node
    unit = GatedConv2d(conv, bn, act, **options)
    unit.bn_layer = plan["bn"]
    if tail is not conv_node:
        tail.replace_all_uses_with(conv_node)
        node = tail
        while node is not conv_node:
            previous = node.args[0]
            gm.graph.erase_node(node)
            node = previous
    replace_module(gm, plan["layer"], unit)
    return unit


def _channelwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if getattr(module, "return_indices", False):
            return False
        return type(module) in CHANNELWISE_MODULES
    if node.op == "call_function" and node.target in CHANNELWISE_FUNCTIONS:
        return not node.kwargs.get("return_indices", False)
    return False


def rewire(gm: fx.GraphModule) -> None:
    """Rebuild the graph so that gated units pass compact (tensor, indices) pairs along channel-wise paths.

    Every call ``unit(x)`` becomes ``unit(x_compact, x_idx)`` (``x_idx`` None when x is not a unit's
    compact output); consumers that need the full layout read ``scatter_channels(y, idx, C)``.
    Sets each unit's ``source`` to the unit whose compact output it reads.
    """
    old = gm.graph
    graph = fx.Graph(owning_module=gm)
    env: dict[fx.Node, fx.Node] = {}
    compact: dict[fx.Node, tuple[fx.Node, fx.Node, int, str]] = {}

    def full(node: fx.Node) -> fx.Node:
        if node not in env:
            values, idx, channels, _ = compact[node]
            env[node] = graph.call_function(scatter_channels, (values, idx, channels))
        return env[node]

    for node in old.nodes:
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, GatedConv2d):
            x = node.args[0]
            if x in compact:
                values, idx, _, module.source = compact[x]
            else:
                values, idx, module.source = full(x), None, None
            pair = graph.call_module(node.target, (values, idx))
            compact[node] = (graph.call_function(operator.getitem, (pair, 0)),
                             graph.call_function(operator.getitem, (pair, 1)), module.out_channels, node.target)
            continue
        first = node.args[0] if node.args else None
        others = list(node.args[1:]) + list(node.kwargs.values())
        if isinstance(first, fx.Node) and first in compact and _channelwise(gm, node) and \
                not any(isinstance(a, fx.Node) and a in compact for a in fx.node.map_aggregate(others, lambda a: a)):
            values, idx, channels, source = compact[first]
            new = graph.node_copy(node, lambda a: values if a is first else full(a))
            compact[node] = (new, idx, channels, source)
            continue
        env[node] = graph.node_copy(node, full)
    gm.graph = graph
    gm.delete_all_unused_submodules()
    gm.recompile()


def rebuild_units(gm: fx.GraphModule, entries: list[dict[str, Any]]) -> None:
    """Recreate saved gated units on a freshly traced model (fxshift.load): same fusions, no computation."""
    for entry in entries:
        name = entry.get("layer")
        nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == name]
        if len(nodes) != 1 or type(gm.get_submodule(name)) is not nn.Conv2d:
            raise RecipeError(f"recipe gates layer {name!r}, which is not a Conv2d called once in this model; load "
                              "the checkpoint into the architecture it was saved from")
        plan = match_unit(gm, nodes[0])
        if plan["bn"] != entry.get("bn_layer") or plan["act"] != entry.get("act"):
            raise RecipeError(f"recipe entry for {name!r} fuses bn={entry.get('bn_layer')!r}, act={entry.get('act')!r}"
                              f" but the model has bn={plan['bn']!r}, act={plan['act']!r} after it")
        options = {k: entry[k] for k in ("target", "threshold", "ratio", "decoupled", "gating", "train_mask")
                   if k in entry}
        fuse_unit(gm, plan, options)
    if entries:
        rewire(gm)


def unit_recipe(gm: torch.nn.Module) -> list[dict[str, Any]]:
    """The recipe entries of `gm`'s gated units (what rebuild_units needs)."""
    return [{"layer": name, "bn_layer": unit.bn_layer, **unit.spec()} for name, unit in gated_units(gm)]
