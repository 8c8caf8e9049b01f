"""Int8-exact shift layers (issue 21): the 7-octave channel limit, and two calibrated-conversion fixes."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import fxshift
from conftest import conv_bn_cnn
from fxshift import ShiftQuantizePass
from fxshift.nn.shift import ShiftConv2d, ShiftLinear
from fxshift.quantize.int8_exact import channel_shift_counts, int8_codes, is_int8_exact, limit_channel_shifts


def _model():
    return conv_bn_cnn(groups=1)


def test_limit_and_codes_math():
    w = torch.tensor([[1.0, -2 ** -7, 2 ** -3, 0.0], [-2 ** -2, 2 ** -8, 0.0, 2 ** -8]])
    assert channel_shift_counts(w).tolist() == [8, 7]
    assert not is_int8_exact(w)
    lim = limit_channel_shifts(w)
    assert lim.tolist() == [[1.0, -2 ** -6, 2 ** -3, 0.0], [-2 ** -2, 2 ** -8, 0.0, 2 ** -8]]
    assert is_int8_exact(lim)
    q, step = int8_codes(lim, torch.tensor([0.75, -3.0]))
    assert q.tolist() == [[64, -1, 8, 0], [64, -1, 0, -1]]   # a negative factor flips the channel
    assert torch.equal(q.float() * step[:, None], lim * torch.tensor([[0.75], [-3.0]]))
    with pytest.raises(ValueError, match="octaves"):
        int8_codes(w)
    assert not is_int8_exact(torch.tensor([[0.3, 1.0]]))     # not a power of two


@pytest.mark.parametrize("mode", ["q", "ps"])
def test_pass_keeps_4bit_channels_int8_exact(mode):
    m, x = _model(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        m[0].weight[0, 0, 0, 0] = 1.0        # a channel whose largest shift is 0 and smallest −7 (Q, 4 bits)
        m[0].weight[0, 0, 0, 1] = 2 ** -7
    gm = fxshift.apply([ShiftQuantizePass(mode=mode, weight_bits=4)], m, x).eval()
    rows = {r["layer"]: r for r in fxshift.report(gm).to_dicts()}
    for name in ("0", "3", "7"):
        assert rows[name]["int8_exact"] is True
        assert is_int8_exact(gm.get_submodule(name).quantized_weight())
    assert gm.get_submodule("0").quantized_weight()[0, 0, 0, 1] == 2 ** -6   # raised to the channel's floor
    off = fxshift.apply([ShiftQuantizePass(weight_bits=4, int8_exact=False)], m, x).eval()
    assert {r["layer"]: r for r in fxshift.report(off).to_dicts()}["0"]["int8_exact"] is False
    five = fxshift.apply([ShiftQuantizePass(weight_bits=5)], m, x).eval()
    assert five.get_submodule("0").channel_shifts is None


def test_calibrated_4bit_layers_are_int8_exact_and_survive_save_load(tmp_path):
    m, x = _model(), torch.randn(4, 3, 8, 8)
    cal = [torch.randn(16, 3, 8, 8)]
    gm = fxshift.apply([ShiftQuantizePass(weight_bits=4, calibration=cal, progress=False, iterations=10)], m, x)
    for r in fxshift.report(gm).to_dicts():
        if r["action"] == "shifted":
            assert r["int8_exact"] is True, r["layer"]
    fxshift.save(gm, tmp_path / "g.pt")
    back = fxshift.load(_model(), tmp_path / "g.pt").eval()
    assert back.get_submodule("3").channel_shifts == 7
    with torch.no_grad():
        assert torch.equal(back(x), gm.eval()(x))


def test_calibrated_bn_fold_commutes_with_train_mode():
    """Issue 21: folding the per-channel scale into BatchNorm as γ' = γ·s was right only in eval mode."""
    m = _model()
    cal = [torch.randn(32, 3, 16, 16) for _ in range(2)]
    gm = fxshift.apply([ShiftQuantizePass(weight_bits=5, calibration=cal, progress=False)], m, cal[0][:1])
    assert gm.get_submodule("0").scale is None           # folded into the BatchNorm
    ref, conv = copy.deepcopy(m), copy.deepcopy(gm)
    x = torch.randn(16, 3, 16, 16)

    def err(a, b):
        return float((a - b).norm() / b.norm())

    with torch.no_grad():
        eval_error = err(conv.eval()(x), ref.eval()(x))
        ref.train(), conv.train()
        train_error = err(conv(x), ref(x))
        for i in range(60):                               # train-mode forwards, no weight update
            batch = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(i))
            ref(batch), conv(batch)
        after = err(conv.eval()(x), ref.eval()(x))
    assert eval_error < 0.1
    assert train_error < 0.1          # was 0.8 with γ' = γ·s
    assert after < 0.1                # was 0.8: running stats drifted from the folded γ


def test_scaled_shift_conv_on_unbatched_input():
    """Issue 21: a calibrated scale on an unbatched (C, H, W) input went onto the width axis."""
    torch.manual_seed(0)
    layer = ShiftConv2d.from_conv(nn.Conv2d(3, 4, 3, padding=1))
    layer.set_scale(torch.tensor([0.5, 2.0, 1.5, 0.25]))
    x = torch.randn(3, 4, 4)                              # width 4 = channels 4: a wrong axis still broadcasts
    with torch.no_grad():
        assert torch.allclose(layer(x), layer(x.unsqueeze(0))[0], atol=1e-6)


def test_per_channel_scale_survives_onnx_export(tmp_path):
    """Quick-suite twin of test_shift_calibration's slow ONNX test: scale on a conv and a linear, frozen,
    exported, run through the function bodies and (when built) the plugin."""
    torch.manual_seed(0)
    conv = ShiftConv2d.from_conv(nn.Conv2d(2, 3, 3, padding=1))
    conv.set_scale(torch.tensor([0.5, 2.0, 1.5]))
    lin = ShiftLinear.from_linear(nn.Linear(3 * 4 * 4, 5))
    lin.set_scale(torch.linspace(0.25, 3.0, 5))
    model = nn.Sequential(conv, nn.Flatten(), lin).eval()
    x = torch.randn(2, 2, 4, 4)
    with torch.no_grad():
        ref = model(x).numpy()
        unscaled = nn.Sequential(copy.deepcopy(conv), nn.Flatten(), copy.deepcopy(lin)).eval()
        unscaled[0].set_scale(None)
        unscaled[2].set_scale(None)
        assert np.abs(unscaled(x).numpy() - ref).max() > 0.1   # the scale matters for this check
    path = fxshift.export_onnx(model, x, tmp_path / "s.onnx")
    plugins = [False] + ([True] if fxshift.onnx.plugin_available() else [])
    for plugin in plugins:
        sess = fxshift.onnx.session(str(path), plugin=plugin)
        out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        assert np.abs(out - ref).max() < 1e-4, plugin
