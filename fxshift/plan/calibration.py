"""Calibrating a timed budget (latency, train_step) against whole-model timings.

Layers timed alone do not add up to the model: onnxruntime fuses neighbours, keeps blocked layouts
between convs and schedules differently, part of the time does not shrink at all (BatchNorm,
activations, call overhead), and the gap depends on the layer and the input size (on ResNet-18 at
112×112 the isolated timings predicted a 50% latency where the model measured 16%; forward+backward in
torch has the same gap). So an allocation is made for an internal target (first the real one), its
structure is timed as a whole model next to the original, and the next internal target comes from a
straight line fitted to every (planned fraction, measured fraction) pair so far:
measured ≈ a + b·planned, solved for the target (one point: measured ∝ planned). A fixed share of time
that does not shrink is exactly the intercept a, so a deterministic model converges in two or three
timings where a proportional guess crawls.

The allocation measured closest to the target without exceeding target × (1 + tolerance) is kept.
When none does, the cheapest allocation is measured; it is kept when it meets the target, and
otherwise ConfigError names the closest measured fraction and the cheapest reachable one.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from ..errors import ConfigError
from .allocation import Allocation, LayerCandidates, allocate
from .budget import Budget

__all__ = ["calibrate", "fit_line"]


def fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(a, b) of measured ≈ a + b·planned by least squares; through the origin for a single point or
    when the points do not rise (noise)."""
    planned = np.array([p for p, _ in points], dtype=float)
    measured = np.array([m for _, m in points], dtype=float)
    if len(points) >= 2 and np.ptp(planned) > 1e-9:
        b, a = np.polyfit(planned, measured, 1)
        if b > 0:
            return float(a), float(b)
    return 0.0, float(np.sum(measured * planned) / max(float(np.sum(planned ** 2)), 1e-12))


def calibrate(entries: Sequence[LayerCandidates], total: float, budget: Budget,
              measure: Callable[[Allocation], float], rounds: int = 6) -> tuple[Allocation, list[float]]:
    """The allocation for a timed `budget` whose whole model measures within the target (see the module
    docstring). `measure(allocation)` times the model built with it and returns its fraction of the
    original. Returns the allocation and the measured fractions, the kept allocation's last."""
    target, tol = budget.target, budget.tolerance
    limit = target * (1.0 + tol)
    lowest = {e.name: min(e.candidates, key=lambda c: c.cost) for e in entries}
    cheapest = Allocation(lowest, total, total - sum(e.cost - lowest[e.name].cost for e in entries), target * total,
                          sum(c.error ** 2 for c in lowest.values()))
    floor = cheapest.fraction  # the smallest internal target the layer timings allow

    def allocation_for(t: float) -> Allocation:
        if t <= floor:
            return cheapest
        try:
            return allocate(entries, total, t, 0.0, unit=budget.kind)
        except ConfigError:
            return cheapest

    def key(allocation: Allocation) -> tuple:
        return tuple(sorted((n, None if c is None else repr(c.rank)) for n, c in allocation.choice.items()))

    tried: dict[tuple, tuple[Allocation, float]] = {}
    order: list[float] = []
    t = target
    for _ in range(rounds):
        allocation = allocation_for(t)
        if key(allocation) in tried:  # the line points at an allocation already timed: no new information
            break
        fraction = measure(allocation)
        tried[key(allocation)] = (allocation, fraction)
        order.append(fraction)
        if abs(fraction - target) <= tol * target:
            break
        if allocation is cheapest and fraction > target:
            break
        a, b = fit_line([(al.fraction, f) for al, f in tried.values()])
        t = min(0.999, max(floor, (target - a) / b))
    feasible = [pair for pair in tried.values() if pair[1] <= limit]
    if not feasible:
        if key(cheapest) not in tried:
            tried[key(cheapest)] = (cheapest, measure(cheapest))
            order.append(tried[key(cheapest)][1])
        low = tried[key(cheapest)][1]
        if low > limit:
            closest = min(order, key=lambda f: abs(f - target))
            raise ConfigError(
                f"the budget of {target:.1%} of the model's {budget.what} cannot be met: the allocations tried "
                f"measured {', '.join(f'{f:.1%}' for f in order)} (closest {closest:.1%}), and decomposing every "
                f"layer this pass may decompose at its cheapest candidate measured {low:.1%} of the original. "
                f"Raise the target to at least {low:.0%}, include more layers, or add smaller fractions to "
                "Budget(fractions=...)")
        feasible = [tried[key(cheapest)]]
    best = min(feasible, key=lambda pair: abs(pair[1] - target))
    if order[-1] != best[1]:
        order.append(best[1])
    return best[0], order
