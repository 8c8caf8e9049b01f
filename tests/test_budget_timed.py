"""Timed budgets (latency, train_step) held against a deterministic timer whose right answer is known.

The fake timer's model time is ``fixed·MACs₀ + (1 − fixed)·MACs`` (a share of the time, BatchNorm,
activations, call overhead, that no decomposition shrinks) and a layer's time is its MACs. Real timers
are noisy; with this one every figure the planner and LayerPrune return can be checked exactly.
"""
import pytest
import torch
from torch import nn

import fxshift
from fxshift import Budget, ConfigError, LayerPrunePass, SpatialSVDPass, TuckerDecomposePass
from fxshift.costs import shape_macs
from fxshift.models import SmallResNet
from fxshift.passes.decompose_base import budget_summary
from fxshift.plan.allocation import Allocation, Candidate, LayerCandidates
from fxshift.plan.calibration import calibrate, fit_line

FIXED = 0.35


class MacTimer:
    """Deterministic stand-in for LatencyTimer / TrainStepTimer."""

    def __init__(self):
        self.macs0, self.threads, self.measured = None, 1, 0

    def prepared(self, model, inputs):
        return model

    def layers(self, modules, input_shape):
        self.measured += len(modules)
        return [float(shape_macs(m, tuple(input_shape))) for m in modules]

    def models(self, models, inputs, min_time=None):
        if self.macs0 is None:   # the first call times the original ("original" for the planner, "0" for LayerPrune)
            self.macs0 = fxshift.macs(models.get("original", models.get("0")), inputs)
        return {k: FIXED * self.macs0 + (1 - FIXED) * fxshift.macs(m, inputs) for k, m in models.items()}

    def save(self):
        pass


def measured_fraction(model, gm, x):
    return FIXED + (1 - FIXED) * fxshift.macs(gm, x) / fxshift.macs(model, x)


@pytest.fixture
def fake_timer(monkeypatch):
    monkeypatch.setattr(Budget, "timer", lambda self, channels_last=False: MacTimer())


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()


def budget_for(kind, target):
    return Budget(**{kind: target}, threads=1)


@pytest.mark.parametrize("kind", ["latency", "train_step"])
@pytest.mark.parametrize("target", [0.4, 0.6])
def test_decomposition_meets_a_timed_budget_where_time_does_not_all_shrink(fake_timer, kind, target):
    """Before the line fit the calibration assumed measured ∝ planned: at 0.4 it tried 0.607, 0.519, 0.481,
    0.458, 0.445, 0.436 and returned 0.436, over the target, with no error."""
    model, x = cnn(), torch.randn(1, 3, 48, 48)
    budget = budget_for(kind, target)
    gm = fxshift.apply([SpatialSVDPass(rank=budget)], model, x)
    summary = budget_summary(gm)[-1]
    reached = measured_fraction(model, gm, x)
    assert target * (1 - budget.tolerance) <= reached <= target * (1 + budget.tolerance)
    assert summary["fraction"] == pytest.approx(reached, rel=1e-9)
    assert summary["measured_fraction"] == pytest.approx(reached, rel=1e-9)
    assert len(summary["calibration"]) <= 4   # the fit needs two or three whole-model timings here


@pytest.mark.parametrize("kind", ["latency", "train_step"])
def test_unreachable_timed_budget_names_the_closest_and_the_cheapest(fake_timer, kind):
    model, x = cnn(), torch.randn(1, 3, 48, 48)
    # the fixed share alone is 0.35 of the time: 0.3 cannot be reached by any allocation
    with pytest.raises(ConfigError, match=r"closest \d+\.\d%.*cheapest candidate measured 3\d\.\d%"):
        fxshift.apply([TuckerDecomposePass(rank=budget_for(kind, 0.3))], model, x)


def test_calibration_fits_a_line_through_the_points():
    assert fit_line([(0.5, 0.675), (0.2, 0.48)]) == pytest.approx((0.35, 0.65))
    assert fit_line([(0.5, 0.6)]) == pytest.approx((0.0, 1.2))          # one point: through the origin
    assert fit_line([(0.5, 0.6), (0.4, 0.7)]) == pytest.approx((0.0, 0.58 / 0.41))  # falling (noise): origin


def test_calibration_on_layer_candidates_alone():
    """Ten layers of cost 10 with candidates of cost 1..9; the model measures 0.35 + 0.65·planned."""
    entries = [LayerCandidates(f"l{i}", 10.0, [Candidate(r, float(r), (10 - r) / 10) for r in range(1, 10)])
               for i in range(10)]
    calls = []

    def measure(allocation: Allocation) -> float:
        calls.append(allocation.fraction)
        return FIXED + (1 - FIXED) * allocation.fraction

    allocation, measured = calibrate(entries, 100.0, Budget(latency=0.5), measure)
    assert abs(measured[-1] - 0.5) <= 0.03 * 0.5 and len(calls) <= 3
    assert FIXED + (1 - FIXED) * allocation.fraction == pytest.approx(measured[-1])


def layer_prune_fractions(model, x):
    """The true measured fraction of the model with its k lowest-scored blocks removed, k = 1..n."""
    out, k = {}, 1
    while True:
        try:
            gm = fxshift.apply([LayerPrunePass(blocks=k)], model, x)
        except ConfigError:
            return out
        out[k] = measured_fraction(model, gm, x)
        k += 1


@pytest.mark.parametrize("kind", ["latency", "train_step"])
@pytest.mark.parametrize("target", [0.9, 0.75])
def test_layer_prune_removes_the_fewest_blocks_that_meet_a_timed_budget(fake_timer, kind, target):
    model, x = SmallResNet((16, 16, 16), 2).eval(), torch.randn(1, 1, 28, 28)
    truth = layer_prune_fractions(model, x)
    expected = min(k for k, f in truth.items() if f <= target)
    gm = fxshift.apply([LayerPrunePass(blocks=budget_for(kind, target))], model, x)
    summary = next(s for s in fxshift.context.budget_summaries(gm) if s["pass"] == "LayerPrunePass")
    assert summary["blocks"] == expected
    assert summary["fraction"] == pytest.approx(truth[expected], rel=1e-9)
    assert measured_fraction(model, gm, x) == pytest.approx(truth[expected], rel=1e-9)


@pytest.mark.parametrize("kind", ["latency", "train_step"])
def test_layer_prune_says_when_removing_blocks_cannot_meet_a_timed_budget(fake_timer, kind):
    model, x = SmallResNet((16, 16, 16), 2).eval(), torch.randn(1, 1, 28, 28)
    with pytest.raises(ConfigError, match="cannot be met by block removal alone"):
        fxshift.apply([LayerPrunePass(blocks=budget_for(kind, 0.3))], model, x)
