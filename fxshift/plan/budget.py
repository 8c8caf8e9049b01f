"""Budget: how much of the whole model to keep, for any pass that decides "how much".

``Budget(macs=0.5)`` asks for a model that keeps 50% of the original model's total MACs;
``Budget(params=0.3)`` 30% of its parameters; ``Budget(latency=0.5)`` half of its onnxruntime
CPU latency; ``Budget(train_step=0.45, batch=256)`` 45% of the time of one training step
(forward + backward in torch). A decomposition pass turns it into per-layer ranks
(fxshift.plan.planner, fxshift.plan.allocation); LayerPrunePass into a number of blocks
(fxshift.plan.block_count). Timed kinds are measured by the timers of fxshift.measure.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..errors import ConfigError

__all__ = ["Budget", "DEFAULT_FRACTIONS"]

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
    error it can find (see fxshift.plan.allocation for the method).

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
        (fxshift.measure.latency) or a TrainStepTimer (fxshift.measure.train_step)."""
        if self.kind == "latency":
            from ..measure.latency import LatencyTimer

            return LatencyTimer(self.threads, self.cache)
        if self.kind == "train_step":
            from ..measure.train_step import TrainStepTimer

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
