"""A plugin session holds the packed weights, not float copies: its peak memory stays below the float session's.

Each session is built and run in a fresh child process (fxshift.measure.process.onnx_peak_memory), so the
numbers are the peak resident set the session added to a process with only numpy and onnxruntime loaded."""
import pytest
import torch
from torch import nn

import fxshift
from fxshift import ShiftQuantizePass

pytest.importorskip("onnxruntime")
from fxshift.onnx import export_onnx, library_path, plugin_available  # noqa: E402
from fxshift.measure.process import onnx_peak_memory  # noqa: E402

pytestmark = pytest.mark.skipif(not plugin_available(), reason="libfxshift_ort not built")


def weight_heavy_model() -> nn.Module:
    """A conv front and two wide Linears: 12.6M float32 weights (50 MB), about 8.5 MB packed at 5 bits."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Linear(2048, 4096), nn.ReLU(),
                         nn.Linear(4096, 1024)).eval()


@pytest.mark.parametrize("batch", [1, 8])
def test_plugin_session_peak_memory_below_float(tmp_path, batch):
    model = weight_heavy_model()
    x = torch.randn(1, 3, 32, 32)
    float_file = export_onnx(model, x, tmp_path / "float.onnx")
    shift_file = export_onnx(fxshift.apply([ShiftQuantizePass(weight_bits=5)], model, x), x, tmp_path / "shift.onnx")
    peak = onnx_peak_memory({"float": (float_file, None), "plugin": (shift_file, str(library_path()))},
                            (batch, 3, 32, 32), runs=2, threads=1)
    weights = 4 * sum(p.numel() for p in model.parameters())
    # the float session holds at least its weights; the plugin one at most half of that (packed codes are 1/6)
    assert peak["float"] >= weights, peak
    assert peak["plugin"] <= 0.5 * peak["float"], peak
