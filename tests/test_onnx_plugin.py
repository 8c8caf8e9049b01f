"""libfxshift_ort through fxshift.onnx: library search, registration, and torchvision models after
Tucker, after shift (frozen) and after both, run in onnxruntime with the plugin and without it (the
function bodies), against torch.

Tolerance: max|y - y_torch| <= 1e-4 * max|y_torch| for both runtimes (float summation order differs:
the native kernels, MLAS and torch sum in different orders; the weights are the same powers of two).
Models use random init and 32×32 inputs (all three have adaptive pooling), batch 2 on a file
exported with batch 1 (dynamic batch).
"""
import json
import threading

import numpy as np
import pytest
import torch

import fxshift
from fxshift import ShiftQuantizePass, TuckerDecomposePass

ort = pytest.importorskip("onnxruntime")

from fxshift.onnx import (PluginNotFound, compare_in_onnxruntime, export_onnx, library_path,  # noqa: E402
                          plugin_available, session, session_options)
from fxshift.onnx import runtime, sessions  # noqa: E402

from conftest import build_torchvision  # noqa: E402

RTOL = 1e-4

pytestmark = pytest.mark.skipif(not plugin_available(), reason="libfxshift_ort not built (" + runtime.BUILD_HINT + ")")


def assert_close(y, ref):
    assert y.shape == ref.shape
    scale = max(float(np.abs(ref).max()), 1e-12)
    err = float(np.abs(y - ref).max())
    assert err <= RTOL * scale, f"max abs error {err:.3g} > {RTOL} x {scale:.3g}"


# ------------------------------------------------------------------------------------------------
# library search and registration
# ------------------------------------------------------------------------------------------------
def test_library_path_and_env_override(tmp_path, monkeypatch):
    found = library_path()
    assert found.is_file() and found.name.startswith("libfxshift_ort")
    (tmp_path / found.name).write_bytes(b"")
    monkeypatch.setenv("FXSHIFT_NATIVE_DIR", str(tmp_path))
    assert library_path() == tmp_path / found.name


def test_missing_library_says_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setattr(sessions, "find_library", lambda stem: (None, [str(tmp_path / "libfxshift_ort.so")]))
    assert library_path(required=False) is None and not plugin_available()
    with pytest.raises(PluginNotFound, match="fetch_ort_headers"):
        library_path()
    with pytest.raises(PluginNotFound):
        session_options()


def test_only_register_custom_ops_is_exported():
    import subprocess

    out = subprocess.run(["nm", "-D", "--defined-only", str(library_path())], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("nm not available")
    symbols = [line.split()[-1] for line in out.stdout.splitlines() if line.strip()]
    assert symbols == ["RegisterCustomOps"]


# ------------------------------------------------------------------------------------------------
# torchvision models × {tucker, shift, both}
# ------------------------------------------------------------------------------------------------
MODELS = ["resnet18", "mobilenet_v2", "vgg11"]
VARIANTS = {
    "tucker": lambda: [TuckerDecomposePass(rank=0.5, n_iter_max=1)],
    "shift": lambda: [ShiftQuantizePass(weight_bits=5)],
    "both": lambda: [TuckerDecomposePass(rank=0.5, n_iter_max=1), ShiftQuantizePass(weight_bits=5)],
}
FAST = {("resnet18", "shift"), ("mobilenet_v2", "shift")}
CASES = [pytest.param(m, v, marks=() if (m, v) in FAST else pytest.mark.slow, id=f"{m}-{v}")
         for m in MODELS for v in VARIANTS]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache = {}

    def get(name, variant):
        if (name, variant) in cache:
            return cache[(name, variant)]
        x = torch.randn(1, 3, 32, 32)
        gm = fxshift.freeze(fxshift.apply(VARIANTS[variant](), build_torchvision(name), x)).eval()
        path = export_onnx(gm, x, tmp_path_factory.mktemp(f"{name}-{variant}") / "model.onnx")
        if (name, variant) in FAST:  # reused by other tests; the big ones (vgg11: 0.5 GB) are not kept
            cache[(name, variant)] = gm, path
        return gm, path

    return get


@pytest.mark.parametrize("name, variant", CASES)
def test_model_matches_torch_with_and_without_plugin(exported, name, variant):
    gm, path = exported(name, variant)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = gm(x).numpy()
    with_plugin = session(path, threads=2)
    without = session(path, plugin=False, threads=2)
    assert_close(with_plugin.run(None, {"input": x.numpy()})[0], ref)
    assert_close(without.run(None, {"input": x.numpy()})[0], ref)
    if variant != "tucker":  # batch 1 and 3 on the same sessions: the batch is dynamic
        for batch in (1, 3):
            xb = torch.randn(batch, 3, 32, 32)
            with torch.no_grad():
                rb = gm(xb).numpy()
            assert_close(with_plugin.run(None, {"input": xb.numpy()})[0], rb)
            assert_close(without.run(None, {"input": xb.numpy()})[0], rb)


def test_plugin_kernels_run_instead_of_function_bodies(exported, tmp_path):
    _, path = exported("resnet18", "shift")
    ran = {}
    for plugin in (True, False):
        so = session_options() if plugin else ort.SessionOptions()
        so.enable_profiling = True
        so.profile_file_prefix = str(tmp_path / f"profile_{plugin}")
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        s.run(None, {"input": np.zeros((1, 3, 32, 32), np.float32)})
        with open(s.end_profiling()) as f:
            events = json.load(f)
        ran[plugin] = {e["args"].get("op_name") for e in events if e.get("cat") == "Node"}
    assert {"ShiftConv2d", "ShiftLinear"} <= ran[True] and "Conv" not in ran[True]
    assert "ShiftConv2d" not in ran[False] and "Conv" in ran[False]


def test_eight_threads_one_session_identical(exported):
    _, path = exported("mobilenet_v2", "shift")
    s = session(path, threads=1)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1, 3, 32, 32)).astype(np.float32) for _ in range(3)]
    expected = [s.run(None, {"input": x})[0] for x in xs]
    results, errors = [], []

    def worker(t):
        try:
            for r in range(3):
                i = (t + r) % len(xs)
                results.append((i, s.run(None, {"input": xs[i]})[0]))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 24
    for i, y in results:
        np.testing.assert_array_equal(y, expected[i])


def test_compare_in_onnxruntime(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    x = torch.randn(1, 3, 16, 16)
    gm = fxshift.apply([ShiftQuantizePass(weight_bits=5)], model, x)
    result = compare_in_onnxruntime(gm, x, tmp_path / "m.onnx", baseline=model, rounds=2)
    assert result["ok"] and result["plugin"]
    assert set(result["rel_error"]) == {"plugin", "functions"}
    assert set(result["latency_ms"]) == {"torch", "plugin", "functions", "float"}
    assert result["bytes"] > 0 and result["float_bytes"] > 0
