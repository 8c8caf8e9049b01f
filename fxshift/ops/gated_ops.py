"""The computation of gated (dynamically pruned) units, and its torch.library ops for ONNX export.

Eager execution calls :func:`skip_conv` directly. Under torch.onnx.export the unit calls
``fxshift::gated_conv2d`` and ``fxshift::scatter_channels`` instead, so that the exporter sees one op
per unit with a data-dependent channel count (an unbacked size in the fake implementation), and
fxshift/onnx/gated.py lowers each to standard ONNX ops that keep the skipping.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F


def select_filters(logits: torch.Tensor, k: int = 0) -> torch.Tensor:
    """Boolean (B, C) selection of filters from predictor logits.

    k = 0: logit > 0 (sigmoid > 0.5), and each sample's top filter when it selects none (target "mass").
    k > 0: exactly the k highest logits of each sample (target "uniform": a fixed count, so a threshold
    that drifts during training cannot collapse the selection)."""
    if k > 0:
        top = logits.topk(min(k, logits.shape[1]), dim=1).indices
        return torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter_(1, top, True)
    return (logits > 0) | (logits >= logits.amax(dim=1, keepdim=True))


#: skip mode's activations; they may work in place (they get the conv's fresh output).
ACTIVATION_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": lambda y: y, "relu": torch.relu_, "relu6": F.relu6, "silu": F.silu, "hardswish": F.hardswish, "gelu": F.gelu,
}


def skip_conv(x: torch.Tensor, in_idx: Optional[torch.Tensor], weight: torch.Tensor, scale: Optional[torch.Tensor],
              shift: torch.Tensor, predictor_weight: torch.Tensor, predictor_bias: torch.Tensor, stride: Any,
              padding: Any, dilation: Any, act: str, k: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The skipping computation of a gated unit: (compact output, its channel indices, per-sample selection).

    x holds the active input channels `in_idx` (all channels when None); only the selected filters'
    weight rows (× BN scale) over those input channels are gathered and convolved. `k` as in
    :func:`select_filters`. The selection is None at batch 1 with k > 0 (the indices say it all)."""
    pooled = x.mean(dim=(2, 3))
    pw = predictor_weight if in_idx is None else predictor_weight.index_select(1, in_idx)
    logits = F.linear(pooled, pw, predictor_bias)
    if x.shape[0] == 1 and k > 0:   # batch 1, top-k: the indices directly
        idx = logits[0].topk(min(k, logits.shape[1])).indices
        keep = None
    elif x.shape[0] == 1:   # batch 1: logit > 0 equals select_filters whenever one filter passes (4 ops fewer)
        keep = logits > 0
        idx = keep[0].nonzero().squeeze(1)
        if idx.numel() == 0:
            keep = select_filters(logits)
            idx = keep[0].nonzero().squeeze(1)
    else:
        keep = select_filters(logits, k)
        idx = keep.any(dim=0).nonzero().squeeze(1)
    w = weight.index_select(0, idx)
    if in_idx is not None:
        w = w.index_select(1, in_idx)
    if scale is not None:   # else the BN scale is already folded into weight
        w = w * scale.index_select(0, idx).view(-1, 1, 1, 1)
    y = ACTIVATION_FUNCTIONS[act](F.conv2d(x, w, shift.index_select(0, idx), stride, padding, dilation))
    if x.shape[0] > 1:
        y = y * keep.index_select(1, idx)[:, :, None, None].to(y.dtype)
    return y, idx, keep


@torch.library.custom_op("fxshift::gated_conv2d", mutates_args=())
def _gated_conv2d(x: torch.Tensor, in_idx: Optional[torch.Tensor], weight: torch.Tensor, scale: Optional[torch.Tensor],
                  shift: torch.Tensor, predictor_weight_t: torch.Tensor, predictor_bias: torch.Tensor, stride: list[int],
                  padding: list[int], dilation: list[int], act: str, k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    y, idx, _ = skip_conv(x, in_idx, weight, scale, shift, predictor_weight_t.t(), predictor_bias, stride, padding,
                          dilation, act, k)
    return y, idx


@_gated_conv2d.register_fake
def _(x, in_idx, weight, scale, shift, predictor_weight_t, predictor_bias, stride, padding, dilation, act, k=0):
    if k > 0 and x.shape[0] == 1:     # exactly k filters: a static channel count
        active = min(k, weight.shape[0])
    else:
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
    exported graph does not multiply the gathered weight rows by it at every inference; the predictor
    weight goes in transposed, (C_in, C_out), so that selecting the active input channels gathers
    contiguous rows (a column gather copies one float at a time) and the MatMul needs no Transpose."""
    scale, shift = unit.affine()
    conv = unit.conv
    weight = conv.weight if scale is None else conv.weight * scale.view(-1, 1, 1, 1)
    return torch.ops.fxshift.gated_conv2d(x, in_idx, weight, None, shift, unit.predictor.weight.flatten(1).t(),
                                          unit.predictor.bias, list(conv.stride), list(conv.padding),
                                          list(conv.dilation), unit.act_name, unit.top_k)


def scatter_channels_op(y: torch.Tensor, idx: torch.Tensor, channels: int) -> torch.Tensor:
    return torch.ops.fxshift.scatter_channels(y, idx, int(channels))
