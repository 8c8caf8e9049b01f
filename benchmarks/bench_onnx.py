"""onnxruntime CPU latency of exported models, each runtime in its own process: float, Tucker(0.5), 5-bit shift
with the fxshift plugin, 5-bit shift through the function bodies (stock onnxruntime, which folds the decoded
weights back to float), and the same file with the bodies inlined (target="portable"); ratios to float, with
the file sizes and the load average. int8 rows (issue 21): onnxruntime's own quantize_static of the float file
(float_int8), and fxshift's int8 QDQ export (export_onnx(quantize="int8")) of 4-bit shift (shift4_int8), Tucker(0.5)
(tucker_int8) and Tucker(0.5) + 4-bit shift (tucker_shift4_int8), calibrated on random-normal inputs (timing only).
Quick mode times the int8 rows of the demo CNN only.

Run: pytest benchmarks/bench_onnx.py -s   (FXSHIFT_BENCH_QUICK=1: the demo CNN and resnet18 at batch 1, few rounds)
     FXSHIFT_BENCH_MODELS=resnet18:1,vgg16:8 ...   pick cases;  FXSHIFT_BENCH_THREADS=2 (default) threads per session
All files are written by fxshift.export_onnx (the same exporter). Every candidate runs in a child process of its
own (fxshift.measure.process: one thread pool per process, the processes alternate, medians over rounds), so
no second pool spins beside the one being timed. pytest-benchmark records the export of the plugin file's run in
this process only as a smoke check; the ratios are in extra_info and the printed table. Tucker uses n_iter_max=2:
latency depends on the ranks, not on how well HOOI converged on random weights.
"""
import os

import onnx
import pytest
import torch

import fxshift
from fxshift.onnx import export_onnx, library_path, plugin_available
from fxshift.onnx.export import inline_functions

from conftest import QUICK, build_torchvision
from fxshift.measure.process import onnx_medians


def _cases():
    spec = os.environ.get("FXSHIFT_BENCH_MODELS")
    if spec:
        return [(n, int(b)) for n, b in (item.split(":") for item in spec.split(","))]
    if QUICK:
        return [("demo_cnn", 1), ("resnet18", 1)]
    return [("demo_cnn", 1), ("resnet18", 1), ("resnet18", 8), ("vgg16", 1), ("vgg16", 8)]


LATENCY_CASES = _cases()
THREADS = int(os.environ.get("FXSHIFT_BENCH_THREADS", "2"))
KINDS = ("float", "tucker", "shift_plugin", "shift_functions", "shift_portable", "float_int8", "shift4_int8",
         "tucker_int8", "tucker_shift4_int8")


def _native_or_skip():
    try:
        from fxshift.ops import native
        native.load()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"native shift kernels not available: {exc}")


def _model_and_input(name):
    if name == "demo_cnn":
        from fxshift.demo import small_cnn
        torch.manual_seed(0)
        return small_cnn().eval(), (1, 28, 28)
    return build_torchvision(name), (3, 224, 224)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            _native_or_skip()
            folder = tmp_path_factory.mktemp(name)
            model, chw = _model_and_input(name)
            x = torch.randn(1, *chw)
            files = {"float": export_onnx(model, x, folder / "float.onnx")}
            if not QUICK:
                tucker = fxshift.apply([fxshift.TuckerDecomposePass(rank=0.5, n_iter_max=2)], model, x)
                files["tucker"] = export_onnx(tucker, x, folder / "tucker.onnx")
                del tucker
            shift = fxshift.apply([fxshift.ShiftQuantizePass(weight_bits=5)], model, x)
            files["shift"] = export_onnx(shift, x, folder / "shift5.onnx")
            portable = inline_functions(onnx.load(str(files["shift"])))  # = export_onnx(..., target="portable")
            files["portable"] = folder / "shift5_portable.onnx"
            onnx.save(portable, str(files["portable"]))
            del shift
            if not QUICK or name == "demo_cnn":
                files.update(_int8_files(model, x, folder, chw))
            cache[name] = (files, chw)
        return cache[name]

    return get


def _int8_files(model, x, folder, chw):
    """int8 QDQ files: onnxruntime's own quantize_static of the float export, fxshift's export of compressed models."""
    from fxshift.onnx.int8 import ort_int8

    cal = list(torch.randn(16, *chw, generator=torch.Generator().manual_seed(1)).split(8))
    files = {"float_int8": ort_int8(folder / "float.onnx", folder / "float_int8.onnx", cal)}
    variants = {"shift4_int8": [fxshift.ShiftQuantizePass(weight_bits=4)]}
    if not QUICK:
        variants["tucker_int8"] = [fxshift.TuckerDecomposePass(rank=0.5, n_iter_max=2)]
        variants["tucker_shift4_int8"] = variants["tucker_int8"] + [fxshift.ShiftQuantizePass(weight_bits=4)]
    for kind, passes in variants.items():
        gm = fxshift.apply(passes, model, x)
        files[kind] = export_onnx(gm, x, folder / f"{kind}.onnx", quantize="int8", calibration=cal)
    return files


@pytest.mark.parametrize("name, batch", LATENCY_CASES)
def test_ort_latency_float_tucker_shift(benchmark, exported, name, batch):
    files, chw = exported(name)
    plugin = str(library_path()) if plugin_available() else None
    candidates = {"float": (files["float"], None)}
    if "tucker" in files:
        candidates["tucker"] = (files["tucker"], None)
    if plugin:
        candidates["shift_plugin"] = (files["shift"], plugin)
    candidates["shift_functions"] = (files["shift"], None)
    if not QUICK:
        candidates["shift_portable"] = (files["portable"], None)
    for kind in KINDS[5:]:
        if kind in files:
            candidates[kind] = (files[kind], None)
    medians, load = onnx_medians(candidates, (batch, *chw), rounds=2 if QUICK else 5, iters=3 if QUICK else 10,
                                 min_time=0.05 if QUICK else 0.3, threads=THREADS)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the timings are the child processes' (extra_info)
    sizes = {"float": files["float"].stat().st_size, "shift_plugin": files["shift"].stat().st_size,
             "shift_functions": files["shift"].stat().st_size, "shift_portable": files["portable"].stat().st_size}
    for kind in ("tucker",) + KINDS[5:]:
        if kind in files:
            sizes[kind] = files[kind].stat().st_size
    base = medians["float"]
    lines = [f"\n{name} batch {batch} (onnxruntime CPU, {THREADS} threads, each runtime in its own process, "
             f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}):",
             f"  {'model':<20} {'ms':>9} {'speed vs float':>15} {'MB':>9} {'size vs float':>14}"]
    for kind in KINDS:
        if kind not in medians:
            lines.append(f"  {kind:<20} ({'libfxshift_ort not built' if kind == 'shift_plugin' else 'not timed'})")
            continue
        lines.append(f"  {kind:<20} {1e3 * medians[kind]:9.2f} {base / medians[kind]:14.2f}x "
                     f"{sizes[kind] / 1e6:9.2f} {sizes[kind] / sizes['float']:14.3f}")
        benchmark.extra_info[f"{kind}_ms"] = round(1e3 * medians[kind], 3)
        benchmark.extra_info[f"{kind}_speed_vs_float"] = round(base / medians[kind], 3)
        benchmark.extra_info[f"{kind}_bytes"] = sizes[kind]
    benchmark.extra_info.update(model=name, batch=batch, threads=THREADS, loadavg=list(load))
    print("\n".join(lines))
    assert sizes["shift_plugin"] <= 0.2 * sizes["float"]  # 5-bit codes: about 1/6 of float32
    if "shift4_int8" in sizes:
        assert sizes["shift4_int8"] <= 0.3 * sizes["float"]  # int8 weights: about 1/4 of float32
