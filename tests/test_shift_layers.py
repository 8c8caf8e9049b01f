"""DeepShift layers against docs/methods.md §1: Q and PS rounding, fixed point, STE gradients, training helpers."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxshift.errors import ConfigError
from fxshift.nn import ShiftConv2d, ShiftLinear
from fxshift.nn.shift import (ps_init, ps_weight, quantize_q, round_shift, round_to_fixed, shift_codes,
                              shift_range)
from fxshift.train import deepshift_param_groups, ps_weight_decay_loss, shift_regularizer


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _is_power_of_two_or_zero(t, p_min, p_max):
    t = t.detach().double()
    nz = t != 0
    e = torch.log2(t[nz].abs())
    return bool(torch.all(e == e.round()) and torch.all(e >= p_min) and torch.all(e <= p_max))


# ---------------------------------------------------------------------------------------------- ranges
@pytest.mark.parametrize("wb", range(2, 9))
def test_shift_ranges(wb):
    # Q is capped at −126 (8 bits): the packed format decodes smaller shifts to 0.
    assert shift_range("q", wb) == (max(-(2 ** (wb - 1) - 1), -126), 0)
    assert shift_range("ps", wb) == (-(2 ** (wb - 1) - 2), 0)


def test_ranges_of_the_paper():
    assert shift_range("q", 5) == (-15, 0)
    assert shift_range("q", 4) == (-7, 0)
    assert shift_range("q", 3) == (-3, 0)
    assert shift_range("ps", 5) == (-14, 0)


@pytest.mark.parametrize("bad", [1, 9, 0, 5.0, True, "5", None])
def test_weight_bits_out_of_range(bad):
    with pytest.raises(ConfigError):
        shift_range("q", bad)
    with pytest.raises(ConfigError):
        ShiftLinear(3, 2, weight_bits=bad)


def test_bad_mode_and_rounding():
    with pytest.raises(ConfigError, match="mode"):
        ShiftLinear(3, 2, mode="deepshift")
    with pytest.raises(ConfigError, match="rounding"):
        ShiftLinear(3, 2, rounding="nearest")
    with pytest.raises(ConfigError, match="activation_bits"):
        ShiftLinear(3, 2, activation_bits=(16,))
    with pytest.raises(ConfigError, match="activation_bits"):
        ShiftLinear(3, 2, activation_bits=(0, 8))


# ---------------------------------------------------------------------------------------------- Q
@pytest.mark.parametrize("wb", [2, 3, 4, 5, 8])
def test_q_matches_formula(wb):
    w = torch.randn(4000, generator=_gen(wb), dtype=torch.float64) * torch.exp2(
        torch.empty(4000, dtype=torch.float64).uniform_(-20, 4, generator=_gen(wb + 100)))
    w[::97] = 0.0
    q = quantize_q(w, wb)
    # independent numpy reference: sign(w)·2^round_half_even(log2 clamp(|w|, 2^pmin, 1))
    p_min = -(2 ** (wb - 1) - 1)
    a = np.clip(np.abs(w.numpy()), 2.0 ** p_min, 1.0)
    ref = np.sign(w.numpy()) * np.exp2(np.round(np.log2(a)))
    np.testing.assert_array_equal(q.numpy(), ref)
    assert _is_power_of_two_or_zero(q, p_min, 0)


def test_q_clamp_and_zeros():
    w = torch.tensor([5.0, -3.0, 1.0, 1e-12, -1e-12, 0.0, -0.0, 0.75, 2.0 ** -15, 2.0 ** -16])
    q = quantize_q(w, 5)
    expected = torch.tensor([1.0, -1.0, 1.0, 2.0 ** -15, -(2.0 ** -15), 0.0, 0.0, 1.0, 2.0 ** -15, 2.0 ** -15])
    assert torch.equal(q, expected)
    # log2(0.75) = -0.415 → 0; exact zeros stay zero


def test_deterministic_is_round_half_even():
    p = torch.tensor([-0.5, -1.5, -2.5, -3.5, -2.4, -2.6, 0.5])
    assert torch.equal(round_shift(p), torch.tensor([-0.0, -2.0, -2.0, -4.0, -2.0, -3.0, 0.0]))
    assert torch.equal(round_shift(p), torch.round(p))
    # (quantize_q against numpy's half-even round in the log domain: test_q_matches_formula)


def test_stochastic_rounding_unbiased():
    p = torch.full((200_000,), -2.3, dtype=torch.float64)
    r = round_shift(p, "stochastic", generator=_gen(0))
    assert set(r.unique().tolist()) == {-3.0, -2.0}
    assert abs(r.mean().item() - (-2.3)) < 5e-3
    # in the log domain through quantize_q: E[log2|W_q|] = log2|w|
    w = torch.full((200_000,), -(2.0 ** -4.75), dtype=torch.float64)
    q = quantize_q(w, 5, "stochastic", generator=_gen(1))
    assert torch.all(q < 0)
    assert abs(torch.log2(q.abs()).mean().item() + 4.75) < 5e-3
    # integers stay put
    assert torch.equal(round_shift(torch.tensor([-3.0, 0.0]), "stochastic"), torch.tensor([-3.0, 0.0]))


def test_stochastic_only_in_training_mode():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    layer = ShiftLinear.from_linear(lin, mode="q", rounding="stochastic")
    layer.train()
    a, b = layer.quantized_weight(), layer.quantized_weight()
    assert not torch.equal(a, b)
    layer.eval()
    assert torch.equal(layer.quantized_weight(), quantize_q(lin.weight, 5))


# ---------------------------------------------------------------------------------------------- PS
def test_ps_formula():
    shift = torch.tensor([-20.0, 3.0, -2.4, -2.6, -2.5, -14.0, -1.0, -1.0, -1.0, -1.0, -1.0])
    sign = torch.tensor([1.0, -1.0, 0.7, -0.6, 1.0, -1.0, 0.3, -0.49, 0.5, -1.7, 0.0])
    w = ps_weight(shift, sign, 5)
    expected = torch.tensor([2.0 ** -14, -1.0, 2.0 ** -2, -(2.0 ** -3), 2.0 ** -2, -(2.0 ** -14), 0.0, 0.0, 0.0,
                             -0.5, 0.0])
    assert torch.equal(w, expected)


@pytest.mark.parametrize("wb", [2, 3, 5, 8])
def test_ps_values_in_range_and_ternary_sign(wb):
    g = _gen(wb)
    shift = torch.empty(5000).uniform_(-200, 20, generator=g)
    sign = torch.empty(5000).uniform_(-2, 2, generator=g)
    w = ps_weight(shift, sign, wb)
    p_min, p_max = shift_range("ps", wb)
    assert _is_power_of_two_or_zero(w, p_min, p_max)
    assert torch.equal(torch.sign(w), torch.sign(torch.round(sign)))
    assert set(torch.sign(w).unique().tolist()) == {-1.0, 0.0, 1.0}


def test_ps_init_from_weights():
    w = torch.tensor([0.3, -0.26, 2.0 ** -3, -(2.0 ** -20), 0.0, 4.0, -1.0])
    p, s = ps_init(w, 5)
    assert torch.equal(p, torch.tensor([-2.0, -2.0, -3.0, -14.0, -14.0, 0.0, 0.0]))
    assert torch.equal(s, torch.tensor([1.0, -1.0, 1.0, -1.0, 0.0, 1.0, -1.0]))
    # a weight of exact in-range powers of two is reproduced exactly
    exact = torch.tensor([[0.5, -0.25], [2.0 ** -14, 0.0]])
    layer = ShiftLinear.from_linear(_linear_with(exact), mode="ps")
    assert torch.equal(layer.quantized_weight(), exact)


def _linear_with(weight, bias=None):
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def test_ps_scratch_init():
    conv = ShiftConv2d(4, 8, 3, mode="ps")
    conv.reset_from_scratch(_gen(0))
    assert conv.shift.min() >= -10 and conv.shift.max() <= -1
    assert conv.sign.min() >= -1 and conv.sign.max() <= 1
    lin = ShiftLinear(30, 20, mode="ps", weight_bits=4)
    lin.reset_from_scratch(_gen(0))
    assert lin.shift.min() >= -6 and lin.shift.max() <= 0 and lin.shift.min() < -4


# ---------------------------------------------------------------------------------------------- fixed point
def test_round_to_fixed_formula():
    x = torch.tensor([1.03, -0.01, 10.0, -10.0, 0.0, 3.99, -4.0, 0.5])
    r = round_to_fixed(x, 3, 5)
    expected = torch.clamp(torch.floor(x * 32) / 32, -4.0, 4.0 - 1 / 32)
    assert torch.equal(r, expected)
    assert torch.equal(r, torch.tensor([1.0, -1 / 32, 4 - 1 / 32, -4.0, 0.0, 3.96875, -4.0, 0.5]))
    y = torch.randn(1000, generator=_gen(3)) * 100
    r = round_to_fixed(y, 16, 16)
    assert torch.equal(r, torch.floor(y * 65536) / 65536)
    assert torch.all(r <= y) and torch.all(y - r < 2.0 ** -16)


def test_activation_bits_round_input_and_bias():
    lin = _linear_with(torch.tensor([[0.5, -0.25]]), torch.tensor([0.3]))
    layer = ShiftLinear.from_linear(lin, mode="q", activation_bits=(3, 5)).eval()
    x = torch.tensor([[1.03, -0.01]])
    xr = round_to_fixed(x, 3, 5)
    br = round_to_fixed(torch.tensor([0.3]), 3, 5)
    assert torch.equal(layer(x), F.linear(xr, torch.tensor([[0.5, -0.25]]), br))
    assert br.item() == math.floor(0.3 * 32) / 32


# ---------------------------------------------------------------------------------------------- STE gradients
def test_q_ste_passes_gradient_unchanged():
    w = torch.randn(50, generator=_gen(4), requires_grad=True)
    up = torch.randn(50, generator=_gen(5))
    (quantize_q(w, 5) * up).sum().backward()
    assert torch.equal(w.grad, up)


def test_ps_ste_gradients():
    shift = torch.tensor([-2.4, -3.6, -1.0, -13.7], requires_grad=True)
    sign = torch.tensor([0.8, -0.9, 0.2, 1.0], requires_grad=True)
    w = ps_weight(shift, sign, 5)
    up = torch.tensor([1.0, 2.0, 3.0, 4.0])
    (w * up).sum().backward()
    p_tilde = torch.tensor([-2.0, -4.0, -1.0, -14.0])
    # dW/dP = ln2·W (identity through round), dW/dS = 2^P̃ (identity through sign and round)
    assert torch.allclose(shift.grad, up * math.log(2) * w.detach())
    assert torch.allclose(sign.grad, up * torch.exp2(p_tilde))
    # out of range: a descent step that moves P back toward the range is passed on; one that moves it further is not
    s2 = torch.tensor([-20.0, 3.0, -20.0, 3.0], requires_grad=True)
    w2 = ps_weight(s2, torch.ones(4), 5)
    (w2 * torch.tensor([-1.0, 1.0, 1.0, -1.0])).sum().backward()
    assert s2.grad[0] < 0 and s2.grad[1] > 0 and s2.grad[2] == 0 and s2.grad[3] == 0


def test_round_to_fixed_ste():
    x = torch.randn(10, generator=_gen(6), requires_grad=True)
    round_to_fixed(x, 3, 5).sum().backward()
    assert torch.equal(x.grad, torch.ones(10))


@pytest.mark.parametrize("mode", ["q", "ps"])
def test_layer_gradients_flow(mode):
    torch.manual_seed(0)
    conv = ShiftConv2d.from_conv(nn.Conv2d(3, 6, 3, padding=1, groups=3), mode=mode, activation_bits=(16, 16))
    lin = ShiftLinear.from_linear(nn.Linear(6, 4), mode=mode)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    out = lin(conv(x).mean((2, 3)))
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for layer in (conv, lin):
        for name, p in layer.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("mode", ["q", "ps"])
def test_conv_layer_equals_conv_with_quantized_weight(mode):
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1), groups=2)
    layer = ShiftConv2d.from_conv(conv, mode=mode).eval()
    x = torch.randn(2, 4, 9, 8)
    ref = F.conv2d(x, layer.quantized_weight(), conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    assert torch.equal(layer(x), ref)
    assert _is_power_of_two_or_zero(layer.quantized_weight(), *layer.shift_range)


@pytest.mark.parametrize("padding,padding_mode", [("same", "zeros"), ((1, 2), "reflect"), ("same", "circular"),
                                                  (1, "replicate")])
def test_conv_padding_modes(padding, padding_mode):
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, (3, 4), padding=padding, padding_mode=padding_mode)
    layer = ShiftConv2d.from_conv(conv, mode="q").eval()
    ref = nn.Conv2d(3, 4, (3, 4), padding=padding, padding_mode=padding_mode)
    with torch.no_grad():
        ref.weight.copy_(layer.quantized_weight())
        ref.bias.copy_(conv.bias)
    x = torch.randn(1, 3, 7, 9)
    torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=0)


def test_shift_codes():
    w = torch.tensor([[1.0, -0.5, 0.0], [2.0 ** -14, -(2.0 ** -7), 0.25]])
    sign, m = shift_codes(w)
    assert sign.dtype == torch.int8 and m.dtype == torch.uint8
    assert sign.tolist() == [[1, -1, 0], [1, -1, 1]]
    assert m.tolist() == [[0, 1, 0], [14, 7, 2]]


# ---------------------------------------------------------------------------------------------- param groups, regulariser
def _ps_model(freeze_sign=False):
    torch.manual_seed(3)
    return nn.Sequential(ShiftConv2d.from_conv(nn.Conv2d(2, 4, 3), mode="ps", freeze_sign=freeze_sign),
                         nn.BatchNorm2d(4), nn.Flatten(),
                         ShiftLinear.from_linear(nn.Linear(4, 3), mode="q"),
                         ShiftLinear.from_linear(nn.Linear(3, 2), mode="ps", freeze_sign=freeze_sign))


def test_param_groups():
    model = _ps_model()
    groups = deepshift_param_groups(model, lr_sign=0.0, weight_decay=1e-4, lr_shift=0.01)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"weights", "shift", "sign"}
    assert by_name["shift"]["weight_decay"] == 0.0 and by_name["sign"]["weight_decay"] == 0.0
    assert by_name["weights"]["weight_decay"] == 1e-4
    assert by_name["sign"]["lr"] == 0.0 and by_name["shift"]["lr"] == 0.01
    assert [id(p) for p in by_name["shift"]["params"]] == [id(model[0].shift), id(model[4].shift)]
    assert [id(p) for p in by_name["sign"]["params"]] == [id(model[0].sign), id(model[4].sign)]
    n = sum(len(g["params"]) for g in groups)
    assert n == len(list(model.parameters()))
    # lr_sign=0 freezes the sign under a real optimizer step; the shift moves
    opt = torch.optim.RAdam(groups, lr=1e-2)
    sign0, shift0 = model[0].sign.detach().clone(), model[0].shift.detach().clone()
    model.train()
    model(torch.randn(8, 2, 3, 3)).square().sum().backward()
    opt.step()
    assert torch.equal(model[0].sign, sign0)
    assert not torch.equal(model[0].shift, shift0)


def test_param_groups_frozen_sign_and_plain_model():
    groups = deepshift_param_groups(_ps_model(freeze_sign=True))
    assert {g["name"] for g in groups} == {"weights", "shift"}
    assert all("lr" not in g for g in groups)
    plain = nn.Linear(3, 2)
    assert [g["name"] for g in deepshift_param_groups(plain)] == ["weights"]
    torch.optim.SGD(deepshift_param_groups(plain), lr=0.1)


def test_regulariser():
    model = _ps_model()
    wd = 1e-3
    expected = wd * 0.5 * sum((torch.exp2(m.shift.detach()) ** 2).sum() for m in (model[0], model[4]))
    reg = shift_regularizer(model, wd)
    torch.testing.assert_close(reg, expected)
    reg.backward()
    # d/dP of wd·½·(2^P)² = wd·ln2·(2^P)²
    torch.testing.assert_close(model[0].shift.grad, wd * math.log(2) * torch.exp2(model[0].shift.detach()) ** 2)
    assert ps_weight_decay_loss is shift_regularizer
    assert shift_regularizer(nn.Linear(2, 2), wd).item() == 0.0
