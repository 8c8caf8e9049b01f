"""DeepShift training helpers: optimizer parameter groups and the PS shift regulariser (docs/methods.md §1).

The authors' advice for DeepShift-PS: the shifts P and signs S get no weight decay; instead add
wd·½·Σ(2^P)² to the loss; train with RAdam/Adam (lr 0.01 from scratch, 0.001 from pretrained); a
separate learning rate for the sign (0 freezes it) is an option.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..nn.shift import SHIFT_LAYERS

__all__ = ["deepshift_param_groups", "shift_regularizer", "ps_weight_decay_loss", "shift_parameters"]


def shift_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(shifts P, signs S) of every DeepShift-PS layer in `model`, in module order."""
    shifts, signs = [], []
    for module in model.modules():
        if isinstance(module, SHIFT_LAYERS) and module.mode == "ps":
            shifts.append(module.shift)
            signs.append(module.sign)
    return shifts, signs


def deepshift_param_groups(model: nn.Module, lr_sign: Optional[float] = None, *, weight_decay: float = 0.0,
                           lr_shift: Optional[float] = None) -> list[dict[str, Any]]:
    """Optimizer parameter groups for a model with DeepShift layers.

    Args:
        model: any module; PS layers' `shift` and `sign` parameters go to their own groups.
        lr_sign: learning rate of the PS signs (0 freezes them); None uses the optimizer's lr.
        weight_decay: weight decay of every other parameter (including DeepShift-Q weights and
            biases). P and S always get weight decay 0: use shift_regularizer for them.
        lr_shift: learning rate of the PS shifts; None uses the optimizer's lr.

    Returns:
        A list of parameter-group dicts for any torch.optim optimizer (empty groups left out).
        Parameters with requires_grad=False are left out.

    Example:
        >>> opt = torch.optim.RAdam(deepshift_param_groups(gm, lr_sign=0.0, weight_decay=1e-4), lr=1e-3)
    """
    shifts, signs = shift_parameters(model)
    special = {id(p) for p in shifts + signs}
    other = [p for p in model.parameters() if id(p) not in special and p.requires_grad]
    groups: list[dict[str, Any]] = []
    if other:
        groups.append({"params": other, "weight_decay": weight_decay, "name": "weights"})
    shift_group = [p for p in shifts if p.requires_grad]
    if shift_group:
        group = {"params": shift_group, "weight_decay": 0.0, "name": "shift"}
        if lr_shift is not None:
            group["lr"] = lr_shift
        groups.append(group)
    sign_group = [p for p in signs if p.requires_grad]
    if sign_group:
        group = {"params": sign_group, "weight_decay": 0.0, "name": "sign"}
        if lr_sign is not None:
            group["lr"] = lr_sign
        groups.append(group)
    return groups


def shift_regularizer(model: nn.Module, weight_decay: float) -> torch.Tensor:
    """The DeepShift-PS weight decay term wd·½·Σ(2^P)² over every PS layer's shifts (add it to the loss).

    Returns a 0-d tensor (zero when the model has no PS layers).
    """
    shifts, _ = shift_parameters(model)
    if not shifts:
        first = next(model.parameters(), None)
        return torch.zeros((), device=first.device if first is not None else None)
    total = sum(torch.exp2(p).square().sum() for p in shifts)
    return weight_decay * 0.5 * total


ps_weight_decay_loss = shift_regularizer
