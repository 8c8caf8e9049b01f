"""FTWT's cooldown (docs/methods.md §9): the mask loss is switched off for the last part of training, so
the backbone adapts to the masks the (now fixed) predictors choose."""
from __future__ import annotations

import math

from ..errors import ConfigError


def mask_loss_weight(step: int, total_steps: int, weight: float = 1.0, cooldown: float = 0.5) -> float:
    """The mask loss's weight at `step` (0-based) of `total_steps`: `weight` before the cooldown, 0 in it.

    The cooldown is the last `cooldown` fraction of the steps (FTWT: the second half, 0.5); 0 keeps the
    loss on throughout. Example::

        loss = task + fxshift.train.mask_loss_weight(step, steps, 0.5) * fxshift.train.mask_loss(gm)
    """
    if isinstance(cooldown, bool) or not isinstance(cooldown, (int, float)) or not 0 <= cooldown < 1:
        raise ConfigError(f"mask_loss_weight: cooldown must be a fraction of training in [0, 1), got {cooldown!r}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ConfigError(f"mask_loss_weight: total_steps must be a positive int, got {total_steps!r}")
    start = math.ceil((1.0 - cooldown) * total_steps)
    return float(weight) if step < start else 0.0
