"""The packed shift weight value (fxshift.ops.packed_weight): one format check, one word count, one message
for the torch codec, the native wrappers, the torch ops and the frozen modules."""
import pytest
import torch
from torch import nn

import fxshift
from fxshift.nn import ShiftConv2d, ShiftLinear
from fxshift.ops import packing
from fxshift.ops.packed_weight import PackedShiftWeight, ShiftFormat


def test_format_arithmetic():
    fmt = ShiftFormat(5, 1)
    assert (fmt.codes_per_word, fmt.zero_code) == (6, 31)
    assert [fmt.row_words(k) for k in (0, 1, 6, 7, 4096)] == [0, 1, 1, 2, 683]
    assert (fmt.max_magnitude(False), fmt.max_magnitude(True)) == (15, 14)
    assert ShiftFormat(5, 0).max_magnitude(True) == 15
    assert fmt.packed_bytes(10, 27) == 10 * 5 * 4
    assert [ShiftFormat(b, 0).codes_per_word for b in range(2, 10)] == [16, 10, 8, 6, 5, 4, 4, 3]
    assert ShiftFormat(4, True).has_zero == 1  # a bool has_zero is accepted as 0/1
    assert str(fmt) == "bits=5, has_zero=1"


@pytest.mark.parametrize("bits, has_zero, message", [(1, 0, "bits must be an int in"), (10, 0, "bits must be"),
                                                    (5.0, 0, "bits must be an int"), (True, 0, "bits must be an int"),
                                                    (5, 2, "has_zero must be 0 or 1"), (5, None, "has_zero")])
def test_format_rejects(bits, has_zero, message):
    with pytest.raises(ValueError, match=message):
        ShiftFormat(bits, has_zero)


def test_weight_validation():
    words = torch.zeros(4, 2, dtype=torch.int32)
    packed = PackedShiftWeight.of(words, (4, 3, 2, 2), 5, 0, exact=True)  # K = 12 → 2 words a row
    assert (packed.rows, packed.k, packed.row_words, packed.nbytes) == (4, 12, 2, 32)
    assert packed.row_major().data_ptr() == words.data_ptr()  # no copy
    assert PackedShiftWeight.of(words.flatten(), (4, 12), 5, 0).row_major().shape == (4, 2)
    as_u32 = PackedShiftWeight.of(words.view(torch.uint32), (4, 12), 5, 0).row_major()
    assert as_u32.dtype == torch.int32
    with pytest.raises(ValueError, match=r"wrong word count: words has 8 elements .* packs to 4 x 3 = 12 words "
                                         r"\(row_words = ceil\(13 / 6\)\)"):
        PackedShiftWeight.of(words, (4, 13), 5, 0)
    with pytest.raises(ValueError, match=r"packed weights have shape \(8,\), but 4 rows of 12 5-bit codes "
                                         r"need \(4, 2\)"):
        PackedShiftWeight.of(words.flatten(), (4, 12), 5, 0, exact=True)
    with pytest.raises(ValueError, match="int32"):
        PackedShiftWeight.of(words.float(), (4, 12), 5, 0)
    with pytest.raises(ValueError, match="int32"):
        PackedShiftWeight.of(words.long(), (4, 12), 5, 0)
    with pytest.raises(ValueError, match="torch.Tensor"):
        PackedShiftWeight.of(words.numpy(), (4, 12), 5, 0)
    for shape in [(12,), (4, -1), ("a", 3)]:
        with pytest.raises(ValueError, match="shape"):
            PackedShiftWeight.of(words, shape, 5, 0)
    with pytest.raises(ValueError, match="format must be a ShiftFormat"):
        PackedShiftWeight(words, (4, 12), (5, 0))


def test_every_layer_reports_the_same_count():
    """The codec, the C wrappers and the torch op name the same expected words for one bad input."""
    from fxshift.ops import native

    words = torch.zeros(3, 1, dtype=torch.int32)
    expected = r"packs to 3 x 2 = 6 words"
    with pytest.raises(ValueError, match=expected):
        packing.unpack(words, (3, 7), 5, 0)
    with pytest.raises(native.NativeArgumentError, match=r"fxshift.ops.native.unpack: wrong word count.*" + expected):
        native.unpack(words, (3, 7), 5, 0)
    with pytest.raises(native.NativeArgumentError, match=expected):
        native.shift_linear(torch.randn(2, 7), words, 3, 5, 0)
    with pytest.raises(ValueError, match=r"fxshift::shift_linear: packed weights have shape \(3, 1\), but 3 rows "
                                         r"of 7 5-bit codes need \(3, 2\)"):
        torch.ops.fxshift.shift_linear(torch.randn(2, 7), words, 3, 5, False)
    with pytest.raises(ValueError, match="fxshift::shift_linear: bits must be an int in"):
        torch.ops.fxshift.shift_linear(torch.randn(2, 7), words, 3, 12, False)


@pytest.mark.parametrize("layer", [ShiftConv2d.from_conv(nn.Conv2d(4, 8, 3)), ShiftLinear.from_linear(nn.Linear(20, 6))])
def test_frozen_module_exposes_its_packed_weight(layer):
    frozen = fxshift.freeze(layer)
    packed = frozen.packed
    assert packed.words is frozen.words and packed.shape == tuple(frozen.weight_shape)
    assert (packed.bits, packed.has_zero) == (frozen.bits, frozen.has_zero)
    assert frozen.weight_bytes == packed.nbytes == frozen.words.numel() * 4
    assert torch.equal(packing.unpack(packed.words, packed.shape, packed.bits, packed.has_zero),
                       frozen.unpacked_weight())
