"""Calibrated DeepShift-Q conversion (issue 14): the math, the pass, and everything downstream."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fxshift
from conftest import conv_bn_cnn
from fxshift import ConfigError, ShiftQuantizePass
from fxshift.quantize.shift_calibration import (StatsAccumulator, adaround_plan, calibrate_shift_weight, conv_columns,
                                                linear_columns, nearest_log_codes, output_error)


def _stats(w, x, xq=None, keep=0):  # one batch of Linear inputs
    acc = StatsAccumulator(w, total=len(x), keep=keep)
    acc.add(linear_columns(x), linear_columns(x if xq is None else xq))
    return acc.finish()


def _is_pow2(t, bits):
    m = -torch.log2(t.abs())
    return bool(((m - m.round()).abs() < 1e-6).all() and (m >= 0).all() and (m <= 2 ** (bits - 1) - 1).all())


def test_conv_columns_reproduce_conv2d():
    torch.manual_seed(0)
    x, w = torch.randn(2, 4, 7, 6), torch.randn(6, 2, 3, 3)
    cols = conv_columns(x, (3, 3), (2, 1), (1, 1, 1, 1), (1, 1), groups=2)
    y = torch.nn.functional.conv2d(x, w, stride=(2, 1), padding=1, groups=2)
    wg = w.reshape(2, 3, -1)
    y2 = (wg @ cols).reshape(6, 2, -1).permute(1, 0, 2)
    assert torch.allclose(y2.reshape(y.shape), y, atol=1e-5)


def test_output_error_matches_direct_computation():
    torch.manual_seed(0)
    x = torch.randn(3000, 20).relu() + 1.0   # large mean: the shifted accumulation must not lose precision
    xq = x + 0.05 * torch.randn_like(x)
    w, b = torch.randn(8, 20), torch.randn(8)
    w2, b2 = w + 0.1 * torch.randn_like(w), b + 0.1
    direct = ((x @ w.t() + b) - (xq @ w2.t() + b2)).norm() / (x @ w.t() + b).norm()
    assert output_error(_stats(w, x, xq), b, w2, b2) == pytest.approx(float(direct), rel=1e-4)


def test_calibration_beats_plain_and_keeps_codes_powers_of_two():
    torch.manual_seed(0)
    x = torch.randn(2000, 48).relu() * torch.rand(48) * 3
    xq = x + 0.05 * torch.randn_like(x)
    w, b = 0.1 * torch.randn(16, 48), 0.1 * torch.randn(16)
    st = _stats(w, x, xq)
    for bits in (5, 4):
        res = calibrate_shift_weight(w, b, st, bits, iterations=50)
        assert _is_pow2(res.codes, bits)
        assert (res.scale > 0).all()
        y, yh = x @ w.t() + b, xq @ (res.scale[:, None] * res.codes).t() + res.bias
        direct = float((y - yh).norm() / y.norm())
        assert res.error_calibrated == pytest.approx(direct, rel=1e-3)
        assert res.error_calibrated < 0.8 * res.error_plain
        # bias correction: no mean output shift is left on the calibration data
        assert torch.allclose((y - yh).mean(0), torch.zeros(16), atol=1e-3 * float(y.abs().mean()))


def test_rounding_choice_is_a_neighbour_and_adaround_is_no_worse_than_nearest():
    torch.manual_seed(1)
    x = torch.randn(1000, 32) @ torch.randn(32, 32)   # correlated inputs: rounding choices interact
    w = 0.2 * torch.randn(12, 32)
    st = _stats(w, x)
    near = calibrate_shift_weight(w, None, st, 5, adaround=False)
    ada = calibrate_shift_weight(w, None, st, 5, iterations=100)
    assert ada.error_calibrated <= near.error_calibrated + 1e-6
    assert ada.adaround_rows > 0
    # each code is the lower or the upper power of two around |w|/s (s the scale before the refit)
    ratio = (w.abs() / ada.scale[:, None]).clamp(2.0 ** -15, 1)
    lo = torch.floor(torch.log2(ratio))
    p = torch.log2(ada.codes.abs())
    assert bool(((p - lo) > -1.5).all() and ((p - lo) < 2.5).all())
    assert torch.equal(torch.sign(ada.codes), torch.sign(w))


def test_projected_stats_match_direct_moments_and_keep_a_sample():
    torch.manual_seed(2)
    x = torch.randn(600, 10) + 3.0
    xq = x + 0.1 * torch.randn_like(x)
    w, off = torch.randn(4, 10), torch.randn(600, 4)
    acc = StatsAccumulator(w, total=600, keep=100)
    for sl in (slice(0, 250), slice(250, 600)):     # two batches: the shift of the first must not bias the sums
        acc.add(linear_columns(x[sl]), linear_columns(xq[sl]), linear_columns(off[sl]))
    st = acc.finish()
    u = x @ w.t() + off
    uc, qc = u - u.mean(0), xq - xq.mean(0)
    assert torch.allclose(st.mean_u[0], u.mean(0), atol=1e-4)
    assert torch.allclose(st.var_u[0], (uc ** 2).mean(0), rtol=1e-4)
    assert torch.allclose(st.c_uq[0], uc.t() @ qc / 600, atol=1e-4)
    assert torch.allclose(st.h_qq[0], qc.t() @ qc / 600, atol=1e-4)
    assert st.cols_q.shape == (1, 100, 10) and st.cols_u.shape == (1, 100, 4)
    # the kept columns are rows of the centred data, in the same order for x̃ and u
    i = int((qc - st.cols_q[0, 0]).norm(dim=1).argmin())
    assert torch.allclose(st.cols_q[0, 0], qc[i], atol=1e-4) and torch.allclose(st.cols_u[0, 0], uc[i], atol=1e-4)
    with pytest.raises(ValueError, match="offset"):
        acc.add(linear_columns(x[:5]), linear_columns(xq[:5]), torch.zeros(1, 3, 5))


def test_adaround_plan_exact_when_cheap_minibatch_within_budget():
    assert adaround_plan(64, 576, 1, 10 ** 5, 100) == (0, 0)                # O·K²·T fits: Hqq
    assert adaround_plan(512, 4608, 1, 1000, 100, max_macs=1e12) == (1000, 1000)   # n < K/2: all columns
    keep, batch = adaround_plan(512, 4608, 1, 1568, 100, max_macs=1e11)
    assert 128 <= batch <= keep <= 1568
    assert 2 * 512 * 4608 * batch * 100 <= 1e11
    assert adaround_plan(512, 4608, 1, 1568, 0) == (0, 0)


def test_minibatch_and_column_adaround_agree_with_the_exact_one():
    torch.manual_seed(3)
    x = torch.randn(3000, 40) @ torch.randn(40, 40) * 0.3
    w = 0.2 * torch.randn(24, 40)
    exact = calibrate_shift_weight(w, None, _stats(w, x), 5, iterations=100)
    near = calibrate_shift_weight(w, None, _stats(w, x), 5, adaround=False)
    cols = calibrate_shift_weight(w, None, _stats(w, x, keep=3000), 5, iterations=100, batch=3000)
    mini = calibrate_shift_weight(w, None, _stats(w, x, keep=1000), 5, iterations=100, batch=128)
    assert cols.error_calibrated == pytest.approx(exact.error_calibrated, rel=0.02)   # same gradient, other order
    assert mini.adaround_batch == 128 and exact.adaround_batch == 0
    assert mini.error_calibrated <= near.error_calibrated + 1e-6
    assert mini.error_calibrated < exact.error_calibrated * 1.1 + 1e-6
    assert _is_pow2(mini.codes, 5)


def _model():
    return conv_bn_cnn(groups=2)


@pytest.fixture(scope="module")
def calibrated():
    m = _model()
    x = torch.randn(8, 3, 16, 16)
    cal = [torch.randn(16, 3, 16, 16) for _ in range(2)]
    gm = fxshift.apply([ShiftQuantizePass(weight_bits=5, calibration=cal, progress=False)], m, x).eval()
    return m, x, gm


def test_pass_calibrates_scales_bn_fold_and_report(calibrated):
    m, x, gm = calibrated
    plain = fxshift.apply([ShiftQuantizePass(weight_bits=5)], m, x).eval()
    with torch.no_grad():
        y = m(x)
        err_plain = float((plain(x) - y).norm() / y.norm())
        err_cal = float((gm(x) - y).norm() / y.norm())
    assert err_cal < 0.3 * err_plain
    assert gm.get_submodule("0").scale is None            # folded into the BatchNorm after it
    assert gm.get_submodule("3").scale is not None        # no BatchNorm: kept as the layer's scale
    assert gm.get_submodule("7").bias is not None
    assert _is_pow2(gm.get_submodule("3").weight.detach(), 5)
    rows = {r["layer"]: r for r in fxshift.report(gm).to_dicts()}
    for name in ("0", "3", "7"):
        assert rows[name]["calibrated"] is True
        assert rows[name]["output_error_after"] < rows[name]["output_error_before"]
    assert rows["0"]["scale_in"] == "1" and rows["3"]["scale_in"] == "layer"
    assert m[1].running_mean.abs().max() <= 0.5          # the user's model is untouched
    assert isinstance(m[0], nn.Conv2d)


@pytest.mark.slow  # ONNX export of the model: ~15 s on a quiet machine, more under load
def test_freeze_save_load_and_onnx_parity(calibrated, tmp_path):
    m, x, gm = calibrated
    frozen = fxshift.freeze(gm).eval()
    with torch.no_grad():
        ref = gm(x)
        assert torch.allclose(frozen(x), ref, atol=1e-5)
    assert frozen.get_submodule("3").scale is not None
    fxshift.save(gm, tmp_path / "c.pt")
    fxshift.save(frozen, tmp_path / "f.pt")
    with torch.no_grad():
        assert torch.equal(fxshift.load(_model(), tmp_path / "c.pt").eval()(x), ref)
        assert torch.equal(fxshift.load(_model(), tmp_path / "f.pt").eval()(x), frozen(x))
    for target, plugin in (("fxshift", True), ("fxshift", False), ("portable", False)):
        path = tmp_path / f"{target}.onnx"
        fxshift.export_onnx(frozen, (x,), path, target=target)
        sess = fxshift.onnx.session(str(path), plugin=plugin)
        out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        assert np.abs(out - ref.numpy()).max() < 1e-4, (target, plugin)


def test_ps_from_calibrated_model(calibrated):
    _, x, gm = calibrated
    ps = fxshift.apply([ShiftQuantizePass(mode="ps", weight_bits=5)], gm).eval()
    assert ps.get_submodule("3").mode == "ps"
    with torch.no_grad():
        assert torch.allclose(ps(x), gm(x), atol=1e-6)   # codes within the PS range are kept exactly


def test_torch_op_scale_argument():
    from fxshift.nn.shift import ShiftLinear
    torch.manual_seed(0)
    layer = ShiftLinear.from_linear(nn.Linear(10, 4))
    layer.set_scale(torch.tensor([0.5, 2.0, 1.5, 0.25]))
    frozen = fxshift.nn.frozen_shift.freeze_layer(layer)
    x = torch.randn(3, 10)
    expected = (x @ layer.quantized_weight().t()) * layer.scale + layer.bias
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=1e-6)
        assert torch.allclose(frozen(x), expected, atol=1e-5)


def test_config_errors():
    m, x = _model(), torch.randn(2, 3, 16, 16)
    with pytest.raises(ConfigError, match="empty"):
        ShiftQuantizePass(calibration=[])
    with pytest.raises(ConfigError, match="mode='q'"):
        ShiftQuantizePass(mode="ps", calibration=[x])
    with pytest.raises(ConfigError, match="do not fit"):
        fxshift.apply([ShiftQuantizePass(calibration=[torch.randn(2, 5, 16, 16)], progress=False)], m, x)
    with pytest.raises(ConfigError, match="single tensor"):
        ShiftQuantizePass(calibration=x)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12)
        self.conv1, self.bn1 = nn.Conv2d(12, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12)
        self.conv2, self.bn2 = nn.Conv2d(12, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


def test_residual_layer_makes_up_the_shortcut_error(monkeypatch):
    import fxshift.passes.shift_calibrate as sc
    torch.manual_seed(4)
    m = _Residual()
    for bn in (m.bn0, m.bn1, m.bn2):
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
    m.eval()
    cal, x = [torch.randn(16, 3, 12, 12) for _ in range(2)], torch.randn(16, 3, 12, 12)
    errs = {}
    for residual in (False, True):
        monkeypatch.setattr(sc, "RESIDUAL", residual)
        gm = fxshift.apply([ShiftQuantizePass(weight_bits=4, calibration=cal, iterations=50, progress=False)], m, x)
        with torch.no_grad():
            y = m(x)
            errs[residual] = float((gm.eval()(x) - y).norm() / y.norm())
    assert errs[True] < 0.97 * errs[False], errs


def test_adaround_single_thread_section_restores_the_thread_count():
    from fxshift.quantize import shift_calibration as sc
    torch.manual_seed(5)
    x, w = torch.randn(500, 16), 0.3 * torch.randn(8, 16)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        calibrate_shift_weight(w, None, _stats(w, x), 5, iterations=5)   # small layer: AdaRound on one thread
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError):
            with sc._threads_at_most(1):
                assert torch.get_num_threads() == 1
                raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
