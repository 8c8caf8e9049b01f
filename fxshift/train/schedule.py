"""DecomposeSchedule: change a model's structure in the middle of training (docs/methods.md §7).

Elhoushi et al. (arXiv 1909.05675) train the original architecture for a few epochs, Tucker-
decompose it, keep training the decomposed (cheaper) model, and optionally recompose it at the
end. The schedule does the switching for any training loop, one call at each epoch's start:

    sched = fxshift.train.DecomposeSchedule(at_epoch=3, pipeline=[TuckerDecomposePass(rank=0.5)],
                                            recompose_at_end=True, example_inputs=x[:1])
    for epoch in range(epochs):
        model, optimizer = sched.on_epoch_start(epoch, model, optimizer, lr_scheduler=scheduler)
        train_one_epoch(model, optimizer)
        scheduler.step()
    model, optimizer = sched.on_train_end(model, optimizer, lr_scheduler=scheduler)

The pipeline is any fxshift pipeline (TuckerDecomposePass, ShiftQuantizePass, a callable …).
"""
from __future__ import annotations

import logging
import time
import warnings
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import ConfigError
from ..nn.base import RECOMPOSE_RULES
from ..passes.recompose import RecomposePass
from ..pipeline import Pass, apply
from ..measure.train_step import is_channels_last
from ..trace import LeafSpec
from .deepshift import shift_parameters
from .distributed import apply_synced, rewrap
from .optim import GroupOf, rebuild_optimizer, unwrap_model

__all__ = ["DecomposeSchedule"]

log = logging.getLogger("fxshift.train")


def _device_of(module: nn.Module) -> Optional[torch.device]:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return None


def _to(inputs: Any, device: Optional[torch.device]) -> Any:
    if device is None or inputs is None:
        return inputs
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to(x, device) for x in inputs)
    return inputs


def has_decomposed_layers(model: nn.Module) -> bool:
    """True when `model` holds a chain that RecomposePass can fold."""
    return any(type(m) in RECOMPOSE_RULES for m in unwrap_model(model).modules())


class DecomposeSchedule:
    """Switch a model to `pipeline`'s structure at the start of epoch `at_epoch`, and optionally
    fold decomposed chains back into the original layers when training ends.

    Args:
        at_epoch: the epoch (as counted by the caller's loop, usually from 0) at whose start the
            switch happens. Epochs 0 … at_epoch−1 train the original model.
        pipeline: a pass or list of passes for fxshift.apply (any pass: TuckerDecomposePass,
            ShiftQuantizePass, …).
        recompose_at_end: on_train_end() runs RecomposePass, so that the final weights load into
            the original architecture (`original.load_state_dict(model.state_dict())`).
        example_inputs: a small batch (e.g. one sample) for tracing and for the report's MACs;
            moved to the model's device. The model is traced in eval mode so that BatchNorm
            statistics are not touched by it.
        group_of: `(name, param) -> group index | group "name" | None`: the optimizer param group of
            a new parameter (default: the group of the layer it replaced). Useful to send new
            parameters to a group created empty from the start, e.g. DeepShift-PS shifts to a
            group without weight decay.
        ps_no_decay: DeepShift-PS shifts and signs get no weight decay (docs/methods.md §1; add
            fxshift.train.shift_regularizer to the loss instead): where the default rule would put
            them in a group with weight decay, they go to its no-decay twin (see rebuild_optimizer's
            `no_decay`). Default True; `group_of` choices are kept as given.
        leaf_modules, concrete_args: tracing options, as for fxshift.apply.
        process_group: synchronise across this process group even when the model is not wrapped
            in DDP (a DDP model always uses its wrapper's group).
        src: the global rank whose weights all ranks take after the switch (default: the group's
            first rank).

    When the switch happens:
        exactly at `on_epoch_start(epoch=at_epoch, ...)`, once per schedule object. Resuming from a
        checkpoint saved after the switch is therefore safe: the epochs after `at_epoch` do
        nothing, and the model loaded with fxshift.load already has the new structure. Resuming
        from a checkpoint saved before the switch (at the end of an epoch < at_epoch) switches at
        `at_epoch` as the original run did.

    What a switch returns:
        a new model (a GraphModule from fxshift.apply, re-wrapped in DistributedDataParallel with
        the old wrapper's options when the model was wrapped; the caller's model is copied, never
        changed; the new one keeps its device, train/eval mode and channels-last weights), and a
        new optimizer of the same class and hyper-parameters over exactly the new model's
        parameters, with the state of parameters that survived (BatchNorm, untouched layers)
        carried over; LR schedulers given as `lr_scheduler` are moved to it at their current
        position. See fxshift.train.rebuild_optimizer for the rules.

    Under DDP, every rank calls the schedule; the ranks apply the pipeline each, check that the
    structures agree and take the source rank's weights (fxshift.train.apply_synced).

    Attributes:
        events: one dict per switch/recompose done: epoch, event, seconds (wall-clock, including
            the optimizer rebuild and, under DDP, the synchronisation), params before/after.
    """

    def __init__(self, at_epoch: int, pipeline: Pass | Sequence[Pass], *, recompose_at_end: bool = False,
                 example_inputs: Any = None, group_of: Optional[GroupOf] = None, leaf_modules: LeafSpec = None,
                 concrete_args: Optional[dict[str, Any]] = None, process_group: Any = None,
                 src: Optional[int] = None, ps_no_decay: bool = True):
        if isinstance(at_epoch, bool) or not isinstance(at_epoch, int) or at_epoch < 0:
            raise ConfigError(f"at_epoch={at_epoch!r}: give the epoch (an int ≥ 0) at whose start to switch")
        self.at_epoch = at_epoch
        self.pipeline = list(pipeline) if isinstance(pipeline, (list, tuple)) else [pipeline]
        if not self.pipeline:
            raise ConfigError("pipeline is empty: give at least one pass (e.g. TuckerDecomposePass(rank=0.5))")
        self.recompose_at_end = bool(recompose_at_end)
        self.example_inputs = example_inputs
        self.group_of = group_of
        self.ps_no_decay = bool(ps_no_decay)
        self.apply_kwargs = {"leaf_modules": leaf_modules, "concrete_args": concrete_args}
        self.process_group = process_group
        self.src = src
        self.switched = False
        self.recomposed = False
        self.events: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------- the hooks
    def on_epoch_start(self, epoch: int, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                       lr_scheduler: Any = None) -> tuple[nn.Module, Optional[torch.optim.Optimizer]]:
        """Call at the start of every epoch; returns (model, optimizer), new ones at the switch.

        `lr_scheduler`: an LR scheduler or a list of them driving `optimizer`, moved to the new
        optimizer at the switch (pass it every epoch, or at least at the switch).
        """
        if epoch == self.at_epoch and not self.switched:
            model, optimizer = self.switch(model, optimizer, lr_scheduler, epoch=epoch)
        return model, optimizer

    def on_train_end(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                     lr_scheduler: Any = None) -> tuple[nn.Module, Optional[torch.optim.Optimizer]]:
        """Call once after the last epoch; returns (model, optimizer).

        With recompose_at_end, decomposed chains are folded back (RecomposePass) and the returned
        model's state_dict loads into the original architecture; the optimizer is rebuilt over
        the recomposed parameters (state carried for the untouched ones), so training may go on.
        Otherwise, or when the model has nothing to recompose, both are returned as they are.
        """
        if not self.recompose_at_end or not has_decomposed_layers(model):
            return model, optimizer
        model, optimizer = self._run([RecomposePass()], model, optimizer, lr_scheduler, "recompose", None)
        self.recomposed = True
        return model, optimizer

    def switch(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, lr_scheduler: Any = None,
               *, epoch: Optional[int] = None) -> tuple[nn.Module, Optional[torch.optim.Optimizer]]:
        """Apply the pipeline now, whatever the epoch (on_epoch_start calls this at `at_epoch`)."""
        result = self._run(self.pipeline, model, optimizer, lr_scheduler, "switch", epoch)
        self.switched = True
        return result

    # ---------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The schedule's progress (JSON-able): whether it switched/recomposed, and its events."""
        return {"at_epoch": self.at_epoch, "switched": self.switched, "recomposed": self.recomposed,
                "events": [dict(e) for e in self.events]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.switched = bool(state.get("switched", False))
        self.recomposed = bool(state.get("recomposed", False))
        self.events = [dict(e) for e in state.get("events", [])]

    # ------------------------------------------------------------------------------- internals
    def _run(self, pipeline: list, model: nn.Module, optimizer: Optional[torch.optim.Optimizer], lr_scheduler: Any,
             event: str, epoch: Optional[int]) -> tuple[nn.Module, Optional[torch.optim.Optimizer]]:
        if lr_scheduler is None and optimizer is not None and any("initial_lr" in g for g in optimizer.param_groups):
            warnings.warn("the optimizer seems to be driven by an LR scheduler ('initial_lr' in its param groups) but "
                          "none was passed as lr_scheduler=; the scheduler will keep adjusting the old optimizer",
                          stacklevel=3)
        start = time.perf_counter()
        ddp = model if isinstance(model, DistributedDataParallel) else None
        base = unwrap_model(model)
        device = _device_of(base)
        group = ddp.process_group if ddp is not None else self.process_group
        was_training = base.training
        base.eval()  # tracing and shape probing run the model once: keep BatchNorm statistics as they are
        try:
            if ddp is not None or self.process_group is not None:
                gm = apply_synced(pipeline, base, _to(self.example_inputs, device), process_group=group, src=self.src,
                                  **self.apply_kwargs)
            else:
                gm = apply(pipeline, base, _to(self.example_inputs, device), **self.apply_kwargs)
        finally:
            base.train(was_training)
        gm.train(was_training)
        if device is not None and any(t.device != device for t in list(gm.parameters()) + list(gm.buffers())):
            gm.to(device)
        if is_channels_last(base):
            gm.to(memory_format=torch.channels_last)
        new_model: nn.Module = rewrap(ddp, gm) if ddp is not None else gm
        new_optimizer = None
        if optimizer is not None:
            no_decay = None
            if self.ps_no_decay:
                ps = {id(p) for params in shift_parameters(gm) for p in params}
                no_decay = lambda _name, param: id(param) in ps  # noqa: E731
            new_optimizer = rebuild_optimizer(optimizer, base, gm, lr_scheduler=lr_scheduler, group_of=self.group_of,
                                              no_decay=no_decay)
        seconds = time.perf_counter() - start
        record = {"event": event, "epoch": epoch, "seconds": seconds,
                  "params_before": sum(p.numel() for p in base.parameters()),
                  "params_after": sum(p.numel() for p in gm.parameters())}
        self.events.append(record)
        log.info("fxshift schedule: %s at epoch %s in %.2f s, parameters %d -> %d", event, epoch, seconds,
                 record["params_before"], record["params_after"])
        return new_model, new_optimizer

    def __repr__(self) -> str:
        names = ", ".join(type(p).__name__ if not hasattr(p, "__name__") else p.__name__ for p in self.pipeline)
        return (f"DecomposeSchedule(at_epoch={self.at_epoch}, pipeline=[{names}], "
                f"recompose_at_end={self.recompose_at_end}, switched={self.switched})")
