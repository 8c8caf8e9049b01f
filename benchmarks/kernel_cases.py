"""The timed side of benchmarks/bench_shift_kernels.py, run inside one child process per runtime
(fxshift.measure.process.torch_medians): builds each case's tensors from a fixed seed and times either torch float32
("float": F.linear / F.conv2d on the decoded weight) or fxshift's native kernels ("native")."""
import time

import torch
import torch.nn.functional as F

BITS, HAS_ZERO = 5, 1


def random_words(gen, shape):
    from fxshift.ops import packing

    mmax = (1 << (BITS - 1)) - 1
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1, 1).to(torch.int8)
    sign[torch.rand(shape, generator=gen) < 0.1] = 0
    mag = torch.randint(0, mmax, shape, generator=gen).to(torch.uint8)
    return packing.pack(sign, mag, BITS, HAS_ZERO)


def build(case):
    """case: {"kind": "linear", "k", "o", "batch"} or {"kind": "conv", "c", "o", "hw", "k", "s", "p", "batch"}.
    Returns (torch_fn, native_fn)."""
    from fxshift.ops import native, packing

    gen = torch.Generator().manual_seed(0)
    if case["kind"] == "linear":
        o, k = case["o"], case["k"]
        words = random_words(gen, (o, k))
        w = packing.unpack(words, (o, k), BITS, HAS_ZERO)
        x = torch.randn(case["batch"], k, generator=gen)
        bias = torch.randn(o, generator=gen)
        return (lambda: F.linear(x, w, bias)), (lambda: native.shift_linear(x, words, o, BITS, HAS_ZERO, bias))
    shape = (case["o"], case["c"], case["k"], case["k"])
    s, p = case["s"], case["p"]
    words = random_words(gen, shape)
    w = packing.unpack(words, shape, BITS, HAS_ZERO)
    x = torch.randn(case["batch"], case["c"], case["hw"], case["hw"], generator=gen)
    bias = torch.randn(case["o"], generator=gen)
    return ((lambda: F.conv2d(x, w, bias, s, p)),
            (lambda: native.shift_conv2d(x, words, shape, s, p, 1, 1, BITS, HAS_ZERO, bias)))


def time_cases(runtime, cases, iters, min_time):
    """{case name: median seconds per call} for runtime "float" or "native"."""
    out = {}
    for case in cases:
        torch_fn, native_fn = build(case)
        fn = torch_fn if runtime == "float" else native_fn
        fn()
        t0 = time.perf_counter()
        fn()
        reps = max(1, int(0.02 / max(time.perf_counter() - t0, 1e-6)))  # each sample lasts ~20 ms
        times = []
        t_end = time.perf_counter() + min_time
        while len(times) < iters or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            times.append((time.perf_counter() - t0) / reps)
        times.sort()
        out[case["name"]] = times[len(times) // 2]
    return out
