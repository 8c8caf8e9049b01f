"""ShiftQuantizePass(calibration=...) cost on a small CNN, as ratios to what it is set beside.

Run:  pytest benchmarks/bench_shift_calibration.py -s     (FXSHIFT_BENCH_QUICK=1: the short CI mode)

fxshift.models.small_cnn (random init, eval mode) on random 28×28 images: the calibrated 5-bit conversion,
the plain conversion and one float forward over the calibration set are timed round-robin in one run
(medians over the rounds), so both ratios compare timings that saw the same machine state; the load
average is recorded beside them. pytest-benchmark records the calibrated conversion (quick mode: the
plain one, the calibrated one being timed once in the round).
"""
import os
import statistics
import time

import pytest
import torch

import fxshift
from fxshift import ShiftQuantizePass
from fxshift.models import small_cnn

from conftest import QUICK

IMAGES, BATCH = (16, 16) if QUICK else (512, 64)
ITERATIONS = 10 if QUICK else 100
ROUNDS = 1 if QUICK else 3


def _timed(fn, out: dict, key: str) -> float:
    t = time.perf_counter()
    out[key] = fn()
    return time.perf_counter() - t


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = small_cnn().eval()
    x = torch.randn(IMAGES, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    batches = list(x.split(BATCH))

    def calibrated():
        return fxshift.apply([ShiftQuantizePass(weight_bits=5, calibration=batches, iterations=ITERATIONS,
                                                progress=False)], model, x[:1])

    def plain():
        return fxshift.apply([ShiftQuantizePass(weight_bits=5)], model, x[:1])

    @torch.no_grad()
    def forward():
        for b in batches:
            model(b)

    # warm-up outside the timing: the first calibration pays one-off imports (torch.optim, ~seconds)
    fxshift.apply([ShiftQuantizePass(weight_bits=5, calibration=batches[:1], iterations=1, progress=False)], model,
                  x[:1])
    return model, x, {"calibrated": calibrated, "plain": plain, "float_forward": forward}


def test_calibration_time_ratio(benchmark, setup):
    model, x, fns = setup
    load = os.getloadavg()
    times, last = {k: [] for k in fns}, {}
    for _ in range(ROUNDS):
        for k, fn in fns.items():
            times[k].append(_timed(fn, last, k))
    med = {k: statistics.median(v) for k, v in times.items()}
    gm = last["calibrated"] if QUICK else benchmark.pedantic(fns["calibrated"], rounds=1, iterations=1)
    if QUICK:  # the round above is the measurement; pytest-benchmark times the (cheap) plain conversion
        benchmark.pedantic(fns["plain"], rounds=1, iterations=1)
    ratio_fwd, ratio_plain = med["calibrated"] / med["float_forward"], med["calibrated"] / med["plain"]
    benchmark.extra_info.update(model="small_cnn", images=IMAGES, iterations=ITERATIONS, threads=torch.get_num_threads(),
                                loadavg_1min=round(load[0], 2), calibrated_s=round(med["calibrated"], 3),
                                plain_s=round(med["plain"], 4), float_forward_s=round(med["float_forward"], 4),
                                ratio_to_float_forward=round(ratio_fwd, 1), ratio_to_plain=round(ratio_plain, 1))
    print(f"\nsmall_cnn, {IMAGES} images, {ITERATIONS} AdaRound steps: calibrated {med['calibrated']:.2f} s = "
          f"{ratio_fwd:.0f}× a float forward over the calibration set ({1e3 * med['float_forward']:.1f} ms), "
          f"{ratio_plain:.0f}× the plain conversion ({1e3 * med['plain']:.1f} ms); load {load[0]:.1f}")
    # the time buys something: calibrated conversion fits the float model better than plain rounding
    plain = last["plain"].eval()
    with torch.no_grad():
        y = model(x)
        err = {k: float((m.eval()(x) - y).norm() / y.norm()) for k, m in (("plain", plain), ("calibrated", gm))}
    assert err["calibrated"] < 0.7 * err["plain"], err
