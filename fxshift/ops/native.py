"""cffi (ABI mode) loader and torch wrappers of the native shift kernels (libfxshift).

The library is found where fxshift.ops.libraries looks (``$FXSHIFT_NATIVE_DIR`` first) and
loaded lazily, once.  Every wrapper takes torch tensors (contiguous, CPU;
float32 activations or int32 fixed-point ones, int32 packed words), allocates
the output, and calls the C kernel with the GIL released.  Argument problems
raise :class:`NativeArgumentError` (a :class:`~fxshift.errors.NativeError` and
a :class:`ValueError`) naming the argument; a missing library raises
:class:`~fxshift.errors.NativeError` saying how to build it.

The packed weight format is documented in :mod:`fxshift.ops.packing`.
"""
from __future__ import annotations

import contextlib
import operator
import threading
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch

from ..errors import NativeError
from .libraries import candidates, library_filename
from .packed_weight import PackedShiftWeight, ShiftFormat

__all__ = [
    "NativeArgumentError",
    "ABI_VERSION",
    "load",
    "library_path",
    "pack",
    "unpack",
    "unpack_codes",
    "shift_linear",
    "shift_conv2d",
    "shift_linear_fixed",
    "shift_conv2d_fixed",
    "conv2d_output_size",
    "set_num_threads",
    "get_num_threads",
    "active_isa",
    "supported_isas",
    "force_isa",
    "forced_isa",
    "cuda",
]


class NativeArgumentError(NativeError, ValueError):
    """A native kernel rejected its arguments (wrong dtype, device, shape or size)."""


ABI_VERSION = 1

# Declarations of native/include/fxshift.h (tests/test_native_kernels.py checks they agree).
CDEF = """
typedef struct fxs_conv2d_shape {
    int64_t n, c, h, w;
    int64_t out_channels;
    int64_t kh, kw;
    int64_t stride_h, stride_w;
    int64_t pad_h, pad_w;
    int64_t dilation_h, dilation_w;
    int64_t groups;
} fxs_conv2d_shape;
int fxs_abi_version(void);
const char *fxs_status_message(int status);
int fxs_codes_per_word(int bits);
int64_t fxs_row_words(int64_t k, int bits);
int fxs_conv2d_output_size(const fxs_conv2d_shape *shape, int64_t *out_h, int64_t *out_w);
int fxs_pack(const int8_t *sign, const uint8_t *shift_mag, int64_t len, int64_t rows, int64_t k, int bits, int has_zero, uint32_t *out, int64_t out_words);
int fxs_unpack(const uint32_t *w, int64_t w_words, int64_t rows, int64_t k, int bits, int has_zero, float *out, int64_t out_len);
int fxs_unpack_codes(const uint32_t *w, int64_t w_words, int64_t rows, int64_t k, int bits, int has_zero, int8_t *sign, uint8_t *shift_mag, int64_t len);
int fxs_shift_linear(const float *x, int64_t x_len, int64_t batch, int64_t in_features, const uint32_t *w, int64_t w_words, int64_t out_features, int bits, int has_zero, const float *bias, int64_t bias_len, float *y, int64_t y_len);
int fxs_shift_conv2d(const fxs_conv2d_shape *shape, const float *x, int64_t x_len, const uint32_t *w, int64_t w_words, int bits, int has_zero, const float *bias, int64_t bias_len, float *y, int64_t y_len);
int fxs_shift_linear_fixed(const int32_t *x, int64_t x_len, int64_t batch, int64_t in_features, const uint32_t *w, int64_t w_words, int64_t out_features, int bits, int has_zero, const int32_t *bias, int64_t bias_len, int frac_bits, float *y, int64_t y_len);
int fxs_shift_conv2d_fixed(const fxs_conv2d_shape *shape, const int32_t *x, int64_t x_len, const uint32_t *w, int64_t w_words, int bits, int has_zero, const int32_t *bias, int64_t bias_len, int frac_bits, float *y, int64_t y_len);
typedef void (*fxs_body_fn)(void *arg, int64_t i);
typedef void (*fxs_parallel_for_fn)(void *runner, int64_t n, fxs_body_fn body, void *arg);
typedef struct fxs_exec { fxs_parallel_for_fn parallel_for; void *runner; int max_threads; } fxs_exec;
int fxs_shift_linear_ex(const float *x, int64_t x_len, int64_t batch, int64_t in_features, const uint32_t *w, int64_t w_words, int64_t out_features, int bits, int has_zero, const float *scale, int64_t scale_len, const float *bias, int64_t bias_len, float *y, int64_t y_len, const fxs_exec *exec);
int fxs_shift_conv2d_ex(const fxs_conv2d_shape *shape, const float *x, int64_t x_len, const uint32_t *w, int64_t w_words, int bits, int has_zero, const float *scale, int64_t scale_len, const float *bias, int64_t bias_len, float *y, int64_t y_len, const fxs_exec *exec);
int fxs_set_pool_spin_us(int us);
int fxs_set_num_threads(int n);
int fxs_get_num_threads(void);
int fxs_force_isa(int isa);
int fxs_active_isa(void);
int fxs_isa_supported(int isa);
const char *fxs_isa_name(int isa);
"""

# Declarations of native/include/fxshift_cuda.h.
CUDA_CDEF = """
int fxs_cuda_abi_version(void);
int fxs_cuda_device_count(void);
int fxs_cuda_shift_linear(const float *x, int64_t x_len, int64_t batch, int64_t in_features, const uint32_t *w, int64_t w_words, int64_t out_features, int bits, int has_zero, const float *bias, int64_t bias_len, float *y, int64_t y_len, void *stream);
int fxs_cuda_shift_conv2d(const fxs_conv2d_shape *shape, const float *x, int64_t x_len, const uint32_t *w, int64_t w_words, int bits, int has_zero, const float *bias, int64_t bias_len, float *y, int64_t y_len, void *stream);
int fxs_cuda_shift_linear_ex(const float *x, int64_t x_len, int64_t batch, int64_t in_features, const uint32_t *w, int64_t w_words, int64_t out_features, int bits, int has_zero, const float *scale, int64_t scale_len, const float *bias, int64_t bias_len, float *y, int64_t y_len, void *stream);
int fxs_cuda_shift_conv2d_ex(const fxs_conv2d_shape *shape, const float *x, int64_t x_len, const uint32_t *w, int64_t w_words, int bits, int has_zero, const float *scale, int64_t scale_len, const float *bias, int64_t bias_len, float *y, int64_t y_len, void *stream);
"""

# fxs_status codes (fxshift.h)
OK = 0
ERR_NULL_POINTER = -1
ERR_BAD_SIZE = -2
ERR_BAD_BITS = -3
ERR_WORD_COUNT = -4
ERR_INPUT_SIZE = -5
ERR_OUTPUT_SIZE = -6
ERR_BIAS_SIZE = -7
ERR_CONV_GEOMETRY = -8
ERR_GROUPS = -9
ERR_VALUE_RANGE = -10
ERR_FRAC_BITS = -11
ERR_BAD_ISA = -12
ERR_THREADS = -13
ERR_OUT_OF_MEMORY = -14
ERR_CUDA = -15
ERR_NO_DEVICE = -16
ERR_BAD_POINTER = -17

ISAS = {"auto": -1, "scalar": 0, "avx2": 1, "avx512": 2}

BUILD_HINT = ("build it with `pip install -e .` (scikit-build-core runs CMake) or, for development, "
              "`cmake -S . -B build/dev -G Ninja -DCMAKE_BUILD_TYPE=Release && cmake --build build/dev`, "
              "or point FXSHIFT_NATIVE_DIR at the folder holding it")

_lock = threading.Lock()
_state: dict = {}


def _ffi():
    ffi = _state.get("ffi")
    if ffi is None:
        try:
            import cffi
        except ImportError as exc:  # pragma: no cover - cffi is a dependency
            raise NativeError(f"fxshift's native kernels need cffi ({exc}); pip install cffi") from exc
        ffi = cffi.FFI()
        ffi.cdef(CDEF + CUDA_CDEF)  # one FFI for both libraries: they share fxs_conv2d_shape
        _state["ffi"] = ffi
    return ffi


def _open(stem: str):
    """Returns (ffi, lib, path) for the first loadable candidate, or (ffi, None, [tried])."""
    ffi = _ffi()
    tried = []
    for path in candidates(stem):
        if not path.is_file():
            tried.append(str(path))
            continue
        try:
            return ffi, ffi.dlopen(str(path)), path
        except OSError as exc:
            tried.append(f"{path} ({exc})")
    return ffi, None, tried


def load():
    """Loads libfxshift (once) and returns ``(ffi, lib)``; raises NativeError if it cannot."""
    st = _state.get("cpu")
    if st is not None:
        return st
    with _lock:
        st = _state.get("cpu")
        if st is not None:
            return st
        ffi, lib, where = _open("fxshift")
        if lib is None:
            raise NativeError("fxshift's native library (" + library_filename("fxshift") + ") was not found; "
                              + BUILD_HINT + ". Looked in: " + "; ".join(where))
        version = lib.fxs_abi_version()
        if version != ABI_VERSION:
            raise NativeError(f"{where} has ABI version {version}, this fxshift expects {ABI_VERSION}: "
                              f"the build is stale; rebuild it ({BUILD_HINT})")
        _state["cpu"] = (ffi, lib)
        _state["cpu_path"] = where
        return ffi, lib


def library_path() -> Path:
    """Path of the loaded libfxshift (loads it if needed)."""
    load()
    return _state["cpu_path"]


# ---------------------------------------------------------------------------------------------
# argument helpers
# ---------------------------------------------------------------------------------------------
def _message(lib, ffi, status: int) -> str:
    return ffi.string(lib.fxs_status_message(status)).decode()


def _raise(fn: str, status: int, detail: str = ""):
    ffi, lib = load()
    msg = f"fxshift.ops.native.{fn}: {_message(lib, ffi, status)} (status {status})"
    if detail:
        msg += f"; {detail}"
    if status in (ERR_OUT_OF_MEMORY, ERR_CUDA, ERR_NO_DEVICE, ERR_BAD_POINTER):
        raise NativeError(msg)
    raise NativeArgumentError(msg)


def _arg_error(fn: str, msg: str):
    raise NativeArgumentError(f"fxshift.ops.native.{fn}: {msg}")


def _int(fn: str, name: str, value, allow_bool: bool = False) -> int:
    if isinstance(value, bool) and not allow_bool:
        _arg_error(fn, f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        _arg_error(fn, f"{name} must be an int, got {value!r}")


def _pair(fn: str, name: str, value) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            _arg_error(fn, f"{name} must be an int or a pair of ints, got {value!r}")
        return _int(fn, name, value[0]), _int(fn, name, value[1])
    v = _int(fn, name, value)
    return v, v


def _tensor(fn: str, name: str, t, dtypes: Sequence[torch.dtype], device: str = "cpu") -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        _arg_error(fn, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        _arg_error(fn, f"{name} must be {want}, got {t.dtype}")
    if t.device.type != device:
        _arg_error(fn, f"{name} must be on the {device.upper()}, got {t.device} "
                       + ("(use the CUDA entry points, fxshift.ops.native.cuda())" if device == "cpu" else ""))
    if not t.is_contiguous():
        _arg_error(fn, f"{name} must be contiguous (call .contiguous()), got strides {t.stride()}")
    return t


def _ptr(ffi, ctype: str, t: Optional[torch.Tensor]):
    if t is None:
        return ffi.NULL
    return ffi.cast(ctype + " *", t.data_ptr())


def _format(fn: str, bits, has_zero) -> ShiftFormat:
    try:
        return ShiftFormat(bits, has_zero)
    except ValueError as e:
        _arg_error(fn, str(e))


def _packed(fn: str, words: torch.Tensor, shape: Sequence[int], fmt: ShiftFormat) -> PackedShiftWeight:
    """The words as a validated PackedShiftWeight of `shape`, or NativeArgumentError with the expected count."""
    try:
        return PackedShiftWeight(words, tuple(shape), fmt)
    except ValueError as e:
        _arg_error(fn, str(e))


def _check_bias(fn: str, bias, n: int, dtype: torch.dtype, device: str = "cpu") -> Optional[torch.Tensor]:
    if bias is None:
        return None
    bias = _tensor(fn, "bias", bias, (dtype,), device)
    if bias.numel() != n:
        _arg_error(fn, f"bias has {bias.numel()} elements (shape {tuple(bias.shape)}), expected {n}")
    return bias


# ---------------------------------------------------------------------------------------------
# pack / unpack
# ---------------------------------------------------------------------------------------------
def pack(sign: torch.Tensor, shift_magnitude: torch.Tensor, bits: int, has_zero: int) -> torch.Tensor:
    """C version of :func:`fxshift.ops.packing.pack`: int8 signs, uint8 magnitudes → int32 (O, row_words)."""
    fn = "pack"
    ffi, lib = load()
    fmt = _format(fn, bits, has_zero)
    bits, has_zero = fmt.bits, fmt.has_zero
    sign = _tensor(fn, "sign", sign, (torch.int8,))
    mag = _tensor(fn, "shift_magnitude", shift_magnitude, (torch.uint8,))
    if sign.dim() < 2 or tuple(sign.shape) != tuple(mag.shape):
        _arg_error(fn, f"sign {tuple(sign.shape)} and shift_magnitude {tuple(mag.shape)} must have the same "
                       "shape (out, ...) with at least 2 dimensions")
    rows = sign.shape[0]
    k = 1
    for d in sign.shape[1:]:
        k *= d
    out = torch.empty(rows, fmt.row_words(k), dtype=torch.int32)
    if out.numel() == 0:
        return out
    st = lib.fxs_pack(_ptr(ffi, "int8_t", sign), _ptr(ffi, "uint8_t", mag), sign.numel(), rows, k, bits,
                      has_zero, _ptr(ffi, "uint32_t", out), out.numel())
    if st != OK:
        _raise(fn, st, f"bits={bits}, has_zero={has_zero}" if st == ERR_VALUE_RANGE else "")
    return out


def _unpack_args(fn: str, words, shape, bits, has_zero):
    fmt = _format(fn, bits, has_zero)
    words = _tensor(fn, "words", words, (torch.int32, torch.uint32))
    packed = _packed(fn, words, shape, fmt)
    return words, packed.shape, packed.rows, packed.k, fmt.bits, fmt.has_zero


def unpack(words: torch.Tensor, shape: Sequence[int], bits: int, has_zero: int) -> torch.Tensor:
    """C version of :func:`fxshift.ops.packing.unpack`: packed words → float32 weight of ``shape``."""
    fn = "unpack"
    ffi, lib = load()
    words, shape, rows, k, bits, has_zero = _unpack_args(fn, words, shape, bits, has_zero)
    out = torch.empty(shape, dtype=torch.float32)
    if out.numel() == 0:
        return out
    st = lib.fxs_unpack(_ptr(ffi, "uint32_t", words), words.numel(), rows, k, bits, has_zero,
                        _ptr(ffi, "float", out), out.numel())
    if st != OK:
        _raise(fn, st)
    return out


def unpack_codes(words: torch.Tensor, shape: Sequence[int], bits: int,
                 has_zero: int) -> tuple[torch.Tensor, torch.Tensor]:
    """C version of :func:`fxshift.ops.packing.unpack_codes`: words → (sign int8, magnitude uint8)."""
    fn = "unpack_codes"
    ffi, lib = load()
    words, shape, rows, k, bits, has_zero = _unpack_args(fn, words, shape, bits, has_zero)
    sign = torch.empty(shape, dtype=torch.int8)
    mag = torch.empty(shape, dtype=torch.uint8)
    if sign.numel() == 0:
        return sign, mag
    st = lib.fxs_unpack_codes(_ptr(ffi, "uint32_t", words), words.numel(), rows, k, bits, has_zero,
                              _ptr(ffi, "int8_t", sign), _ptr(ffi, "uint8_t", mag), sign.numel())
    if st != OK:
        _raise(fn, st)
    return sign, mag


# ---------------------------------------------------------------------------------------------
# linear
# ---------------------------------------------------------------------------------------------
def _linear(fn: str, x, words, out_features, bits, has_zero, bias, x_dtype, frac_bits=None,
            device: str = "cpu"):
    fmt = _format(fn, bits, has_zero)
    bits, has_zero = fmt.bits, fmt.has_zero
    out_features = _int(fn, "out_features", out_features)
    if out_features < 1:
        _arg_error(fn, f"out_features must be >= 1, got {out_features}")
    x = _tensor(fn, "x", x, (x_dtype,), device)
    words = _tensor(fn, "words", words, (torch.int32, torch.uint32), device)
    if x.dim() < 1 or x.shape[-1] < 1:
        _arg_error(fn, f"x must have shape (..., in_features) with in_features >= 1, got {tuple(x.shape)}")
    k = x.shape[-1]
    batch = x.numel() // k
    _packed(fn, words, (out_features, k), fmt)
    bias = _check_bias(fn, bias, out_features, x_dtype, device)
    y = torch.empty(*x.shape[:-1], out_features, dtype=torch.float32, device=x.device)
    return x, words, bias, y, batch, k, out_features, bits, has_zero


def _linear_detail(st: int, x, words, out_features, k, bits, bias) -> str:
    if st == ERR_BAD_SIZE:
        return f"x shape {tuple(x.shape)}, out_features={out_features} (each dimension must be in [1, 2^31-1])"
    if st == ERR_WORD_COUNT:
        return f"words has {words.numel()} elements, expected {out_features * ShiftFormat(bits, 0).row_words(k)}"
    if st == ERR_BIAS_SIZE and bias is not None:
        return f"bias has {bias.numel()} elements, expected {out_features}"
    return f"x shape {tuple(x.shape)}, words {tuple(words.shape)}, out_features={out_features}, bits={bits}"


def _check_scale(fn: str, scale, n: int) -> Optional[torch.Tensor]:
    if scale is None:
        return None
    scale = _tensor(fn, "scale", scale, (torch.float32,))
    if scale.numel() != n:
        _arg_error(fn, f"scale has {scale.numel()} elements (shape {tuple(scale.shape)}), expected {n} "
                       "(one per output channel)")
    return scale


def _ex(lib, name: str):
    try:
        return getattr(lib, name)
    except AttributeError:
        raise NativeError(f"the loaded libfxshift has no {name} (a per-channel scale needs a libfxshift built "
                          "from this fxshift); rebuild the native library") from None


def shift_linear(x: torch.Tensor, words: torch.Tensor, out_features: int, bits: int, has_zero: int,
                 bias: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y = (x @ W.T) * scale + bias`` with W the packed ``(out_features, in_features)`` shift weight.

    x: float32 ``(..., in_features)``; words: int32 ``(out_features, row_words)``;
    bias, scale: float32 ``(out_features,)`` or None (scale None = 1; it multiplies the sum before the bias,
    so the kernel's inner loop stays multiplication-free).  Returns float32 ``(..., out_features)``.
    """
    fn = "shift_linear"
    ffi, lib = load()
    x, words, bias, y, batch, k, o, bits, has_zero = _linear(fn, x, words, out_features, bits, has_zero, bias,
                                                             torch.float32)
    scale = _check_scale(fn, scale, o)
    if batch == 0:
        return y
    if scale is not None:
        st = _ex(lib, "fxs_shift_linear_ex")(
            _ptr(ffi, "float", x), x.numel(), batch, k, _ptr(ffi, "uint32_t", words), words.numel(), o, bits,
            has_zero, _ptr(ffi, "float", scale), scale.numel(), _ptr(ffi, "float", bias),
            0 if bias is None else bias.numel(), _ptr(ffi, "float", y), y.numel(), ffi.NULL)
    else:
        st = lib.fxs_shift_linear(_ptr(ffi, "float", x), x.numel(), batch, k, _ptr(ffi, "uint32_t", words),
                                  words.numel(), o, bits, has_zero, _ptr(ffi, "float", bias),
                                  0 if bias is None else bias.numel(), _ptr(ffi, "float", y), y.numel())
    if st != OK:
        _raise(fn, st, _linear_detail(st, x, words, o, k, bits, bias))
    return y


def _frac(fn: str, frac_bits) -> int:
    fb = _int(fn, "frac_bits", frac_bits)
    if not 0 <= fb <= 31:
        _arg_error(fn, f"frac_bits must be in [0, 31], got {fb}")
    return fb


def shift_linear_fixed(x: torch.Tensor, words: torch.Tensor, out_features: int, bits: int, has_zero: int,
                       bias: Optional[torch.Tensor], frac_bits: int) -> torch.Tensor:
    """Fixed-point linear with DeepShift semantics.

    x and bias are int32 fixed-point (value = v * 2**-frac_bits, see
    :func:`fxshift.ops.packing.to_fixed`); each weight adds ``±(x >> m)``
    (arithmetic shift = floor) into an exact int64 sum started from bias; the
    result is ``float32(sum * 2**-frac_bits)``.  Returns float32 ``(..., out_features)``.
    """
    fn = "shift_linear_fixed"
    ffi, lib = load()
    fb = _frac(fn, frac_bits)
    x, words, bias, y, batch, k, o, bits, has_zero = _linear(fn, x, words, out_features, bits, has_zero, bias,
                                                             torch.int32)
    if batch == 0:
        return y
    st = lib.fxs_shift_linear_fixed(_ptr(ffi, "int32_t", x), x.numel(), batch, k, _ptr(ffi, "uint32_t", words),
                                    words.numel(), o, bits, has_zero, _ptr(ffi, "int32_t", bias),
                                    0 if bias is None else bias.numel(), fb, _ptr(ffi, "float", y), y.numel())
    if st != OK:
        _raise(fn, st, _linear_detail(st, x, words, o, k, bits, bias))
    return y


# ---------------------------------------------------------------------------------------------
# conv2d
# ---------------------------------------------------------------------------------------------
def _conv_shape(ffi, fn, x_shape, weight_shape, stride, padding, dilation, groups):
    try:
        ws = tuple(_int(fn, "weight_shape", d) for d in weight_shape)
    except TypeError:
        _arg_error(fn, f"weight_shape must be (out_channels, in_channels/groups, kh, kw), got {weight_shape!r}")
    if len(ws) != 4:
        _arg_error(fn, f"weight_shape must be (out_channels, in_channels/groups, kh, kw), got {weight_shape!r}")
    if len(x_shape) != 4:
        _arg_error(fn, f"x must be 4-D (N, C, H, W), got shape {tuple(x_shape)}")
    sh, sw = _pair(fn, "stride", stride)
    ph, pw = _pair(fn, "padding", padding)
    dh, dw = _pair(fn, "dilation", dilation)
    g = _int(fn, "groups", groups)
    n, c, h, w = x_shape
    if g >= 1 and c != ws[1] * g:
        _arg_error(fn, f"x has {c} channels but weight_shape {ws} with groups={g} expects {ws[1] * g}")
    s = ffi.new("fxs_conv2d_shape *")
    s.n, s.c, s.h, s.w = n, c, h, w
    s.out_channels, s.kh, s.kw = ws[0], ws[2], ws[3]
    s.stride_h, s.stride_w, s.pad_h, s.pad_w = sh, sw, ph, pw
    s.dilation_h, s.dilation_w, s.groups = dh, dw, g
    return s, ws


def _geometry_detail(s) -> str:
    return (f"input (N={s.n}, C={s.c}, H={s.h}, W={s.w}), out_channels={s.out_channels}, "
            f"kernel {s.kh}x{s.kw}, stride ({s.stride_h}, {s.stride_w}), padding ({s.pad_h}, {s.pad_w}), "
            f"dilation ({s.dilation_h}, {s.dilation_w}), groups={s.groups}")


def conv2d_output_size(x_shape: Sequence[int], weight_shape: Sequence[int], stride=1, padding=0, dilation=1,
                       groups: int = 1) -> tuple[int, int]:
    """(out_h, out_w) of a conv, validated by the C library (same rules as the kernels)."""
    fn = "conv2d_output_size"
    ffi, lib = load()
    s, _ = _conv_shape(ffi, fn, tuple(x_shape), weight_shape, stride, padding, dilation, groups)
    oh = ffi.new("int64_t *")
    ow = ffi.new("int64_t *")
    st = lib.fxs_conv2d_output_size(s, oh, ow)
    if st != OK:
        _raise(fn, st, _geometry_detail(s))
    return int(oh[0]), int(ow[0])


def _conv(fn, x, words, weight_shape, stride, padding, dilation, groups, bits, has_zero, bias, x_dtype,
          device: str = "cpu"):
    """Validates a conv call (geometry by the CPU library's rules) and allocates y."""
    ffi, lib = load()
    fmt = _format(fn, bits, has_zero)
    bits, has_zero = fmt.bits, fmt.has_zero
    x = _tensor(fn, "x", x, (x_dtype,), device)
    words = _tensor(fn, "words", words, (torch.int32, torch.uint32), device)
    s, ws = _conv_shape(ffi, fn, tuple(x.shape), weight_shape, stride, padding, dilation, groups)
    oh = ffi.new("int64_t *")
    ow = ffi.new("int64_t *")
    if x.shape[0] == 0:  # empty batch: validate the geometry with n = 1
        s.n = 1
    st = lib.fxs_conv2d_output_size(s, oh, ow)
    s.n = x.shape[0]
    if st != OK:
        _raise(fn, st, _geometry_detail(s))
    _packed(fn, words, ws, fmt)
    bias = _check_bias(fn, bias, ws[0], x_dtype, device)
    y = torch.empty(x.shape[0], ws[0], int(oh[0]), int(ow[0]), dtype=torch.float32, device=x.device)
    return s, x, words, bias, y, bits, has_zero


def _conv_detail(st, s, words, bits) -> str:
    if st in (ERR_CONV_GEOMETRY, ERR_GROUPS, ERR_BAD_SIZE):
        return _geometry_detail(s)
    if st == ERR_WORD_COUNT:
        return f"words has {words.numel()} elements (bits={bits})"
    return _geometry_detail(s)


def shift_conv2d(x: torch.Tensor, words: torch.Tensor, weight_shape: Sequence[int], stride=1, padding=0,
                 dilation=1, groups: int = 1, bits: int = 5, has_zero: int = 0,
                 bias: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``conv2d(x, W) * scale[o] + bias[o]`` (torch semantics: zero padding, groups, dilation) with W packed.

    x: float32 ``(N, C, H, W)``; words: int32 ``(O, row_words)`` of the
    ``weight_shape = (O, C/groups, kh, kw)`` weight; stride/padding/dilation: int
    or pair; bias, scale: float32 ``(O,)`` or None (scale None = 1, applied before the bias).
    Returns float32 ``(N, O, out_h, out_w)``.
    """
    fn = "shift_conv2d"
    ffi, lib = load()
    s, x, words, bias, y, bits, has_zero = _conv(fn, x, words, weight_shape, stride, padding, dilation,
                                                 groups, bits, has_zero, bias, torch.float32)
    scale = _check_scale(fn, scale, int(weight_shape[0]))
    if y.numel() == 0:
        return y
    if scale is not None:
        st = _ex(lib, "fxs_shift_conv2d_ex")(
            s, _ptr(ffi, "float", x), x.numel(), _ptr(ffi, "uint32_t", words), words.numel(), bits, has_zero,
            _ptr(ffi, "float", scale), scale.numel(), _ptr(ffi, "float", bias), 0 if bias is None else bias.numel(),
            _ptr(ffi, "float", y), y.numel(), ffi.NULL)
    else:
        st = lib.fxs_shift_conv2d(s, _ptr(ffi, "float", x), x.numel(), _ptr(ffi, "uint32_t", words),
                                  words.numel(), bits, has_zero, _ptr(ffi, "float", bias),
                                  0 if bias is None else bias.numel(), _ptr(ffi, "float", y), y.numel())
    if st != OK:
        _raise(fn, st, _conv_detail(st, s, words, bits))
    return y


def shift_conv2d_fixed(x: torch.Tensor, words: torch.Tensor, weight_shape: Sequence[int], stride, padding,
                       dilation, groups: int, bits: int, has_zero: int, bias: Optional[torch.Tensor],
                       frac_bits: int) -> torch.Tensor:
    """Fixed-point conv2d with DeepShift semantics (see :func:`shift_linear_fixed`); x, bias int32."""
    fn = "shift_conv2d_fixed"
    ffi, lib = load()
    fb = _frac(fn, frac_bits)
    s, x, words, bias, y, bits, has_zero = _conv(fn, x, words, weight_shape, stride, padding, dilation,
                                                 groups, bits, has_zero, bias, torch.int32)
    if y.numel() == 0:
        return y
    st = lib.fxs_shift_conv2d_fixed(s, _ptr(ffi, "int32_t", x), x.numel(), _ptr(ffi, "uint32_t", words),
                                    words.numel(), bits, has_zero, _ptr(ffi, "int32_t", bias),
                                    0 if bias is None else bias.numel(), fb, _ptr(ffi, "float", y), y.numel())
    if st != OK:
        _raise(fn, st, _conv_detail(st, s, words, bits))
    return y


# ---------------------------------------------------------------------------------------------
# threads and ISA
# ---------------------------------------------------------------------------------------------
def set_num_threads(n: int) -> None:
    """Threads the kernels use (0: the default, i.e. the CPUs this process may run on)."""
    ffi, lib = load()
    n = _int("set_num_threads", "n", n)
    st = lib.fxs_set_num_threads(n)
    if st != OK:
        _raise("set_num_threads", st, f"n={n}")


def get_num_threads() -> int:
    """Threads the kernels use."""
    return int(load()[1].fxs_get_num_threads())


def _isa_name(ffi, lib, isa: int) -> str:
    return ffi.string(lib.fxs_isa_name(isa)).decode()


def active_isa() -> str:
    """Name of the kernel table in use: "scalar", "avx2" or "avx512"."""
    ffi, lib = load()
    return _isa_name(ffi, lib, lib.fxs_active_isa())


def supported_isas() -> list[str]:
    """ISAs this CPU and build can run, the scalar reference first."""
    ffi, lib = load()
    return [name for name, v in ISAS.items() if v >= 0 and lib.fxs_isa_supported(v)]


def force_isa(isa: Union[str, int, None]) -> None:
    """Switches the kernel table process-wide ("scalar" for the reference; None/"auto" restores)."""
    ffi, lib = load()
    if isa is None:
        isa = "auto"
    v = ISAS.get(isa, None) if isinstance(isa, str) else isa
    if v is None:
        _arg_error("force_isa", f"unknown ISA {isa!r}; known: {', '.join(ISAS)}")
    st = lib.fxs_force_isa(v)
    if st != OK:
        _raise("force_isa", st, f"isa={isa!r}; supported here: {', '.join(supported_isas())}")


@contextlib.contextmanager
def forced_isa(isa: Union[str, int]) -> Iterator[None]:
    """Context manager: run the block with ``isa`` forced, then restore the previous table."""
    previous = active_isa()
    force_isa(isa)
    try:
        yield
    finally:
        force_isa(previous)


# ---------------------------------------------------------------------------------------------
# CUDA (libfxshift_cuda)
# ---------------------------------------------------------------------------------------------
class CudaKernels:
    """Wrappers of libfxshift_cuda: the same signatures as the CPU ones, on CUDA tensors.

    The kernels run on torch's current CUDA stream of the input's device.
    """

    def __init__(self, ffi, lib, path: Path):
        self._ffi = ffi
        self._lib = lib
        self.path = path

    def device_count(self) -> int:
        return int(self._lib.fxs_cuda_device_count())

    def _stream(self, t: torch.Tensor):
        stream = torch.cuda.current_stream(t.device)
        return self._ffi.cast("void *", stream.cuda_stream)

    def shift_linear(self, x, words, out_features, bits, has_zero, bias=None):
        fn = "cuda.shift_linear"
        ffi, lib = self._ffi, self._lib
        x, words, bias, y, batch, k, o, bits, has_zero = _linear(fn, x, words, out_features, bits, has_zero, bias,
                                                                 torch.float32, device="cuda")
        if words.device != x.device or (bias is not None and bias.device != x.device):
            _arg_error(fn, "x, words and bias must be on the same CUDA device")
        if batch == 0:
            return y
        with torch.cuda.device(x.device):
            st = lib.fxs_cuda_shift_linear(_ptr(ffi, "float", x), x.numel(), batch, k,
                                           _ptr(ffi, "uint32_t", words), words.numel(), o, bits, has_zero,
                                           _ptr(ffi, "float", bias), 0 if bias is None else bias.numel(),
                                           _ptr(ffi, "float", y), y.numel(), self._stream(x))
        if st != OK:
            _raise(fn, st, _linear_detail(st, x, words, o, k, bits, bias))
        return y

    def shift_conv2d(self, x, words, weight_shape, stride=1, padding=0, dilation=1, groups=1, bits=5,
                     has_zero=0, bias=None):
        fn = "cuda.shift_conv2d"
        ffi, lib = self._ffi, self._lib
        s, x, words, bias, y, bits, has_zero = _conv(fn, x, words, weight_shape, stride, padding,
                                                     dilation, groups, bits, has_zero, bias, torch.float32,
                                                     device="cuda")
        if words.device != x.device or (bias is not None and bias.device != x.device):
            _arg_error(fn, "x, words and bias must be on the same CUDA device")
        if y.numel() == 0:
            return y
        with torch.cuda.device(x.device):
            st = lib.fxs_cuda_shift_conv2d(s, _ptr(ffi, "float", x), x.numel(), _ptr(ffi, "uint32_t", words),
                                           words.numel(), bits, has_zero, _ptr(ffi, "float", bias),
                                           0 if bias is None else bias.numel(), _ptr(ffi, "float", y), y.numel(),
                                           self._stream(x))
        if st != OK:
            _raise(fn, st, _conv_detail(st, s, words, bits))
        return y


def cuda() -> Optional[CudaKernels]:
    """The CUDA kernels (libfxshift_cuda), or None when that library was not built/found.

    Argument checks and messages come from libfxshift (the CPU library), which
    must be loadable too.
    """
    if "cuda" in _state:
        return _state["cuda"]
    load()
    with _lock:
        if "cuda" in _state:
            return _state["cuda"]
        ffi, lib, where = _open("fxshift_cuda")
        result = None
        if lib is not None and lib.fxs_cuda_abi_version() == ABI_VERSION:
            result = CudaKernels(ffi, lib, where)
        _state["cuda"] = result
        return result
