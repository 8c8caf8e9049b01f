"""torch.library custom ops ``fxshift::shift_linear`` and ``fxshift::shift_conv2d`` over packed weights.

The weights are the packed shift format of native/include/fxshift.h (see fxshift.nn.frozen_shift for
a summary): an int32 tensor of shape (O, row_words) holding `bits`-wide codes (top bit sign, low
bits−1 the shift magnitude m of ±2^−m; with has_zero, code 2^bits−1 is a zero weight), floor(32/bits)
codes per little-endian word, each output row starting on a new word.

- The CPU implementations call the native kernels through fxshift.ops.native (cffi).
- The CUDA implementations call the CUDA kernels when the native loader provides them, and raise
  NativeError otherwise.
- Fake (meta) implementations give the output shapes, so that models using the ops trace with
  torch.fx / torch.export / torch.compile and export to ONNX.

The ops are inference-only (no autograd formula): frozen layers are not trained.

They are defined with torch.library.Library (schema + per-device kernels + register_fake) rather
than the torch.library.custom_op decorator: the decorator wraps every kernel in a dynamo-disable
guard whose first call imports torch._dynamo (seconds of start-up for plain eager inference).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..errors import NativeError
from .packed_weight import PackedShiftWeight

__all__ = ["shift_linear", "shift_conv2d", "conv2d_output_size", "check_packed"]


def check_packed(words: torch.Tensor, rows: int, k: int, bits: int, has_zero: bool, what: str) -> PackedShiftWeight:
    """The words as a PackedShiftWeight in the (rows, row_words(k)) layout, or ValueError naming `what`."""
    if words.dtype != torch.int32:  # torch ops take the words as int32 (uint32 lacks kernels)
        raise ValueError(f"{what}: packed weights must be int32, got {words.dtype}")
    try:
        return PackedShiftWeight.of(words, (rows, k), bits, has_zero, exact=True)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


def _check_bias(bias: Optional[torch.Tensor], n: int, x: torch.Tensor, what: str) -> None:
    if bias is None:
        return
    if bias.dim() != 1 or bias.shape[0] != n:
        raise ValueError(f"{what}: bias has shape {tuple(bias.shape)}, expected ({n},)")
    if bias.dtype != torch.float32:
        raise ValueError(f"{what}: bias must be float32, got {bias.dtype}")
    if bias.device != x.device:
        raise ValueError(f"{what}: bias is on {bias.device}, the input on {x.device}")


def _check_input(x: torch.Tensor, words: torch.Tensor, what: str) -> None:
    if x.dtype != torch.float32:
        raise ValueError(f"{what}: input must be float32, got {x.dtype}")
    if words.device != x.device:
        raise ValueError(f"{what}: packed weights are on {words.device}, the input on {x.device}")


def conv2d_output_size(h: int, w: int, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                       dilation: Sequence[int]) -> tuple[int, int]:
    """Output height and width of a convolution with torch's formula."""
    oh = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    return oh, ow


def _check_conv(x: torch.Tensor, words: torch.Tensor, weight_shape: Sequence[int], stride: Sequence[int],
                padding: Sequence[int], dilation: Sequence[int], groups: int, bits: int, has_zero: bool,
                bias: Optional[torch.Tensor]) -> tuple[int, int]:
    what = "fxshift::shift_conv2d"
    if len(weight_shape) != 4 or len(stride) != 2 or len(padding) != 2 or len(dilation) != 2:
        raise ValueError(f"{what}: weight_shape needs 4 entries and stride/padding/dilation 2 each")
    if x.dim() != 4:
        raise ValueError(f"{what}: input must be NCHW (4-D), got shape {tuple(x.shape)}")
    o, cg, kh, kw = weight_shape
    if groups < 1 or o % groups or x.shape[1] != cg * groups:
        raise ValueError(f"{what}: input has {x.shape[1]} channels, weight_shape {tuple(weight_shape)} with "
                         f"groups={groups} needs {cg * groups} (and out channels divisible by groups)")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0 or min(weight_shape) < 1:
        raise ValueError(f"{what}: invalid geometry stride={tuple(stride)} padding={tuple(padding)} "
                         f"dilation={tuple(dilation)} weight_shape={tuple(weight_shape)}")
    _check_input(x, words, what)
    check_packed(words, o, cg * kh * kw, bits, has_zero, what)
    _check_bias(bias, o, x, what)
    oh, ow = conv2d_output_size(x.shape[2], x.shape[3], (kh, kw), stride, padding, dilation)
    if oh < 1 or ow < 1:
        raise ValueError(f"{what}: input {tuple(x.shape)} is too small for the kernel: output would be {oh}×{ow}")
    return oh, ow


def _check_linear(x: torch.Tensor, words: torch.Tensor, out_features: int, bits: int, has_zero: bool,
                  bias: Optional[torch.Tensor]) -> int:
    what = "fxshift::shift_linear"
    if x.dim() < 1:
        raise ValueError(f"{what}: input must have at least one dimension")
    if out_features < 1:
        raise ValueError(f"{what}: out_features={out_features} must be ≥ 1")
    _check_input(x, words, what)
    check_packed(words, out_features, x.shape[-1], bits, has_zero, what)
    _check_bias(bias, out_features, x, what)
    return x.shape[-1]


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
def _scaled(y: torch.Tensor, scale: Optional[torch.Tensor], bias: Optional[torch.Tensor], channel_dim: int
            ) -> torch.Tensor:
    """y ⊙ scale + bias per output channel (dim `channel_dim`): the scale step of a CUDA call made
    without the bias (the CPU kernels apply the scale themselves, fxs_shift_*_ex)."""
    shape = [1] * y.dim()
    shape[channel_dim] = -1
    y = y * scale.view(shape)
    return y if bias is None else y + bias.view(shape)


def _linear_cpu(x, words, out_features, bits, has_zero, bias=None, scale=None):
    from . import native

    k = _check_linear(x, words, out_features, bits, has_zero, bias)
    _check_bias(scale, out_features, x, "fxshift::shift_linear (scale)")
    x2 = x.reshape(-1, k).contiguous()
    y = native.shift_linear(x2, words.contiguous(), out_features, bits, int(has_zero),
                            None if bias is None else bias.contiguous(),
                            scale=None if scale is None else scale.contiguous())
    return y.reshape(*x.shape[:-1], out_features)


def _linear_fake(x, words, out_features, bits, has_zero, bias=None, scale=None):
    _check_linear(x, words, out_features, bits, has_zero, bias)
    _check_bias(scale, out_features, x, "fxshift::shift_linear (scale)")
    return x.new_empty((*x.shape[:-1], out_features))


def _cuda_backend():
    """The native loader's CUDA entry points, or NativeError saying they are missing."""
    from . import native

    cuda = getattr(native, "cuda", None)
    if callable(cuda):
        cuda = cuda()
    if cuda is None:
        raise NativeError("fxshift's CUDA shift kernels are not available in this build (the native library was "
                          "built without CUDA, or fxshift.ops.native exposes no CUDA entry points); run frozen "
                          "shift models on the CPU (model.cpu()) or build with nvcc present")
    return cuda


def _linear_cuda(x, words, out_features, bits, has_zero, bias=None, scale=None):
    k = _check_linear(x, words, out_features, bits, has_zero, bias)
    _check_bias(scale, out_features, x, "fxshift::shift_linear (scale)")
    cuda = _cuda_backend()
    x2 = x.reshape(-1, k).contiguous()
    native_bias = bias if scale is None else None
    y = cuda.shift_linear(x2, words.contiguous(), out_features, bits, int(has_zero),
                          None if native_bias is None else native_bias.contiguous())
    if scale is not None:
        y = _scaled(y, scale, bias, 1)
    return y.reshape(*x.shape[:-1], out_features)


def _conv_cpu(x, words, weight_shape, stride, padding, dilation, groups, bits, has_zero, bias=None, scale=None):
    from . import native

    _check_conv(x, words, weight_shape, stride, padding, dilation, groups, bits, has_zero, bias)
    _check_bias(scale, weight_shape[0], x, "fxshift::shift_conv2d (scale)")
    return native.shift_conv2d(x.contiguous(), words.contiguous(), tuple(weight_shape), tuple(stride),
                               tuple(padding), tuple(dilation), groups, bits, int(has_zero),
                               None if bias is None else bias.contiguous(),
                               scale=None if scale is None else scale.contiguous())


def _conv_fake(x, words, weight_shape, stride, padding, dilation, groups, bits, has_zero, bias=None, scale=None):
    oh, ow = _check_conv(x, words, weight_shape, stride, padding, dilation, groups, bits, has_zero, bias)
    _check_bias(scale, weight_shape[0], x, "fxshift::shift_conv2d (scale)")
    return x.new_empty((x.shape[0], weight_shape[0], oh, ow))


def _conv_cuda(x, words, weight_shape, stride, padding, dilation, groups, bits, has_zero, bias=None, scale=None):
    _check_conv(x, words, weight_shape, stride, padding, dilation, groups, bits, has_zero, bias)
    _check_bias(scale, weight_shape[0], x, "fxshift::shift_conv2d (scale)")
    cuda = _cuda_backend()
    native_bias = bias if scale is None else None
    y = cuda.shift_conv2d(x.contiguous(), words.contiguous(), tuple(weight_shape), tuple(stride),
                          tuple(padding), tuple(dilation), groups, bits, int(has_zero),
                          None if native_bias is None else native_bias.contiguous())
    return y if scale is None else _scaled(y, scale, bias, 1)


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------
SCHEMAS = {
    "shift_linear": "shift_linear(Tensor x, Tensor words, int out_features, int bits, bool has_zero, "
                    "Tensor? bias=None, Tensor? scale=None) -> Tensor",
    "shift_conv2d": "shift_conv2d(Tensor x, Tensor words, int[] weight_shape, int[] stride, int[] padding, "
                    "int[] dilation, int groups, int bits, bool has_zero, Tensor? bias=None, "
                    "Tensor? scale=None) -> Tensor",
}
_KERNELS = {"shift_linear": (_linear_cpu, _linear_cuda, _linear_fake),
            "shift_conv2d": (_conv_cpu, _conv_cuda, _conv_fake)}


def _defined(name: str) -> bool:
    try:
        getattr(torch.ops.fxshift, name)
        return True
    except (AttributeError, RuntimeError):
        return False


_LIB = torch.library.Library("fxshift", "FRAGMENT")  # FRAGMENT: other modules may add fxshift:: ops too
for _name, _schema in SCHEMAS.items():
    if _defined(_name):  # a re-imported module (importlib.reload) keeps the first registration
        continue
    _cpu, _cuda, _fake = _KERNELS[_name]
    _LIB.define(_schema)
    _LIB.impl(_name, _cpu, "CPU")
    _LIB.impl(_name, _cuda, "CUDA")
    torch.library.register_fake(f"fxshift::{_name}", _fake, lib=_LIB)


def shift_linear(x: torch.Tensor, words: torch.Tensor, out_features: int, bits: int, has_zero: bool,
                 bias: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = (x @ Wᵀ) ⊙ scale + bias (scale optional, per output feature) with W decoded from packed shift codes; x is (..., in_features), float32.

    Calls torch.ops.fxshift.shift_linear (CPU: native kernels; CUDA: CUDA kernels)."""
    return torch.ops.fxshift.shift_linear(x, words, out_features, bits, has_zero, bias, scale)


def shift_conv2d(x: torch.Tensor, words: torch.Tensor, weight_shape: Sequence[int], stride: Sequence[int],
                 padding: Sequence[int], dilation: Sequence[int], groups: int, bits: int, has_zero: bool,
                 bias: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """conv2d(x, W, bias) with torch semantics (zero padding, NCHW float32) and W of `weight_shape`
    (O, C_in/groups, kh, kw) decoded from packed codes. Calls torch.ops.fxshift.shift_conv2d."""
    return torch.ops.fxshift.shift_conv2d(x, words, list(weight_shape), list(stride), list(padding), list(dilation),
                                          groups, bits, has_zero, bias, scale)
