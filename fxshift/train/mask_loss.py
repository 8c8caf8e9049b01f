"""mask_loss: the FTWT pruning loss (docs/methods.md §9) to add to the task loss in any training loop."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..nn.gated import gated_units


def mask_loss(model: nn.Module) -> torch.Tensor:
    """Mean over gated units of the BCE between each unit's predicted logits and its targets, from the
    last training-mode forward; a differentiable scalar.

    Example:
        >>> loss = F.cross_entropy(gm(x), y) + 0.5 * fxshift.train.mask_loss(gm)

    Raises ConfigError when `model` has no gated units (apply fxshift.DynamicPrunePass first) or when
    the last forward was not in training mode (call model.train() and run a forward first).
    """
    units = gated_units(model)
    if not units:
        raise ConfigError("mask_loss: the model has no gated units; apply fxshift.DynamicPrunePass first")
    missing = [name for name, unit in units if unit.last_loss is None]
    if missing:
        raise ConfigError(f"mask_loss: no training-mode forward has run since the last eval forward (units without a "
                          f"loss: {', '.join(missing[:3])}{', …' if len(missing) > 3 else ''}); call model.train() "
                          "and run a forward pass before mask_loss")
    return torch.stack([unit.last_loss for _, unit in units]).mean()
