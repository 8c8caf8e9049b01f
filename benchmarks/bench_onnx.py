"""onnxruntime CPU latency of exported models: float, Tucker(0.5), 5-bit shift with the fxshift plugin,
5-bit shift through the function bodies (stock onnxruntime), and the same file with the bodies
inlined (target="portable"), as ratios to float measured in one run, with the file sizes.

Run: pytest benchmarks/bench_onnx.py -s   (FXSHIFT_BENCH_QUICK=1: resnet18 at batch 1 only, few rounds)
All four files are written by fxshift.export_onnx (the same exporter). The four sessions are timed
round-robin (fxshift.onnx.runtime.median_times) so they share the machine's noise; pytest-benchmark
records the plugin session. Tucker uses n_iter_max=2: latency depends on the ranks, not on how well
HOOI converged on random weights.
"""
import onnx
import pytest
import torch

import fxshift
from fxshift.onnx.runtime import median_times, session_runner
from fxshift.onnx import export_onnx, plugin_available, session
from fxshift.onnx.export import inline_functions

from conftest import QUICK, build_torchvision

LATENCY_CASES = [("resnet18", 1)] if QUICK else [("resnet18", 1), ("resnet18", 8), ("vgg16", 1), ("vgg16", 8)]
IMAGE = 224
KINDS = ("float", "tucker", "shift_plugin", "shift_functions", "shift_portable")


def _native_or_skip():
    try:
        from fxshift.ops import native
        native.load()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"native shift kernels not available: {exc}")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            _native_or_skip()
            folder = tmp_path_factory.mktemp(name)
            model = build_torchvision(name)
            x = torch.randn(1, 3, IMAGE, IMAGE)
            tucker = fxshift.apply([fxshift.TuckerDecomposePass(rank=0.5, n_iter_max=2)], model, x)
            shift = fxshift.apply([fxshift.ShiftQuantizePass(weight_bits=5)], model, x)
            files = {"float": export_onnx(model, x, folder / "float.onnx"),
                     "tucker": export_onnx(tucker, x, folder / "tucker.onnx"),
                     "shift": export_onnx(shift, x, folder / "shift5.onnx")}
            portable = inline_functions(onnx.load(str(files["shift"])))  # = export_onnx(..., target="portable")
            files["portable"] = folder / "shift5_portable.onnx"
            onnx.save(portable, str(files["portable"]))
            del tucker, shift
            cache[name] = files
        return cache[name]

    return get


@pytest.mark.parametrize("name, batch", LATENCY_CASES)
def test_ort_latency_float_tucker_shift(benchmark, exported, name, batch):
    files = exported(name)
    x = torch.randn(batch, 3, IMAGE, IMAGE)
    runners = {"float": session_runner(session(files["float"], plugin=False), (x,)),
               "tucker": session_runner(session(files["tucker"], plugin=False), (x,)),
               "shift_functions": session_runner(session(files["shift"], plugin=False), (x,)),
               "shift_portable": session_runner(session(files["portable"], plugin=False), (x,))}
    if plugin_available():
        runners["shift_plugin"] = session_runner(session(files["shift"], plugin=True), (x,))
    medians = median_times(runners, rounds=3 if QUICK else 10, warmup=1 if QUICK else 2)
    main = runners.get("shift_plugin", runners["shift_functions"])
    benchmark.pedantic(main, rounds=2 if QUICK else 5, iterations=1, warmup_rounds=1)
    sizes = {"float": files["float"].stat().st_size, "tucker": files["tucker"].stat().st_size,
             "shift_plugin": files["shift"].stat().st_size, "shift_functions": files["shift"].stat().st_size,
             "shift_portable": files["portable"].stat().st_size}
    base = medians["float"]
    lines = [f"\n{name} batch {batch} (onnxruntime CPU, median of interleaved rounds):",
             f"  {'model':<16} {'ms':>9} {'speed vs float':>15} {'MB':>9} {'size vs float':>14}"]
    for kind in KINDS:
        if kind not in medians:
            lines.append(f"  {kind:<16} (libfxshift_ort not built)")
            continue
        lines.append(f"  {kind:<16} {1e3 * medians[kind]:9.2f} {base / medians[kind]:14.2f}x "
                     f"{sizes[kind] / 1e6:9.2f} {sizes[kind] / sizes['float']:14.3f}")
        benchmark.extra_info[f"{kind}_ms"] = round(1e3 * medians[kind], 3)
        benchmark.extra_info[f"{kind}_speed_vs_float"] = round(base / medians[kind], 3)
        benchmark.extra_info[f"{kind}_bytes"] = sizes[kind]
    benchmark.extra_info.update(model=name, batch=batch)
    print("\n".join(lines))
    assert sizes["shift_plugin"] <= 0.2 * sizes["float"]  # 5-bit codes: about 1/6 of float32
