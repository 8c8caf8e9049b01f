"""TuckerDecomposePass on torchvision models: costs as reported, exactness at full rank, rank forms, errors."""
import pytest
import torch
from torch import nn

import fxshift
from fxshift import ConfigError, RecomposePass, TuckerDecomposePass
from fxshift.nn import LowRankLinear, TuckerConv2d

from conftest import build_torchvision, rel_error

FAST = ["resnet18", "mobilenet_v2"]
SLOW = ["alexnet", "resnet50", "vgg16", "googlenet"]
ALL = FAST + [pytest.param(n, marks=pytest.mark.slow) for n in SLOW]
X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def decomposed():
    cache = {}

    def get(name):
        if name not in cache:
            model = build_torchvision(name)
            before = {k: v.clone() for k, v in model.state_dict().items()}
            gm = fxshift.apply([TuckerDecomposePass(rank=0.5)], model, X)
            cache[name] = (model, before, gm)
        return cache[name]

    return get


@pytest.mark.parametrize("name", ALL)
def test_half_rank_cuts_params_and_macs_as_reported(name, decomposed):
    model, _, gm = decomposed(name)
    totals = fxshift.report(gm).totals()
    params, params_gm = fxshift.parameter_count(model), fxshift.parameter_count(gm)
    macs, macs_gm = fxshift.macs(model, X), fxshift.macs(gm, X)
    assert params_gm < params and macs_gm < macs
    assert params - params_gm == totals["params_before"] - totals["params_after"]
    assert macs - macs_gm == totals["macs_before"] - totals["macs_after"]
    decomposed_rows = [r for r in fxshift.report(gm).to_dicts() if r["action"] == "decomposed"]
    assert decomposed_rows and all(r["macs_after"] < r["macs_before"] for r in decomposed_rows)


@pytest.mark.parametrize("name", ALL)
def test_callers_model_is_untouched(name, decomposed):
    model, before, gm = decomposed(name)
    assert not any(isinstance(m, (TuckerConv2d, LowRankLinear)) for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("name", ALL)
def test_recompose_loads_into_a_fresh_original(name, decomposed):
    _, _, gm = decomposed(name)
    folded = fxshift.apply([RecomposePass()], gm)
    fresh = build_torchvision(name)
    fresh.load_state_dict(folded.state_dict(), strict=True)
    with torch.no_grad():
        assert rel_error(fresh(X), gm(X)) < 1e-5


@pytest.mark.parametrize("name", ALL)
def test_save_load_round_trip_gives_identical_outputs(name, decomposed, tmp_path):
    _, _, gm = decomposed(name)
    path = tmp_path / f"{name}.pt"
    fxshift.save(gm, path)
    loaded = fxshift.load(build_torchvision(name), path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), gm(X), rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL)
def test_full_rank_keeps_outputs(name):
    model = build_torchvision(name)
    gm = fxshift.apply([TuckerDecomposePass(rank=1.0, only_if_cheaper=False, linear=name not in ("vgg16", "alexnet"))],
                       model, X)
    assert sum(r["action"] == "decomposed" for r in fxshift.report(gm).to_dicts()) > 3
    with torch.no_grad():
        assert rel_error(gm(X), model(X)) < 1e-4


def conv_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),  # few input channels: Tucker-1
        nn.Conv2d(16, 32, 3, stride=2, padding=2, dilation=2),
        nn.Conv2d(32, 32, 3, padding=1, groups=4),  # grouped
        nn.Conv2d(32, 32, 3, padding=1, groups=32),  # depthwise
        nn.Conv2d(32, 24, (3, 5), padding=(1, 2), bias=False),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 12)).eval()


def test_structure_geometry_and_skip_reasons():
    model = conv_model()
    x = torch.randn(2, 3, 16, 16)
    gm = fxshift.apply([TuckerDecomposePass(rank=1.0, only_if_cheaper=False)], model, x)
    rows = {r["layer"]: r for r in fxshift.report(gm).to_dicts()}
    assert gm.get_submodule("0").ranks == (16, None)  # Tucker-1
    assert gm.get_submodule("1").core.stride == (2, 2) and gm.get_submodule("1").core.dilation == (2, 2)
    assert rows["2"]["action"] == "skipped" and "grouped" in rows["2"]["reason"]
    assert rows["3"]["action"] == "skipped" and "depthwise" in rows["3"]["reason"]
    assert gm.get_submodule("4").restore.bias is None
    assert isinstance(gm.get_submodule("7"), LowRankLinear)
    with torch.no_grad():
        assert rel_error(gm(x), model(x)) < 1e-4


def test_layers_that_would_not_get_cheaper_are_skipped():
    model = conv_model()
    gm = fxshift.apply([TuckerDecomposePass(rank=1.0)], model, torch.randn(1, 3, 16, 16))
    rows = fxshift.report(gm).to_dicts()
    assert all(r["action"] == "skipped" for r in rows)
    assert any("would not cut MACs" in r["reason"] for r in rows)


@pytest.mark.parametrize("rank, expected", [
    (0.5, (16, 8)),
    (6, (6, 6)),
    ((10, 4), (10, 4)),
    ({"1": (3, 2)}, (3, 2)),
    (lambda name, module: (5, 7) if name == "1" else None, (5, 7)),
])
def test_rank_forms(rank, expected):
    gm = fxshift.apply([TuckerDecomposePass(rank=rank, only_if_cheaper=False, linear=False)], conv_model())
    assert gm.get_submodule("1").ranks == expected


def test_dict_and_callable_leave_other_layers_alone():
    gm = fxshift.apply([TuckerDecomposePass(rank={"1": 4}, only_if_cheaper=False)], conv_model())
    rows = {r["layer"]: r for r in fxshift.report(gm).to_dicts()}
    assert rows["0"]["reason"] == "no rank given for this layer"
    assert isinstance(gm.get_submodule("1"), TuckerConv2d)


def test_vbmf_finds_the_rank_of_a_structured_kernel():
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 96, 3)
    with torch.no_grad():  # output mode of rank 12, input mode of rank 20, plus a little noise
        core = torch.randn(12, 20, 3, 3)
        w = torch.einsum("ta,abij,sb->tsij", torch.randn(96, 12), core, torch.randn(64, 20))
        conv.weight.copy_(w + 0.01 * torch.randn_like(w))
    gm = fxshift.apply([TuckerDecomposePass(rank="vbmf")], nn.Sequential(conv))
    assert gm.get_submodule("0").ranks == (12, 20)


def test_energy_rank_keeps_the_requested_energy():
    gm = fxshift.apply([TuckerDecomposePass(rank="energy:0.9", only_if_cheaper=False, linear=False)], conv_model())
    layer = gm.get_submodule("1")
    original = conv_model()[1].weight.detach()
    unfolded = original.reshape(32, -1)
    energy = torch.linalg.svdvals(unfolded.double()) ** 2
    r_out = layer.ranks[0]
    assert energy[:r_out].sum() / energy.sum() >= 0.9
    assert energy[:r_out - 1].sum() / energy.sum() < 0.9


def test_include_exclude_by_pattern_and_type():
    gm = fxshift.apply([TuckerDecomposePass(rank=0.5, include=["1", "4"], exclude=nn.Linear, only_if_cheaper=False)],
                       conv_model())
    assert [r["layer"] for r in fxshift.report(gm).to_dicts()] == ["1", "4"]


@pytest.mark.parametrize("rank, match", [
    (0, "must lie in 1..32"),
    (-3, "must lie in 1..32"),
    (1.5, r"must lie in \(0, 1\]"),
    (0.0, r"must lie in \(0, 1\]"),
    (33, "must lie in 1..32"),
    ("tucker", "unknown rank"),
    ("energy:2", "energy threshold"),
    ((4, 4, 4), "needs 2 entries"),
    (True, "not a valid setting"),
])
def test_bad_rank_raises_config_error_naming_the_layer(rank, match):
    model = nn.Sequential(nn.Conv2d(16, 32, 3))
    with pytest.raises(ConfigError, match=match) as info:
        fxshift.apply([TuckerDecomposePass(rank=rank)], model)
    assert "'0'" in str(info.value)


def test_recompose_refuses_chains_with_shift_layers():
    gm = fxshift.apply([TuckerDecomposePass(rank=0.5, only_if_cheaper=False), fxshift.ShiftQuantizePass()], conv_model())
    with pytest.raises(fxshift.FxshiftError, match=r"cannot recompose layer '\d'.*ShiftConv2d"):
        fxshift.apply([RecomposePass()], gm)


def test_tucker1_rank_is_capped_by_the_kernel_size():
    model = nn.Sequential(nn.Conv2d(1, 32, 3)).eval()
    x = torch.randn(1, 1, 8, 8)
    gm = fxshift.apply([TuckerDecomposePass(rank=0.5, only_if_cheaper=False)], model, x)
    assert gm.get_submodule("0").ranks == (9, None)  # 1·3·3 = 9 < 16
    with torch.no_grad():
        assert rel_error(gm(x), model(x)) < 1e-5
