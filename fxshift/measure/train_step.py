"""Training-step time of layers and models in torch, for Budget(train_step=...).

What a decomposition saves in training is the time of forward plus backward, not MACs: a 1×1
conv costs little in MACs and a lot in memory traffic, backward weighs layers differently from
forward, and small layers are dominated by per-call overhead. So a training-step budget measures:
every layer and its candidate replacements are run forward and backward (input gradient
included, as in the middle of a network) at the training batch size, round-robin so that they
share the machine's noise, in training mode, in the memory format the model trains in; whole
models likewise, on deep copies (the caller's modules, gradients and BatchNorm statistics are
never touched). Layer figures are cached in memory by structure, input shape and threads.
"""
from __future__ import annotations

import copy
import json
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from .latency import layer_key
from .timing import median_times

__all__ = ["TrainStepTimer", "is_channels_last", "at_batch"]

_MEMORY: dict[str, float] = {}
_LOCK = threading.Lock()


def is_channels_last(module: nn.Module) -> bool:
    """True when the module's 4-D weights are stored channels-last (a common CPU/GPU speed-up)."""
    kernels = [p for p in module.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1]
    return bool(kernels) and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                                 for p in kernels)


def at_batch(inputs: Sequence[torch.Tensor], batch: Optional[int]) -> tuple[torch.Tensor, ...]:
    """The example inputs grown (or cut) to `batch` samples by repeating their rows."""
    if batch is None:
        return tuple(inputs)
    return tuple(x[torch.arange(batch, device=x.device) % x.shape[0]] if isinstance(x, torch.Tensor) and x.dim()
                 else x for x in inputs)


@contextmanager
def _threads(count: Optional[int]) -> Iterator[None]:
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def _materialize(module: nn.Module) -> None:
    """Give a module built on the meta device real placeholder weights (small random values;
    BatchNorm statistics 0 and 1), which is all a timing needs."""
    module.to_empty(device="cpu")
    for p in module.parameters():
        p.normal_(0.0, 0.05)
    for name, b in module.named_buffers():
        if b.is_floating_point():
            b.fill_(1.0 if name.endswith("running_var") else 0.0)
        else:
            b.zero_()


def _backward_of(out: Any) -> None:
    tensors = [t for t in (out if isinstance(out, (tuple, list)) else (out,))
               if isinstance(t, torch.Tensor) and t.requires_grad]
    torch.autograd.backward(tensors, [torch.ones_like(t) for t in tensors])


def _step_runner(module: nn.Module, inputs: Sequence[torch.Tensor]) -> Callable[[], None]:
    """A callable running one forward+backward of `module` (a training-mode copy) on `inputs`."""
    cuda = any(t.is_cuda for t in list(module.parameters()) + list(inputs) if isinstance(t, torch.Tensor))

    def run() -> None:
        module.zero_grad(set_to_none=True)
        for x in inputs:
            if isinstance(x, torch.Tensor) and x.grad is not None:
                x.grad = None
        _backward_of(module(*inputs))
        if cuda:
            torch.cuda.synchronize()

    return run


class TrainStepTimer:
    """Times forward+backward of layers (cached) and of models in torch, in training mode.

    Args:
        threads: torch intra-op threads while timing (default: torch's current setting).
        batch: the batch size a step is timed at (default: the batch of the shapes and inputs given).
        channels_last: time 4-D inputs and conv weights in channels-last format.
        min_time: seconds of timed steps per layer measurement (the median step is kept).

    A training step is long and steady next to an inference call, so each runner is warmed up
    once and timed in at least three rounds (the planner's whole-model checks take most of a
    Budget(train_step=...) run's planning time, which counts against the training it saves).
    """

    def __init__(self, threads: Optional[int] = None, batch: Optional[int] = None, channels_last: bool = False,
                 min_time: float = 0.1):
        self.threads = threads or torch.get_num_threads()
        self.batch = batch
        self.channels_last = channels_last
        self.min_time = min_time
        self.measured = 0

    def _ready(self, module: nn.Module) -> nn.Module:
        copied = copy.deepcopy(module).train()
        if any(t.is_meta for t in list(copied.parameters()) + list(copied.buffers())):
            _materialize(copied)  # the planner's shells: only the structure is known
        for p in copied.parameters():
            p.requires_grad_(True)
        return copied.to(memory_format=torch.channels_last) if self.channels_last else copied

    def _input(self, x: torch.Tensor, grad: bool) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.detach().requires_grad_(grad and x.is_floating_point())

    def prepared(self, model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> nn.Module:
        """What `models` takes for `model` (the module itself: copies are made when timing)."""
        return model

    def layer(self, module: nn.Module, input_shape: Sequence[int]) -> float:
        """Median seconds of one forward+backward of `module` on an input of `input_shape` (cached)."""
        return self.layers([module], input_shape)[0]

    def layers(self, modules: Sequence[nn.Module], input_shape: Sequence[int]) -> list[float]:
        """Median seconds of each module's forward+backward at `input_shape` (its batch replaced by
        this timer's); when any is not cached, all are timed round-robin and the cache updated."""
        shape = (self.batch or input_shape[0], *input_shape[1:])
        keys = [json.dumps(["train_step", self.channels_last, json.loads(layer_key(m, shape, self.threads))],
                           separators=(",", ":")) for m in modules]
        with _LOCK:
            if all(k in _MEMORY for k in keys):
                return [_MEMORY[k] for k in keys]
        x = self._input(torch.randn(shape, generator=torch.Generator().manual_seed(0)), grad=True)
        runners = {key: _step_runner(self._ready(m), (x,)) for key, m in zip(keys, modules)}
        with _threads(self.threads):
            medians = median_times(runners, rounds=3, min_time=self.min_time, warmup=1)
        self.measured += len(runners)
        with _LOCK:
            _MEMORY.update(medians)
        return [medians[k] for k in keys]

    def models(self, models: dict[str, nn.Module], example_inputs: Sequence[torch.Tensor],
               min_time: Optional[float] = None) -> dict[str, float]:
        """Median seconds of one forward+backward of each model on the example inputs grown to this
        timer's batch, timed round-robin on training-mode copies."""
        inputs = tuple(self._input(x, grad=False) for x in at_batch(example_inputs, self.batch))
        runners = {name: _step_runner(self._ready(model), inputs) for name, model in models.items()}
        with _threads(self.threads):
            return median_times(runners, rounds=3, min_time=min_time if min_time is not None else 3 * self.min_time,
                                warmup=1)

    def save(self) -> None:
        """Nothing to write: training-step figures are kept in memory only."""


def clear_cache() -> None:
    """Forget every in-memory layer step time."""
    with _LOCK:
        _MEMORY.clear()
