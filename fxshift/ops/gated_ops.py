"""torch.library ops for gated (dynamically pruned) units, used only while exporting to ONNX.

Eager execution calls fxshift.nn.gated.skip_conv directly. Under torch.onnx.export the unit calls
``fxshift::gated_conv2d`` and ``fxshift::scatter_channels`` instead, so that the exporter sees one op
per unit with a data-dependent channel count (an unbacked size in the fake implementation), and
fxshift/onnx/gated.py lowers each to standard ONNX ops that keep the skipping.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..nn.gated import skip_conv


@torch.library.custom_op("fxshift::gated_conv2d", mutates_args=())
def _gated_conv2d(x: torch.Tensor, in_idx: Optional[torch.Tensor], weight: torch.Tensor, scale: Optional[torch.Tensor],
                  shift: torch.Tensor, predictor_weight: torch.Tensor, predictor_bias: torch.Tensor, stride: list[int],
                  padding: list[int], dilation: list[int], act: str) -> tuple[torch.Tensor, torch.Tensor]:
    y, idx, _ = skip_conv(x, in_idx, weight, scale, shift, predictor_weight, predictor_bias, stride, padding,
                          dilation, act)
    return y, idx


@_gated_conv2d.register_fake
def _(x, in_idx, weight, scale, shift, predictor_weight, predictor_bias, stride, padding, dilation, act):
    active = torch.library.get_ctx().new_dynamic_size(min=1, max=weight.shape[0])
    size = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
            for i in range(2)]
    return x.new_empty(x.shape[0], active, *size), torch.empty(active, dtype=torch.int64, device=x.device)


@torch.library.custom_op("fxshift::scatter_channels", mutates_args=())
def _scatter_channels(y: torch.Tensor, idx: torch.Tensor, channels: int) -> torch.Tensor:
    return y.new_zeros((y.shape[0], channels) + tuple(y.shape[2:])).index_copy(1, idx, y)


@_scatter_channels.register_fake
def _(y, idx, channels):
    return y.new_empty((y.shape[0], channels) + tuple(y.shape[2:]))


def gated_conv2d(unit, x: torch.Tensor, in_idx: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A GatedConv2d's skip-mode forward as one fxshift::gated_conv2d call. The BN scale goes into the
    weight here, on parameters only (constant-folded by onnxruntime when the session loads), so the
    exported graph does not multiply the gathered weight rows by it at every inference."""
    scale, shift = unit.affine()
    conv = unit.conv
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    return torch.ops.fxshift.gated_conv2d(x, in_idx, weight, None, shift, unit.predictor.weight.flatten(1),
                                          unit.predictor.bias, list(conv.stride), list(conv.padding),
                                          list(conv.dilation), unit.act_name)


def scatter_channels(y: torch.Tensor, idx: torch.Tensor, channels: int) -> torch.Tensor:
    return torch.ops.fxshift.scatter_channels(y, idx, int(channels))
