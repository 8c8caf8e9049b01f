"""LayerPrunePass on small models: block finding by pattern, criteria, count/fraction/budget
selection, report rows, save/load, ONNX, composition with later passes, and every ConfigError."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxshift
from fxshift import Budget, ConfigError, LayerPrunePass, RecipeError
from fxshift.prune.blocks import find_blocks, node_shapes
from fxshift.prune.criteria import ensemble_ranks, score_blocks
from fxshift.trace import trace

from conftest import build_torchvision


pytestmark = pytest.mark.usefixtures("one_thread")


class Unit(nn.Module):
    """A residual unit of a model fxshift has never seen: y = x + branch(x), shape kept."""

    def __init__(self, c: int, scale: float = 1.0):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.n = nn.BatchNorm2d(c)
        self.b = nn.Conv2d(c, c, 1)
        with torch.no_grad():
            self.a.weight.mul_(scale)
            self.b.weight.mul_(scale)

    def forward(self, x):
        return torch.add(x, self.b(torch.relu(self.n(self.a(x)))))


class Down(nn.Module):
    """A projection shortcut: not removable."""

    def __init__(self, c: int):
        super().__init__()
        self.a = nn.Conv2d(c, 2 * c, 3, 2, 1)
        self.proj = nn.Conv2d(c, 2 * c, 1, 2)

    def forward(self, x):
        return self.a(x) + self.proj(x)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.u1 = Unit(8, scale=3.0)
        self.u2 = Unit(8, scale=0.1)   # the smallest weights: l1 removes it first
        self.down = Down(8)
        self.u3 = Unit(16, scale=1.0)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.u3(self.down(self.u2(self.u1(F.relu(self.stem(x))))))
        return self.fc(x.mean((2, 3)))


class Plain(nn.Module):
    """VGG-style single path: two 8->8 conv-BN-ReLU runs are removable, the stem and the 8->16 are not."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class Dense(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(7, 4, 3, padding=1)

    def forward(self, x):
        return self.b(torch.cat([x, self.a(x)], 1))


X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _toy():
    torch.manual_seed(0)
    return Toy().eval()


def _rows(gm, action=None):
    return [r for r in fxshift.report(gm).to_dicts() if r["pass"] == "LayerPrunePass" and action in (None, r["action"])]


def _calibration(n=4, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, classes, (8,), generator=g)) for _ in range(n)]


# ----- finding blocks ---------------------------------------------------------------------------

def test_blocks_found_by_pattern_and_rejections_explained():
    gm = trace(_toy(), (X,))
    blocks, rejected = find_blocks(gm, node_shapes(gm, (X,)))
    assert [b.name for b in blocks] == ["u1", "u2", "u3"]
    assert all(b.kind == "residual" for b in blocks)
    assert [r.name for r in rejected] == ["down"] and "projection" in rejected[0].reason


def test_single_path_runs_are_blocks():
    gm = trace(Plain().eval(), (X,))
    blocks, _ = find_blocks(gm, node_shapes(gm, (X,)))
    assert [b.name for b in blocks] == ["features.3..features.5", "features.6..features.8"]
    assert all(b.kind == "chain" for b in blocks)


def test_shape_changing_add_and_concat_are_not_blocks():
    class Broadcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return x + self.c(x).mean(1, keepdim=True)  # same operands, but the branch reduces channels

    gm = trace(Broadcast(), (X,))
    blocks, rejected = find_blocks(gm, node_shapes(gm, (X,)))
    assert blocks == [] and "broadcast" in rejected[0].reason
    gm = trace(Dense(), (X,))
    blocks, rejected = find_blocks(gm, node_shapes(gm, (X,)))
    assert blocks == [] and any("concatenation" in r.reason for r in rejected)


def test_nested_residual_is_ambiguous():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Unit(3)
            self.c = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return x + self.c(self.inner(x))

    gm = trace(Outer(), (X,))
    blocks, rejected = find_blocks(gm, node_shapes(gm, (X,)))
    assert [b.name for b in blocks] == ["inner"]
    assert any("holds other residual blocks" in r.reason for r in rejected)


# ----- removing by count, fraction, budget -----------------------------------------------------

def test_count_removes_lowest_l1_blocks_and_reports():
    model = _toy()
    before = copy.deepcopy(model.state_dict())
    gm = fxshift.apply([LayerPrunePass(blocks=1, criterion="l1")], model, X)
    pruned = _rows(gm, "pruned")
    assert [r["layer"] for r in pruned] == ["u2"]
    assert {r["layer"] for r in _rows(gm, "kept")} == {"u1", "u3"}
    skipped = {r["layer"]: r["reason"] for r in _rows(gm, "skipped")}
    assert skipped.pop("down").startswith("not removable")
    assert set(skipped) == {"stem", "fc"} and all(r == "not inside a removable block" for r in skipped.values())
    row = pruned[0]
    assert row["params_after"] == 0 and row["params_before"] == fxshift.parameter_count(model.u2)
    assert row["macs_before"] == fxshift.macs(model.u2, torch.randn(1, 8, 16, 16)) and row["macs_after"] == 0
    scores = {r["layer"]: r["score"] for r in _rows(gm) if r["score"] is not None}
    assert scores["u2"] < min(scores["u1"], scores["u3"])
    assert fxshift.parameter_count(model) - fxshift.parameter_count(gm) == row["params_before"]
    assert fxshift.macs(model, X) - fxshift.macs(gm, X) == row["macs_before"]
    assert not hasattr(gm, "u2") or not list(gm.u2.parameters())
    # the model given is unchanged, and the pruned one equals the original without u2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = F.relu(model.stem(X))
    expected = model.fc(model.u3(model.down(model.u1(x))).mean((2, 3)))
    assert torch.allclose(gm(X), expected, atol=1e-6)


def test_fraction_rounds_over_candidates():
    gm = fxshift.apply([LayerPrunePass(blocks=0.6)], _toy(), X)   # round(0.6 * 3) = 2
    assert len(_rows(gm, "pruned")) == 2


@pytest.mark.parametrize("kind, target", [("macs", 0.7), ("params", 0.8)])
def test_budget_removes_fewest_blocks_that_meet_it(kind, target):
    model = _toy()
    gm = fxshift.apply([LayerPrunePass(blocks=Budget(**{kind: target}))], model, X)
    measure = (lambda m: fxshift.macs(m, X)) if kind == "macs" else fxshift.parameter_count
    assert measure(gm) <= target * measure(model)
    pruned = _rows(gm, "pruned")
    assert pruned
    # one block fewer (the last one chosen) would not meet the budget
    column = "macs_before" if kind == "macs" else "params_before"
    last = max(pruned, key=lambda r: r["score"])
    assert measure(gm) + last[column] > target * measure(model)


@pytest.mark.slow
def test_latency_budget_measured_in_onnxruntime():
    model = Plain().eval()
    x = torch.randn(8, 3, 32, 32)
    gm = fxshift.apply([LayerPrunePass(blocks=Budget(latency=0.8, threads=1))], model, x)
    summary = [s for s in fxshift.context.budget_summaries(gm) if s["pass"] == "LayerPrunePass"][-1]
    assert summary["kind"] == "latency" and summary["blocks"] == len(_rows(gm, "pruned")) >= 1
    assert summary["fraction"] <= 0.8 * 1.03


def test_include_exclude_choose_blocks():
    gm = fxshift.apply([LayerPrunePass(blocks=1, exclude="u2")], _toy(), X)
    assert [r["layer"] for r in _rows(gm, "pruned")] != ["u2"]
    assert any(r["layer"] == "u2" and r["action"] == "skipped" and "exclude" in r["reason"] for r in _rows(gm))
    gm = fxshift.apply([LayerPrunePass(blocks=1, include="u3")], _toy(), X)
    assert [r["layer"] for r in _rows(gm, "pruned")] == ["u3"]


# ----- criteria -------------------------------------------------------------------------------

@pytest.mark.parametrize("criterion", ["l1", "l2", "bn", "taylor", "imprint", "ensemble", ["l1", "taylor"]])
def test_every_criterion_scores_and_leaves_model_alone(criterion):
    model = _toy().train()
    state = copy.deepcopy(model.state_dict())
    gm = fxshift.apply([LayerPrunePass(blocks=1, criterion=criterion, calibration=_calibration())], model, X)
    scores = [r["score"] for r in _rows(gm) if r["action"] in ("pruned", "kept")]
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_taylor_and_l1_prefer_the_small_block():
    calib = _calibration()
    for criterion in ("l1", "l2", "taylor"):
        gm = fxshift.apply([LayerPrunePass(blocks=1, criterion=criterion, calibration=calib)], _toy(), X)
        assert [r["layer"] for r in _rows(gm, "pruned")] == ["u2"], criterion


def test_imprint_scores_what_the_block_adds():
    # labels that the stem's features separate: a block that maps x to x + ~0 adds nothing
    torch.manual_seed(0)
    model = _toy()
    gm = trace(model, (X,))
    blocks, _ = find_blocks(gm, node_shapes(gm, (X,)))
    u2 = next(b for b in blocks if b.name == "u2")
    with torch.no_grad():
        model.u2.b.weight.zero_()
        model.u2.b.bias.zero_()
    scores, _ = score_blocks(gm, [u2], ["imprint"], _calibration())
    assert scores == [0.0]


def test_ensemble_ranks_sum_and_ties():
    assert ensemble_ranks({"a": [3.0, 1.0, 2.0], "b": [1.0, 1.0, 5.0]}) == [2.5, 0.5, 3.0]


# ----- save / load, ONNX, composition -----------------------------------------------------------

def test_save_load_rebuilds_without_scoring(tmp_path, monkeypatch):
    model = _toy()
    gm = fxshift.apply([LayerPrunePass(blocks=2, criterion="taylor", calibration=_calibration())], model, X)
    path = tmp_path / "pruned.pt"
    fxshift.save(gm, path)
    import fxshift.prune.criteria as criteria

    monkeypatch.setattr(criteria, "CRITERIA", {})  # load must not score anything
    loaded = fxshift.load(_toy(), path)
    assert torch.allclose(loaded(X), gm(X), atol=1e-6)
    assert fxshift.parameter_count(loaded) == fxshift.parameter_count(gm)
    fxshift.save(loaded, tmp_path / "again.pt")   # the removal survives a second round trip
    assert torch.allclose(fxshift.load(_toy(), tmp_path / "again.pt")(X), gm(X), atol=1e-6)


def test_load_into_another_architecture_is_a_recipe_error(tmp_path):
    gm = fxshift.apply([LayerPrunePass(blocks=1)], _toy(), X)
    fxshift.save(gm, tmp_path / "p.pt")
    with pytest.raises(RecipeError, match="u2"):
        fxshift.load(Plain(), tmp_path / "p.pt")


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    import numpy as np

    gm = fxshift.apply([LayerPrunePass(blocks=2)], _toy(), X)
    path = tmp_path / "p.onnx"
    fxshift.export_onnx(gm, (X,), path)
    sess = fxshift.onnx.session(str(path))
    out = sess.run(None, {sess.get_inputs()[0].name: X.numpy()})[0]
    np.testing.assert_allclose(out, gm(X).detach().numpy(), atol=1e-4)


def test_tucker_and_shift_compose_after_and_save(tmp_path):
    from fxshift import ShiftQuantizePass, TuckerDecomposePass

    model = _toy()
    gm = fxshift.apply([LayerPrunePass(blocks=1), TuckerDecomposePass(rank=0.5)], model, X)
    passes = {r["pass"] for r in fxshift.report(gm).to_dicts()}
    assert {"LayerPrunePass", "TuckerDecomposePass"} <= passes
    assert not any(r["layer"].startswith("u2.") for r in fxshift.report(gm).to_dicts() if r["pass"] != "LayerPrunePass")
    fxshift.save(gm, tmp_path / "t.pt")
    assert torch.allclose(fxshift.load(_toy(), tmp_path / "t.pt")(X), gm(X), atol=1e-5)
    gm = fxshift.apply([ShiftQuantizePass(weight_bits=5)], gm, X)
    assert gm(X).shape == (2, 5)


def test_layer_prune_after_tucker_scores_the_chains():
    from fxshift import TuckerDecomposePass

    gm = fxshift.apply([TuckerDecomposePass(rank=0.5, include="u*"), LayerPrunePass(blocks=1)], _toy(), X)
    rows = {r["layer"]: r for r in _rows(gm) if r["action"] in ("pruned", "kept")}
    assert set(rows) == {"u1", "u2", "u3"} and all(r["score"] > 0 for r in rows.values())
    assert len(_rows(gm, "pruned")) == 1 and gm(X).shape == (2, 5)
    chained = fxshift.parameter_count(fxshift.apply([TuckerDecomposePass(rank=0.5, include="u*")], _toy(), X))
    pruned = next(iter(_rows(gm, "pruned")))
    assert fxshift.parameter_count(gm) == chained - pruned["params_before"]


def test_save_load_after_tucker_then_layer_prune(tmp_path):
    from fxshift import TuckerDecomposePass

    gm = fxshift.apply([TuckerDecomposePass(rank=0.5), LayerPrunePass(blocks=2)], _toy(), X)
    fxshift.save(gm, tmp_path / "tl.pt")
    loaded = fxshift.load(_toy(), tmp_path / "tl.pt")
    assert torch.allclose(loaded(X), gm(X), atol=1e-5)
    assert fxshift.parameter_count(loaded) == fxshift.parameter_count(gm)


# ----- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(blocks=0), "at least 1"),
    (dict(blocks=1.5), r"\(0, 1\)"),
    (dict(blocks="two"), "an int"),
    (dict(blocks=True), "an int"),
    (dict(criterion="magic"), "unknown criterion 'magic'"),
    (dict(criterion=["l1", "nope"]), "unknown criterion 'nope'"),
    (dict(criterion="taylor"), "calibration"),
    (dict(criterion="ensemble"), "calibration"),
    (dict(loss_fn=3), "loss_fn"),
])
def test_bad_options_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LayerPrunePass(**kwargs)


def test_too_many_blocks_names_the_count():
    with pytest.raises(ConfigError, match="only 3 removable blocks"):
        fxshift.apply([LayerPrunePass(blocks=4)], _toy(), X)


def test_unreachable_budget_says_what_is_reachable():
    with pytest.raises(ConfigError, match=r"removing all 3 removable blocks leaves \d+\.\d% of the model's macs"):
        fxshift.apply([LayerPrunePass(blocks=Budget(macs=0.05))], _toy(), X)


def test_no_candidates_and_no_inputs():
    with pytest.raises(ConfigError, match="no removable block.*concatenation"):
        fxshift.apply([LayerPrunePass()], Dense(), X)
    with pytest.raises(ConfigError, match="example_inputs"):
        fxshift.apply([LayerPrunePass()], _toy())


def test_bn_criterion_without_batchnorm():
    class NoBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return x + self.c(x)

    with pytest.raises(ConfigError, match="no affine BatchNorm"):
        fxshift.apply([LayerPrunePass(criterion="bn")], NoBN(), X)
