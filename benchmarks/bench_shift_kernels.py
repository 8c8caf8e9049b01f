"""Native shift kernels vs torch float32, as ratios measured in the same run.

    python -m pytest benchmarks/bench_shift_kernels.py --benchmark-only \
        --benchmark-columns=median,iqr,rounds --benchmark-sort=name
    FXSHIFT_BENCH_QUICK=1 python -m pytest benchmarks/bench_shift_kernels.py   # CI: few shapes/rounds
    FXSHIFT_BENCH_ISA=avx2 ...      # force an ISA of the native kernels
    FXSHIFT_BENCH_THREADS=1 FXSHIFT_BENCH_CLOCK=thread ...   # see below

Each test times torch and the native kernel *interleaved* (alternating calls,
median of each), so both see the same machine state, and records
``speedup = torch median / native median`` plus both medians in
``benchmark.extra_info``; pytest-benchmark's own statistics are for the native
kernel.  A summary table is printed at the end of the session.

On a machine shared with other busy processes, wall-clock ratios with several
threads mostly measure the scheduler (torch's OpenMP threads spin-wait on
preempted peers).  ``FXSHIFT_BENCH_THREADS=1 FXSHIFT_BENCH_CLOCK=thread`` runs
torch and the native kernels on one thread each and times them with the
calling thread's CPU time (``time.thread_time``), which preemption does not
inflate; the load average is recorded with every ratio.

Shapes: batch-1 Linear (4096x4096 and VGG-16's classifier 25088->4096,
4096->4096, 4096->1000) against F.linear, and ResNet-18's convolutions (stem,
3x3 at 56/28/14/7 with stride 1 and 2, 1x1 downsamples) at batch 1 and 8
against F.conv2d.  Weights are 5-bit shift codes with the zero code.
"""
import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from fxshift.ops import native, packing

QUICK = os.environ.get("FXSHIFT_BENCH_QUICK", "") not in ("", "0")
THREADS = int(os.environ.get("FXSHIFT_BENCH_THREADS", "0"))  # 0: library/torch defaults
CLOCK = os.environ.get("FXSHIFT_BENCH_CLOCK", "wall")
if CLOCK not in ("wall", "thread"):
    raise ValueError("FXSHIFT_BENCH_CLOCK must be 'wall' or 'thread'")
if CLOCK == "thread" and THREADS != 1:
    raise ValueError("FXSHIFT_BENCH_CLOCK=thread needs FXSHIFT_BENCH_THREADS=1 (CPU time of the calling thread)")
TIMER = time.thread_time if CLOCK == "thread" else time.perf_counter
BITS, HAS_ZERO = 5, 1
ROUNDS = 5 if QUICK else 15

# (name, in_features, out_features, batch)
LINEAR = [
    ("fc_4096x4096", 4096, 4096, 1),
    ("vgg16_fc6_25088x4096", 25088, 4096, 1),
    ("vgg16_fc7_4096x4096", 4096, 4096, 1),
    ("vgg16_fc8_4096x1000", 4096, 1000, 1),
    ("fc_4096x4096_b4", 4096, 4096, 4),
    ("fc_4096x4096_b16", 4096, 4096, 16),
]
# (name, c_in, c_out, hw_in, k, stride, pad)
CONV = [
    ("stem_7x7s2_3-64_224", 3, 64, 224, 7, 2, 3),
    ("l1_3x3_64-64_56", 64, 64, 56, 3, 1, 1),
    ("l2_3x3s2_64-128_56", 64, 128, 56, 3, 2, 1),
    ("l2_3x3_128-128_28", 128, 128, 28, 3, 1, 1),
    ("l2_ds1x1s2_64-128_56", 64, 128, 56, 1, 2, 0),
    ("l3_3x3s2_128-256_28", 128, 256, 28, 3, 2, 1),
    ("l3_3x3_256-256_14", 256, 256, 14, 3, 1, 1),
    ("l3_ds1x1s2_128-256_28", 128, 256, 28, 1, 2, 0),
    ("l4_3x3s2_256-512_14", 256, 512, 14, 3, 2, 1),
    ("l4_3x3_512-512_7", 512, 512, 7, 3, 1, 1),
    ("l4_ds1x1s2_256-512_14", 256, 512, 14, 1, 2, 0),
]
if QUICK:
    LINEAR = [LINEAR[0], LINEAR[3]]
    CONV = [CONV[1], CONV[9]]
CONV_BATCHES = [1] if QUICK else [1, 8]

_summary = []


@pytest.fixture(scope="module", autouse=True)
def _setup():
    isa = os.environ.get("FXSHIFT_BENCH_ISA")
    torch_threads = torch.get_num_threads()
    if isa:
        native.force_isa(isa)
    if THREADS:
        torch.set_num_threads(THREADS)
        native.set_num_threads(THREADS)
    header = (f"fxshift native ({native.active_isa()}, {native.get_num_threads()} threads) vs torch "
              f"{torch.__version__} ({torch.get_num_threads()} threads), {CLOCK} clock, medians in ms:")
    yield
    if isa:
        native.force_isa(None)
    if THREADS:
        torch.set_num_threads(torch_threads)
        native.set_num_threads(0)
    if _summary:
        print("\n\n" + header)
        print(f"{'shape':<34}{'torch':>10}{'native':>10}{'speedup':>9}")
        for name, t, n in _summary:
            print(f"{name:<34}{t * 1e3:>10.3f}{n * 1e3:>10.3f}{t / n:>8.2f}x")


def random_words(gen, shape):
    mmax = (1 << (BITS - 1)) - 1
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1, 1).to(torch.int8)
    sign[torch.rand(shape, generator=gen) < 0.1] = 0
    mag = torch.randint(0, mmax, shape, generator=gen).to(torch.uint8)
    return packing.pack(sign, mag, BITS, HAS_ZERO)


def interleaved(fn_a, fn_b, rounds, min_time=0.05):
    """Median seconds per call of fn_a and fn_b, timed alternately (each timing covers enough calls
    to last ~min_time)."""
    fn_a(), fn_b()  # warm up
    t0 = TIMER()
    fn_a()
    reps = max(1, int(min_time / max(TIMER() - t0, 1e-6)))
    ta, tb = [], []
    for _ in range(rounds):
        for fn, acc in ((fn_a, ta), (fn_b, tb)):
            t0 = TIMER()
            for _ in range(reps):
                fn()
            acc.append((TIMER() - t0) / reps)
    return statistics.median(ta), statistics.median(tb)


def record(benchmark, name, torch_fn, native_fn):
    t_torch, t_native = interleaved(torch_fn, native_fn, ROUNDS)
    benchmark.extra_info.update(speedup=round(t_torch / t_native, 3), torch_ms=round(t_torch * 1e3, 4),
                                native_ms=round(t_native * 1e3, 4), isa=native.active_isa(),
                                native_threads=native.get_num_threads(), torch_threads=torch.get_num_threads(),
                                clock=CLOCK, load_avg_1min=round(os.getloadavg()[0], 2))
    _summary.append((name, t_torch, t_native))
    benchmark.pedantic(native_fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("name,k,o,batch", LINEAR, ids=[s[0] for s in LINEAR])
def test_shift_linear(benchmark, name, k, o, batch):
    gen = torch.Generator().manual_seed(0)
    words = random_words(gen, (o, k))
    w = packing.unpack(words, (o, k), BITS, HAS_ZERO)
    x = torch.randn(batch, k, generator=gen)
    bias = torch.randn(o, generator=gen)
    torch.testing.assert_close(native.shift_linear(x, words, o, BITS, HAS_ZERO, bias), F.linear(x, w, bias),
                               rtol=1e-4, atol=1e-3)
    record(benchmark, name, lambda: F.linear(x, w, bias),
           lambda: native.shift_linear(x, words, o, BITS, HAS_ZERO, bias))


@pytest.mark.parametrize("batch", CONV_BATCHES)
@pytest.mark.parametrize("name,c,o,hw,k,s,p", CONV, ids=[s[0] for s in CONV])
def test_shift_conv2d(benchmark, name, c, o, hw, k, s, p, batch):
    gen = torch.Generator().manual_seed(0)
    shape = (o, c, k, k)
    words = random_words(gen, shape)
    w = packing.unpack(words, shape, BITS, HAS_ZERO)
    x = torch.randn(batch, c, hw, hw, generator=gen)
    bias = torch.randn(o, generator=gen)
    torch.testing.assert_close(native.shift_conv2d(x, words, shape, s, p, 1, 1, BITS, HAS_ZERO, bias),
                               F.conv2d(x, w, bias, s, p), rtol=1e-4, atol=1e-3)
    record(benchmark, f"{name}_b{batch}", lambda: F.conv2d(x, w, bias, s, p),
           lambda: native.shift_conv2d(x, words, shape, s, p, 1, 1, BITS, HAS_ZERO, bias))
