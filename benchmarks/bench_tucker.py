"""TuckerDecomposePass cost, and what Tucker(0.5) buys in onnxruntime CPU latency.

Run: pytest benchmarks/bench_tucker.py   (FXSHIFT_BENCH_QUICK=1 for the short CI mode)
The latency figure is a ratio measured in one run: original and Tucker(0.5) sessions are timed
round-robin, so both see the same machine noise; pytest-benchmark also records the decomposed one.
"""
import pytest
import torch

import fxshift
from fxshift.onnx import export_plain, session
from fxshift.measure.timing import median_times, session_runner

from conftest import QUICK, build_torchvision

LATENCY_CASES = [("resnet18", 1)] if QUICK else [("resnet18", 1), ("resnet18", 8), ("vgg16", 1), ("vgg16", 8)]
IMAGE = 224


def test_tucker_pass_time(benchmark):
    name = "resnet18" if QUICK else "resnet50"
    model = build_torchvision(name)
    x = torch.randn(1, 3, IMAGE, IMAGE)
    gm = benchmark.pedantic(lambda: fxshift.apply([fxshift.TuckerDecomposePass(rank=0.5)], model, x), rounds=1,
                            iterations=1)
    rows = fxshift.report(gm).to_dicts()
    benchmark.extra_info.update(model=name, layers_decomposed=sum(r["action"] == "decomposed" for r in rows),
                                layers_looked_at=len(rows))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            model = build_torchvision(name)
            x = torch.randn(1, 3, IMAGE, IMAGE)
            gm = fxshift.apply([fxshift.TuckerDecomposePass(rank=0.5)], model, x)
            export_plain(model, (x,), folder / "original.onnx")
            export_plain(gm, (x,), folder / "tucker.onnx")
            cache[name] = dict(original=folder / "original.onnx", tucker=folder / "tucker.onnx",
                               mac_ratio=fxshift.macs(model, x) / fxshift.macs(gm, x))
        return cache[name]

    return get


@pytest.mark.parametrize("name, batch", LATENCY_CASES)
def test_ort_latency_original_vs_tucker(benchmark, exported, name, batch):
    files = exported(name)
    x = torch.randn(batch, 3, IMAGE, IMAGE)
    runners = {kind: session_runner(session(files[kind], plugin=False), (x,)) for kind in ("original", "tucker")}
    medians = median_times(runners, rounds=5 if QUICK else 15)
    benchmark.pedantic(runners["tucker"], rounds=3 if QUICK else 10, iterations=1, warmup_rounds=1)
    speedup = medians["original"] / medians["tucker"]
    benchmark.extra_info.update(model=name, batch=batch, original_ms=1e3 * medians["original"],
                                tucker_ms=1e3 * medians["tucker"], speedup=round(speedup, 3),
                                mac_ratio=round(files["mac_ratio"], 3))
    print(f"\n{name} batch {batch}: original {1e3 * medians['original']:.1f} ms, Tucker(0.5) "
          f"{1e3 * medians['tucker']:.1f} ms, speedup {speedup:.2f}x, MAC ratio {files['mac_ratio']:.2f}x")
    assert files["mac_ratio"] > 1.5  # Tucker(0.5) must cut the MACs this ratio is set beside
