"""Calibrated post-training DeepShift-Q conversion of one layer (docs/methods.md §1; AdaRound, Nagel et al. 2020).

A layer y = W·x + b (a conv is this on unfolded input patches, one block per group) is converted to
ŷ = s ⊙ (Q·x̃) + b̂ with Q = ±2^p (p in the Q range of `weight_bits`), a float scale s per output row and
a corrected bias b̂, where x̃ are the inputs the *converted* model feeds the layer and x the float model's.
Everything is computed from second moments of the calibration inputs (centred, per group)::

    E‖y − ŷ‖² per row = w·Hff·wᵀ − 2·w·C·ŵᵀ + ŵ·Hqq·ŵᵀ + (w·μf + b − ŵ·μq − b̂)²,   ŵ = s·q

with Hff = Cov(x), Hqq = Cov(x̃), C = Cov(x, x̃) (asymmetric reconstruction: the layer also undoes the
error of the layers before it). Steps, per output row:

1. scale: s = max|w| · 2^t for t on a small grid in [0, 1) (every |w|/s ≤ 1), keeping the t whose
   nearest-in-log rounding gives the least error;
2. rounding: each weight takes the lower or upper neighbouring power of two of |w|/s, chosen AdaRound-style:
   a soft choice h = clip(σ(V)(ζ−γ)+γ, 0, 1) minimises the error plus λ·Σ(1 − |2h−1|^β) (β annealed 20→2)
   for a bounded number of Adam steps, then h rounds to 0/1; a row keeps nearest-in-log rounding if
   that is better;
3. the scale is refitted by least squares for the chosen codes;
4. bias correction: b̂ = b + w·μf − ŵ·μq removes the mean output shift.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["InputStats", "StatsAccumulator", "CalibrationResult", "conv_columns", "linear_columns",
           "calibrate_shift_weight", "output_error", "nearest_log_codes"]

_ZETA, _GAMMA = 1.1, -0.1  # AdaRound's rectified-sigmoid stretch


def conv_columns(x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                 dilation: Sequence[int], groups: int) -> torch.Tensor:
    """Input patches of a conv as (groups, C/groups·kh·kw, N·L) columns (torch weight order).

    `padding` is (left, right, top, bottom) of zeros, applied before unfolding (so asymmetric and
    "same" padding work; pad other modes beforehand)."""
    if any(padding):
        x = F.pad(x, tuple(padding))
    cols = F.unfold(x, tuple(kernel_size), dilation=tuple(dilation), stride=tuple(stride))  # (N, C·kh·kw, L)
    n, k, l = cols.shape
    return cols.reshape(n, groups, k // groups, l).permute(1, 2, 0, 3).reshape(groups, k // groups, n * l)


def linear_columns(x: torch.Tensor) -> torch.Tensor:
    """Inputs of a Linear as (1, in_features, rows) columns."""
    return x.reshape(-1, x.shape[-1]).t().unsqueeze(0)


@dataclass
class InputStats:
    """Centred second moments of a layer's float inputs x and converted-model inputs x̃, per group."""

    n: int
    mean_f: torch.Tensor  # (G, K)
    mean_q: torch.Tensor  # (G, K)
    h_ff: torch.Tensor  # (G, K, K)  Cov(x)
    h_qq: torch.Tensor  # (G, K, K)  Cov(x̃)
    c_fq: torch.Tensor  # (G, K, K)  Cov(x, x̃)


class StatsAccumulator:
    """Accumulates InputStats from batches of columns (G, K, n); shifted by the first batch's mean so
    that centring loses no precision, summed in float64."""

    def __init__(self) -> None:
        self.n = 0
        self._shift_f = self._shift_q = None
        self._sf = self._sq = self._ff = self._qq = self._fq = None

    def add(self, cols_f: torch.Tensor, cols_q: torch.Tensor) -> None:
        if cols_f.shape != cols_q.shape:
            raise ValueError(f"float and converted columns differ in shape: {tuple(cols_f.shape)} vs "
                             f"{tuple(cols_q.shape)}")
        cols_f, cols_q = cols_f.float(), cols_q.float()
        if self._shift_f is None:
            self._shift_f = cols_f.mean(dim=2, keepdim=True)
            self._shift_q = cols_q.mean(dim=2, keepdim=True)
        f, q = cols_f - self._shift_f, cols_q - self._shift_q
        parts = (f.sum(2).double(), q.sum(2).double(), (f @ f.transpose(1, 2)).double(),
                 (q @ q.transpose(1, 2)).double(), (f @ q.transpose(1, 2)).double())
        if self._sf is None:
            self._sf, self._sq, self._ff, self._qq, self._fq = parts
        else:
            for name, value in zip(("_sf", "_sq", "_ff", "_qq", "_fq"), parts):
                getattr(self, name).add_(value)
        self.n += cols_f.shape[2]

    def finish(self) -> InputStats:
        if self.n == 0:
            raise ValueError("no calibration columns were added")
        n = self.n
        mf, mq = self._sf / n, self._sq / n
        h_ff = self._ff / n - mf.unsqueeze(2) * mf.unsqueeze(1)
        h_qq = self._qq / n - mq.unsqueeze(2) * mq.unsqueeze(1)
        c_fq = self._fq / n - mf.unsqueeze(2) * mq.unsqueeze(1)
        return InputStats(n, (mf + self._shift_f.squeeze(2).double()).float(),
                          (mq + self._shift_q.squeeze(2).double()).float(), h_ff.float(), h_qq.float(), c_fq.float())


@dataclass
class CalibrationResult:
    codes: torch.Tensor  # (O, K) exact ±2^p, p in the Q range
    scale: torch.Tensor  # (O,) float, > 0
    bias: torch.Tensor  # (O,) corrected bias
    error_plain: float  # relative output error of plain DeepShift-Q rounding (no scale, original bias)
    error_calibrated: float  # relative output error after calibration
    adaround_rows: int  # rows whose AdaRound choice beat nearest-in-log rounding


def _q_range(weight_bits: int) -> tuple[int, int]:
    return -(2 ** (weight_bits - 1) - 1), 0


def nearest_log_codes(w: torch.Tensor, weight_bits: int) -> torch.Tensor:
    """sign(w)·2^round(log2 clamp(|w|, 2^p_min, 1)): plain DeepShift-Q rounding (zeros stay zero)."""
    p_min, _ = _q_range(weight_bits)
    return torch.sign(w) * torch.exp2(torch.round(torch.log2(w.abs().clamp(2.0 ** p_min, 1.0))))


def _grouped(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t.reshape(groups, t.shape[0] // groups, *t.shape[1:])


def _row_errors(w: torch.Tensor, b: torch.Tensor, w_hat: torch.Tensor, b_hat: torch.Tensor, st: InputStats,
                wc: Optional[torch.Tensor] = None, wffw: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared output error per row (G, Og) for weights of shape (G, Og, K)."""
    if wc is None:
        wc = w @ st.c_fq
    if wffw is None:
        wffw = ((w @ st.h_ff) * w).sum(-1)
    centred = wffw - 2 * (wc * w_hat).sum(-1) + ((w_hat @ st.h_qq) * w_hat).sum(-1)
    mean = (w * st.mean_f.unsqueeze(1)).sum(-1) + b - (w_hat * st.mean_q.unsqueeze(1)).sum(-1) - b_hat
    return centred.clamp(min=0) + mean ** 2


def _energy(w: torch.Tensor, b: torch.Tensor, st: InputStats) -> torch.Tensor:
    return ((w @ st.h_ff) * w).sum(-1) + ((w * st.mean_f.unsqueeze(1)).sum(-1) + b) ** 2


def output_error(weight: torch.Tensor, bias: Optional[torch.Tensor], new_weight: torch.Tensor,
                 new_bias: Optional[torch.Tensor], stats: InputStats) -> float:
    """‖y − ŷ‖ / ‖y‖ over the calibration data, y from (weight, bias) on x, ŷ from (new_weight, new_bias) on x̃."""
    g = stats.h_ff.shape[0]
    weight, new_weight = weight.reshape(weight.shape[0], -1), new_weight.reshape(weight.shape[0], -1)
    zeros = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
    w, w_hat = _grouped(weight.float(), g), _grouped(new_weight.float(), g)
    b = _grouped(zeros if bias is None else bias.float(), g)
    b_hat = _grouped(zeros if new_bias is None else new_bias.float(), g)
    err = _row_errors(w, b, w_hat, b_hat, stats).sum()
    energy = _energy(w, b, stats).sum()
    return math.sqrt(float(err) / float(energy)) if float(energy) > 0 else (0.0 if float(err) == 0 else math.inf)


def _rect_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA).clamp(0, 1)


def _adaround(w: torch.Tensor, s: torch.Tensor, st: InputStats, wc: torch.Tensor, weight_bits: int,
              iterations: int, lam: float, lr: float) -> torch.Tensor:
    """Codes q (G, Og, K) choosing the lower/upper power of two of |w|/s per weight (see the module doc)."""
    p_min, _ = _q_range(weight_bits)
    sign = torch.sign(w)
    a = (w.abs() / s.unsqueeze(-1)).clamp(2.0 ** p_min, 1.0)
    lo = torch.exp2(torch.floor(torch.log2(a)))
    hi = (2 * lo).clamp(max=1.0)
    gap = hi - lo
    frac = torch.where(gap > 0, (a - lo) / gap.clamp(min=1e-30), torch.zeros_like(a))
    frac = frac.clamp(0.01, 0.99)
    v = -torch.log((_ZETA - _GAMMA) / (frac - _GAMMA) - 1)
    m1, m2 = torch.zeros_like(v), torch.zeros_like(v)  # Adam moments (plain Adam, betas 0.9 / 0.999)
    step = s.unsqueeze(-1) * sign * gap  # dŵ/dh
    base = s.unsqueeze(-1) * sign * lo
    ref = _row_errors(w, torch.zeros_like(s), base + step * (frac > 0.5), torch.zeros_like(s), st, wc).sum()
    norm = float(ref) if float(ref) > 0 else 1.0
    warm = int(0.2 * iterations)
    count = w.numel()
    for it in range(iterations):
        with torch.no_grad():
            sig = torch.sigmoid(v)
            raw = sig * (_ZETA - _GAMMA) + _GAMMA
            h = raw.clamp(0, 1)
            w_hat = base + step * h
            grad_w = 2 * (w_hat @ st.h_qq - wc) / norm  # d(centred error)/dŵ; the mean goes to the bias
            grad_h = grad_w * step
            if it >= warm:
                beta = 20 + (2 - 20) * (it - warm) / max(1, iterations - warm - 1)
                d = 2 * h - 1
                grad_h = grad_h - lam / count * beta * d.abs().pow(beta - 1) * torch.sign(d) * 2
            inside = ((raw > 0) & (raw < 1)).to(v.dtype)
            grad = grad_h * sig * (1 - sig) * (_ZETA - _GAMMA) * inside
            m1.mul_(0.9).add_(grad, alpha=0.1)
            m2.mul_(0.999).addcmul_(grad, grad, value=0.001)
            v -= lr * (m1 / (1 - 0.9 ** (it + 1))) / ((m2 / (1 - 0.999 ** (it + 1))).sqrt() + 1e-8)
    return sign * (lo + gap * (v >= 0).to(lo.dtype))


@torch.no_grad()
def calibrate_shift_weight(weight: torch.Tensor, bias: Optional[torch.Tensor], stats: InputStats, weight_bits: int = 5,
                           iterations: int = 100, scale_grid: int = 4, lam: float = 0.01, lr: float = 0.1,
                           adaround: bool = True) -> CalibrationResult:
    """Calibrated shift codes, per-row scale and corrected bias for a (O, K) weight (K per group).

    `stats` are the layer's InputStats (G groups, rows split evenly over groups). With adaround=False
    step 2 is nearest-in-log rounding at the chosen scale."""
    shape, o = weight.shape, weight.shape[0]
    weight = weight.detach().reshape(o, -1)
    g = stats.h_ff.shape[0]
    w = _grouped(weight.float(), g)
    zeros = torch.zeros(o, dtype=torch.float32, device=weight.device)
    b = _grouped(zeros if bias is None else bias.detach().float(), g)
    wc = w @ stats.c_fq
    wffw = ((w @ stats.h_ff) * w).sum(-1)
    amax = w.abs().amax(-1).clamp(min=1e-30)

    def fitted_scale(q: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        num, den = (wc * q).sum(-1), ((q @ stats.h_qq) * q).sum(-1)
        s = torch.where(den > 0, num / den.clamp(min=1e-30), fallback)
        return torch.where(s > 0, s, fallback)

    def errors(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:  # centred only: the bias absorbs the mean
        return _row_errors(w, torch.zeros_like(b), s.unsqueeze(-1) * q, torch.zeros_like(b), _centred(stats),
                           wc, wffw)

    best_s, best_err = amax.clone(), None
    for i in range(max(1, scale_grid)):
        s = amax * 2.0 ** (i / max(1, scale_grid))
        err = errors(nearest_log_codes(w / s.unsqueeze(-1), weight_bits), s)
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            best_s, best_err = torch.where(better, s, best_s), torch.where(better, err, best_err)
    s = best_s
    q_near = nearest_log_codes(w / s.unsqueeze(-1), weight_bits)
    q, rows = q_near, 0
    if adaround and iterations > 0:
        q_ada = _adaround(w, s, stats, wc, weight_bits, iterations, lam, lr)
        take = errors(q_ada, s) < errors(q_near, s)
        rows = int(take.sum())
        q = torch.where(take.unsqueeze(-1), q_ada, q_near)
    s = fitted_scale(q, s)
    w_hat = s.unsqueeze(-1) * q
    b_hat = b + (w * stats.mean_f.unsqueeze(1)).sum(-1) - (w_hat * stats.mean_q.unsqueeze(1)).sum(-1)
    plain = nearest_log_codes(weight.detach().float(), weight_bits)
    return CalibrationResult(codes=q.reshape(shape).to(weight.dtype), scale=s.reshape(o), bias=b_hat.reshape(o),
                             error_plain=output_error(weight, bias, plain, bias, stats),
                             error_calibrated=output_error(weight, bias, w_hat.reshape(weight.shape), b_hat.reshape(o),
                                                           stats),
                             adaround_rows=rows)


def _centred(st: InputStats) -> InputStats:
    zero_f, zero_q = torch.zeros_like(st.mean_f), torch.zeros_like(st.mean_q)
    return InputStats(st.n, zero_f, zero_q, st.h_ff, st.h_qq, st.c_fq)
