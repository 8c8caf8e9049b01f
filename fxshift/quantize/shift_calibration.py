"""Calibrated post-training DeepShift-Q conversion of one layer (docs/methods.md §1; AdaRound, Nagel et al. 2020).

A layer y = W·x + b (a conv is this on unfolded input patches, one block per group) is converted to
ŷ = s ⊙ (Q·x̃) + b̂ with Q = ±2^p (p in the Q range of `weight_bits`), a float scale s per output row and
a corrected bias b̂, where x̃ are the inputs the *converted* model feeds the layer and x the float model's.
Everything is computed from moments of the float outputs u = W·x (no bias) and of x̃ (centred, per group)::

    E‖y − ŷ‖² per row = Var(u) − 2·ŵ·Cov(x̃, u) + ŵ·Hqq·ŵᵀ + (E u + b − ŵ·μq − b̂)²,   ŵ = s·q

with Hqq = Cov(x̃) (asymmetric reconstruction: the layer also undoes the error of the layers before it);
projecting on W first keeps the cost at one K×K product per batch (Hqq) instead of three. Steps, per row:

1. scale: s = max|w| · 2^t for t on a small grid in [0, 1) (every |w|/s ≤ 1), keeping the t whose
   nearest-in-log rounding gives the least error;
2. rounding: each weight takes the lower or upper neighbouring power of two of |w|/s, chosen AdaRound-style:
   a soft choice h = clip(σ(V)(ζ−γ)+γ, 0, 1) minimises the error plus λ·Σ(1 − |2h−1|^β) (β annealed 20→2)
   for a bounded number of Adam steps, then h rounds to 0/1; a row keeps nearest-in-log rounding if
   that is better. The gradient comes from Hqq, or — when that costs more than `max_macs` over the
   steps (big layers: O·K² multiply-adds a step) — from a minibatch of stored (x̃, u) columns per step
   (a fixed-seed sample of the calibration positions), sized to the budget; AdaRound's many small
   elementwise passes run on one thread for layers under 4M weights (thread sync costs more there);
3. the scale is refitted by least squares for the chosen codes;
4. bias correction: b̂ = b + E u − ŵ·μq removes the mean output shift.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["LayerStats", "StatsAccumulator", "CalibrationResult", "conv_columns", "linear_columns",
           "calibrate_shift_weight", "output_error", "nearest_log_codes", "adaround_plan"]

_ZETA, _GAMMA = 1.1, -0.1  # AdaRound's rectified-sigmoid stretch
MAX_MACS = 3e10  # default AdaRound budget per layer (multiply-adds over all steps): ~1-2 s on 2 cores
_MIN_BATCH = 64  # fewest columns per minibatch step
_MAX_KEPT = 2 ** 26  # floats of stored columns per layer (256 MB)
_PARALLEL_MIN = 1 << 22  # AdaRound on fewer weights runs on one thread (its many small passes lose to thread sync)


@contextmanager
def _threads_at_most(n: int):
    old = torch.get_num_threads()
    if n < old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n < old:
            torch.set_num_threads(old)


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


def adaround_plan(rows: int, k: int, groups: int, n: int, iterations: int, max_macs: float = MAX_MACS) -> tuple[int, int]:
    """(columns to store, columns per AdaRound step) for a layer of `rows` outputs and K = `k` inputs per group
    over n calibration columns; (0, 0): AdaRound works from Hqq (exact, O·K² multiply-adds a step).

    The exact forms are Hqq (O·K² a step) or all n columns (2·O·K·n a step, when n < K/2); the cheaper
    is used when it fits `max_macs` over the steps, else a minibatch of m = max_macs / (2·O·K·steps)
    columns (at least 64) a step from a fixed-seed sample of the columns."""
    if iterations <= 0 or n <= 0:
        return 0, 0
    h_cost, full_cost = rows * k * k * iterations, 2 * rows * k * n * iterations
    if min(h_cost, full_cost) <= max_macs:
        return (0, 0) if h_cost <= full_cost else (n, n)
    batch = min(n, max(_MIN_BATCH, int(max_macs // (2 * rows * k * iterations))))
    keep = min(n, max(16 * batch, 4096), max(batch, _MAX_KEPT // (groups * k + rows)))
    return keep, min(batch, keep)


@dataclass
class LayerStats:
    """Centred moments of one layer's target u = W·x (no bias; plus any offset given to StatsAccumulator.add)
    and of its converted-model inputs x̃, per group."""

    n: int
    mean_q: torch.Tensor  # (G, K)       E x̃
    h_qq: torch.Tensor  # (G, K, K)      Cov(x̃)
    mean_u: torch.Tensor  # (G, Og)      E u
    var_u: torch.Tensor  # (G, Og)       Var(u) per row
    c_uq: torch.Tensor  # (G, Og, K)     Cov(u, x̃) = W·Cov(x, x̃)
    cols_q: Optional[torch.Tensor] = None  # (G, m, K) centred sample of x̃ columns (minibatch AdaRound)
    cols_u: Optional[torch.Tensor] = None  # (G, m, Og) the matching centred u


class StatsAccumulator:
    """Accumulates LayerStats of a (O, K·G) float weight from batches of input columns (G, K, n).

    Shifted by the first batch's means so that centring loses no precision, summed in float64.
    `keep` > 0 also stores that many of the `total` columns, chosen uniformly with a fixed seed."""

    def __init__(self, weight: torch.Tensor, groups: int = 1, total: int = 0, keep: int = 0, seed: int = 0) -> None:
        o = weight.shape[0]
        if o % groups:
            raise ValueError(f"{o} output rows do not split into {groups} groups")
        self.w = weight.detach().float().reshape(groups, o // groups, -1)
        self.n = 0
        self._shift_u = self._shift_q = None
        self._su = self._sq = self._uu = self._qq = self._uq = None
        self._pick = None
        if keep > 0:
            if total < keep:
                raise ValueError(f"cannot keep {keep} of {total} columns")
            g = torch.Generator().manual_seed(seed)
            self._pick = torch.zeros(total, dtype=torch.bool)
            self._pick[torch.randperm(total, generator=g)[:keep]] = True
        self._kept_q: list[torch.Tensor] = []
        self._kept_u: list[torch.Tensor] = []

    def add(self, cols_f: torch.Tensor, cols_q: torch.Tensor, offset: Optional[torch.Tensor] = None) -> None:
        """Float and converted-model input columns (G, K, n); `offset` (G, Og, n), if given, is added to the
        float outputs u (the layer's target), e.g. to make up the error of a residual branch."""
        if cols_f.shape != cols_q.shape:
            raise ValueError(f"float and converted columns differ in shape: {tuple(cols_f.shape)} vs "
                             f"{tuple(cols_q.shape)}")
        if cols_f.shape[:2] != (self.w.shape[0], self.w.shape[2]):
            raise ValueError(f"columns of shape {tuple(cols_f.shape)} do not fit the weight "
                             f"(groups {self.w.shape[0]}, {self.w.shape[2]} inputs per group)")
        u = self.w @ cols_f.float()  # (G, Og, n)
        if offset is not None:
            if offset.shape != u.shape:
                raise ValueError(f"offset of shape {tuple(offset.shape)} does not fit the outputs {tuple(u.shape)}")
            u = u + offset.float()
        cols_q = cols_q.float()
        if self._shift_u is None:
            self._shift_u = u.mean(dim=2, keepdim=True)
            self._shift_q = cols_q.mean(dim=2, keepdim=True)
        uc, qc = u - self._shift_u, cols_q - self._shift_q
        parts = (uc.sum(2).double(), qc.sum(2).double(), (uc * uc).sum(2).double(),
                 (qc @ qc.transpose(1, 2)).double(), (uc @ qc.transpose(1, 2)).double())
        if self._su is None:
            self._su, self._sq, self._uu, self._qq, self._uq = parts
        else:
            for name, value in zip(("_su", "_sq", "_uu", "_qq", "_uq"), parts):
                getattr(self, name).add_(value)
        n_b = cols_f.shape[2]
        if self._pick is not None:
            if self.n + n_b > len(self._pick):
                raise ValueError(f"more columns than the {len(self._pick)} announced")
            sel = self._pick[self.n:self.n + n_b].nonzero().squeeze(1)
            self._kept_q.append(qc.index_select(2, sel).transpose(1, 2).contiguous())
            self._kept_u.append(uc.index_select(2, sel).transpose(1, 2).contiguous())
        self.n += n_b

    def finish(self) -> LayerStats:
        if self.n == 0:
            raise ValueError("no calibration columns were added")
        n = self.n
        mu, mq = self._su / n, self._sq / n
        var_u = self._uu / n - mu * mu
        h_qq = self._qq / n - mq.unsqueeze(2) * mq.unsqueeze(1)
        c_uq = self._uq / n - mu.unsqueeze(2) * mq.unsqueeze(1)
        cols_q = cols_u = None
        if self._kept_q:
            cols_q = torch.cat(self._kept_q, 1) - mq.float().unsqueeze(1)
            cols_u = torch.cat(self._kept_u, 1) - mu.float().unsqueeze(1)
        return LayerStats(n, (mq + self._shift_q.squeeze(2).double()).float(), h_qq.float(),
                          (mu + self._shift_u.squeeze(2).double()).float(), var_u.clamp(min=0).float(), c_uq.float(),
                          cols_q, cols_u)


@dataclass
class CalibrationResult:
    codes: torch.Tensor  # (O, K) exact ±2^p, p in the Q range
    scale: torch.Tensor  # (O,) float, > 0
    bias: torch.Tensor  # (O,) corrected bias
    error_plain: float  # relative output error of plain DeepShift-Q rounding (no scale, original bias)
    error_calibrated: float  # relative output error after calibration
    adaround_rows: int  # rows whose AdaRound choice beat nearest-in-log rounding
    adaround_batch: int = 0  # columns per AdaRound step (0: exact, from Hqq)


def _q_range(weight_bits: int, channel_shifts: Optional[int] = None) -> tuple[int, int]:
    """The Q shift range; `channel_shifts` (e.g. 7 for int8-exact layers) narrows it to that many shifts.
    Codes are at most 1 in magnitude (the scale takes the rest), so this bounds every channel's span."""
    p_min = -(2 ** (weight_bits - 1) - 1)
    return (p_min if channel_shifts is None else max(p_min, 1 - channel_shifts)), 0


def nearest_log_codes(w: torch.Tensor, weight_bits: int, channel_shifts: Optional[int] = None) -> torch.Tensor:
    """sign(w)·2^round(log2 clamp(|w|, 2^p_min, 1)): plain DeepShift-Q rounding (zeros stay zero)."""
    p_min, _ = _q_range(weight_bits, channel_shifts)
    return torch.sign(w) * torch.exp2(torch.round(torch.log2(w.abs().clamp(2.0 ** p_min, 1.0))))


def _grouped(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t.reshape(groups, t.shape[0] // groups, *t.shape[1:])


def _moments(q: torch.Tensor, st: LayerStats) -> tuple[torch.Tensor, torch.Tensor]:
    """(Cov(u, x̃)·q, q·Hqq·q) per row: the centred error of ŵ = s·q is Var(u) − 2s·first + s²·second.

    q·Hqq·q comes from all stored columns instead when there are fewer of them than inputs (cheaper)."""
    cols = st.cols_q
    if cols is not None and cols.shape[1] == st.n and st.n < cols.shape[2]:
        qq = (q @ cols.transpose(1, 2)).pow_(2).sum(-1) / st.n
    else:
        qq = ((q @ st.h_qq) * q).sum(-1)
    return (st.c_uq * q).sum(-1), qq


def _centred_error(st: LayerStats, s: torch.Tensor, cq: torch.Tensor, qq: torch.Tensor) -> torch.Tensor:
    return (st.var_u - 2 * s * cq + s * s * qq).clamp(min=0)


def _mean_error(st: LayerStats, b: torch.Tensor, w_hat: torch.Tensor, b_hat: torch.Tensor) -> torch.Tensor:
    return (st.mean_u + b - (w_hat * st.mean_q.unsqueeze(1)).sum(-1) - b_hat) ** 2


def _relative(err: torch.Tensor, st: LayerStats, b: torch.Tensor) -> float:
    energy = float((st.var_u + (st.mean_u + b) ** 2).sum())
    err = float(err.sum())
    return math.sqrt(err / energy) if energy > 0 else (0.0 if err == 0 else math.inf)


def output_error(stats: LayerStats, bias: Optional[torch.Tensor], new_weight: torch.Tensor,
                 new_bias: Optional[torch.Tensor]) -> float:
    """‖y − ŷ‖ / ‖y‖ over the calibration data: y from the stats' weight and `bias` on x, ŷ from
    (new_weight, new_bias) on x̃."""
    g, og = stats.var_u.shape
    w_hat = _grouped(new_weight.detach().reshape(g * og, -1).float(), g)
    zeros = torch.zeros(g * og, dtype=torch.float32, device=w_hat.device)
    b = _grouped(zeros if bias is None else bias.detach().float(), g)
    b_hat = _grouped(zeros if new_bias is None else new_bias.detach().float(), g)
    cq, qq = _moments(w_hat, stats)
    return _relative(_centred_error(stats, torch.ones_like(cq), cq, qq) + _mean_error(stats, b, w_hat, b_hat), stats, b)


def _adam(v: torch.Tensor, lr: float) -> torch.optim.Optimizer:
    """Plain Adam (betas 0.9 / 0.999) on v, fused into one kernel where torch has it."""
    try:
        return torch.optim.Adam([v], lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam([v], lr=lr, betas=(0.9, 0.999), eps=1e-8)


def _adaround(w: torch.Tensor, s: torch.Tensor, st: LayerStats, weight_bits: int, iterations: int, lam: float,
              lr: float, batch: int, seed: int, channel_shifts: Optional[int] = None) -> torch.Tensor:
    """Codes q (G, Og, K) choosing the lower/upper power of two of |w|/s per weight (see the module doc)."""
    p_min, _ = _q_range(weight_bits, channel_shifts)
    sign = torch.sign(w)
    a = (w.abs() / s.unsqueeze(-1)).clamp(2.0 ** p_min, 1.0)
    lo = torch.exp2(torch.floor(torch.log2(a)))
    hi = (2 * lo).clamp(max=1.0)
    gap = hi - lo
    frac = torch.where(gap > 0, (a - lo) / gap.clamp(min=1e-30), torch.zeros_like(a))
    frac = frac.clamp(0.01, 0.99)
    v = -torch.log((_ZETA - _GAMMA) / (frac - _GAMMA) - 1)
    step = s.unsqueeze(-1) * sign * gap  # dŵ/dh
    base = s.unsqueeze(-1) * sign * lo
    cq, qq = _moments(base + step * (frac > 0.5), st)
    ref = float(_centred_error(st, torch.ones_like(cq), cq, qq).sum())
    norm = ref if ref > 0 else 1.0
    warm = int(0.2 * iterations)
    count = w.numel()
    use_cols = st.cols_q is not None and batch > 0
    if use_cols:
        m_all = st.cols_q.shape[1]
        batch = min(batch, m_all)
        gen = torch.Generator().manual_seed(seed)
        order, pos = torch.randperm(m_all, generator=gen), 0
    stretch = _ZETA - _GAMMA
    edge = math.log((_ZETA - _GAMMA) / -_GAMMA - 1)  # |v| < edge ⟺ 0 < σ(v)(ζ−γ)+γ < 1 (h not clipped)
    step_grad = step * (2 * stretch / norm)  # d(error / norm)/dŵ · dŵ/dh · dh/dσ, but for σ(1−σ)
    v = v.contiguous()
    opt = _adam(v, lr)
    for it in range(iterations):
        sig = torch.sigmoid(v)
        h = sig.mul(stretch).add_(_GAMMA).clamp_(0, 1)
        w_hat = torch.addcmul(base, step, h)
        if not use_cols:  # d(centred error)/dŵ / 2; the mean goes to the bias
            grad = w_hat @ st.h_qq - st.c_uq
        elif batch == m_all:
            grad = (w_hat @ st.cols_q.transpose(1, 2) - st.cols_u.transpose(1, 2)) @ st.cols_q / m_all
        else:
            if pos + batch > m_all:
                order, pos = torch.randperm(m_all, generator=gen), 0
            idx = order[pos:pos + batch]
            pos += batch
            xb, ub = st.cols_q.index_select(1, idx), st.cols_u.index_select(1, idx)  # (G, m, K), (G, m, Og)
            grad = (xb @ w_hat.transpose(1, 2) - ub).transpose(1, 2) @ xb / batch
        grad.mul_(step_grad)
        if it >= warm:  # regulariser λ·Σ(1 − |2h−1|^β): its gradient is −2λβ·sign(d)|d|^(β−1), d = 2h−1
            beta = 20 + (2 - 20) * (it - warm) / max(1, iterations - warm - 1)
            d = h.mul_(2).sub_(1)
            grad.sub_(d.abs().pow_(beta - 2).mul_(d), alpha=2 * lam / count * beta * stretch)
        grad.mul_(sig.addcmul_(sig, sig, value=-1)).masked_fill_(v.abs() >= edge, 0)  # · σ(1−σ), 0 where clipped
        v.grad = grad
        opt.step()
    return sign * (lo + gap * (v >= 0).to(lo.dtype))


@torch.no_grad()
def calibrate_shift_weight(weight: torch.Tensor, bias: Optional[torch.Tensor], stats: LayerStats, weight_bits: int = 5,
                           iterations: int = 100, scale_grid: int = 4, lam: float = 0.01, lr: float = 0.1,
                           adaround: bool = True, batch: int = 0, seed: int = 0,
                           channel_shifts: Optional[int] = None) -> CalibrationResult:
    """Calibrated shift codes, per-row scale and corrected bias for a (O, K) weight (K per group).

    `stats` are the layer's LayerStats of this weight (G groups, rows split evenly over groups). With
    adaround=False step 2 is nearest-in-log rounding at the chosen scale. `batch` > 0: AdaRound steps on
    minibatches of that many of the stats' stored columns (see adaround_plan); 0: exact, from Hqq.
    `channel_shifts`: at most that many powers of two per row (7: the codes are exact in int8)."""
    shape, o = weight.shape, weight.shape[0]
    weight = weight.detach().reshape(o, -1)
    g = stats.h_qq.shape[0]
    if tuple(stats.c_uq.shape) != (g, o // g, weight.shape[1]):
        raise ValueError(f"stats of shape {tuple(stats.c_uq.shape)} do not fit a weight of shape {tuple(shape)}")
    w = _grouped(weight.float(), g)
    zeros = torch.zeros(o, dtype=torch.float32, device=weight.device)
    b = _grouped(zeros if bias is None else bias.detach().float(), g)
    amax = w.abs().amax(-1).clamp(min=1e-30)

    def refit(s: torch.Tensor, cq: torch.Tensor, qq: torch.Tensor) -> torch.Tensor:
        fit = torch.where(qq > 0, cq / qq.clamp(min=1e-30), s)
        return torch.where(fit > 0, fit, s)

    best = None  # (s, q, cq, qq, error) of the best grid scale per row, nearest-in-log rounding
    for i in range(max(1, scale_grid)):
        s = amax * 2.0 ** (i / max(1, scale_grid))
        q = nearest_log_codes(w / s.unsqueeze(-1), weight_bits, channel_shifts)
        cq, qq = _moments(q, stats)
        cand = (s, q, cq, qq, _centred_error(stats, s, cq, qq))
        if best is None:
            best = cand
        else:
            better = cand[4] < best[4]
            best = tuple(torch.where(better.unsqueeze(-1) if x.dim() == 3 else better, x, y) for x, y in zip(cand, best))
    s, q, cq, qq, _ = best
    rows = 0
    if adaround and iterations > 0:
        with _threads_at_most(1 if w.numel() < _PARALLEL_MIN else torch.get_num_threads()):
            q_ada = _adaround(w, s, stats, weight_bits, iterations, lam, lr, batch, seed, channel_shifts)
        cq_a, qq_a = _moments(q_ada, stats)
        s_a, s_n = refit(s, cq_a, qq_a), refit(s, cq, qq)
        take = _centred_error(stats, s_a, cq_a, qq_a) < _centred_error(stats, s_n, cq, qq)
        rows = int(take.sum())
        q = torch.where(take.unsqueeze(-1), q_ada, q)
        cq, qq = torch.where(take, cq_a, cq), torch.where(take, qq_a, qq)
    s = refit(s, cq, qq)
    w_hat = s.unsqueeze(-1) * q
    b_hat = b + stats.mean_u - (w_hat * stats.mean_q.unsqueeze(1)).sum(-1)
    plain = nearest_log_codes(w, weight_bits)
    cq_p, qq_p = _moments(plain, stats)
    err_plain = _centred_error(stats, torch.ones_like(cq_p), cq_p, qq_p) + _mean_error(stats, b, plain, b)
    err_cal = _centred_error(stats, s, cq, qq) + _mean_error(stats, b, w_hat, b_hat)
    return CalibrationResult(codes=q.reshape(shape).to(weight.dtype), scale=s.reshape(o), bias=b_hat.reshape(o),
                             error_plain=_relative(err_plain, stats, b), error_calibrated=_relative(err_cal, stats, b),
                             adaround_rows=rows, adaround_batch=batch if stats.cols_q is not None else 0)
