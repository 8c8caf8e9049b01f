"""ShiftQuantizePass: which layers it replaces, its report, its options, save/load of shift models."""
import copy
import math

import pytest
import torch
from torch import nn

import fxshift
from fxshift import ConfigError, ShiftQuantizePass, TuckerDecomposePass
from fxshift.nn import ShiftConv2d, ShiftLinear, TuckerConv2d
from fxshift.nn.shift import quantize_q


class Geometry(nn.Module):
    """Convs with stride, padding, dilation, groups, depthwise, padding modes and a Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4, bias=False)
        self.dw = nn.Conv2d(8, 8, 5, padding="same", groups=8)
        self.c3 = nn.Conv2d(8, 6, (3, 1), stride=(1, 2), padding=(1, 0), padding_mode="reflect")
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = self.dw(x)
        x = self.c3(x)
        return self.fc(x.mean((2, 3)))


def _rows(gm, pass_name="ShiftQuantizePass"):
    return [r for r in fxshift.report(gm).rows if r.pass_name == pass_name]


def test_resnet18_every_conv_and_fc():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    gm = fxshift.apply(ShiftQuantizePass(mode="q", weight_bits=5), model, x)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20
    for name in convs:
        assert isinstance(gm.get_submodule(name), ShiftConv2d)
    assert isinstance(gm.fc, ShiftLinear)
    rows = _rows(gm)
    assert len(rows) == 21 and all(r.action == "shifted" for r in rows)
    for r in rows:
        d = r.to_dict()
        assert d["mode"] == "q" and d["bits"] == 5
        module = model.get_submodule(r.layer)
        o, k = module.weight.shape[0], module.weight[0].numel()
        assert d["weight_bytes_before"] == module.weight.numel() * 4
        assert d["weight_bytes_after"] == o * math.ceil(k / 6) * 4
        assert 0 < d["rel_error"] < 0.3  # power-of-two rounding of Gaussian-like weights: about 0.2
        if r.layer not in ("conv1", "layer2.0.downsample.0", "fc"):
            continue
        w = module.weight.detach()
        assert d["rel_error"] == pytest.approx(((quantize_q(w, 5) - w).norm() / w.norm()).item(), rel=1e-5)
        assert r.macs_before == r.macs_after and r.macs_before > 0
        assert r.params_before == r.params_after
    before_bytes = sum(r.extra["weight_bytes_before"] for r in rows)
    after_bytes = sum(r.extra["weight_bytes_after"] for r in rows)
    assert after_bytes < before_bytes * 5.4 / 32  # about 5 bits a weight, not 8
    out = gm(x)
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    # the caller's model is untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(type(m) in (nn.Conv2d,) for n, m in model.named_modules() if n in convs)
    assert "mode" in str(fxshift.report(gm)) and "weight_bytes_after" in str(fxshift.report(gm))


@pytest.mark.parametrize("mode,wb", [("q", 4), ("ps", 5), ("ps", 3)])
def test_geometry_model(mode, wb):
    torch.manual_seed(1)
    model = Geometry().eval()
    x = torch.randn(2, 3, 16, 16)
    gm = fxshift.apply(ShiftQuantizePass(mode=mode, weight_bits=wb), model, x)
    for name in ("c1", "c2", "dw", "c3"):
        layer, conv = gm.get_submodule(name), model.get_submodule(name)
        assert isinstance(layer, ShiftConv2d) and layer.mode == mode and layer.weight_bits == wb
        assert (layer.stride, layer.padding, layer.dilation, layer.groups, layer.padding_mode) == \
               (conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode)
        # the shift layer equals its conv with the quantised weight
        ref = copy.deepcopy(conv)
        with torch.no_grad():
            ref.weight.copy_(layer.quantized_weight())
        inp = torch.randn(1, conv.in_channels, 9, 9)
        torch.testing.assert_close(layer(inp), ref(inp), rtol=1e-6, atol=1e-6)
    assert gm(x).shape == (2, 5)
    bits = {r.extra["bits"] for r in _rows(gm)}
    assert bits == {wb}
    if mode == "ps":
        p_min = -(2 ** (wb - 1) - 2)
        assert all(gm.get_submodule(n).shift.min() >= p_min for n in ("c1", "c2", "dw", "c3", "fc"))


def test_q_layer_with_exact_zeros_reports_wider_packing():
    model = nn.Sequential(nn.Linear(7, 4))
    with torch.no_grad():
        model[0].weight[0, 0] = 0.0
    gm = fxshift.apply(ShiftQuantizePass(mode="q", weight_bits=5), model)
    row = _rows(gm)[0]
    assert row.extra["bits"] == 6
    assert row.extra["weight_bytes_after"] == 4 * math.ceil(7 / 5) * 4


def test_ps_init_and_freeze_sign():
    torch.manual_seed(2)
    model = Geometry()
    gm = fxshift.apply(ShiftQuantizePass(mode="ps", weight_bits=5, freeze_sign=True), model)
    w = model.c1.weight.detach()
    layer = gm.c1
    assert torch.equal(layer.sign, torch.sign(w))
    assert torch.equal(layer.shift, torch.round(torch.log2(w.abs())).clamp(-14, 0))
    assert not layer.sign.requires_grad and layer.shift.requires_grad


def test_include_exclude():
    model = Geometry()
    gm = fxshift.apply(ShiftQuantizePass(include=["c*"], exclude=["c2", nn.Linear]), model)
    assert isinstance(gm.c1, ShiftConv2d) and isinstance(gm.c3, ShiftConv2d)
    assert type(gm.c2) is nn.Conv2d and type(gm.fc) is nn.Linear and type(gm.dw) is nn.Conv2d
    assert [r.layer for r in _rows(gm)] == ["c1", "c3"]


def test_training_mode_and_options_carried():
    model = Geometry().train()
    gm = fxshift.apply(ShiftQuantizePass(mode="q", weight_bits=6, rounding="stochastic", activation_bits=(16, 16)),
                       model)
    assert gm.c1.training
    assert gm.c1.rounding == "stochastic" and gm.c1.activation_bits == (16, 16)


@pytest.mark.parametrize("options,match", [
    (dict(weight_bits=1), "weight_bits"), (dict(weight_bits=9), "weight_bits"), (dict(weight_bits=4.5), "weight_bits"),
    (dict(mode="qs"), "mode"), (dict(rounding="nearest"), "rounding"), (dict(activation_bits=16), "activation_bits"),
    (dict(mode="q", freeze_sign=True), "freeze_sign"), (dict(include=[3]), "include"),
])
def test_config_errors(options, match):
    with pytest.raises(ConfigError, match=match):
        ShiftQuantizePass(**options)


def test_inside_tucker_chain():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 36, 10))
    x = torch.randn(1, 8, 6, 6)
    gm = fxshift.apply([TuckerDecomposePass(rank=0.5, linear=False), ShiftQuantizePass(mode="ps")], model, x)
    chain = gm.get_submodule("0")
    assert isinstance(chain, TuckerConv2d)
    assert all(isinstance(getattr(chain, n), ShiftConv2d) for n in ("reduce", "core", "restore"))
    assert isinstance(gm.get_submodule("3"), ShiftLinear)
    assert [r.layer for r in _rows(gm)] == ["0.reduce", "0.core", "0.restore", "3"]
    assert gm(x).shape == (1, 10)
    # a second ShiftQuantizePass leaves shift layers alone
    gm2 = fxshift.apply(ShiftQuantizePass(mode="q"), gm)
    assert len(_rows(gm2)) == 4


@pytest.mark.parametrize("mode", ["q", "ps"])
def test_save_load_round_trip(tmp_path, mode):
    torch.manual_seed(4)
    model = Geometry().eval()
    x = torch.randn(2, 3, 16, 16)
    gm = fxshift.apply(ShiftQuantizePass(mode=mode, weight_bits=4, activation_bits=(8, 8),
                                         freeze_sign=mode == "ps"), model, x)
    with torch.no_grad():  # pretend training moved the parameters
        for p in gm.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "shift.pt"
    fxshift.save(gm, path)
    loaded = fxshift.load(Geometry(), path).eval()
    for name in ("c1", "c2", "dw", "c3", "fc"):
        a, b = gm.get_submodule(name), loaded.get_submodule(name)
        assert type(a) is type(b) and a.spec() == b.spec()
        for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
            assert na == nb and torch.equal(pa, pb) and pa.requires_grad == pb.requires_grad
    torch.testing.assert_close(loaded(x), gm(x), rtol=0, atol=0)


def test_save_load_tucker_then_shift(tmp_path):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 36, 10)).eval()
    x = torch.randn(1, 8, 6, 6)
    gm = fxshift.apply([TuckerDecomposePass(rank=0.5), ShiftQuantizePass(mode="ps")], model, x).eval()
    fxshift.save(gm, tmp_path / "m.pt")
    fresh = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 36, 10))
    loaded = fxshift.load(fresh, tmp_path / "m.pt").eval()
    torch.testing.assert_close(loaded(x), gm(x), rtol=0, atol=0)
