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


#: attribute reads of a tensor that do not depend on its channel count (timm's ``x.ndim == 4`` checks).
SHAPE_FREE_ATTRIBUTES = ("ndim", "dtype", "device")


def _attribute_read(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is getattr and len(node.args) == 2 and \
        node.args[1] in SHAPE_FREE_ATTRIBUTES


def _value_users(node: fx.Node) -> list[fx.Node]:
    """The users of `node` that read its values (not only its ndim / dtype / device)."""
    return [u for u in node.users if not _attribute_read(u)]


def _sole_user(node: fx.Node) -> Optional[fx.Node]:
    """The one node reading `node`'s values as its only argument, or None."""
    users = _value_users(node)
    if len(users) == 1 and users[0].args and users[0].args[0] is node:
        return users[0]
    return None


_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


def _functional_batchnorm(gm: fx.GraphModule, node: fx.Node
                          ) -> Optional[tuple[str, list[fx.Node], nn.BatchNorm2d]]:
    """(module name, its get_attr nodes, the BatchNorm2d) when `node` is F.batch_norm over one module's
    own tensors: what tracing through a norm + activation module such as timm's BatchNormAct2d leaves
    in the graph. The GraphModule keeps only those tensors in a plain Module, so the BatchNorm2d is
    rebuilt from them and the call's eps and momentum."""
    if node.op != "call_function" or node.target is not F.batch_norm:
        return None
    args = dict(zip(_BN_ARGS, node.args))
    args.update(node.kwargs)
    attrs, owner = [], None
    for key in ("running_mean", "running_var", "weight", "bias"):
        value = args.get(key)
        if value is None and key in ("weight", "bias"):
            continue
        if not isinstance(value, fx.Node) or value.op != "get_attr" or len(value.users) != 1:
            return None
        prefix, _, attr = value.target.rpartition(".")
        if attr != key or (owner is not None and prefix != owner):
            return None
        owner = prefix
        attrs.append(value)
    if owner is None:
        return None
    if not owner or any(n.op == "get_attr" and n.target.startswith(owner + ".") and n not in attrs
                        for n in gm.graph.nodes):
        return None          # the norm's tensors are read elsewhere too
    module = gm.get_submodule(owner)
    if isinstance(module, nn.BatchNorm2d):
        return (owner, attrs, module) if module.track_running_stats else None
    mean, var = getattr(module, "running_mean", None), getattr(module, "running_var", None)
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    eps, momentum = args.get("eps", 1e-5), args.get("momentum", 0.1)
    if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor) or mean.ndim != 1 or \
            var.shape != mean.shape or not isinstance(eps, float) or (weight is None) != (bias is None) or \
            not (momentum is None or isinstance(momentum, float)):
        return None
    bn = nn.BatchNorm2d(mean.numel(), eps=eps, momentum=momentum, affine=weight is not None,
                        device=mean.device, dtype=mean.dtype)
    with torch.no_grad():
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        if weight is not None:
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
    return owner, attrs, bn.train(gm.training)


def _chain(gm: fx.GraphModule, conv_node: fx.Node
           ) -> tuple[dict[str, Any], list[fx.Node], list[fx.Node], Optional[nn.BatchNorm2d]]:
    """The unit of `conv_node`: (plan, the nodes after the conv it absorbs in order, get_attr nodes to
    drop, the BatchNorm2d).

    After the conv: a BatchNorm2d (a module, or F.batch_norm over a BatchNorm2d's tensors), then,
    through nn.Identity modules (timm's drop / drop_block), an activation the unit can apply."""
    plan: dict[str, Any] = {"layer": conv_node.target, "bn": None, "act": "none"}
    chain: list[fx.Node] = []
    attrs: list[fx.Node] = []
    norm: Optional[nn.BatchNorm2d] = None
    tail = conv_node
    user = _sole_user(tail)
    if user is not None and user.op == "call_module" and len(user.args) == 1 and not user.kwargs:
        bn = gm.get_submodule(user.target)
        if isinstance(bn, nn.BatchNorm2d) and type(bn).forward is nn.BatchNorm2d.forward and \
                bn.track_running_stats and \
                sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == user.target) == 1:
            plan["bn"], tail, norm = user.target, user, bn
            chain.append(user)
    elif user is not None:
        functional = _functional_batchnorm(gm, user)
        if functional is not None:
            plan["bn"], attrs, norm = functional
            tail = user
            chain.append(user)
    look, skipped = tail, []
    while True:
        user = _sole_user(look)
        if user is None:
            break
        if user.op == "call_module" and type(gm.get_submodule(user.target)) is nn.Identity and len(user.args) == 1 \
                and not user.kwargs:
            skipped.append(user)
            look = user
            continue
        act = _activation_of(gm, user)
        if act is not None:
            plan["act"] = act
            chain += skipped + [user]
        break
    return plan, chain, attrs, norm


def match_unit(gm: fx.GraphModule, conv_node: fx.Node) -> dict[str, Any]:
    """The conv's unit: {"layer", "bn" (module name or None), "act" (activation name or "none")}."""
    return _chain(gm, conv_node)[0]


def fuse_unit(gm: fx.GraphModule, plan: dict[str, Any], options: dict[str, Any]) -> GatedConv2d:
    """Replace conv (+ bn + act) nodes of `plan` by one call of a new GatedConv2d under the conv's name."""
    conv_node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == plan["layer"])
    conv = gm.get_submodule(plan["layer"])
    found, chain, attrs, bn = _chain(gm, conv_node)
    if (found["bn"], found["act"]) != (plan["bn"], plan["act"]):
        raise RecipeError(f"layer {plan['layer']!r}: expected BatchNorm {plan['bn']!r} and activation "
                          f"{plan['act']!r} after it, found {found['bn']!r} and {found['act']!r}")
    act = ACTIVATIONS[plan["act"]]() if plan["act"] != "none" else None
    unit = GatedConv2d(conv, bn, act, **options).train(conv.training)   # the mode of the layers it replaces
    unit.bn_layer = plan["bn"]
    if chain:
        chain[-1].replace_all_uses_with(conv_node)
        for node in reversed(chain):
            gm.graph.erase_node(node)
        for node in attrs:
            gm.graph.erase_node(node)
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
        if _attribute_read(node) and first in compact:     # x.ndim of a compact tensor: no scatter needed
            values = compact[first][0]
            env[node] = graph.node_copy(node, lambda a: values if a is first else full(a))
            continue
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
        options = {k: entry[k] for k in ("target", "threshold", "ratio", "decoupled", "gating", "train_mask",
                                         "channel_multiple")
                   if k in entry}
        fuse_unit(gm, plan, options)
    if entries:
        rewire(gm)


def unit_recipe(gm: torch.nn.Module) -> list[dict[str, Any]]:
    """The recipe entries of `gm`'s gated units (what rebuild_units needs)."""
    return [{"layer": name, "bn_layer": unit.bn_layer, **unit.spec()} for name, unit in gated_units(gm)]
