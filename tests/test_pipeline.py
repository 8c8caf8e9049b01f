"""apply(): pass forms, the caller's model untouched, report rows and formatting."""
import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

import fxshift
from fxshift.errors import FxshiftError


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def test_plain_callable_and_passbase_both_count_as_passes():
    calls = []

    def record(gm: fx.GraphModule) -> fx.GraphModule:
        calls.append("fn")
        return gm

    class Noop(PassBase):
        def call(self, gm):
            calls.append("base")
            return PassResult(gm, False)

    gm = fxshift.apply([record, Noop()], small_cnn())
    assert calls == ["fn", "base"]
    assert isinstance(gm, fx.GraphModule)


def test_graph_rewriting_callable_pass_is_applied():
    def relu_to_gelu(gm: fx.GraphModule) -> fx.GraphModule:
        for node in gm.graph.nodes:
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.ReLU):
                setattr(gm, node.target, nn.GELU())
        return gm

    model = small_cnn()
    gm = fxshift.apply(relu_to_gelu, model)
    assert isinstance(gm.get_submodule("1"), nn.GELU)
    assert isinstance(model[1], nn.ReLU)


def test_failing_pass_is_named():
    def broken(gm):
        raise KeyError("boom")

    with pytest.raises(FxshiftError, match="pass broken failed"):
        fxshift.apply([broken], small_cnn())


def test_non_pass_entry_and_bad_return_are_rejected():
    with pytest.raises(FxshiftError, match="not a pass"):
        fxshift.apply([42], small_cnn())
    with pytest.raises(FxshiftError, match="must return a GraphModule"):
        fxshift.apply([lambda gm: 42], small_cnn())


def test_callers_model_is_never_changed():
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [type(m) for m in model.modules()]
    fxshift.apply([fxshift.TuckerDecomposePass(rank=0.5, only_if_cheaper=False)], model, torch.randn(1, 3, 8, 8))
    assert [type(m) for m in model.modules()] == modules_before
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_report_rows_dicts_and_table():
    x = torch.randn(2, 3, 8, 8)
    gm = fxshift.apply([fxshift.TuckerDecomposePass(rank=0.5, only_if_cheaper=False)], small_cnn(), x)
    rows = fxshift.report(gm).to_dicts()
    assert [r["layer"] for r in rows] == ["0", "2", "6"]
    for row in rows:
        assert set(row) >= {"layer", "pass", "action", "reason", "params_before", "params_after", "macs_before",
                            "macs_after", "rank", "rel_error"}
        assert row["pass"] == "TuckerDecomposePass" and row["action"] == "decomposed"
        assert 0 <= row["rel_error"] < 1
    table = str(fxshift.report(gm))
    assert "TuckerDecomposePass" in table and "layer" in table.splitlines()[0]


def test_apply_on_a_previous_result_continues_its_report():
    x = torch.randn(1, 3, 8, 8)
    gm = fxshift.apply([fxshift.TuckerDecomposePass(rank=0.5, only_if_cheaper=False)], small_cnn(), x)
    gm2 = fxshift.apply([fxshift.RecomposePass()], gm)
    actions = [r["action"] for r in fxshift.report(gm2).to_dicts()]
    assert actions == ["decomposed"] * 3 + ["recomposed"] * 3
    assert len(fxshift.report(gm)) == 3  # the earlier result keeps its own report


def test_measuring_shapes_leaves_batchnorm_statistics_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3)).train()
    gm = fxshift.apply([fxshift.TuckerDecomposePass(rank=0.5, only_if_cheaper=False)], model, torch.randn(4, 3, 8, 8))
    assert gm.training and gm.get_submodule("1").training
    assert torch.equal(gm.get_submodule("1").running_mean, torch.zeros(16))
    assert int(gm.get_submodule("1").num_batches_tracked) == 0
