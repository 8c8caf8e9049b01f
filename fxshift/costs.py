"""Parameter and multiply-accumulate counts, measured by running the model once with hooks.

MACs are those of convolutions and linear layers (what decomposition and shift layers change),
per sample: the total for the example batch divided by its size.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .registry import register_into

MacRule = Callable[[nn.Module, torch.Tensor], int]

#: module type -> MACs for one sample given the module's output (looked up along the MRO).
MAC_RULES: dict[type, MacRule] = {}


#: Decorator: `@register_mac_rule(MyModule)` counts MyModule's MACs with the function.
register_mac_rule: Callable[[type], Callable[[MacRule], MacRule]] = register_into(MAC_RULES)


@register_mac_rule(nn.Conv2d)
def _conv_macs(module: nn.Conv2d, output: torch.Tensor) -> int:
    per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
    return output[0].numel() * per_output


@register_mac_rule(nn.Linear)
def _linear_macs(module: nn.Linear, output: torch.Tensor) -> int:
    rows = output.numel() // output.shape[0] if output.ndim > 1 else output.numel()
    return rows * module.in_features


def _rule_for(module: nn.Module) -> MacRule | None:
    for cls in type(module).__mro__:
        if cls in MAC_RULES:
            return MAC_RULES[cls]
    return None


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _as_tuple(inputs: Any) -> tuple:
    return inputs if isinstance(inputs, tuple) else (inputs,)


@contextlib.contextmanager
def _measuring(model: nn.Module):
    """Run `model` in eval mode for a measurement, so BatchNorm statistics and dropout masks are
    left alone, then restore every submodule's own mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _unbatched(module: nn.Module, args: tuple) -> bool:
    """Whether a counted layer was called on one unbatched sample: a convolution on an input without
    the batch dimension ((C, H, W) for Conv2d), a linear layer on a vector."""
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if x is None:
        return False
    kernel_size = getattr(module, "kernel_size", None)
    spatial_dims = len(kernel_size) if isinstance(kernel_size, tuple) else 0
    return x.ndim == spatial_dims + 1


@torch.no_grad()
def macs(model: nn.Module, example_inputs: Any) -> int:
    """MACs per sample of one forward pass on `example_inputs` (batch = first input's size 0, or 1
    when the first counted layer sees an unbatched input, e.g. a (C, H, W) image)."""
    inputs = _as_tuple(example_inputs)
    total = 0
    first_unbatched: bool | None = None

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        nonlocal total, first_unbatched
        rule = _rule_for(module)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            output = output[0]  # gated units return (values, channel indices)
        if rule is not None and isinstance(output, torch.Tensor):
            if first_unbatched is None:
                first_unbatched = _unbatched(module, args)
            total += rule(module, output) * output.shape[0] if output.ndim > 1 else rule(module, output)

    handles = [m.register_forward_hook(hook) for m in model.modules() if _rule_for(m) is not None]
    try:
        with _measuring(model):
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    batched = inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].ndim > 1 and not first_unbatched
    batch = inputs[0].shape[0] if batched else 1
    return total // max(batch, 1)


@torch.no_grad()
def layer_macs(module: nn.Module, input_shape: Sequence[int]) -> int:
    """MACs per sample of a single layer for an input of `input_shape` (run on one zero sample)."""
    param = next(module.parameters(), None)
    device, dtype = (param.device, param.dtype) if param is not None else ("cpu", torch.float32)
    x = torch.zeros((1, *input_shape[1:]), device=device, dtype=dtype)
    return macs(module, (x,))


@torch.no_grad()
def input_shapes(model: nn.Module, example_inputs: Any) -> dict[str, tuple[int, ...]]:
    """Shape of the first tensor input of every submodule, by qualified name, from one forward pass.

    The pass runs on a meta-device copy of the model and inputs (shapes only, no arithmetic: a
    ResNet-50 at 224×224 in milliseconds instead of a second or more), and on the real ones when
    that fails (data-dependent code, ops without meta kernels)."""
    inputs = _as_tuple(example_inputs)
    shapes = _meta_input_shapes(model, inputs)
    return shapes if shapes is not None else _recorded_input_shapes(model, inputs)


def _meta_input_shapes(model: nn.Module, inputs: tuple) -> dict[str, tuple[int, ...]] | None:
    """input_shapes on a meta-device copy, or None when the inputs are not all tensors or the
    forward fails there (then the real forward decides, and raises what the user must see)."""
    if not all(isinstance(x, torch.Tensor) for x in inputs):
        return None
    try:
        return _recorded_input_shapes(meta_copy(model), tuple(x.to("meta") for x in inputs))
    except Exception:  # noqa: BLE001 - any failure on meta falls back to the real forward
        return None


def _recorded_input_shapes(model: nn.Module, inputs: tuple) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}

    def recorder(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            if name not in shapes and args and isinstance(args[0], torch.Tensor):
                shapes[name] = tuple(args[0].shape)

        return hook

    handles = [m.register_forward_pre_hook(recorder(n)) for n, m in model.named_modules() if n]
    try:
        with _measuring(model):
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return shapes


def state_bytes(model: nn.Module) -> int:
    """Bytes of everything the model's state_dict holds (weights, packed codes, norm statistics):
    what a deployed copy of the weights costs."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` on the meta device: shapes without data, for costing structures quickly.
    Its parameters and buffers are made on meta directly (the weights are never cloned)."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo).to(device="meta")


def shape_macs(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """layer_macs on the meta device: output shapes only, no arithmetic (same count)."""
    param = next(module.parameters(), None)
    if param is not None and param.device.type != "meta":
        module = meta_copy(module)
    return layer_macs(module, input_shape)


def proxy_input_shape(module: nn.Module) -> tuple[int, ...]:
    """An input shape to compare a layer's costs when no example inputs were given: 32 output
    pixels a side for a conv, one row for a Linear."""
    if isinstance(module, nn.Linear):
        return (1, module.in_features)
    reach = [(k - 1) * d + 1 for k, d in zip(module.kernel_size, module.dilation)]
    side = [32 * s + r for s, r in zip(module.stride, reach)]
    return (1, module.in_channels, *side)
