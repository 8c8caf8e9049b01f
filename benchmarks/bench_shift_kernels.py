"""Native shift kernels vs torch float32, each runtime timed in its own process.

    python -m pytest benchmarks/bench_shift_kernels.py -s
    FXSHIFT_BENCH_QUICK=1 python -m pytest benchmarks/bench_shift_kernels.py   # CI: few shapes/rounds
    FXSHIFT_BENCH_ISA=avx2 ...      # force an ISA of the native kernels (FXSHIFT_ISA in the child)
    FXSHIFT_BENCH_THREADS=1 ...     # threads of torch and of libfxshift (default 2)

A torch process and a native process (fxshift.measure.process, benchmarks/kernel_cases.py) each time
every shape; the two alternate for a few rounds, and ``speedup = torch median / native median`` comes from
the medians over rounds, with the load average.  One process holds one thread pool only, so torch's OpenMP
and libfxshift's pool never spin against each other (interleaved in one process they moved the ratio
between 0.5x and 8x).  Each test also checks, in this process, that the native result matches torch.

Shapes: batch-1 Linear (4096x4096 and VGG-16's classifier 25088->4096, 4096->4096, 4096->1000) against
F.linear, and ResNet-18's convolutions (stem, 3x3 at 56/28/14/7 with stride 1 and 2, 1x1 downsamples) at
batch 1 and 8 against F.conv2d.  Weights are 5-bit shift codes with the zero code.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from fxshift.ops import native, packing

from kernel_cases import BITS, HAS_ZERO, random_words
from fxshift.measure.process import torch_medians

QUICK = os.environ.get("FXSHIFT_BENCH_QUICK", "") not in ("", "0")
THREADS = int(os.environ.get("FXSHIFT_BENCH_THREADS", "2"))
ISA = os.environ.get("FXSHIFT_BENCH_ISA")
ROUNDS = 2 if QUICK else 5

# (name, in_features, out_features, batch)
LINEAR = [
    ("fc_4096x4096", 4096, 4096, 1),
    ("vgg16_fc6_25088x4096", 25088, 4096, 1),
    ("vgg16_fc7_4096x4096", 4096, 4096, 1),
    ("vgg16_fc8_4096x1000", 4096, 1000, 1),
    ("fc_4096x4096_b4", 4096, 4096, 4),
    ("fc_4096x4096_b8", 4096, 4096, 8),
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



def _cases():
    cases = [dict(kind="linear", name=n, k=k, o=o, batch=b) for n, k, o, b in LINEAR]
    cases += [dict(kind="conv", name=f"{n}_b{b}", c=c, o=o, hw=hw, k=k, s=s, p=p, batch=b)
              for n, c, o, hw, k, s, p in CONV for b in CONV_BATCHES]
    return cases


@pytest.fixture(scope="module")
def timings():
    """{case name: {"float": s, "native": s}} from alternating child processes, and the load average."""
    if ISA:
        os.environ["FXSHIFT_ISA"] = ISA
    try:
        medians, load = torch_medians(["float", "native"], _cases(), "kernel_cases", [os.path.dirname(__file__)],
                                      rounds=ROUNDS, iters=3 if QUICK else 7, min_time=0.02 if QUICK else 0.1,
                                      threads=THREADS)
    finally:
        if ISA:
            os.environ.pop("FXSHIFT_ISA")
    isa = ISA or native.active_isa()
    print(f"\n\nfxshift native ({isa}) vs torch {torch.__version__} float32, {THREADS} threads each, each in its "
          f"own process, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; medians in ms:")
    print(f"{'shape':<34}{'torch':>10}{'native':>10}{'speedup':>9}")
    for name, d in medians.items():
        print(f"{name:<34}{d['float'] * 1e3:>10.3f}{d['native'] * 1e3:>10.3f}{d['float'] / d['native']:>8.2f}x")
    return medians, load, isa


def record(benchmark, timings, name, native_fn):
    medians, load, isa = timings
    t_torch, t_native = medians[name]["float"], medians[name]["native"]
    benchmark.extra_info.update(speedup=round(t_torch / t_native, 3), torch_ms=round(t_torch * 1e3, 4),
                                native_ms=round(t_native * 1e3, 4), isa=isa, threads=THREADS,
                                load_avg_1min=round(load[0], 2))
    benchmark.pedantic(native_fn, rounds=1, iterations=1)


@pytest.mark.parametrize("name,k,o,batch", LINEAR, ids=[s[0] for s in LINEAR])
def test_shift_linear(benchmark, timings, name, k, o, batch):
    gen = torch.Generator().manual_seed(0)
    words = random_words(gen, (o, k))
    w = packing.unpack(words, (o, k), BITS, HAS_ZERO)
    x = torch.randn(batch, k, generator=gen)
    bias = torch.randn(o, generator=gen)
    torch.testing.assert_close(native.shift_linear(x, words, o, BITS, HAS_ZERO, bias), F.linear(x, w, bias),
                               rtol=1e-4, atol=1e-3)
    record(benchmark, timings, name, lambda: native.shift_linear(x, words, o, BITS, HAS_ZERO, bias))


@pytest.mark.parametrize("batch", CONV_BATCHES)
@pytest.mark.parametrize("name,c,o,hw,k,s,p", CONV, ids=[s[0] for s in CONV])
def test_shift_conv2d(benchmark, timings, name, c, o, hw, k, s, p, batch):
    gen = torch.Generator().manual_seed(0)
    shape = (o, c, k, k)
    words = random_words(gen, shape)
    w = packing.unpack(words, shape, BITS, HAS_ZERO)
    x = torch.randn(batch, c, hw, hw, generator=gen)
    bias = torch.randn(o, generator=gen)
    torch.testing.assert_close(native.shift_conv2d(x, words, shape, s, p, 1, 1, BITS, HAS_ZERO, bias),
                               F.conv2d(x, w, bias, s, p), rtol=1e-4, atol=1e-3)
    record(benchmark, timings, f"{name}_b{batch}",
           lambda: native.shift_conv2d(x, words, shape, s, p, 1, 1, BITS, HAS_ZERO, bias))
