"""Power-of-two weights as exact int8 (docs/DESIGN.md, performance model).

A channel whose nonzero weights are ±2^p with p in [p_max − 6, p_max] is exactly ``step · q`` with
``step = 2^(p_max − 6)`` and integer ``q`` in {±1, ±2, …, ±64} (or 0): int8 without rounding, and small
enough that onnxruntime's u8×s8 pair sums (AVX2 maddubs) never saturate (255·64·2 < 2^15).
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["INT8_SHIFTS", "limit_channel_shifts", "channel_shift_counts", "is_int8_exact", "int8_codes"]

INT8_SHIFTS = 7  # distinct powers of two a channel may use: ±1 … ±64 times its step


def _rows(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(1, -1)


def limit_channel_shifts(w: torch.Tensor, shifts: int = INT8_SHIFTS) -> torch.Tensor:
    """Raise the magnitudes of each output channel's nonzero ±2^p values that lie more than `shifts` − 1
    octaves below the channel's largest to that floor (DeepShift-Q's clamp, per channel); zeros stay."""
    if shifts < 1:
        raise ValueError(f"shifts={shifts}: give at least 1")
    rows = _rows(w)
    mag = rows.abs()
    floor = mag.amax(dim=1, keepdim=True) * 2.0 ** (1 - shifts)
    out = torch.where(rows != 0, torch.sign(rows) * torch.maximum(mag, floor), rows)
    return out.reshape(w.shape)


def _exponents(rows: torch.Tensor) -> torch.Tensor:
    """log2|w| of exact ±2^p values (nonzero entries; zeros give −inf)."""
    return torch.log2(rows.abs().double())


def channel_shift_counts(w: torch.Tensor) -> torch.Tensor:
    """Per output channel, how many octaves its nonzero weights span, counted inclusively (p_max − p_min + 1;
    0 for an all-zero channel)."""
    rows = _rows(w.detach())
    p = _exponents(rows)
    nonzero = rows != 0
    p_max = torch.where(nonzero, p, torch.full_like(p, -torch.inf)).amax(dim=1)
    p_min = torch.where(nonzero, p, torch.full_like(p, torch.inf)).amin(dim=1)
    counts = (p_max - p_min + 1).round()
    return torch.where(nonzero.any(dim=1), counts, torch.zeros_like(counts)).to(torch.int64)


def is_int8_exact(w: torch.Tensor) -> bool:
    """True when `w` holds only ±2^p / 0 and every channel spans at most INT8_SHIFTS octaves."""
    rows = _rows(w.detach())
    p = _exponents(rows)[rows != 0]
    if not bool(torch.all(p == p.round())):
        return False
    return bool((channel_shift_counts(w) <= INT8_SHIFTS).all())


def int8_codes(w: torch.Tensor, factor: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8, step float32 > 0) per output channel with ``q · step == w · factor`` exactly, for a weight
    of ±2^p / 0 values whose channels span ≤ INT8_SHIFTS octaves and an optional per-channel factor
    (a calibrated scale times a folded BatchNorm's γ/σ; a negative factor flips the channel's signs).

    Raises ValueError when `w` is not of that form."""
    rows = _rows(w.detach()).double()
    if not is_int8_exact(rows):
        counts = channel_shift_counts(rows)
        raise ValueError(f"weight is not int8-exact: channels span up to {int(counts.max())} octaves (at most "
                         f"{INT8_SHIFTS}), or values are not powers of two")
    nonzero = rows != 0
    p = torch.where(nonzero, _exponents(rows), torch.full_like(rows, -torch.inf))
    p_max = p.amax(dim=1)
    p_max = torch.where(torch.isfinite(p_max), p_max, torch.zeros_like(p_max))
    base = torch.exp2(p_max - (INT8_SHIFTS - 1))  # the channel's step before the factor
    q = torch.round(rows / base.unsqueeze(1))
    f = torch.ones_like(base) if factor is None else factor.detach().double().reshape(-1)
    sign = torch.where(f < 0, -torch.ones_like(f), torch.ones_like(f))
    step = torch.where(f != 0, base * f.abs(), torch.ones_like(base))
    q = torch.where((f != 0).unsqueeze(1), q * sign.unsqueeze(1), torch.zeros_like(q))
    return q.to(torch.int8).reshape(w.shape), step.float()
