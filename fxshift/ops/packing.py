"""Packed shift-weight format: pure-torch reference of pack / unpack.

The format (shared with the C kernels in ``native/include/fxshift.h`` and the
ONNX export, which mirrors :func:`unpack` with standard ops):

* A shift weight is zero or ``(-1)**sign * 2**(-m)``, ``m >= 0`` an integer.
* Each weight is a ``bits``-wide code, ``2 <= bits <= 9``: the top bit is the
  sign, the low ``bits - 1`` bits are ``m``.
* If ``has_zero`` is 1, the code with sign 1 and ``m`` all ones (value
  ``2**bits - 1``) is the weight 0, so negative weights use ``m`` up to
  ``2**(bits-1) - 2`` (positive ones up to ``2**(bits-1) - 1``); with
  ``has_zero = 0`` there is no zero code.
* Codes are packed into little-endian uint32 words, ``32 // bits`` codes per
  word (bits 2→16, 3→10, 4→8, 5→6, 6→5, 7→4, 8→4, 9→3), code ``i`` of a word in
  bits ``[i*bits, (i+1)*bits)``; unused high bits are 0.
* A weight of shape ``(O, ...)`` is flattened to ``(O, K)`` (torch order; a conv
  weight ``(O, C/groups, kh, kw)`` gives ``K = C/groups*kh*kw``) and packed row by
  row, each row starting on a new word: ``row_words = ceil(K / codes_per_word)``.
  The packed tensor is ``torch.int32`` of shape ``(O, row_words)`` holding the
  word bits (torch lacks uint32 arithmetic on many ops).
* Decoding is total: ``m > 126`` (only reachable with 8 or 9 bits) decodes to a
  signed zero, as in the C kernels.

Everything here is vectorised torch and runs on any device; the format checks and the word
arithmetic are :class:`fxshift.ops.packed_weight.ShiftFormat` / ``PackedShiftWeight``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .packed_weight import MAX_BITS, MIN_BITS, PackedShiftWeight, ShiftFormat

__all__ = [
    "MIN_BITS",
    "MAX_BITS",
    "codes_per_word",
    "row_words",
    "max_magnitude",
    "pack",
    "unpack",
    "unpack_codes",
    "to_fixed",
    "MAX_NORMAL_SHIFT",
]

MAX_NORMAL_SHIFT = 126  # 2**-126 is the smallest normal float32: larger m decode to zero


def codes_per_word(bits: int) -> int:
    """Codes per uint32 word: ``32 // bits``."""
    return ShiftFormat(bits, 0).codes_per_word


def row_words(k: int, bits: int) -> int:
    """Words per packed row of ``k`` codes: ``ceil(k / codes_per_word(bits))``."""
    return ShiftFormat(bits, 0).row_words(k)


def max_magnitude(bits: int, has_zero: int, negative: bool) -> int:
    """Largest shift magnitude ``m`` representable for a weight of that sign."""
    return ShiftFormat(bits, has_zero).max_magnitude(negative)


def _as_rows(t: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < 2:
        raise ValueError(f"{name} must have shape (out, ...) with at least 2 dimensions, got {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {t.dtype}")
    return t.reshape(t.shape[0], -1)


def pack(sign: torch.Tensor, shift_magnitude: torch.Tensor, bits: int, has_zero: int) -> torch.Tensor:
    """Packs signs and shift magnitudes into ``int32`` words of shape ``(O, row_words)``.

    Parameters
    ----------
    sign : integer tensor of shape ``(O, ...)``, values in {-1, 0, +1}
        0 (a zero weight) needs ``has_zero=1``; its magnitude is ignored.
    shift_magnitude : integer tensor, same shape, values ``m >= 0``
        The weight is ``sign * 2**-m``.
    bits, has_zero : the format (see the module docstring).

    Raises
    ------
    ValueError
        On a shape/dtype mismatch, a sign outside {-1, 0, 1}, a zero without
        ``has_zero``, or a magnitude that does not fit ``bits``.
    """
    fmt = ShiftFormat(bits, has_zero)
    bits, has_zero = fmt.bits, fmt.has_zero
    s = _as_rows(sign, "sign")
    m = _as_rows(shift_magnitude, "shift_magnitude")
    if tuple(sign.shape) != tuple(shift_magnitude.shape):
        raise ValueError(f"sign {tuple(sign.shape)} and shift_magnitude {tuple(shift_magnitude.shape)} "
                         "must have the same shape")
    if s.device != m.device:
        raise ValueError(f"sign ({s.device}) and shift_magnitude ({m.device}) must be on the same device")
    s = s.to(torch.int64)
    m = m.to(torch.int64)
    rows, k = s.shape
    if ((s < -1) | (s > 1)).any():
        bad = s[(s < -1) | (s > 1)][0].item()
        raise ValueError(f"sign values must be -1, 0 or +1, found {bad}")
    nonzero = s != 0
    if not has_zero and (~nonzero).any():
        raise ValueError("sign contains 0 (a zero weight) but has_zero=0 has no zero code; "
                         "pack with has_zero=1 (one more bit in DeepShift-Q terms)")
    if (nonzero & (m < 0)).any():
        raise ValueError("shift_magnitude must be >= 0")
    mmax = fmt.max_magnitude(False)
    limit = torch.where(s < 0, fmt.max_magnitude(True), mmax)
    over = nonzero & (m > limit)
    if over.any():
        idx = over.nonzero()[0]
        raise ValueError(
            f"shift_magnitude {m[idx[0], idx[1]].item()} (sign {s[idx[0], idx[1]].item()}) at flat position "
            f"({idx[0].item()}, {idx[1].item()}) does not fit bits={bits}, has_zero={has_zero}: positive weights "
            f"allow m <= {mmax}, negative ones m <= {fmt.max_magnitude(True)}")

    codes = torch.where(nonzero, ((s < 0).to(torch.int64) << (bits - 1)) | m.clamp(min=0),
                        torch.full_like(m, fmt.zero_code))
    per = fmt.codes_per_word
    rw = fmt.row_words(k)
    padded = torch.zeros(rows, rw * per, dtype=torch.int64, device=s.device)
    padded[:, :k] = codes
    shifts = torch.arange(per, dtype=torch.int64, device=s.device) * bits
    words = (padded.view(rows, rw, per) << shifts).sum(dim=-1)  # disjoint bit fields: sum == or
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return words.to(torch.int32)


def _codes(packed: PackedShiftWeight) -> torch.Tensor:
    w = packed.words.reshape(packed.rows, packed.row_words).to(torch.int64) & 0xFFFFFFFF
    bits, per = packed.bits, packed.format.codes_per_word
    shifts = torch.arange(per, dtype=torch.int64, device=w.device) * bits
    codes = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(packed.rows, packed.row_words * per)[:, :packed.k]


def unpack(words: torch.Tensor, shape: Sequence[int], bits: int, has_zero: int) -> torch.Tensor:
    """Decodes packed words to the float32 weight of ``shape`` (``(O, ...)``).

    ``words`` holds ``O * row_words(K, bits)`` int32 words (any shape), e.g. the
    ``(O, row_words)`` tensor :func:`pack` returns.  Any bit pattern decodes to a
    finite value (see the module docstring); padding bits are ignored.
    """
    packed = PackedShiftWeight.of(words, shape, bits, has_zero)
    bits, has_zero = packed.bits, packed.has_zero
    codes = _codes(packed)
    m = codes & ((1 << (bits - 1)) - 1)
    negative = (codes >> (bits - 1)) == 1
    mag = torch.where(m > MAX_NORMAL_SHIFT, torch.zeros((), dtype=torch.float32, device=codes.device),
                      torch.exp2(-m.to(torch.float32)))
    w = torch.where(negative, -mag, mag)
    if has_zero:
        w = torch.where(codes == packed.format.zero_code, torch.zeros((), dtype=torch.float32, device=w.device), w)
    return w.reshape(packed.shape)


def unpack_codes(words: torch.Tensor, shape: Sequence[int], bits: int,
                 has_zero: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decodes packed words to ``(sign int8 in {-1, 0, 1}, shift_magnitude uint8)`` of ``shape``.

    The inverse of :func:`pack` (zero weights give sign 0, magnitude 0).
    """
    packed = PackedShiftWeight.of(words, shape, bits, has_zero)
    bits, has_zero = packed.bits, packed.has_zero
    codes = _codes(packed)
    m = codes & ((1 << (bits - 1)) - 1)
    sign = 1 - 2 * (codes >> (bits - 1))
    if has_zero:
        zero = codes == packed.format.zero_code
        sign = torch.where(zero, 0, sign)
        m = torch.where(zero, 0, m)
    return sign.to(torch.int8).reshape(packed.shape), m.to(torch.uint8).reshape(packed.shape)


def to_fixed(x: torch.Tensor, frac_bits: int, int_bits: int | None = None) -> torch.Tensor:
    """DeepShift's ``round_to_fixed`` as int32 fixed-point numbers (value = result * 2**-frac_bits).

    ``floor(x * 2**frac_bits)``, clamped to the ``int_bits.frac_bits`` range
    ``[-2**(int_bits-1), 2**(int_bits-1) - 2**-frac_bits]``; ``int_bits`` defaults
    to ``32 - frac_bits`` (the whole int32 range).  NaN maps to 0.  The result is
    the input format of the fixed-point kernels.
    """
    if isinstance(frac_bits, bool) or not isinstance(frac_bits, int) or not 0 <= frac_bits <= 31:
        raise ValueError(f"frac_bits must be an int in [0, 31], got {frac_bits!r}")
    if int_bits is None:
        int_bits = 32 - frac_bits
    if isinstance(int_bits, bool) or not isinstance(int_bits, int) or int_bits < 1 or int_bits + frac_bits > 32:
        raise ValueError(f"int_bits must be >= 1 with int_bits + frac_bits <= 32, got {int_bits!r}")
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise ValueError("x must be a floating-point tensor")
    hi = (1 << (int_bits + frac_bits - 1)) - 1
    lo = -(1 << (int_bits + frac_bits - 1))
    v = torch.floor(x.to(torch.float64) * float(1 << frac_bits))
    v = torch.nan_to_num(v, nan=0.0).clamp(lo, hi)
    return v.to(torch.int32)
