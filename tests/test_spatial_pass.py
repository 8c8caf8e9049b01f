"""SpatialSVDPass: exact at full rank for every geometry, Eckart–Young errors, rank forms, recompose, errors."""
import math

import pytest
import torch
from torch import nn

import fxshift
from fxshift import Budget, ConfigError, RecomposePass, SpatialSVDPass
from fxshift.decompose.spatial import spatial_max_rank, spatial_optimal_error, spatial_singular_values
from fxshift.nn import LowRankLinear, SpatialConv2d

from conftest import build_torchvision, rel_error


pytestmark = pytest.mark.usefixtures("one_thread")


def conv(*args, seed=0, **kwargs):
    torch.manual_seed(seed)
    return nn.Conv2d(*args, **kwargs).eval()


GEOMETRIES = {
    "3x3": dict(args=(8, 12, 3), kwargs=dict(padding=1)),
    "stride2": dict(args=(8, 12, 3), kwargs=dict(stride=2, padding=1)),
    "stride-per-axis": dict(args=(6, 10, 3), kwargs=dict(stride=(2, 1), padding=(1, 0))),
    "non-square-kernel": dict(args=(6, 10, (3, 5)), kwargs=dict(padding=(1, 2))),
    "non-square-stride-pad-dil": dict(args=(6, 9, (5, 3)), kwargs=dict(stride=(1, 2), padding=(3, 1),
                                                                      dilation=(2, 1))),
    "dilation": dict(args=(8, 8, 3), kwargs=dict(padding=2, dilation=2)),
    "no-bias": dict(args=(8, 12, 3), kwargs=dict(padding=1, bias=False)),
    "grouped": dict(args=(8, 12, 3), kwargs=dict(padding=1, groups=4)),
    "depthwise": dict(args=(8, 8, 3), kwargs=dict(padding=1, groups=8)),
    "depthwise-x2-stride2": dict(args=(8, 16, (3, 5)), kwargs=dict(stride=2, padding=(1, 2), groups=8)),
    "same": dict(args=(6, 10, 4), kwargs=dict(padding="same")),
    "valid": dict(args=(6, 10, 3), kwargs=dict(padding="valid")),
    "1x1": dict(args=(16, 12, 1), kwargs=dict()),
}


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_full_rank_is_exact_and_keeps_geometry(geometry):
    spec = GEOMETRIES[geometry]
    layer = conv(*spec["args"], **spec["kwargs"])
    x = torch.randn(2, layer.in_channels, 15, 13, generator=torch.Generator().manual_seed(1))
    gm = fxshift.apply([SpatialSVDPass(rank=1.0, only_if_cheaper=False)], nn.Sequential(layer), x)
    chain = gm.get_submodule("0")
    assert isinstance(chain, SpatialConv2d)
    assert chain.rank == spatial_max_rank(layer.weight, layer.groups)
    assert chain.vertical.kernel_size == (layer.kernel_size[0], 1)
    assert chain.horizontal.kernel_size == (1, layer.kernel_size[1])
    assert chain.vertical.stride == (layer.stride[0], 1) and chain.horizontal.stride == (1, layer.stride[1])
    assert chain.vertical.dilation == (layer.dilation[0], 1) and chain.horizontal.dilation == (1, layer.dilation[1])
    assert chain.vertical.groups == chain.horizontal.groups == layer.groups
    with torch.no_grad():
        y, y_hat = layer(x), gm(x)
    assert y_hat.shape == y.shape
    assert rel_error(y_hat, y) < 1e-5
    row = fxshift.report(gm).to_dicts()[0]
    assert row["rel_error"] < 1e-6


@pytest.mark.parametrize("geometry", ["3x3", "non-square-stride-pad-dil", "grouped", "depthwise-x2-stride2"])
@pytest.mark.parametrize("fraction", [0.2, 0.5])
def test_error_is_the_eckart_young_optimum(geometry, fraction):
    spec = GEOMETRIES[geometry]
    layer = conv(*spec["args"], **spec["kwargs"])
    gm = fxshift.apply([SpatialSVDPass(rank=fraction, only_if_cheaper=False)], nn.Sequential(layer))
    chain = gm.get_submodule("0")
    k = chain.rank
    w = layer.weight.detach()
    sv = spatial_singular_values(w.double(), layer.groups)
    optimum = math.sqrt(float(sv[:, k:].pow(2).sum() / sv.pow(2).sum()))
    reported = fxshift.report(gm).to_dicts()[0]["rel_error"]
    actual = rel_error(chain.recompose().weight.detach().double(), w.double())
    assert reported == pytest.approx(optimum, rel=1e-6, abs=1e-9)
    assert actual == pytest.approx(optimum, rel=1e-4, abs=1e-6)
    assert reported == pytest.approx(spatial_optimal_error(w, k, layer.groups), rel=1e-6, abs=1e-9)


def test_error_falls_with_rank():
    layer = conv(16, 24, 3, padding=1)
    errors = []
    for k in (2, 8, 16, 32, 48):
        gm = fxshift.apply([SpatialSVDPass(rank=k, only_if_cheaper=False)], nn.Sequential(layer))
        errors.append(fxshift.report(gm).to_dicts()[0]["rel_error"])
    assert all(a > b for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-6


def structured_conv(true_rank: int, noise: float = 0.01) -> nn.Conv2d:
    """A 3×3 conv whose reshaped (S·kh)×(kw·T) matrix has rank `true_rank` plus a little noise."""
    layer = conv(32, 48, 3, padding=1)
    t, s, kh, kw = layer.weight.shape
    g = torch.Generator().manual_seed(3)
    m = torch.randn(s * kh, true_rank, generator=g) @ torch.randn(true_rank, kw * t, generator=g)
    w = m.reshape(s, kh, kw, t).permute(3, 0, 1, 2)
    with torch.no_grad():
        layer.weight.copy_(w + noise * torch.randn(w.shape, generator=g))
    return layer


@pytest.mark.parametrize("rank, expected", [
    (7, 7),
    (0.25, round(0.25 * 96)),
    ("vbmf", 6),
    ({"0": 5}, 5),
    (lambda name, module: 9, 9),
])
def test_rank_forms(rank, expected):
    gm = fxshift.apply([SpatialSVDPass(rank=rank, only_if_cheaper=False)], nn.Sequential(structured_conv(6)))
    assert gm.get_submodule("0").rank == expected


def test_energy_rank_keeps_the_requested_energy():
    layer = conv(16, 24, 3, padding=1)
    gm = fxshift.apply([SpatialSVDPass(rank="energy:0.8", only_if_cheaper=False)], nn.Sequential(layer))
    k = gm.get_submodule("0").rank
    energy = spatial_singular_values(layer.weight.detach().double()).pow(2).sum(0)
    kept = torch.cumsum(energy, 0) / energy.sum()
    assert kept[k - 1] >= 0.8 and kept[k - 2] < 0.8


def test_skips_non_zero_padding_and_decomposes_linear():
    model = nn.Sequential(conv(4, 8, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    gm = fxshift.apply([SpatialSVDPass(rank=0.25)], model, torch.randn(1, 4, 6, 6))
    rows = {r["layer"]: r for r in fxshift.report(gm).to_dicts()}
    assert rows["0"]["action"] == "skipped" and "zero padding" in rows["0"]["reason"]
    assert rows["2"]["action"] == "decomposed" and isinstance(gm.get_submodule("2"), LowRankLinear)
    gm = fxshift.apply([SpatialSVDPass(rank=0.25, linear=False)], model, torch.randn(1, 4, 6, 6))
    assert {r["layer"]: r for r in fxshift.report(gm).to_dicts()}["2"]["reason"] == "linear=False"


@pytest.mark.parametrize("name, exclude, layers", [
    ("resnet18", "layer4.*", 12),  # layer4's 1536×1536 SVDs take a minute on a busy 2-core machine
    pytest.param("resnet18", None, 15, marks=pytest.mark.slow),
    ("mobilenet_v2", None, 30),
])
def test_default_rank_cuts_cost_and_recomposes_into_the_original(name, exclude, layers):
    model = build_torchvision(name)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    gm = fxshift.apply([SpatialSVDPass(exclude=exclude)], model, x)
    assert fxshift.macs(gm, x) < 0.9 * fxshift.macs(model, x)
    assert sum(isinstance(m, SpatialConv2d) for m in gm.modules()) >= layers
    folded = fxshift.apply([RecomposePass()], gm)
    fresh = build_torchvision(name)
    fresh.load_state_dict(folded.state_dict(), strict=True)
    with torch.no_grad():
        assert rel_error(fresh(x), gm(x)) < 1e-4


def test_save_load_round_trip(tmp_path):
    model = nn.Sequential(conv(8, 12, (3, 5), stride=2, padding=(1, 2)), nn.ReLU(), conv(12, 12, 3, groups=3))
    x = torch.randn(1, 8, 12, 12)
    gm = fxshift.apply([SpatialSVDPass(rank=3, only_if_cheaper=False)], model, x)
    fxshift.save(gm, tmp_path / "s.pt")
    loaded = fxshift.load(model, tmp_path / "s.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), gm(x), rtol=0, atol=0)


@pytest.mark.parametrize("rank, match", [
    (0, r"must lie in 1\.\.27"),
    (28, r"must lie in 1\.\.27"),
    (1.5, r"must lie in \(0, 1\]"),
    ("tai", "unknown rank"),
    ("energy:0", "energy threshold"),
    (True, "not a valid setting"),
    ({"0": Budget(macs=0.5)}, "whole model"),
])
def test_bad_rank_raises_config_error_naming_the_layer(rank, match):
    model = nn.Sequential(conv(9, 16, 3))  # largest K = min(9·3, 3·16) = 27
    with pytest.raises(ConfigError, match=match) as info:
        fxshift.apply([SpatialSVDPass(rank=rank)], model)
    assert "'0'" in str(info.value)
