"""The packed shift weight as one value: its format, its shape and its words, validated in one place.

Every layer that handles packed weights (the torch reference codec in fxshift.ops.packing, the cffi
wrappers in fxshift.ops.native, the torch ops in fxshift.ops.shift_ops, the frozen modules and
`fxshift inspect`) goes through :class:`ShiftFormat` for ``bits`` / ``has_zero`` and the word arithmetic,
and through :class:`PackedShiftWeight` for the word-count and dtype checks, so there is one
``row_words`` and one set of error messages. The format itself is described in fxshift.ops.packing.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = ["MIN_BITS", "MAX_BITS", "ShiftFormat", "PackedShiftWeight", "as_int"]

MIN_BITS = 2
MAX_BITS = 9
WORD_DTYPES = (torch.int32, torch.uint32)  # the word bits; torch lacks uint32 arithmetic on many ops


def as_int(value: Any, name: str, allow_bool: bool = False) -> int:
    """``value`` as a Python int (anything with ``__index__``), or ValueError naming ``name``."""
    if isinstance(value, bool) and not allow_bool:
        raise ValueError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {value!r}") from None


@dataclass(frozen=True)
class ShiftFormat:
    """``bits``-wide codes (top bit sign, low bits − 1 the magnitude m of ±2^−m), ``has_zero``: the all-ones
    code is the weight 0. Raises ValueError unless 2 ≤ bits ≤ 9 and has_zero is 0 or 1."""

    bits: int
    has_zero: int

    def __post_init__(self) -> None:
        bits = as_int(self.bits, "bits")
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {self.bits!r}")
        has_zero = as_int(self.has_zero, "has_zero", allow_bool=True)
        if has_zero not in (0, 1):
            raise ValueError(f"has_zero must be 0 or 1, got {self.has_zero!r}")
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "has_zero", has_zero)

    @property
    def codes_per_word(self) -> int:
        """Codes in one little-endian uint32 word: ``32 // bits``."""
        return 32 // self.bits

    @property
    def zero_code(self) -> int:
        """The code of the weight 0 when ``has_zero`` (sign 1, m all ones)."""
        return (1 << self.bits) - 1

    def row_words(self, k: int) -> int:
        """Words of one packed row of ``k`` codes: ``ceil(k / codes_per_word)``."""
        k = as_int(k, "k")
        if k < 0:
            raise ValueError(f"k must be a non-negative int, got {k!r}")
        return -(-k // self.codes_per_word)

    def max_magnitude(self, negative: bool) -> int:
        """Largest m representable for a weight of that sign (a negative one loses the zero code)."""
        mmax = (1 << (self.bits - 1)) - 1
        return mmax - 1 if (negative and self.has_zero) else mmax

    def packed_bytes(self, rows: int, k: int) -> int:
        """Bytes of a (rows, k) weight in this format."""
        return rows * self.row_words(k) * 4

    def __str__(self) -> str:
        return f"bits={self.bits}, has_zero={self.has_zero}"


def _weight_shape(shape: Sequence[int]) -> tuple[int, ...]:
    try:
        dims = tuple(as_int(d, "shape") for d in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be a sequence of ints, got {shape!r}") from None
    if len(dims) < 2 or any(d < 0 for d in dims):
        raise ValueError(f"shape must be (out, ...) with >= 2 non-negative dims, got {dims}")
    return dims


@dataclass(frozen=True, eq=False)
class PackedShiftWeight:
    """Packed words of a weight of ``shape`` (``(O, ...)``, flattened to ``(O, K)`` in torch order).

    ``words`` is int32 (or uint32) holding ``O · row_words(K)`` words; ``exact=True`` also requires the
    ``(O, row_words)`` layout the kernels and the ONNX nodes take. Construction raises ValueError with the
    expected count or shape; ``words`` itself is never copied or changed.
    """

    words: torch.Tensor
    shape: tuple[int, ...]
    format: ShiftFormat
    exact: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.format, ShiftFormat):
            raise ValueError(f"format must be a ShiftFormat, got {type(self.format).__name__}")
        object.__setattr__(self, "shape", _weight_shape(self.shape))
        w = self.words
        if not isinstance(w, torch.Tensor):
            raise ValueError(f"words must be a torch.Tensor, got {type(w).__name__}")
        if w.dtype not in WORD_DTYPES:
            raise ValueError(f"words must be int32 (the packed word bits), got {w.dtype}")
        rows, rw = self.rows, self.row_words
        if self.exact and tuple(w.shape) != (rows, rw):
            raise ValueError(f"packed weights have shape {tuple(w.shape)}, but {rows} rows of {self.k} {self.format.bits}-bit "
                             f"codes need ({rows}, {rw}) (row_words = ceil({self.k} / {self.format.codes_per_word}))")
        if w.numel() != rows * rw:
            raise ValueError(f"wrong word count: words has {w.numel()} elements (shape {tuple(w.shape)}), a "
                             f"{self.shape} weight with bits={self.format.bits} packs to {rows} x {rw} = "
                             f"{rows * rw} words (row_words = ceil({self.k} / {self.format.codes_per_word}))")

    @classmethod
    def of(cls, words: torch.Tensor, shape: Sequence[int], bits: int, has_zero: int,
           exact: bool = False) -> "PackedShiftWeight":
        return cls(words, tuple(shape), ShiftFormat(bits, has_zero), exact)

    @property
    def bits(self) -> int:
        return self.format.bits

    @property
    def has_zero(self) -> int:
        return self.format.has_zero

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def k(self) -> int:
        """Codes per row: the product of ``shape[1:]``."""
        k = 1
        for d in self.shape[1:]:
            k *= d
        return k

    @property
    def row_words(self) -> int:
        return self.format.row_words(self.k)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed words."""
        return self.format.packed_bytes(self.rows, self.k)

    def row_major(self) -> torch.Tensor:
        """The words as a contiguous ``(O, row_words)`` int32 tensor (a view when already so)."""
        w = self.words.reshape(self.rows, self.row_words)
        return (w if w.dtype == torch.int32 else w.view(torch.int32)).contiguous()
