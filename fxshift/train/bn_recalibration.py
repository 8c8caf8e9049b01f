"""Re-estimating BatchNorm statistics under the masks gated units apply (FTWT, docs/methods.md §9).

A model fine-tuned dense (train_mask "none") or under the targets ("target") and then gated at inference
runs its BatchNorm layers on activations they were not estimated on. Running a few batches in training
mode under the predictors' own masks, with cumulative averages, re-estimates every BatchNorm of the
model without touching a weight.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from ..errors import ConfigError
from ..nn.gated import check_train_mask, gated_units


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Any], *, train_mask: Any = "predicted",
                          max_batches: Optional[int] = None) -> nn.Module:
    """Reset and re-estimate the running statistics of every BatchNorm in `model` (in place; returned).

    Args:
        model: a model with gated units (fxshift.DynamicPrunePass).
        batches: inputs, or (input, ...) tuples such as a DataLoader yields.
        train_mask: the masks the units apply while the statistics are gathered ("predicted": what
            inference runs); each unit's own setting is restored afterwards.
        max_batches: stop after this many batches.

    Only the BatchNorm layers and the gated units run in training mode (dropout stays off); the
    statistics are cumulative averages over the batches (momentum None), and each BatchNorm's momentum
    and every module's training flag are restored.
    """
    units = gated_units(model)
    if not units:
        raise ConfigError("recalibrate_batchnorm: the model has no gated units; apply fxshift.DynamicPrunePass "
                          "first (for a plain model, torch.optim.swa_utils.update_bn does this)")
    mode = check_train_mask(train_mask, "recalibrate_batchnorm")
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None or max_batches is not None and max_batches < 1:
        raise ConfigError("recalibrate_batchnorm: no batches given; pass a DataLoader or a list of input batches")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    flags = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    saved = {unit: unit.train_mask for _, unit in units}
    count = 0
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for _, unit in units:
            unit.train_mask = mode
            unit.train()
        batch = first
        while batch is not None and (max_batches is None or count < max_batches):
            model(batch[0] if isinstance(batch, (tuple, list)) else batch)
            count += 1
            batch = next(iterator, None)
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for unit, setting in saved.items():
            unit.train_mask = setting
            unit.last_loss = None
        for m, flag in flags.items():
            m.training = flag
    return model
