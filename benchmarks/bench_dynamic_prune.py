"""Batch-1 CPU latency of a VGG-style CNN with gated units (DynamicPrunePass) at 25 / 50 / 75 % active
filters: skip mode against the dense model, in torch and in onnxruntime, as ratios measured in one run.

Run: pytest benchmarks/bench_dynamic_prune.py -s   (FXSHIFT_BENCH_QUICK=1: 50 % only, 32×32 input, few rounds)
The predictors are set so that every unit keeps a fixed random subset of its filters for every
input (zero weights, biases +1 / −1), so the active fraction is exact. The dense model, the gated
model in skip mode and in mask mode (dense compute, then zeroing: what public FTWT code runs),
and the two onnxruntime sessions (1 thread) are timed round-robin in one process; torch runs with
1 thread too. pytest-benchmark records the torch skip model.
"""
import os

import pytest
import torch
from torch import nn

import fxshift
from fxshift import DynamicPrunePass
from fxshift.nn import set_gating
from fxshift.nn.gated import gated_units

from conftest import QUICK

from fxshift.measure.timing import median_times, session_runner, torch_runner
from fxshift.onnx import session

IMAGE = 32 if QUICK else 64
ROUNDS = 5 if QUICK else 20
WIDTHS = (64, 64, "M", 128, 128, "M", 256, 256, "M")


def vgg() -> nn.Module:
    layers, cin = [], 3
    for w in WIDTHS:
        if w == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            cin = w
    torch.manual_seed(0)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)).eval()


def gated(model: nn.Module, x: torch.Tensor, active: float) -> torch.fx.GraphModule:
    gm = fxshift.apply(DynamicPrunePass(), model, x)
    g = torch.Generator().manual_seed(1)
    for _, unit in gated_units(gm):
        n = unit.out_channels
        on = torch.randperm(n, generator=g)[:round(active * n)]
        with torch.no_grad():
            unit.predictor.weight.zero_()
            unit.predictor.bias.fill_(-1.0)
            unit.predictor.bias[on] = 1.0
    return gm.eval()


ACTIVE = [0.5] if QUICK else [0.25, 0.5, 0.75]


@pytest.fixture(scope="module")
def dense_files(tmp_path_factory):
    x = torch.randn(1, 3, IMAGE, IMAGE)
    dense = vgg()
    return dense, x, fxshift.export_onnx(dense, x, tmp_path_factory.mktemp("dense") / "dense.onnx", dynamic_batch=False)


@pytest.mark.parametrize("active", ACTIVE)
def test_gated_vgg_latency(benchmark, active, dense_files, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dense, x, dense_onnx = dense_files
        gm = gated(dense, x, active)
        macs = fxshift.dynamic_macs(gm, x)[0].item()
        dense_macs = fxshift.macs(dense, x)
        skip_model = gm
        mask_model = set_gating(fxshift.apply([], gm), "mask")   # a copy with dense compute
        with torch.no_grad():
            assert torch.allclose(skip_model(x), mask_model(x), rtol=1e-4, atol=1e-5)
        runners = {"dense": torch_runner(dense, (x,)), "skip": torch_runner(skip_model, (x,)),
                   "mask": torch_runner(mask_model, (x,))}
        files = {"ort dense": dense_onnx,
                 "ort skip": fxshift.export_onnx(gm, x, tmp_path / "gated.onnx", dynamic_batch=False)}
        sessions = {k: session(str(p), plugin=False, threads=1) for k, p in files.items()}
        out = sessions["ort skip"].run(None, {sessions["ort skip"].get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            assert torch.allclose(torch.from_numpy(out), gm(x), rtol=1e-3, atol=1e-4)
        runners.update({k: session_runner(s, (x,)) for k, s in sessions.items()})
        times = median_times(runners, rounds=ROUNDS)
        load = os.getloadavg()[0]
        info = {"active": active, "macs_ratio": dense_macs / macs, "torch_speedup": times["dense"] / times["skip"],
                "torch_mask_speedup": times["dense"] / times["mask"],
                "ort_speedup": times["ort dense"] / times["ort skip"], "load": load,
                **{f"{k}_ms": 1e3 * v for k, v in times.items()}}
        benchmark.extra_info.update(info)
        print(f"\nactive {active:.0%} input {IMAGE}: MACs {dense_macs / 1e6:.1f}M → {macs / 1e6:.1f}M "
              f"({info['macs_ratio']:.2f}×); torch dense {info['dense_ms']:.2f} ms, skip {info['skip_ms']:.2f} ms "
              f"({info['torch_speedup']:.2f}×), mask {info['mask_ms']:.2f} ms ({info['torch_mask_speedup']:.2f}×); "
              f"ORT dense {info['ort dense_ms']:.2f} ms, skip {info['ort skip_ms']:.2f} ms ({info['ort_speedup']:.2f}×); "
              f"load {load:.2f}")
        benchmark.pedantic(runners["skip"], rounds=3 if QUICK else 10, iterations=1)
        assert macs < dense_macs * (active + 0.1)      # the count follows the active fraction
    finally:
        torch.set_num_threads(threads)
