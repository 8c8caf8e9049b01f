"""LayerPrunePass on resnet50: measured onnxruntime latency with 2, 4 and 6 blocks removed, beside the MAC ratios.

Run:  pytest benchmarks/bench_layer_prune.py -s     (FXSHIFT_BENCH_QUICK=1: the short CI mode, 64×64 input)

resnet50 (random init) loses its 2, 4 and 6 lowest-L1 blocks; the original and the three pruned
models are exported to ONNX and timed round-robin in one run (medians), so every latency ratio
is against an original measured beside it. Each case records the MAC and parameter ratios, the
measured latency ratio and the machine's load average; pytest-benchmark times the pruned session.
"""
import os

import pytest
import torch

import fxshift
from fxshift.measure.latency import LatencyTimer, model_onnx

from conftest import QUICK, build_torchvision

IMAGE = 64 if QUICK else 224
COUNTS = (2, 4, 6)
THREADS = int(os.environ.get("FXSHIFT_BENCH_THREADS", "0")) or None
MIN_TIME = 0.2 if QUICK else 2.0


@pytest.fixture(scope="module")
def measured():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_torchvision("resnet50")
        x = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
        models = {"original": model}
        for k in COUNTS:
            models[k] = fxshift.apply([fxshift.LayerPrunePass(blocks=k, criterion="l1")], model, x)
        onnx = {k: model_onnx(m, (x,)) for k, m in models.items()}
        timer = LatencyTimer(threads=THREADS)
        load = os.getloadavg()
        medians = timer.models(onnx, (x,), min_time=MIN_TIME)
        base_macs, base_params = fxshift.macs(model, x), fxshift.parameter_count(model)
        out = {}
        for k in COUNTS:
            out[k] = dict(blocks_removed=k, image=IMAGE, threads=timer.threads, loadavg_1min=round(load[0], 2),
                          mac_ratio=round(fxshift.macs(models[k], x) / base_macs, 4),
                          param_ratio=round(fxshift.parameter_count(models[k]) / base_params, 4),
                          latency_ratio=round(medians[k] / medians["original"], 4),
                          original_ms=round(1e3 * medians["original"], 2), pruned_ms=round(1e3 * medians[k], 2),
                          removed=[r["layer"] for r in fxshift.report(models[k]).to_dicts() if r["action"] == "pruned"])
        yield out, onnx, x, timer.threads
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("k", COUNTS)
def test_resnet50_blocks_removed(benchmark, measured, k):
    from fxshift.measure.timing import session_runner
    from fxshift.onnx import session

    results, onnx, x, threads = measured
    r = results[k]
    run = session_runner(session(onnx[k], plugin=False, threads=threads), [x.numpy()])
    benchmark.pedantic(run, rounds=3 if QUICK else 20, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(r)
    print(f"\nresnet50 {IMAGE}x{IMAGE}, {k} blocks removed ({', '.join(r['removed'])}): MACs {r['mac_ratio']:.3f}, "
          f"params {r['param_ratio']:.3f}, onnxruntime latency {r['latency_ratio']:.3f} of the original "
          f"({r['original_ms']:.1f} -> {r['pruned_ms']:.1f} ms, {threads} threads, load {r['loadavg_1min']})")
    assert r["mac_ratio"] < 1.0 and len(r["removed"]) == k
