"""A whole-model cost budget for the decomposition passes, and the per-layer rank allocation.

``Budget(macs=0.5)`` asks a decomposition pass for a model that keeps 50% of the original
model's total MACs; ``Budget(params=0.3)`` 30% of its parameters; ``Budget(latency=0.5)`` half
of its onnxruntime CPU latency; ``Budget(train_step=0.45, batch=256)`` 45% of the time of one
training step (forward + backward in torch). The pass then chooses every layer's rank itself:

1. Candidates. For each layer it can decompose, the pass proposes a few ranks (one per entry of
   ``Budget.fractions``: "keep about this fraction of the layer's cost"), and for each one an
   estimate of the relative reconstruction error e = ‖W − Ŵ‖/‖W‖ (exact for SVD-based methods,
   the HOSVD truncation for Tucker-2, a short ALS for CP) and its cost: MACs at the layer's
   input shape, parameters, latency measured in onnxruntime, or forward+backward time measured
   in torch (fxshift.step_timer). Keeping the layer as it is
   (cost unchanged, e = 0) is always a candidate.
2. Allocation (:func:`allocate`). Minimise Σ_layers e² (the sum of the fractions of each
   layer's weight energy that is lost) subject to
   ``fixed cost + Σ_layers cost(choice) ≤ target × original total``, where the fixed cost is
   everything no candidate changes (layers that cannot be decomposed count at their full cost).
   This is a multiple-choice knapsack (one option per layer); with a few dozen layers and ~10
   options each it is solved exactly by dynamic programming over the layers' summed cost,
   counted in steps of 1/10000 of the budget and rounded up (so the true total never exceeds
   the target, and at most one step per layer of the budget is left unused), followed by a
   greedy fill that spends that rounding slack on the changes that lower Σe² most. (A greedy
   "least error per unit of cost saved" descent was tried first: on small random instances it
   ended up to 2.6× above the optimum.)

   The result keeps the cost at or just below the target. When even the cheapest candidate of
   every layer cannot reach ``target × (1 + tolerance)``, ConfigError says what can be reached.
3. Decomposition of each layer at its chosen rank (the final error is in the report).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import ConfigError

__all__ = ["Budget", "Candidate", "LayerCandidates", "Allocation", "allocate", "DEFAULT_FRACTIONS"]

#: Per-layer cost fractions proposed as candidates: "keep about this fraction of the layer's cost".
DEFAULT_FRACTIONS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

_KINDS = ("macs", "params", "latency", "train_step")
_MEASURED = ("latency", "train_step")


@dataclass(frozen=True)
class Budget:
    """Keep a fraction of the whole model's MACs, parameters, onnxruntime latency or training-step time.

    Give exactly one of ``macs``, ``params``, ``latency``, ``train_step``, each a fraction in (0, 1] of the
    *original whole model's* total: ``Budget(macs=0.5)`` makes the decomposed model have about
    50% of the original model's MACs (conv and linear MACs per sample, as fxshift.macs counts
    them), ``Budget(params=0.3)`` about 30% of all its parameters (BatchNorm and every other
    layer included), ``Budget(latency=0.5)`` about half of its batch latency in onnxruntime on
    this machine's CPU, ``Budget(train_step=0.45, batch=256)`` about 45% of the time of one
    training step (forward and backward in torch, training mode, in the memory format the model's
    weights are in) at batch 256: the budget to give a decomposition made mid-training
    (fxshift.train.DecomposeSchedule), where the time saved per step is what counts. Layers the pass cannot or may not decompose count at their full cost. The
    pass chooses per-layer ranks that meet the target with the smallest total reconstruction
    error it can find (see fxshift.decompose.budget for the method).

    For latency, every candidate layer is timed in onnxruntime (cached by layer type, shape and
    ranks; for train_step, forward+backward in torch), the allocation is made from those timings,
    and then checked against the whole model:
    the chosen structure is timed next to the original and the allocation corrected until the
    measured fraction is within the tolerance (layers timed alone do not add up to the model).
    Timings on a busy machine are noisy; `threads=1` gives the steadiest ratios there.

    Args:
        macs, params, latency, train_step: the fraction to keep (exactly one of them).
        tolerance: how far above the target the result may end when the target cannot be met
            exactly (default 3%, relative); a target that cannot be reached within it raises
            ConfigError. The allocation aims at or just below the target.
        fractions: the candidate per-layer cost fractions (6–10 values in (0, 1) keep the search
            and, for latency, the timing short).
        threads: onnxruntime intra-op threads for latency, torch threads for train_step (default:
            the CPUs this process may use; torch's current setting for train_step).
        cache: a JSON file that keeps layer latencies between runs (keyed by layer type, shape,
            ranks and threads), in addition to the in-memory cache (latency only).
        verify: for latency and train_step, also time the decomposed model and record the
            measured fraction.
        batch: for train_step, the training batch size the steps are timed at (default: the batch
            of the example inputs, which fxshift.train.DecomposeSchedule usually gets as one sample:
            give the real one).

    ``macs``, ``latency`` and ``train_step`` need the example_inputs given to fxshift.apply (the
    layers' input shapes); ``params`` does not.

    Example:
        >>> gm = fxshift.apply([fxshift.TuckerDecomposePass(rank=fxshift.Budget(macs=0.5))], model, x)
    """

    macs: Optional[float] = None
    params: Optional[float] = None
    latency: Optional[float] = None
    train_step: Optional[float] = None
    tolerance: float = 0.03
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    threads: Optional[int] = None
    cache: Optional[str] = None
    verify: bool = True
    batch: Optional[int] = None

    def __post_init__(self) -> None:
        given = [k for k in _KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(f"Budget needs exactly one of macs=, params=, latency=, train_step= "
                              f"(got {given or 'none'}), "
                              "e.g. Budget(macs=0.5)")
        value = getattr(self, given[0])
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
            raise ConfigError(f"Budget({given[0]}={value!r}): the fraction of the model to keep must lie in (0, 1]")
        if not (isinstance(self.tolerance, (int, float)) and 0.0 <= self.tolerance < 0.5):
            raise ConfigError(f"Budget tolerance {self.tolerance!r} must lie in [0, 0.5)")
        fractions = tuple(self.fractions)
        if not fractions or any(isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f < 1.0
                                for f in fractions):
            raise ConfigError(f"Budget fractions {self.fractions!r} must be a non-empty list of values in (0, 1)")
        object.__setattr__(self, "fractions", tuple(sorted(set(float(f) for f in fractions))))
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ConfigError(f"Budget threads={self.threads!r} must be a positive int")
        if self.batch is not None:
            if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
                raise ConfigError(f"Budget batch={self.batch!r} must be a positive int (the training batch size)")
            if given[0] != "train_step":
                raise ConfigError(f"Budget batch={self.batch} applies to train_step= only; "
                                  f"{given[0]}= is costed per the example inputs' batch")

    @property
    def kind(self) -> str:
        """"macs", "params", "latency" or "train_step"."""
        return next(k for k in _KINDS if getattr(self, k) is not None)

    @property
    def measured(self) -> bool:
        """True when the cost is timed (latency, train_step) rather than counted."""
        return self.kind in _MEASURED

    @property
    def what(self) -> str:
        """The cost's name, for messages."""
        return {"macs": "MACs", "params": "parameters", "latency": "onnxruntime latency",
                "train_step": "training-step time"}[self.kind]

    def timer(self, channels_last: bool = False) -> Any:
        """The timer a measured budget costs layers and models with: a LatencyTimer
        (fxshift.onnx.latency) or a TrainStepTimer (fxshift.step_timer)."""
        if self.kind == "latency":
            from ..onnx.latency import LatencyTimer

            return LatencyTimer(self.threads, self.cache)
        if self.kind == "train_step":
            from ..step_timer import TrainStepTimer

            return TrainStepTimer(self.threads, self.batch, channels_last=channels_last)
        raise ConfigError(f"{self!r} is counted, not timed")

    @property
    def target(self) -> float:
        """The fraction of the original total to keep."""
        return float(getattr(self, self.kind))

    def __repr__(self) -> str:
        batch = f", batch={self.batch}" if self.batch is not None else ""
        return f"Budget({self.kind}={self.target:g}{batch})"

    def to_dict(self) -> dict[str, Any]:
        out = {"kind": self.kind, "target": self.target, "tolerance": self.tolerance,
               "fractions": list(self.fractions)}
        if self.batch is not None:
            out["batch"] = self.batch
        return out


@dataclass
class Candidate:
    """One way to decompose a layer: the pass's rank, its cost and its estimated relative error."""

    rank: Any
    cost: float
    error: float


@dataclass
class LayerCandidates:
    """A layer's current cost and its candidate decompositions (cheaper ones only are used)."""

    name: str
    cost: float
    candidates: list[Candidate] = field(default_factory=list)


@dataclass
class Allocation:
    """The chosen candidate per layer (None keeps the layer), the resulting and target totals."""

    choice: dict[str, Optional[Candidate]]
    total_before: float
    total_after: float
    target_total: float
    squared_error: float

    @property
    def fraction(self) -> float:
        """total_after / total_before."""
        return self.total_after / self.total_before if self.total_before > 0 else 1.0


def _options(layer: LayerCandidates) -> list[Candidate]:
    """Keep (cost, 0) plus the Pareto-optimal cheaper candidates, by decreasing cost."""
    keep = Candidate(None, float(layer.cost), 0.0)
    cheaper = sorted((c for c in layer.candidates if c.cost < layer.cost and math.isfinite(c.error)),
                     key=lambda c: (c.cost, c.error))
    pareto: list[Candidate] = []
    best = math.inf
    for c in cheaper:  # increasing cost: keep a candidate only if it beats every cheaper one
        if c.error < best - 1e-15:
            pareto.append(c)
            best = c.error
    return [keep] + pareto[::-1]


def allocate(layers: Sequence[LayerCandidates], total: float, target_fraction: float,
             tolerance: float = 0.03, unit: str = "", resolution: int = 10_000) -> Allocation:
    """Choose one candidate per layer so that the model's total cost is at most
    ``target_fraction × total`` with the smallest Σ e² (see the module docstring).

    Args:
        layers: every layer the pass may decompose, with its current cost and its candidates.
        total: the whole model's cost now (layers that are not listed count as fixed cost).
        target_fraction: the fraction of `total` to keep.
        tolerance: accept a result up to ``target × (1 + tolerance)`` when nothing cheaper exists.
        unit: the cost's name, for messages.
        resolution: cost steps of the dynamic programme (the budget for the listed layers split
            into this many; costs are rounded up, so the true total never exceeds the budget).

    Returns:
        An Allocation; raises ConfigError when the target is out of reach.
    """
    target = target_fraction * total
    options = {layer.name: _options(layer) for layer in layers}
    names = list(options)
    fixed = total - sum(float(layer.cost) for layer in layers)
    capacity = target - fixed  # what the listed layers may cost together
    cheapest = sum(min(o.cost for o in opts) for opts in options.values())
    if cheapest > capacity + tolerance * target + 1e-9 * abs(target):
        reach = (fixed + cheapest) / total if total > 0 else 1.0
        raise ConfigError(
            f"the budget of {target_fraction:.1%} of the model's {unit or 'cost'} cannot be met: decomposing every "
            f"layer this pass may decompose at its cheapest candidate keeps {reach:.1%}. Raise the target, "
            "include more layers, or add smaller fractions to Budget(fractions=...)")
    if cheapest >= capacity:  # within the tolerance: the cheapest choice everywhere
        current = {name: min(range(len(opts)), key=lambda i: opts[i].cost) for name, opts in options.items()}
    else:
        current = _knapsack(options, names, capacity, resolution)
    cost = fixed + sum(options[n][i].cost for n, i in current.items())

    # Fill: spend the rounding slack on the single changes that lower Σe² the most.
    limit = max(cost, target)
    while True:
        best: Optional[tuple[float, str, int]] = None
        for name, opts in options.items():
            here = opts[current[name]]
            for i, o in enumerate(opts):
                gain = here.error ** 2 - o.error ** 2
                if gain <= 1e-15 or cost - here.cost + o.cost > limit + 1e-9 * abs(limit):
                    continue
                if best is None or gain > best[0]:
                    best = (gain, name, i)
        if best is None:
            break
        _, name, i = best
        cost += options[name][i].cost - options[name][current[name]].cost
        current[name] = i

    choice = {name: (options[name][i] if i else None) for name, i in current.items()}
    squared = sum(options[name][i].error ** 2 for name, i in current.items())
    return Allocation(choice, float(total), cost, target, squared)


def _knapsack(options: dict[str, list[Candidate]], names: list[str], capacity: float,
              resolution: int) -> dict[str, int]:
    """Multiple-choice knapsack by dynamic programming: one option per layer, Σ cost ≤ capacity,
    least Σ e². Costs are counted in steps of capacity/resolution, rounded up."""
    step = capacity / resolution
    size = resolution + 1
    best = np.full(size, np.inf)
    best[0] = 0.0  # best[c]: least Σe² of the layers so far with Σ cost in steps exactly c
    picks = np.zeros((len(names), size), dtype=np.int16)
    for row, name in enumerate(names):
        new = np.full(size, np.inf)
        for i, o in enumerate(options[name]):
            units = int(math.ceil(o.cost / step - 1e-9))
            if units >= size:
                continue
            shifted = np.full(size, np.inf)
            shifted[units:] = best[:size - units] + o.error ** 2
            better = shifted < new
            new[better] = shifted[better]
            picks[row][better] = i
        best = new
    end = int(np.argmin(best))
    if not np.isfinite(best[end]):  # cannot happen when the cheapest choice fits; be safe
        return {name: min(range(len(options[name])), key=lambda i: options[name][i].cost) for name in names}
    chosen: dict[str, int] = {}
    for row in range(len(names) - 1, -1, -1):
        name = names[row]
        i = int(picks[row][end])
        chosen[name] = i
        end -= int(math.ceil(options[name][i].cost / step - 1e-9))
    return chosen
