"""Drives calibrated DeepShift-Q conversion (ShiftQuantizePass(calibration=...)) over a traced graph.

The graph runs node by node on all calibration batches twice over: once as the float model (a copy taken
before any change) and once as the model being converted. At each selected Conv2d / Linear the layer's
float inputs and converted-model inputs give the second moments fxshift.quantize.shift_calibration works
from; the layer is then replaced and its (converted) output feeds the layers after it.

Residual adds (residual=True, off by default: on the Fashion-MNIST ResNet of
experiments/shift_calibration.py it changed top-1 agreement by no more than the noise, see
experiments/results/shift_calibration.md): when a layer's output (through a sole eval-mode BatchNorm)
is only added to another branch that is already computed, the layer's target becomes its float output
plus that branch's error (float minus converted, in the layer's units: divided by the BatchNorm's γ/σ),
so the layer also makes up the error the shortcut carries past it; the report's output errors are
then against that target.
"""
from __future__ import annotations

import copy
import operator
from typing import Any, Callable, Iterable, Optional

import torch
import torch.fx as fx
from torch import nn

from ..errors import ConfigError
from ..quantize.calibration_batches import calibration_batches as as_batches
from ..nn.shift import ShiftConv2d, explicit_padding
from ..quantize.shift_calibration import (MAX_MACS, CalibrationResult, StatsAccumulator, adaround_plan,
                                          calibrate_shift_weight, conv_columns, linear_columns)

__all__ = ["calibration_batches", "calibrate_graph"]

RESIDUAL = False  # True: layers feeding a residual add also make up the other branch's error (module doc)


def calibration_batches(calibration: Any) -> list[tuple]:
    """The calibration iterable as a list of argument tuples; ConfigError when empty or not tensors."""
    if isinstance(calibration, torch.Tensor):
        raise ConfigError("calibration: give an iterable of batches (e.g. a list of tensors or a DataLoader "
                          "yielding inputs without labels), not a single tensor; wrap it as [x]")
    return as_batches(calibration, ", or calibration=None for plain DeepShift-Q rounding")


def _columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return linear_columns(x)
    pad = explicit_padding(module.padding, module.kernel_size, module.dilation)
    if module.padding_mode != "zeros":
        x = torch.nn.functional.pad(x, pad, mode=module.padding_mode)
        pad = (0, 0, 0, 0)
    return conv_columns(x, module.kernel_size, module.stride, pad, module.dilation, module.groups)


def _sole_batchnorm(gm: fx.GraphModule, node: fx.Node) -> Optional[tuple[str, nn.Module]]:
    """The eval-mode BatchNorm (with affine and running stats) that is the node's only user, if any."""
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_module":
        return None
    bn = gm.get_submodule(users[0].target)
    if not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) or not bn.affine or bn.running_mean is None:
        return None
    if len(users[0].all_input_nodes) != 1:
        return None
    return users[0].target, bn


def _residual_branch(gm: fx.GraphModule, float_gm: fx.GraphModule, node: fx.Node,
                     computed: dict) -> Optional[tuple[fx.Node, Optional[torch.Tensor]]]:
    """(the other input of the add the layer's output goes to, σ/γ of the BatchNorm between or None) when
    the layer's output (through a sole eval-mode BatchNorm) is only added to a branch already `computed`."""
    out, factor = node, None
    found = _sole_batchnorm(gm, node)
    if found is not None:
        out = next(iter(node.users))
        bn = float_gm.get_submodule(found[0])
        gamma = bn.weight.detach()
        std = torch.sqrt(bn.running_var.detach() + bn.eps)
        factor = torch.where(gamma.abs() > 1e-12, std / torch.where(gamma == 0, torch.ones_like(gamma), gamma),
                             torch.zeros_like(gamma))
    users = list(out.users)
    if len(users) != 1 or users[0].op != "call_function" or users[0].target not in (operator.add, torch.add):
        return None
    add = users[0]
    if add.kwargs or len(add.args) != 2 or not all(isinstance(a, fx.Node) for a in add.args) or add.args[0] is add.args[1]:
        return None
    other = add.args[1] if add.args[0] is out else add.args[0]
    return (other, factor) if other in computed else None


def _offset_columns(offset: torch.Tensor, groups: int) -> torch.Tensor:
    """A layer-output-shaped tensor as (G, O/G, n) columns in the order of conv_columns / linear_columns."""
    if offset.dim() == 4:
        n, o = offset.shape[:2]
        return offset.reshape(n, groups, o // groups, -1).permute(1, 2, 0, 3).reshape(groups, o // groups, -1)
    return offset.reshape(-1, offset.shape[-1]).t().unsqueeze(0)


def _fold_into_bn(bn: nn.Module, scale: torch.Tensor, bias: torch.Tensor) -> bool:
    """BN(scale ⊙ u + bias) = BN'(u) in eval *and* train mode: μ' = (μ − bias)/scale and σ' = σ/scale
    (running_var' = (var + ε)/scale² − ε), γ and β unchanged. A positive scale commutes with batch
    statistics (norm(s·u + b) = norm(u)), so train-mode forwards and their running-stat updates agree with
    the unfolded layer (up to ε/s² in the variance update). Folding γ instead (γ' = γ·s) is right only in eval
    mode. Returns False (nothing changed) when a scale is not positive or a variance would go negative."""
    with torch.no_grad():
        var = (bn.running_var + bn.eps) / (scale * scale) - bn.eps
        if not bool((scale > 0).all()) or not bool(torch.isfinite(var).all()) or bool((var < 0).any()):
            return False
        bn.running_mean.copy_((bn.running_mean - bias) / scale)
        bn.running_var.copy_(var)
    return True


def calibrate_graph(gm: fx.GraphModule, batches: list[tuple], names: set[str],
                    convert: Callable[[str, nn.Module], tuple[nn.Module, Any]], weight_bits: int, iterations: int,
                    progress: bool = True, max_macs: float = MAX_MACS,
                    residual: Optional[bool] = None) -> dict[str, dict[str, Any]]:
    """Convert the call_module layers `names` of `gm` in graph order, calibrated; returns per-layer info.

    `convert(name, module)` builds the plain shift layer and does the bookkeeping (report row); this
    function then writes the calibrated codes, scale and bias into it (or folds the scale into the
    following BatchNorm) and puts it into the graph. `max_macs`: AdaRound's budget per layer
    (fxshift.quantize.shift_calibration.adaround_plan). `residual`: layers feeding a residual add also make
    up the other branch's error (module doc); None: the module's RESIDUAL."""
    from ..graph import replace_module

    residual = RESIDUAL if residual is None else residual
    float_gm = copy.deepcopy(gm)
    training = {n: m.training for n, m in gm.named_modules()}
    gm.eval()
    float_gm.eval()
    nodes = list(gm.graph.nodes)
    targets = [n for n in nodes if n.op == "call_module" and n.target in names]
    last_use = {}
    for i, n in enumerate(nodes):
        for a in n.all_input_nodes:
            last_use[a] = i
    env_f: dict[fx.Node, list] = {}
    env_q: dict[fx.Node, list] = {}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    info: dict[str, dict[str, Any]] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(targets), desc="shift calibration", unit="layer", leave=False)

    def run(node: fx.Node, env: dict, model: fx.GraphModule, i: int) -> Any:
        args = fx.node.map_arg(node.args, lambda a: env[a][i])
        kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a][i])
        if node.op == "call_module":
            return model.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "get_attr":
            obj = model
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return obj
        raise AssertionError(node.op)

    def checked(node: fx.Node, compute: Callable[[], list]) -> list:
        try:
            return compute()
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            shapes = [tuple(t.shape) for t in batches[0]]
            raise ConfigError(f"calibration batches (first: shapes {shapes}) do not fit the model: node "
                              f"{node.name} ({node.op} {node.target}) failed with: {err}; give batches shaped "
                              "like the model's example inputs") from None

    try:
        with torch.no_grad():
            for index, node in enumerate(nodes):
                if node.op == "placeholder":
                    k = placeholders.index(node)
                    for b, batch in enumerate(batches):
                        if k >= len(batch) and node.args == ():
                            raise ConfigError(f"calibration batch {b} has {len(batch)} tensors, the model takes "
                                              f"{len(placeholders)} inputs ({[p.target for p in placeholders]})")
                    vals = [batch[k] if k < len(batch) else node.args[0] for batch in batches]
                    env_f[node], env_q[node] = vals, list(vals)
                elif node.op == "output":
                    break
                elif node.op == "call_module" and node.target in names:
                    module = gm.get_submodule(node.target)
                    x_node = node.args[0]
                    env_f[node] = checked(node, lambda: [run(node, env_f, float_gm, i)
                                                         for i in range(len(batches))])
                    rows, groups = module.weight.shape[0], getattr(module, "groups", 1)
                    total = sum(out.numel() // rows for out in env_f[node])  # output positions = columns
                    keep, batch = adaround_plan(rows, module.weight[0].numel(), groups, total, iterations, max_macs)
                    acc = StatsAccumulator(module.weight.reshape(rows, -1), groups, total, keep)
                    branch = _residual_branch(gm, float_gm, node, env_q) if residual else None
                    layer, _ = convert(node.target, module)
                    for i, (xf, xq) in enumerate(zip(env_f[x_node], env_q[x_node])):
                        offset = None
                        if branch is not None:
                            other, factor = branch
                            diff = env_f[other][i] - env_q[other][i]
                            if factor is not None:
                                diff = diff * (factor.view(1, -1, *([1] * (diff.dim() - 2))))
                            offset = _offset_columns(diff, groups)
                        acc.add(_columns(module, xf), _columns(module, layer._round_input(xq)), offset)
                    res = calibrate_shift_weight(module.weight, module.bias, acc.finish(), weight_bits, iterations,
                                                 batch=batch, channel_shifts=getattr(layer, "channel_shifts", None))
                    folded = _install(gm, node, layer, res)
                    replace_module(gm, node.target, layer)
                    env_q[node] = [layer(*fx.node.map_arg(node.args, lambda a: env_q[a][i]))
                                   for i in range(len(batches))]
                    info[node.target] = {"result": res, "scale_in": folded or "layer"}
                    if bar is not None:
                        bar.update(1)
                else:
                    env_f[node] = checked(node, lambda: [run(node, env_f, float_gm, i)
                                                         for i in range(len(batches))])
                    env_q[node] = [run(node, env_q, gm, i) for i in range(len(batches))]
                for a in node.all_input_nodes:
                    if last_use.get(a) == index:
                        env_f.pop(a, None)
                        env_q.pop(a, None)
    finally:
        if bar is not None:
            bar.close()
        for n, m in gm.named_modules():
            m.train(training.get(n, m.training))
    return info


def _install(gm: fx.GraphModule, node: fx.Node, layer: nn.Module, res: CalibrationResult) -> Optional[str]:
    """Write codes, bias and scale into `layer`; fold the scale into a sole following BatchNorm.

    Returns the BatchNorm's name when folded."""
    with torch.no_grad():
        layer.weight.copy_(res.codes.to(layer.weight.dtype))
        found = _sole_batchnorm(gm, node)
        if found is not None and ((isinstance(layer, ShiftConv2d)) == isinstance(found[1], nn.BatchNorm2d)) \
                and _fold_into_bn(found[1], res.scale, res.bias):
            layer.set_scale(None)
            if layer.bias is not None:
                layer.bias.zero_()
            return found[0]
        layer.set_scale(res.scale)
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros_like(res.bias))
        layer.bias.copy_(res.bias)
        return None
