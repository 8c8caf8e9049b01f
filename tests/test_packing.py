"""The packed shift-weight format: pure-torch pack/unpack (fxshift.ops.packing) and its C twin."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxshift.errors import FxshiftError
from fxshift.ops import native, packing

HYP = settings(max_examples=60, deadline=None, derandomize=True)


def random_weights(gen, shape, bits, has_zero, zero_frac=0.2):
    """Random valid (sign int8, magnitude uint8) of ``shape``."""
    mmax = (1 << (bits - 1)) - 1
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1, 1).to(torch.int8)
    if has_zero:
        sign[torch.rand(shape, generator=gen) < zero_frac] = 0
    mag = torch.randint(0, mmax + 1, shape, generator=gen)
    mag = torch.where((sign < 0) & (mag == mmax) & bool(has_zero), mmax - 1, mag).to(torch.uint8)
    return sign, mag


def reference_value(sign, mag):
    mag = mag.to(torch.float64)
    val = sign.to(torch.float64) * torch.where(mag > 126, 0.0, torch.exp2(-mag))
    return val.to(torch.float32)


def test_codes_per_word_and_row_words():
    assert [packing.codes_per_word(b) for b in range(2, 10)] == [16, 10, 8, 6, 5, 4, 4, 3]
    assert packing.row_words(0, 5) == 0
    assert packing.row_words(6, 5) == 1
    assert packing.row_words(7, 5) == 2
    assert packing.row_words(4096, 5) == 683
    for bad in (1, 10, 5.0, True, None):
        with pytest.raises(ValueError):
            packing.codes_per_word(bad)
    with pytest.raises(ValueError):
        packing.row_words(-1, 5)


def test_known_words():
    # bits=5: codes 3 (+2^-3), 0b10010 = 18 (-2^-2), 31 (zero) -> 3 | 18 << 5 | 31 << 10
    sign = torch.tensor([[1, -1, 0]], dtype=torch.int8)
    mag = torch.tensor([[3, 2, 9]], dtype=torch.uint8)
    words = packing.pack(sign, mag, 5, 1)
    assert words.dtype == torch.int32 and words.shape == (1, 1)
    assert words.item() == 3 | 18 << 5 | 31 << 10
    assert packing.unpack(words, (1, 3), 5, 1).tolist() == [[0.125, -0.25, 0.0]]
    # bits=2, 16 codes of value 3 (sign 1, m 1): every bit set -> int32 -1
    words = packing.pack(-torch.ones(1, 16, dtype=torch.int8), torch.ones(1, 16, dtype=torch.uint8), 2, 0)
    assert words.item() == -1
    assert packing.unpack(words, (1, 16), 2, 0).eq(-0.5).all()
    # rows start on a new word; padding is zero
    words = packing.pack(torch.ones(2, 7, dtype=torch.int8), torch.zeros(2, 7, dtype=torch.uint8), 5, 0)
    assert words.shape == (2, 2) and words[:, 1].eq(0).all()


def test_unpack_clamps_out_of_range_magnitudes():
    # bits=9: m up to 255; m > 126 decodes to (signed) zero, as in the C kernels
    mags = [0, 1, 126, 127, 200, 255]
    codes = torch.tensor(mags, dtype=torch.int64)
    words = (codes[0::3] | codes[1::3] << 9 | codes[2::3] << 18).to(torch.int32).reshape(2, 1)
    w = packing.unpack(words, (2, 3), 9, 0)
    assert w.flatten().tolist() == [1.0, 0.5, 2.0 ** -126, 0.0, 0.0, 0.0]
    assert torch.isfinite(w).all()


@HYP
@given(rows=st.integers(1, 6), k=st.integers(1, 40), bits=st.integers(2, 9), has_zero=st.integers(0, 1),
       seed=st.integers(0, 2**31 - 1))
def test_round_trip(rows, k, bits, has_zero, seed):
    gen = torch.Generator().manual_seed(seed)
    sign, mag = random_weights(gen, (rows, k), bits, has_zero)
    words = packing.pack(sign, mag, bits, has_zero)
    assert words.shape == (rows, packing.row_words(k, bits))
    w = packing.unpack(words, (rows, k), bits, has_zero)
    assert torch.equal(w, reference_value(sign, mag))
    s2, m2 = packing.unpack_codes(words, (rows, k), bits, has_zero)
    assert torch.equal(s2, sign)
    assert torch.equal(m2, torch.where(sign == 0, 0, mag.to(torch.int64)).to(torch.uint8))


def test_conv_weight_shape_round_trip():
    gen = torch.Generator().manual_seed(1)
    sign, mag = random_weights(gen, (8, 3, 3, 3), 4, 1)
    words = packing.pack(sign, mag, 4, 1)
    assert words.shape == (8, packing.row_words(27, 4))
    w = packing.unpack(words, (8, 3, 3, 3), 4, 1)
    assert w.shape == (8, 3, 3, 3)
    assert torch.equal(w, reference_value(sign, mag))


def test_pack_validation():
    ones = torch.ones(2, 4, dtype=torch.int8)
    zeros = torch.zeros(2, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="-1, 0 or \\+1"):
        packing.pack(ones * 2, zeros, 5, 1)
    with pytest.raises(ValueError, match="has_zero=0"):
        packing.pack(ones * 0, zeros, 5, 0)
    with pytest.raises(ValueError, match="does not fit"):
        packing.pack(ones, zeros + 16, 5, 0)
    packing.pack(ones, zeros + 15, 5, 1)  # positive weights keep m = 15 with has_zero
    with pytest.raises(ValueError, match="does not fit"):
        packing.pack(-ones, zeros + 15, 5, 1)  # ... negative ones do not: that is the zero code
    packing.pack(-ones, zeros + 15, 5, 0)
    packing.pack(ones * 0, zeros + 200, 5, 1)  # a zero's magnitude is ignored
    with pytest.raises(ValueError, match="same shape"):
        packing.pack(ones, torch.zeros(2, 5, dtype=torch.uint8), 5, 0)
    with pytest.raises(ValueError, match="integer dtype"):
        packing.pack(ones.float(), zeros, 5, 0)
    with pytest.raises(ValueError, match="at least 2"):
        packing.pack(ones[0], zeros[0], 5, 0)
    with pytest.raises(ValueError, match=">= 0"):
        packing.pack(ones, -torch.ones(2, 4, dtype=torch.int64), 5, 0)
    with pytest.raises(ValueError, match="bits"):
        packing.pack(ones, zeros, 10, 0)
    with pytest.raises(ValueError, match="has_zero"):
        packing.pack(ones, zeros, 5, 2)


def test_unpack_validation():
    words = torch.zeros(2, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="wrong word count"):
        packing.unpack(words, (2, 7), 5, 0)
    with pytest.raises(ValueError, match="wrong word count"):
        packing.unpack_codes(words, (3, 6), 5, 0)
    with pytest.raises(ValueError, match="int32"):
        packing.unpack(words.float(), (2, 6), 5, 0)
    with pytest.raises(ValueError, match="shape"):
        packing.unpack(words, (12,), 5, 0)
    packing.unpack(words.flatten(), (2, 6), 5, 0)  # any shape with the right count


def test_to_fixed():
    x = torch.tensor([0.0, 1.5, -1.5, -0.3, 1e10, -1e10, float("nan")])
    f = packing.to_fixed(x, 4)
    assert f.dtype == torch.int32
    assert f.tolist() == [0, 24, -24, -5, 2**31 - 1, -(2**31), 0]
    # DeepShift's 8-bit example (3 integer, 5 fraction bits): range [-4, 4 - 2^-5]
    f = packing.to_fixed(torch.tensor([10.0, -10.0, 0.51]), 5, 3)
    assert f.tolist() == [127, -128, 16]
    with pytest.raises(ValueError):
        packing.to_fixed(x, 32)
    with pytest.raises(ValueError):
        packing.to_fixed(x, 16, 17)


# ---- torch reference vs the C library -------------------------------------------------------
@HYP
@given(rows=st.integers(1, 5), k=st.integers(1, 50), bits=st.integers(2, 9), has_zero=st.integers(0, 1),
       seed=st.integers(0, 2**31 - 1))
def test_torch_and_c_agree(rows, k, bits, has_zero, seed):
    gen = torch.Generator().manual_seed(seed)
    sign, mag = random_weights(gen, (rows, k), bits, has_zero)
    words = packing.pack(sign, mag, bits, has_zero)
    assert torch.equal(native.pack(sign, mag, bits, has_zero), words)
    assert torch.equal(native.unpack(words, (rows, k), bits, has_zero), packing.unpack(words, (rows, k), bits,
                                                                                           has_zero))
    cs, cm = native.unpack_codes(words, (rows, k), bits, has_zero)
    ts, tm = packing.unpack_codes(words, (rows, k), bits, has_zero)
    assert torch.equal(cs, ts) and torch.equal(cm, tm)
    # garbage words (padding bits too) decode identically and finitely
    garbage = torch.randint(-(2**31), 2**31, words.shape, generator=gen, dtype=torch.int64).to(torch.int32)
    for isa in native.supported_isas():
        with native.forced_isa(isa):
            c = native.unpack(garbage, (rows, k), bits, has_zero)
        t = packing.unpack(garbage, (rows, k), bits, has_zero)
        assert torch.equal(c, t), isa
        assert torch.isfinite(c).all() and c.abs().le(1).all()


def test_c_pack_validation_matches():
    ones = torch.ones(2, 4, dtype=torch.int8)
    zeros = torch.zeros(2, 4, dtype=torch.uint8)
    for sign, mag, bits, hz in [(ones * 0, zeros, 5, 0), (-ones, zeros + 15, 5, 1), (ones, zeros + 16, 5, 0)]:
        with pytest.raises(ValueError):
            packing.pack(sign, mag, bits, hz)
        with pytest.raises(native.NativeArgumentError, match="not representable"):
            native.pack(sign, mag, bits, hz)
    with pytest.raises(FxshiftError, match="wrong word count"):
        native.unpack(torch.zeros(3, dtype=torch.int32), (2, 7), 5, 0)
    with pytest.raises(ValueError, match="int8"):
        native.pack(ones.to(torch.int64), zeros, 5, 0)
    assert native.pack(torch.ones(0, 4, dtype=torch.int8), torch.zeros(0, 4, dtype=torch.uint8), 5, 0).shape == (0, 1)


def test_exact_powers_of_two():
    # every magnitude decodes to exactly 2^-m, in torch and in C
    m = torch.arange(0, 128).reshape(1, -1)
    sign = torch.ones_like(m, dtype=torch.int8)
    words = packing.pack(sign, m.to(torch.uint8), 8, 0)
    w = packing.unpack(words, m.shape, 8, 0).flatten().tolist()
    assert w[:127] == [math.ldexp(1.0, -i) for i in range(127)]
    assert w[127] == 0.0
    assert native.unpack(words, m.shape, 8, 0).flatten().tolist() == w
