"""The rank grammar, parsed once (fxshift.plan.rank_setting) and shared by every decomposition pass."""
import pytest
from torch import nn

from fxshift import Budget, ConfigError, CPDecomposePass, SpatialSVDPass, TuckerDecomposePass
from fxshift.plan.rank_setting import (Absolute, Energy, Fraction, PerMode, VBMF, is_data_driven, parse_rank,
                                            rank_for_layer)


@pytest.mark.parametrize("value, parsed", [
    (0.5, Fraction(0.5)), (1.0, Fraction(1.0)), (7, Absolute(7)), ("vbmf", VBMF()), ("energy:0.85", Energy(0.85)),
    ((0.5, 4), PerMode((Fraction(0.5), Absolute(4)))), ([2, "vbmf"], PerMode((Absolute(2), VBMF()))),
])
def test_every_form_parses_to_its_typed_value(value, parsed):
    assert parse_rank(value, "conv") == parsed
    assert parse_rank(parsed, "conv") is parsed  # typed values pass through


@pytest.mark.parametrize("value, match", [
    (1.5, r"\(0, 1\]"), (0.0, r"\(0, 1\]"), ("energy:x", "form 'energy:0.85'"), ("energy:1.5", "energy threshold"),
    ("tucker", "unknown rank"), (True, "not a valid setting"), (((1, 2), 3), "flat tuple"), ((), "flat tuple"),
    (Budget(macs=0.5), "whole model"),
])
def test_bad_values_name_the_layer(value, match):
    with pytest.raises(ConfigError, match=match) as info:
        parse_rank(value, "features.3")
    assert "'features.3'" in str(info.value)


def test_dict_and_callable_pick_and_parse_per_layer():
    conv = nn.Conv2d(4, 4, 3)
    assert rank_for_layer({"a": 0.25}, "a", conv) == Fraction(0.25)
    assert rank_for_layer({"a": 0.25}, "b", conv) is None
    assert rank_for_layer(lambda name, m: 3 if name == "a" else None, "a", conv) == Absolute(3)
    assert rank_for_layer(lambda name, m: None, "a", conv) is None
    assert is_data_driven(VBMF()) and is_data_driven(Energy(0.9)) and not is_data_driven(Fraction(0.5))


@pytest.mark.parametrize("make", [TuckerDecomposePass, CPDecomposePass, SpatialSVDPass])
def test_every_pass_rejects_the_same_bad_setting_the_same_way(make):
    import fxshift

    with pytest.raises(ConfigError, match="energy threshold 1.5 must lie") as info:
        fxshift.apply([make(rank="energy:1.5")], nn.Sequential(nn.Conv2d(8, 16, 3)))
    assert "'0'" in str(info.value)
