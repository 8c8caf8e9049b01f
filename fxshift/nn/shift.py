"""DeepShift layers (docs/methods.md §1): weights that are ±2^p (or 0), trained in float.

Two modes, both with straight-through gradients so that any torch optimizer trains them:

- ``"q"`` (DeepShift-Q): the layer keeps an ordinary float ``weight``; the forward pass uses
  ``W_q = sign(W)·2^round(log2|W|)`` with nonzero ``|W|`` clamped into ``[2^p_min, 1]`` first and
  ``p ∈ [−(2^(wb−1)−1), 0]`` (wb = weight_bits; 5 bits → −15…0; 8 bits → −126…0, since every
  decoder reads a shift below −126, a subnormal float32, as 0). Exact zeros stay zero.
- ``"ps"`` (DeepShift-PS): the layer trains the shift ``shift`` (P) and the sign ``sign`` (S)
  directly, ``W = sign(round(S))·2^round(clamp(P))`` with ``P ∈ [−(2^(wb−1)−2), 0]`` (5 bits →
  −14…0; one code of the packed format is kept for zero) and a ternary sign (``|S| < 0.5`` → 0).

Rounding of the shift is "deterministic" (round half to even, as torch.round) or "stochastic"
(floor plus a Bernoulli draw with the fractional part as probability). Stochastic rounding is
used in training mode only; in eval mode (and hence in the frozen inference form) the layers round
deterministically so that inference is reproducible.

``activation_bits=(integer, fraction)`` rounds the layer's input (and its bias) to fixed point,
``round_to_fixed(x, ib, fb) = clamp(floor(x·2^fb)·2^−fb, −2^(ib−1), 2^(ib−1) − 2^−fb)``, with a
straight-through gradient; None keeps float activations; (16, 16) is the paper's setting.

``channel_shifts`` (an attribute, None by default; ShiftQuantizePass sets it) limits each output channel to
that many powers of two below its largest (smaller magnitudes are raised to the floor, as DeepShift-Q's
clamp): 7 makes the layer exact in int8 (fxshift.quantize.int8_exact).
"""
from __future__ import annotations

import copy
import math
from typing import Any, ClassVar, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..costs import register_mac_rule
from ..errors import ConfigError
from ..ops.packing import MAX_NORMAL_SHIFT
from ..quantize.int8_exact import limit_channel_shifts
from .base import register_structure

MODES = ("q", "ps")
ROUNDINGS = ("deterministic", "stochastic")
MIN_WEIGHT_BITS, MAX_WEIGHT_BITS = 2, 8

ActivationBits = Optional[Sequence[int]]


# --------------------------------------------------------------------------------------------
# option checks and shift ranges
# --------------------------------------------------------------------------------------------
def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"unknown DeepShift mode {mode!r}: use 'q' (DeepShift-Q) or 'ps' (DeepShift-PS)")
    return mode


def check_rounding(rounding: str) -> str:
    if rounding not in ROUNDINGS:
        raise ConfigError(f"unknown rounding {rounding!r}: use 'deterministic' or 'stochastic'")
    return rounding


def check_weight_bits(weight_bits: int) -> int:
    if isinstance(weight_bits, bool) or not isinstance(weight_bits, int) \
            or not MIN_WEIGHT_BITS <= weight_bits <= MAX_WEIGHT_BITS:
        raise ConfigError(f"weight_bits={weight_bits!r} is out of range: give an int from {MIN_WEIGHT_BITS} to "
                          f"{MAX_WEIGHT_BITS} (5 is DeepShift's usual setting)")
    return weight_bits


def check_activation_bits(activation_bits: ActivationBits) -> Optional[tuple[int, int]]:
    if activation_bits is None:
        return None
    try:
        ib, fb = activation_bits
    except (TypeError, ValueError):
        raise ConfigError(f"activation_bits={activation_bits!r}: give (integer_bits, fraction_bits), "
                          "e.g. (16, 16), or None for float activations") from None
    for v in (ib, fb):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"activation_bits={activation_bits!r}: both entries must be ints")
    if not 1 <= ib <= 32 or not 0 <= fb <= 31 or ib + fb > 48:
        raise ConfigError(f"activation_bits={activation_bits!r}: need 1 ≤ integer bits ≤ 32, 0 ≤ fraction bits ≤ 31 "
                          "(and at most 48 bits in all)")
    return int(ib), int(fb)


def shift_range(mode: str, weight_bits: int) -> tuple[int, int]:
    """(p_min, p_max) of the shift p for a mode and weight_bits: Q −(2^(wb−1)−1)…0, PS −(2^(wb−1)−2)…0,
    neither below −MAX_NORMAL_SHIFT (the packed format decodes smaller shifts to 0: Q at 8 bits)."""
    check_mode(mode)
    check_weight_bits(weight_bits)
    half = 2 ** (weight_bits - 1)
    p_min = -(half - 1) if mode == "q" else -(half - 2)
    return max(p_min, -MAX_NORMAL_SHIFT), 0


# --------------------------------------------------------------------------------------------
# rounding primitives (no gradient handling here)
# --------------------------------------------------------------------------------------------
def round_shift(p: torch.Tensor, rounding: str = "deterministic", generator: Optional[torch.Generator] = None
                ) -> torch.Tensor:
    """Round shifts to integers: half to even (torch.round) or stochastically, floor + Bernoulli(frac)."""
    if rounding == "deterministic":
        return torch.round(p)
    check_rounding(rounding)
    low = torch.floor(p)
    frac = p - low
    draw = torch.rand(p.shape, device=p.device, dtype=p.dtype, generator=generator)
    return low + (draw < frac).to(p.dtype)


class _StraightThrough(torch.autograd.Function):
    """Forward returns `value`, backward passes the gradient unchanged to `x` (identity STE)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return value

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def straight_through(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` in the forward pass, identity gradient to `x` in the backward pass."""
    if not x.requires_grad:
        return value
    return _StraightThrough.apply(x, value.detach())


def _quantize_q_value(w: torch.Tensor, weight_bits: int, rounding: str,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    p_min, _ = shift_range("q", weight_bits)
    magnitude = w.abs().clamp(min=2.0 ** p_min, max=1.0)
    p = round_shift(torch.log2(magnitude), rounding, generator)
    return torch.sign(w) * torch.exp2(p)


def quantize_q(w: torch.Tensor, weight_bits: int = 5, rounding: str = "deterministic",
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """DeepShift-Q rounding ``sign(W)·2^round(log2 clamp(|W|, 2^p_min, 1))`` with an identity STE.

    Exact zeros stay zero (sign(0) = 0).
    """
    return straight_through(w, _quantize_q_value(w.detach(), weight_bits, rounding, generator))


class _ClampTowardRange(torch.autograd.Function):
    """Clamp whose gradient passes where the input is in range or where descent moves it back in.

    A plain clamp gives zero gradient outside the range (a shift that drifted out would be stuck);
    an identity STE lets it drift further. This passes the gradient only when a descent step
    (x − lr·grad) moves x toward the range.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, low: float, high: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.low, ctx.high = low, high
        return x.clamp(low, high)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        blocked = ((x < ctx.low) & (grad > 0)) | ((x > ctx.high) & (grad < 0))
        return grad.masked_fill(blocked, 0.0), None, None


def ps_weight(shift: torch.Tensor, sign: torch.Tensor, weight_bits: int = 5, rounding: str = "deterministic",
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """DeepShift-PS weight ``sign(round(S))·2^round(clamp(P))`` with identity STEs through round and sign.

    Gradients: dW/dP = ln2·W (through the rounding), dW/dS = 2^round(P) (through sign and round).
    """
    p_min, p_max = shift_range("ps", weight_bits)
    p = _ClampTowardRange.apply(shift, float(p_min), float(p_max)) if shift.requires_grad \
        else shift.clamp(p_min, p_max)
    p = straight_through(p, round_shift(p.detach(), rounding, generator))
    s = straight_through(sign, torch.sign(torch.round(sign.detach())))
    return s * torch.exp2(p)


def ps_init(weight: torch.Tensor, weight_bits: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, S) from a trained weight: P = round(log2|w|) clamped into the PS range, S = sign(w).

    Zero weights get S = 0 (and P = p_min).
    """
    p_min, p_max = shift_range("ps", weight_bits)
    w = weight.detach()
    with torch.no_grad():
        p = torch.round(torch.log2(w.abs())).nan_to_num(nan=p_min, neginf=p_min, posinf=p_max).clamp(p_min, p_max)
        return p, torch.sign(w)


def round_to_fixed(x: torch.Tensor, integer_bits: int = 16, fraction_bits: int = 16) -> torch.Tensor:
    """``clamp(floor(x·2^fb)·2^−fb, −2^(ib−1), 2^(ib−1) − 2^−fb)`` with an identity STE."""
    scale = 2.0 ** fraction_bits
    low, high = -(2.0 ** (integer_bits - 1)), 2.0 ** (integer_bits - 1) - 1.0 / scale
    value = (torch.floor(x.detach() * scale) / scale).clamp(low, high)
    return straight_through(x, value)


def shift_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sign int8 in {−1, 0, +1}, magnitude m uint8) of a tensor of exact ±2^−m or 0 values."""
    w = weight.detach()
    sign = torch.sign(w).to(torch.int8)
    m = (-torch.log2(w.abs())).nan_to_num(posinf=0.0).round()
    m = torch.where(sign == 0, torch.zeros_like(m), m)
    if (m < 0).any() or (m > 255).any():
        raise ValueError("weight holds values that are not 2^-m with 0 ≤ m ≤ 255")
    return sign, m.to(torch.uint8)


# --------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------
class _ShiftLayer(nn.Module):
    """What ShiftConv2d and ShiftLinear share: the mode, the weight parameters and the quantiser."""

    method: ClassVar[str] = ""

    def __init__(self, weight_shape: Sequence[int], bias: bool, mode: str, weight_bits: int, rounding: str,
                 activation_bits: ActivationBits, device: Any = None, dtype: Any = None):
        super().__init__()
        self.mode = check_mode(mode)
        self.weight_bits = check_weight_bits(weight_bits)
        self.rounding = check_rounding(rounding)
        self.activation_bits = check_activation_bits(activation_bits)
        factory = dict(device=device, dtype=dtype)
        if mode == "q":
            self.weight = nn.Parameter(torch.zeros(weight_shape, **factory))
        else:
            self.shift = nn.Parameter(torch.zeros(weight_shape, **factory))
            self.sign = nn.Parameter(torch.zeros(weight_shape, **factory))
        if bias:
            self.bias = nn.Parameter(torch.zeros(weight_shape[0], **factory))
        else:
            self.register_parameter("bias", None)
        # optional per-output-channel float scale, applied after accumulation and before the bias
        # (set by calibrated conversion, fxshift.quantize.shift_calibration; None: no scale)
        self.register_buffer("scale", None)
        self.channel_shifts: Optional[int] = None  # at most this many powers of two per output channel

    # ---- the effective weights -----------------------------------------------------------
    @property
    def shift_range(self) -> tuple[int, int]:
        return shift_range(self.mode, self.weight_bits)

    def _rounding_now(self) -> str:
        return self.rounding if self.training else "deterministic"

    def quantized_weight(self) -> torch.Tensor:
        """The ±2^p / 0 weight the forward pass uses (differentiable through the STEs)."""
        if self.mode == "q":
            w = quantize_q(self.weight, self.weight_bits, self._rounding_now())
        else:
            w = ps_weight(self.shift, self.sign, self.weight_bits, self._rounding_now())
        if self.channel_shifts is None:
            return w
        return straight_through(w, limit_channel_shifts(w.detach(), self.channel_shifts))

    @torch.no_grad()
    def set_scale(self, scale: Optional[torch.Tensor]) -> None:
        """Set (or with None remove) the per-output-channel scale y = scale ⊙ (W_q ∗ x) + bias."""
        if scale is None:
            self.scale = None
            return
        rows = (self.weight if self.mode == "q" else self.shift).shape[0]
        if scale.shape != (rows,):
            raise ConfigError(f"scale of shape {tuple(scale.shape)} does not fit {rows} output channels")
        ref = self.weight if self.mode == "q" else self.shift
        self.scale = scale.detach().to(device=ref.device, dtype=ref.dtype).clone()

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        """Apply the scale (per output channel, dim 1 for convs, last for linears) and the bias."""
        bias = self.quantized_bias()
        if self.scale is not None:  # a conv's channels are dim −3 of (N, C, H, W) and of unbatched (C, H, W)
            y = y * (self.scale.view(-1, 1, 1) if isinstance(self, ShiftConv2d) else self.scale)
        if bias is not None:
            y = y + (bias.view(-1, 1, 1) if isinstance(self, ShiftConv2d) else bias)
        return y

    def quantized_bias(self) -> Optional[torch.Tensor]:
        if self.bias is None or self.activation_bits is None:
            return self.bias
        return round_to_fixed(self.bias, *self.activation_bits)

    def _round_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.activation_bits is None else round_to_fixed(x, *self.activation_bits)

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Start from a trained float weight: Q copies it; PS sets P = round(log2|w|), S = sign(w)."""
        if self.mode == "q":
            self.weight.copy_(weight)
        else:
            p, s = ps_init(weight, self.weight_bits)
            self.shift.copy_(p)
            self.sign.copy_(s)

    @torch.no_grad()
    def reset_from_scratch(self, generator: Optional[torch.Generator] = None) -> None:
        """DeepShift's from-scratch init: Q as torch's default; PS conv P ~ U(−10, −1), linear P ~ U(range),
        S ~ U(−1, 1)."""
        if self.mode == "q":
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5), generator=generator)
            return
        p_min, p_max = self.shift_range
        low, high = self._scratch_shift_bounds(p_min, p_max)
        self.shift.uniform_(low, high, generator=generator)
        self.sign.uniform_(-1.0, 1.0, generator=generator)

    def _scratch_shift_bounds(self, p_min: int, p_max: int) -> tuple[float, float]:
        return float(p_min), float(p_max)

    @property
    def freeze_sign(self) -> bool:
        return self.mode == "ps" and not self.sign.requires_grad

    # ---- save / load -----------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        return {"method": self.method, "mode": self.mode, "weight_bits": self.weight_bits, "rounding": self.rounding,
                "activation_bits": list(self.activation_bits) if self.activation_bits else None,
                "freeze_sign": self.freeze_sign, "scale": self.scale is not None, "bias": self.bias is not None,
                "channel_shifts": self.channel_shifts}

    @staticmethod
    def _options(spec: dict[str, Any]) -> dict[str, Any]:
        return dict(mode=spec["mode"], weight_bits=spec["weight_bits"], rounding=spec.get("rounding", "deterministic"),
                    activation_bits=spec.get("activation_bits"))

    def _finish_from_spec(self, spec: dict[str, Any]) -> "_ShiftLayer":
        self.channel_shifts = spec.get("channel_shifts")
        if self.mode == "ps" and spec.get("freeze_sign"):
            self.sign.requires_grad_(False)
        if spec.get("bias") and self.bias is None:  # calibration gave a bias-less layer one
            ref = self.weight if self.mode == "q" else self.shift
            self.bias = nn.Parameter(torch.zeros(ref.shape[0], dtype=ref.dtype, device=ref.device))
        if spec.get("scale"):  # values come with the state dict
            ref = self.weight if self.mode == "q" else self.shift
            self.scale = torch.ones(ref.shape[0], dtype=ref.dtype, device=ref.device)
        return self

    def as_ps(self, freeze_sign: bool = False) -> "_ShiftLayer":
        """A DeepShift-PS copy of this DeepShift-Q layer (e.g. a calibrated one): P, S from its eval-mode
        weights (shifts clamped into the PS range), same bias and scale."""
        if self.mode != "q":
            raise ConfigError("as_ps() converts DeepShift-Q layers; this layer is already mode='ps'")
        new = copy.deepcopy(self)
        weight = new.weight
        del new.weight
        new.mode = "ps"
        value = _quantize_q_value(weight.detach(), self.weight_bits, "deterministic")
        if self.channel_shifts is not None:
            value = limit_channel_shifts(value, self.channel_shifts)
        p, sign = ps_init(value, self.weight_bits)
        new.shift = nn.Parameter(p)
        new.sign = nn.Parameter(sign, requires_grad=not freeze_sign)
        return new

    def _mode_repr(self) -> str:
        text = f"mode={self.mode}, weight_bits={self.weight_bits}, rounding={self.rounding}"
        if self.activation_bits is not None:
            text += f", activation_bits={self.activation_bits}"
        return text


def _pair(v: Union[int, Sequence[int]]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def explicit_padding(padding: Union[str, int, Sequence[int]], kernel_size: Sequence[int],
                     dilation: Sequence[int]) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero-padding amounts of a Conv2d `padding` (ints, "valid" or "same")."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        amounts = []
        for k, d in zip(reversed(tuple(kernel_size)), reversed(tuple(dilation))):  # width first, as F.pad
            total = d * (k - 1)
            amounts += [total // 2, total - total // 2]
        return tuple(amounts)  # type: ignore[return-value]
    ph, pw = _pair(padding)
    return (pw, pw, ph, ph)


@register_structure
class ShiftConv2d(_ShiftLayer):
    """A Conv2d whose weights are DeepShift power-of-two weights (any stride, padding, dilation, groups,
    padding mode). Build one with ``ShiftConv2d.from_conv(conv, mode="q", weight_bits=5)``.

    Parameters: ``weight`` (mode "q") or ``shift`` and ``sign`` (mode "ps"), and ``bias``.
    """

    method = "shift_conv2d"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Union[int, Sequence[int]], stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 *, mode: str = "q", weight_bits: int = 5, rounding: str = "deterministic",
                 activation_bits: ActivationBits = None, device: Any = None, dtype: Any = None):
        if in_channels % groups or out_channels % groups:
            raise ConfigError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        self_kernel = _pair(kernel_size)
        super().__init__((out_channels, in_channels // groups, *self_kernel), bias, mode, weight_bits, rounding,
                         activation_bits, device, dtype)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = self_kernel
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.padding_mode = padding_mode

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, mode: str = "q", weight_bits: int = 5, rounding: str = "deterministic",
                  activation_bits: ActivationBits = None, freeze_sign: bool = False,
                  init: bool = True) -> "ShiftConv2d":
        """A shift layer with `conv`'s geometry, started from its weights (unless init=False) and bias."""
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, conv.padding_mode, mode=mode, weight_bits=weight_bits,
                    rounding=rounding, activation_bits=activation_bits, device=conv.weight.device,
                    dtype=conv.weight.dtype)
        if init:
            layer.set_weight(conv.weight)
            if conv.bias is not None:
                with torch.no_grad():
                    layer.bias.copy_(conv.bias)
        if freeze_sign and mode == "ps":
            layer.sign.requires_grad_(False)
        return layer

    @classmethod
    def from_spec(cls, original: nn.Conv2d, spec: dict[str, Any]) -> "ShiftConv2d":
        return cls.from_conv(original, init=False, **cls._options(spec))._finish_from_spec(spec)

    def _scratch_shift_bounds(self, p_min: int, p_max: int) -> tuple[float, float]:
        low = max(-10.0, float(p_min))  # U(-10, -1), kept inside the range for small weight_bits
        high = min(-1.0, float(p_max)) if low < -1.0 else float(p_max)
        return low, high

    def padding_amounts(self) -> tuple[int, int, int, int]:
        """(left, right, top, bottom) padding, with "same"/"valid" made explicit."""
        return explicit_padding(self.padding, self.kernel_size, self.dilation)

    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.padding_mode != "zeros":
            x = F.pad(x, self.padding_amounts(), mode=self.padding_mode)
            return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            return self.conv(self._round_input(x), self.quantized_weight(), self.quantized_bias())
        return self._finish(self.conv(self._round_input(x), self.quantized_weight(), None))

    def extra_repr(self) -> str:
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}")
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode}"
        return text + ", " + self._mode_repr()


@register_structure
class ShiftLinear(_ShiftLayer):
    """A Linear whose weights are DeepShift power-of-two weights. Build one with ``ShiftLinear.from_linear``."""

    method = "shift_linear"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, mode: str = "q",
                 weight_bits: int = 5, rounding: str = "deterministic", activation_bits: ActivationBits = None,
                 device: Any = None, dtype: Any = None):
        super().__init__((out_features, in_features), bias, mode, weight_bits, rounding, activation_bits, device, dtype)
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str = "q", weight_bits: int = 5, rounding: str = "deterministic",
                    activation_bits: ActivationBits = None, freeze_sign: bool = False,
                    init: bool = True) -> "ShiftLinear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, mode=mode,
                    weight_bits=weight_bits, rounding=rounding, activation_bits=activation_bits,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        if init:
            layer.set_weight(linear.weight)
            if linear.bias is not None:
                with torch.no_grad():
                    layer.bias.copy_(linear.bias)
        if freeze_sign and mode == "ps":
            layer.sign.requires_grad_(False)
        return layer

    @classmethod
    def from_spec(cls, original: nn.Linear, spec: dict[str, Any]) -> "ShiftLinear":
        return cls.from_linear(original, init=False, **cls._options(spec))._finish_from_spec(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            return F.linear(self._round_input(x), self.quantized_weight(), self.quantized_bias())
        return self._finish(F.linear(self._round_input(x), self.quantized_weight(), None))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                + self._mode_repr())


def shift_layer_from(module: nn.Module, **options: Any) -> _ShiftLayer:
    """ShiftConv2d.from_conv or ShiftLinear.from_linear, by the module's type."""
    if isinstance(module, nn.Conv2d):
        return ShiftConv2d.from_conv(module, **options)
    if isinstance(module, nn.Linear):
        return ShiftLinear.from_linear(module, **options)
    raise ConfigError(f"{type(module).__name__} cannot become a shift layer (Conv2d and Linear can)")


SHIFT_LAYERS = (ShiftConv2d, ShiftLinear)


@register_mac_rule(ShiftConv2d)
def _shift_conv_macs(module: ShiftConv2d, output: torch.Tensor) -> int:
    """One shift-add per weight and output pixel, as many as the Conv2d it replaces has MACs."""
    per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
    return output[0].numel() * per_output


@register_mac_rule(ShiftLinear)
def _shift_linear_macs(module: ShiftLinear, output: torch.Tensor) -> int:
    rows = output.numel() // output.shape[0] if output.ndim > 1 else output.numel()
    return rows * module.in_features
