"""The per-output-channel scale of fxshift.ops.native.shift_linear / shift_conv2d (y = sum * scale + bias):
every ISA against the decoded-float torch result, and bit-equal to scaling the unscaled kernel output."""
import pytest
import torch
import torch.nn.functional as F

native = pytest.importorskip("fxshift.ops.native")
from fxshift.ops import packing  # noqa: E402

try:
    native.load()
    HAVE_EX = hasattr(native.load()[1], "fxs_shift_conv2d_ex")
except Exception:  # noqa: BLE001
    HAVE_EX = False
pytestmark = pytest.mark.skipif(not HAVE_EX, reason="libfxshift with fxs_*_ex not built")


def _words(gen, shape, bits=5):
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1, 1).to(torch.int8)
    sign[torch.rand(shape, generator=gen) < 0.1] = 0
    mag = torch.randint(0, (1 << (bits - 1)) - 1, shape, generator=gen).to(torch.uint8)
    return packing.pack(sign, mag, bits, 1)


@pytest.mark.parametrize("isa", native.supported_isas())
@pytest.mark.parametrize("batch", [1, 9])
def test_scale_linear_conv(isa, batch):
    gen = torch.Generator().manual_seed(batch)
    with native.forced_isa(isa):
        words = _words(gen, (24, 70))
        w = packing.unpack(words, (24, 70), 5, 1)
        x, bias = torch.randn(batch, 70, generator=gen), torch.randn(24, generator=gen)
        scale = torch.rand(24, generator=gen) * 3 - 1
        y = native.shift_linear(x, words, 24, 5, 1, bias, scale=scale)
        torch.testing.assert_close(y, F.linear(x, w) * scale + bias, rtol=1e-5, atol=1e-5)
        plain = native.shift_linear(x, words, 24, 5, 1)
        assert torch.equal(y, plain * scale + bias)
        cshape = (16, 6, 3, 3)
        cw = _words(gen, cshape)
        xc, cb = torch.randn(batch, 6, 12, 11, generator=gen), torch.randn(16, generator=gen)
        cs = torch.rand(16, generator=gen) + 0.5
        yc = native.shift_conv2d(xc, cw, cshape, 1, 1, 1, 1, 5, 1, cb, scale=cs)
        ref = F.conv2d(xc, packing.unpack(cw, cshape, 5, 1), None, 1, 1) * cs[:, None, None] + cb[:, None, None]
        torch.testing.assert_close(yc, ref, rtol=1e-5, atol=1e-5)
        plain = native.shift_conv2d(xc, cw, cshape, 1, 1, 1, 1, 5, 1)
        assert torch.equal(yc, plain * cs[:, None, None] + cb[:, None, None])


def test_bad_scale_names_it():
    words = _words(torch.Generator().manual_seed(0), (4, 10))
    with pytest.raises(ValueError, match="scale has 3 elements"):
        native.shift_linear(torch.randn(2, 10), words, 4, 5, 1, scale=torch.ones(3))
