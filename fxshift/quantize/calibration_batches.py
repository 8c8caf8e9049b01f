"""Calibration data as the quantisers take it: a list of input tuples, checked once with clear errors."""
from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError

__all__ = ["calibration_batches"]


def calibration_batches(calibration: Any, empty_hint: str = "") -> list[tuple]:
    """The calibration iterable (tensors, tuples or lists of tensors: inputs only) as a list of argument tuples;
    ConfigError when it is not iterable, empty, or a batch holds something other than tensors. `empty_hint` is
    appended to the message for an empty iterable."""
    try:
        batches = [b if isinstance(b, tuple) else tuple(b) if isinstance(b, list) else (b,) for b in calibration]
    except TypeError:
        raise ConfigError(f"calibration must be an iterable of input batches, got {type(calibration).__name__}") \
            from None
    if not batches:
        raise ConfigError("calibration is empty: give at least one batch of inputs (e.g. 32 unlabelled images)"
                          + empty_hint)
    for i, b in enumerate(batches):
        if not b or not all(isinstance(t, torch.Tensor) for t in b):
            raise ConfigError(f"calibration batch {i} must be a tensor or a tuple of tensors (inputs only, no "
                              f"labels), got {[type(t).__name__ for t in b]}")
    return batches
