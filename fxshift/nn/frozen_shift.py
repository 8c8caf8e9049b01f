"""Inference form of the DeepShift layers: packed power-of-two weights run by native kernels.

Packed weight format (the one of native/include/fxshift.h, shared with ONNX and C)
------------------------------------------------------------------------------------
A shift weight is 0 or (−1)^sign · 2^(−m) with m ≥ 0 an integer shift magnitude. Each weight is a
``bits``-wide code (2 ≤ bits ≤ 9)::

    code = sign << (bits − 1) | m          top bit: sign, low bits − 1 bits: m

With ``has_zero = 1`` the code 2^bits − 1 (sign 1, m all ones) is the weight 0. Codes are packed
floor(32 / bits) to a little-endian 32-bit word (5 bits → 6 codes per word, 30 of 32 bits used;
4 → 8; 8 → 4), code i of a word in bits [i·bits, (i+1)·bits); each output row (output channel /
feature) starts on a new word, so a weight of shape (O, K) takes O · ceil(K / floor(32 / bits))
words; a conv's K is (C_in / groups) · kh · kw in torch order. A 5-bit layer therefore costs
32/6 ≈ 5.3 bits a weight, not 8 or 32.

Widths chosen by freeze():

- DeepShift-PS (shift range −(2^(wb−1)−2)…0 plus zero): bits = weight_bits, has_zero = 1.
- DeepShift-Q (range −(2^(wb−1)−1)…0, both signs, no zero unless the float weight had exact
  zeros): bits = weight_bits and has_zero = 0; a layer with exact zeros gets bits = weight_bits + 1
  and has_zero = 1.

So a frozen layer computes exactly the weights its trained layer used in eval mode; outputs agree up
to float summation order. With ``activation_bits`` the input is rounded to the same fixed-point
grid as in training and the stored bias is already rounded.

The weights live in the int32 buffer ``words`` of shape (O, row_words); ``bias`` is a float32 buffer.
Frozen layers compute in float32 (the kernels' type): give them float32 inputs.
Forward calls the custom ops fxshift::shift_conv2d / fxshift::shift_linear (fxshift.ops.shift_ops).
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..costs import register_mac_rule
from ..ops import packing, shift_ops  # noqa: F401  (shift_ops registers the torch.ops.fxshift ops)
from ..ops.packed_weight import PackedShiftWeight, ShiftFormat
from .base import register_structure
from .shift import ShiftConv2d, ShiftLinear, _ShiftLayer, check_activation_bits, explicit_padding, shift_codes

__all__ = ["FrozenShiftConv2d", "FrozenShiftLinear", "freeze_layer", "packing_width", "packed_bytes"]


def packed_bytes(rows: int, k: int, bits: int) -> int:
    """Bytes of a (rows, k) weight in the packed format: rows · row_words · 4."""
    return ShiftFormat(bits, 0).packed_bytes(rows, k)


def packing_width(mode: str, weight_bits: int, has_zeros: bool) -> tuple[int, int]:
    """(bits, has_zero) that freeze() packs a layer with (see the module docstring)."""
    if mode == "ps":
        return weight_bits, 1
    return (weight_bits + 1, 1) if has_zeros else (weight_bits, 0)


def _round_fixed_plain(x: torch.Tensor, integer_bits: int, fraction_bits: int) -> torch.Tensor:
    scale = 2.0 ** fraction_bits
    return (torch.floor(x * scale) / scale).clamp(-(2.0 ** (integer_bits - 1)), 2.0 ** (integer_bits - 1) - 1 / scale)


class _FrozenShift(nn.Module):
    method: ClassVar[str] = ""

    def _setup(self, rows: int, k: int, bits: int, has_zero: int, bias: bool, activation_bits: Any, mode: str,
               weight_bits: int, device: Any = None, scale: bool = False) -> None:
        fmt = ShiftFormat(bits, has_zero)
        self.bits, self.has_zero = fmt.bits, fmt.has_zero
        self.activation_bits = check_activation_bits(activation_bits)
        self.mode, self.weight_bits = mode, weight_bits
        self.register_buffer("words", torch.zeros(rows, fmt.row_words(k), dtype=torch.int32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(rows, dtype=torch.float32, device=device))
        else:
            self.register_buffer("bias", None)
        # per-output-channel float scale applied after accumulation, before the bias (None: none)
        self.register_buffer("scale", torch.ones(rows, dtype=torch.float32, device=device) if scale else None)

    def _with_bias(self, spec: dict[str, Any]) -> "_FrozenShift":
        if spec.get("bias") and self.bias is None:  # calibration gave a bias-less layer one
            self.bias = torch.zeros(self.words.shape[0], dtype=torch.float32, device=self.words.device)
        return self

    @property
    def packed(self) -> PackedShiftWeight:
        """The packed weight as one validated value (format, shape, words; no copy)."""
        return PackedShiftWeight.of(self.words, self.weight_shape, self.bits, self.has_zero, exact=True)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the packed weights."""
        return self.packed.nbytes

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_bits is not None:
            x = _round_fixed_plain(x, *self.activation_bits)
        return x

    def _load(self, layer: _ShiftLayer, rows: int) -> None:
        with torch.no_grad():
            was_training = layer.training
            layer.eval()
            try:
                weight = layer.quantized_weight().detach()
                bias = layer.quantized_bias()
            finally:
                layer.train(was_training)
        sign, magnitude = shift_codes(weight.reshape(rows, -1))
        self.words.copy_(packing.pack(sign.cpu(), magnitude.cpu(), self.bits, self.has_zero).to(self.words.device))
        if bias is not None:
            self.bias.copy_(bias.detach().to(torch.float32))
        if layer.scale is not None:
            self.scale.copy_(layer.scale.detach().to(torch.float32))

    def unpacked_weight(self) -> torch.Tensor:
        """The decoded float32 weight (for checks; the forward pass never builds it)."""
        return packing.unpack(self.words.cpu(), self.weight_shape, self.bits, self.has_zero)

    def spec(self) -> dict[str, Any]:
        return {"method": self.method, "bits": self.bits, "has_zero": self.has_zero, "mode": self.mode,
                "weight_bits": self.weight_bits,
                "activation_bits": list(self.activation_bits) if self.activation_bits else None,
                "scale": self.scale is not None, "bias": self.bias is not None}

    def _format_repr(self) -> str:
        text = f"bits={self.bits}, has_zero={self.has_zero} ({self.mode}, weight_bits={self.weight_bits})"
        if self.activation_bits is not None:
            text += f", activation_bits={self.activation_bits}"
        return text


@register_structure
class FrozenShiftConv2d(_FrozenShift):
    """A frozen ShiftConv2d: packed weights, any stride, padding, dilation, groups and padding mode."""

    method = "frozen_shift_conv2d"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Sequence[int], stride: Sequence[int],
                 padding: Any, dilation: Sequence[int], groups: int, bias: bool, padding_mode: str, *, bits: int,
                 has_zero: int, activation_bits: Any = None, mode: str = "q", weight_bits: int = 5,
                 device: Any = None, scale: bool = False):
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = tuple(int(k) for k in kernel_size)
        self.stride, self.dilation = tuple(stride), tuple(dilation)
        self.padding, self.padding_mode = padding, padding_mode
        self.weight_shape = (out_channels, in_channels // groups, *self.kernel_size)
        k = self.weight_shape[1] * self.weight_shape[2] * self.weight_shape[3]
        self._setup(out_channels, k, bits, has_zero, bias, activation_bits, mode, weight_bits, device, scale)
        left, right, top, bottom = explicit_padding(padding, self.kernel_size, self.dilation)
        self._pre_pad: Optional[tuple[int, int, int, int]] = None
        if padding_mode != "zeros" or left != right or top != bottom:
            self._pre_pad = (left, right, top, bottom)
            self._op_padding = [0, 0]
        else:
            self._op_padding = [top, left]

    @classmethod
    def _like(cls, conv: Any, bits: int, has_zero: int, **options: Any) -> "FrozenShiftConv2d":
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                   conv.groups, conv.bias is not None, conv.padding_mode, bits=bits, has_zero=has_zero, **options)

    @classmethod
    def from_shift(cls, layer: ShiftConv2d) -> "FrozenShiftConv2d":
        """Pack a trained ShiftConv2d (its eval-mode weights)."""
        has_zeros = _has_zero_weights(layer)
        bits, has_zero = packing_width(layer.mode, layer.weight_bits, has_zeros)
        device = next(layer.parameters()).device
        frozen = cls._like(layer, bits, has_zero, activation_bits=layer.activation_bits, mode=layer.mode,
                           weight_bits=layer.weight_bits, device=device, scale=layer.scale is not None)
        frozen._load(layer, layer.out_channels)
        return frozen

    @classmethod
    def from_spec(cls, original: nn.Module, spec: dict[str, Any]) -> "FrozenShiftConv2d":
        frozen = cls._like(original, spec["bits"], spec["has_zero"], activation_bits=spec.get("activation_bits"),
                           mode=spec.get("mode", "q"), weight_bits=spec.get("weight_bits", 5),
                           scale=bool(spec.get("scale")))
        return frozen._with_bias(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._prepare(x)
        if self._pre_pad is not None:
            x = F.pad(x, self._pre_pad, mode="constant" if self.padding_mode == "zeros" else self.padding_mode)
        return torch.ops.fxshift.shift_conv2d(x, self.words, list(self.weight_shape), list(self.stride),
                                              list(self._op_padding), list(self.dilation), self.groups, self.bits,
                                              bool(self.has_zero), self.bias, self.scale)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, " + self._format_repr())


@register_structure
class FrozenShiftLinear(_FrozenShift):
    """A frozen ShiftLinear: packed weights run by fxshift::shift_linear."""

    method = "frozen_shift_linear"

    def __init__(self, in_features: int, out_features: int, bias: bool, *, bits: int, has_zero: int,
                 activation_bits: Any = None, mode: str = "q", weight_bits: int = 5, device: Any = None,
                 scale: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_shape = (out_features, in_features)
        self._setup(out_features, in_features, bits, has_zero, bias, activation_bits, mode, weight_bits, device,
                    scale)

    @classmethod
    def from_shift(cls, layer: ShiftLinear) -> "FrozenShiftLinear":
        has_zeros = _has_zero_weights(layer)
        bits, has_zero = packing_width(layer.mode, layer.weight_bits, has_zeros)
        device = next(layer.parameters()).device
        frozen = cls(layer.in_features, layer.out_features, layer.bias is not None, bits=bits, has_zero=has_zero,
                     activation_bits=layer.activation_bits, mode=layer.mode, weight_bits=layer.weight_bits,
                     device=device, scale=layer.scale is not None)
        frozen._load(layer, layer.out_features)
        return frozen

    @classmethod
    def from_spec(cls, original: nn.Module, spec: dict[str, Any]) -> "FrozenShiftLinear":
        return cls(original.in_features, original.out_features, spec.get("bias", original.bias is not None),
                   bits=spec["bits"],
                   has_zero=spec["has_zero"], activation_bits=spec.get("activation_bits"),
                   mode=spec.get("mode", "q"), weight_bits=spec.get("weight_bits", 5),
                   scale=bool(spec.get("scale")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.fxshift.shift_linear(self._prepare(x), self.words, self.out_features, self.bits,
                                              bool(self.has_zero), self.bias, self.scale)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                + self._format_repr())


def _has_zero_weights(layer: _ShiftLayer) -> bool:
    if layer.mode == "ps":
        return True
    with torch.no_grad():
        return bool((layer.weight == 0).any())


def freeze_layer(layer: nn.Module) -> nn.Module:
    """The frozen (packed) form of a ShiftConv2d or ShiftLinear."""
    if isinstance(layer, ShiftConv2d):
        return FrozenShiftConv2d.from_shift(layer)
    if isinstance(layer, ShiftLinear):
        return FrozenShiftLinear.from_shift(layer)
    raise TypeError(f"{type(layer).__name__} is not a shift layer")


@register_mac_rule(FrozenShiftConv2d)
def _frozen_conv_macs(module: FrozenShiftConv2d, output: torch.Tensor) -> int:
    _, cg, kh, kw = module.weight_shape
    return output[0].numel() * cg * kh * kw


@register_mac_rule(FrozenShiftLinear)
def _frozen_linear_macs(module: FrozenShiftLinear, output: torch.Tensor) -> int:
    rows = output.numel() // output.shape[0] if output.ndim > 1 else output.numel()
    return rows * module.in_features
