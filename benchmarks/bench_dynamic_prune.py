"""Batch-1 CPU latency of a VGG-style CNN with gated units (DynamicPrunePass) at 64×64 and 224×224: skip mode
against the dense model, in torch and in onnxruntime, as ratios measured in one run.

Run: pytest benchmarks/bench_dynamic_prune.py -s   (FXSHIFT_BENCH_QUICK=1: 64×64 only, few rounds)
DynamicPrunePass(target="uniform", ratio=r): each unit keeps its top k filters, k = r·C rounded to a
multiple of 16 (channel_multiple, the default; 1: exactly round(r·C)); the predictors are set so that
the k are a fixed random subset for every input (zero weights, biases +1 / −1). Ratio 0.5 keeps about a
third of the MACs (a unit reading a compact input skips input channels too), 0.65 about half, 0.7 0.59;
0.65 with channel_multiple=1 (k = 42, 83, 166) shows what ragged channel counts cost. torch
(1 thread): dense, skip and mask mode (dense compute, then zeroing: what public FTWT code runs) timed
round robin in this process (fxshift.measure.timing.median_times); onnxruntime (1 thread): dense and skip,
each session in its own process, alternating (fxshift.measure.process.onnx_medians). The goal (issue 20):
skip ≥ 1.5× dense in torch and ≥ 1.3× in onnxruntime at half the MACs.
"""
import os

import pytest
import torch
from torch import nn

import fxshift
from fxshift import DynamicPrunePass
from fxshift.measure.process import onnx_medians
from fxshift.measure.timing import median_times, torch_runner
from fxshift.nn import set_gating
from fxshift.nn.gated import gated_units

from conftest import QUICK

IMAGES = [64] if QUICK else [64, 224]
SETTINGS = [(0.65, 16)] if QUICK else [(0.5, 16), (0.65, 16), (0.65, 1), (0.7, 16)]   # (ratio, channel_multiple)
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


def gated(model: nn.Module, x: torch.Tensor, ratio: float, multiple: int) -> torch.fx.GraphModule:
    gm = fxshift.apply(DynamicPrunePass(target="uniform", ratio=ratio, channel_multiple=multiple), model, x)
    g = torch.Generator().manual_seed(1)
    for _, unit in gated_units(gm):
        on = torch.randperm(unit.out_channels, generator=g)[:unit.top_k]
        with torch.no_grad():
            unit.predictor.weight.zero_()
            unit.predictor.bias.fill_(-1.0)
            unit.predictor.bias[on] = 1.0
    return gm.eval()


@pytest.mark.parametrize("image", IMAGES)
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"uniform{s[0]}-multiple{s[1]}")
def test_gated_vgg_latency(benchmark, image, setting, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.randn(1, 3, image, image)
        dense = vgg()
        gm = gated(dense, x, *setting)
        ks = [unit.top_k for _, unit in gated_units(gm)]
        active = max(unit.top_k / unit.out_channels for _, unit in gated_units(gm))
        macs = fxshift.dynamic_macs(gm, x)[0].item()
        dense_macs = fxshift.macs(dense, x)
        mask_model = set_gating(fxshift.apply([], gm), "mask")   # a copy with dense compute
        with torch.no_grad():
            assert torch.allclose(gm(x), mask_model(x), rtol=1e-4, atol=1e-5)
        rounds = 3 if QUICK else (15 if image <= 64 else 7)
        times = median_times({"dense": torch_runner(dense, (x,)), "skip": torch_runner(gm, (x,)),
                              "mask": torch_runner(mask_model, (x,))}, rounds=rounds)
        files = {"ort dense": fxshift.export_onnx(dense, x, tmp_path / "dense.onnx", dynamic_batch=False),
                 "ort skip": fxshift.export_onnx(gm, x, tmp_path / "gated.onnx", dynamic_batch=False)}
        from fxshift.onnx import session
        sess = session(str(files["ort skip"]), plugin=False, threads=1)
        out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            assert torch.allclose(torch.from_numpy(out), gm(x), rtol=1e-3, atol=1e-4)
        ort, load = onnx_medians({k: (str(p), None) for k, p in files.items()}, tuple(x.shape), threads=1,
                                 rounds=3 if QUICK else 5, iters=10 if image <= 64 else 5)
        times.update(ort)
        info = {"image": image, "ratio": setting[0], "channel_multiple": setting[1], "k": ks, "macs_fraction": macs / dense_macs,
                "torch_speedup": times["dense"] / times["skip"], "torch_mask_speedup": times["dense"] / times["mask"],
                "ort_speedup": times["ort dense"] / times["ort skip"], "load": load[0],
                **{f"{k}_ms": 1e3 * v for k, v in times.items()}}
        benchmark.extra_info.update(info)
        print(f"\n{image}×{image} uniform {setting[0]} (k {ks}): MACs {dense_macs / 1e6:.0f}M → {macs / 1e6:.0f}M "
              f"({info['macs_fraction']:.2f}); torch dense {info['dense_ms']:.2f} ms, skip {info['skip_ms']:.2f} ms "
              f"({info['torch_speedup']:.2f}×), mask {info['mask_ms']:.2f} ms ({info['torch_mask_speedup']:.2f}×); "
              f"ORT dense {info['ort dense_ms']:.2f} ms, skip {info['ort skip_ms']:.2f} ms ({info['ort_speedup']:.2f}×);"
              f" load {os.getloadavg()[0]:.2f}")
        benchmark.pedantic(torch_runner(gm, (x,)), rounds=3, iterations=1)
        assert macs < dense_macs * active * (active + 0.15) + 0.05 * dense_macs   # compact in and out
    finally:
        torch.set_num_threads(threads)
