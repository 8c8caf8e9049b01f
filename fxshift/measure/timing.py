"""Round-robin medians: the one way fxshift times candidates inside a process.

Every candidate runs once per round, in turn, so each sees the same background load; a
candidate's figure is the median of its rounds, which a busy machine moves less than a mean.
(Candidates that would run two thread pools at once are timed in separate processes instead:
fxshift.measure.process.)
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

__all__ = ["default_threads", "median_times", "session_runner", "torch_runner"]


def default_threads() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def session_runner(sess, inputs: Sequence[Any]) -> Callable[[], Any]:
    """A no-argument callable running onnxruntime session `sess` on `inputs` (tensors or numpy arrays)."""
    arrays = [x.detach().cpu().numpy() if hasattr(x, "detach") else x for x in inputs]
    feeds = {i.name: x for i, x in zip(sess.get_inputs(), arrays)}
    return lambda: sess.run(None, feeds)


def torch_runner(model, inputs: Sequence[Any]) -> Callable[[], Any]:
    """A no-argument callable running `model` on `inputs` in inference mode."""
    import torch

    def run():
        with torch.inference_mode():
            return model(*inputs)

    return run


def median_times(runners: Mapping[str, Callable[[], Any]], rounds: int = 5, min_time: float = 0.0,
                 max_rounds: int = 200, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each runner, timed round-robin (each sees the same machine noise):
    at least `rounds` rounds, more (up to `max_rounds`) until every runner has had `min_time`
    seconds on average."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    spent = 0.0
    done = 0
    while done < max_rounds and (done < rounds or spent < min_time * len(runners)):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            samples[name].append(elapsed)
            spent += elapsed
        done += 1
    return {name: statistics.median(values) for name, values in samples.items()}
