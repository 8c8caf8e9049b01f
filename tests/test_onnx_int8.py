"""int8 QDQ export for onnxruntime's own kernels (issue 21): exact shift codes, the torch reference, errors."""
from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import fxshift
from fxshift import ShiftQuantizePass, TuckerDecomposePass
from fxshift.onnx import QDQReference, export_int8
from fxshift.onnx.export import ExportError

ort = pytest.importorskip("onnxruntime")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv1, self.bn1 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 24, 3, stride=2, padding=1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        y = torch.relu(self.bn0(self.conv0(x)))
        y = torch.relu(y + self.bn1(self.conv1(y)))          # a residual add
        y = torch.relu(self.conv2(y))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def _net():
    torch.manual_seed(0)
    m = _Net()
    for bn in (m.bn0, m.bn1):
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
    with torch.no_grad():
        m.bn1.weight[3] = -0.7                               # a negative γ flips that channel's int8 signs
    return m.eval()


def _cal(n=2):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 3, 12, 12, generator=g) for _ in range(n)]


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _int8_weight(proto, node_name):
    """(int8 weight, per-channel scale) feeding the named Conv / Gemm node."""
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    dq = {n.output[0]: n for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    node = next(n for n in proto.graph.node if n.name == node_name)
    d = dq[node.input[1]]
    return inits[d.input[0]], inits[d.input[1]]


@pytest.fixture(scope="module")
def shift4(tmp_path_factory):
    m, x = _net(), torch.randn(1, 3, 12, 12)
    gm = fxshift.apply([ShiftQuantizePass(weight_bits=4, calibration=_cal(), progress=False, iterations=20)], m, x)
    gm.eval()
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    path = tmp_path_factory.mktemp("int8") / "shift4.onnx"
    result = export_int8(gm, x, path, _cal())
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in state.items())   # the model is not changed
    return m, gm, result


def test_shift_layers_become_their_codes_exactly(shift4):
    m, gm, result = shift4
    proto = onnx.load(str(result.path))
    status = {e["layer"]: e for e in result.layers if e["layer"]}
    assert set(status) == {"conv0", "conv1", "conv2", "fc"}
    assert all(e["status"] == "int8 exact" for e in status.values()), status
    assert json.loads({p.key: p.value for p in proto.metadata_props}["fxshift.int8"])[0]["status"] == "int8 exact"
    for name, bn in (("conv0", gm.bn0), ("conv1", gm.bn1), ("conv2", None), ("fc", None)):
        layer = gm.get_submodule(name)
        codes = layer.quantized_weight().detach().reshape(layer.quantized_weight().shape[0], -1)
        p_max = torch.log2(codes.abs().amax(1))
        expected = codes * torch.exp2(6 - p_max)[:, None]               # ±1 … ±64
        if bn is not None:
            expected = expected * torch.sign(bn.weight.detach())[:, None]
        q, scale = _int8_weight(proto, status[name]["node"])
        assert q.dtype == np.int8
        assert np.array_equal(q.reshape(len(q), -1).astype(np.float32), expected.numpy()), name
        assert np.abs(q).max() <= 64 and (scale > 0).all()


def test_onnxruntime_runs_int8_kernels_and_matches_the_torch_reference(shift4, tmp_path):
    _, gm, result = shift4
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(result.path), so, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert {"QLinearConv", "QLinearAdd"} <= ops                          # onnxruntime's own int8 kernels
    proto = onnx.load(str(result.path))
    ref = QDQReference(proto)
    x = torch.randn(32, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    out = _run(result.path, x)
    with torch.no_grad():
        r = ref(x).numpy()
        y = gm(x).numpy()
    # one quantisation step of the classifier's input, through the classifier's largest row L1 norm
    gemm = next(n for n in proto.graph.node if n.op_type == "Gemm")
    dq = next(n for n in proto.graph.node if n.output[0] == gemm.input[0])
    step = float(numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == dq.input[1])))
    w = np.abs(_int8_weight(proto, gemm.name)[0] * _int8_weight(proto, gemm.name)[1][:, None]).sum(1).max()
    assert np.abs(out - r).max() <= step * w + 1e-5
    assert np.linalg.norm(r - y) / np.linalg.norm(y) < 0.1                # the int8 model is close to the torch one


def test_tucker_shift4_and_plain_layers(tmp_path):
    m, x = _net(), torch.randn(1, 3, 12, 12)
    gm = fxshift.apply([TuckerDecomposePass(rank=0.5, include=["conv1"]),
                        ShiftQuantizePass(weight_bits=4, exclude=["fc"])], m, x)
    result = export_int8(gm, x, tmp_path / "t.onnx", torch.randn(64, 3, 12, 12))
    by_layer = {e["layer"]: e["status"] for e in result.layers if e["layer"]}
    assert {"conv1.reduce", "conv1.core", "conv1.restore", "conv0", "conv2"} <= set(by_layer)
    assert set(by_layer.values()) == {"int8 exact"}
    plain = [e for e in result.layers if not e["layer"]]
    assert len(plain) == 1 and plain[0]["status"] == "int8"                # fc: onnxruntime's own scales
    assert result.float_layers == []


def test_not_exact_layers_are_named(tmp_path):
    m, x = _net(), torch.randn(1, 3, 12, 12)
    gm = fxshift.apply([ShiftQuantizePass(weight_bits=5, int8_exact=False, include=["conv0"])], m, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                   # nothing is left float here
        path = fxshift.export_onnx(gm, x, tmp_path / "q.onnx", quantize="int8", calibration=_cal(1))
    meta = json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["fxshift.int8"])
    conv0 = next(e for e in meta if e["layer"] == "conv0")
    assert conv0["status"].startswith("int8 (not exact")


def test_errors():
    m, x = _net(), torch.randn(1, 3, 12, 12)
    with pytest.raises(fxshift.ConfigError, match="needs calibration"):
        fxshift.export_onnx(m, x, "/tmp/never.onnx", quantize="int8")
    with pytest.raises(ExportError, match="quantize='int4'"):
        fxshift.export_onnx(m, x, "/tmp/never.onnx", quantize="int4", calibration=_cal(1))
    with pytest.raises(fxshift.ConfigError, match="calibration batch 0"):
        fxshift.export_onnx(m, x, "/tmp/never.onnx", quantize="int8", calibration=[(x, torch.tensor([1]))])


def test_export_pass_int8(tmp_path):
    m, x = _net(), torch.randn(1, 3, 12, 12)
    with pytest.raises(fxshift.ConfigError, match="needs calibration"):
        fxshift.ExportOnnxPass(tmp_path / "p.onnx", quantize="int8")
    fxshift.apply([fxshift.ExportOnnxPass(tmp_path / "p.onnx", quantize="int8", calibration=_cal(1))], m, x)
    meta = json.loads({p.key: p.value for p in onnx.load(str(tmp_path / "p.onnx")).metadata_props}["fxshift.int8"])
    assert [e["status"] for e in meta] == ["int8"] * 4


def test_int8_reference_in_torch_before_export():
    m, x = _net(), torch.randn(8, 3, 12, 12)
    ref = fxshift.onnx.int8_reference(m, x[:1], _cal(1))
    with torch.no_grad():
        y, r = m(x), ref(x)
    assert r.shape == y.shape and float((r - y).norm() / y.norm()) < 0.1
    with pytest.raises(fxshift.ConfigError, match="takes 1 inputs"):
        ref(x, x)
