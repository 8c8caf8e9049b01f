"""libfxshift_ort: the optional per-output-channel input "scale" (y = sum * scale + B) and the kernels
running on onnxruntime's intra-op pool (results identical for any thread count, no second pool).

Like test_onnx_robustness.py this needs only numpy, onnx and onnxruntime, so native/ort/run_asan_tests.sh
runs it against the sanitizer build too.
"""
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from test_onnx_robustness import (  # noqa: E402
    ATOL, RTOL, _model, _plugin, random_weights, reference_conv, unpack)


@pytest.fixture(scope="module")
def plugin():
    return _plugin()


def _node_model(op, words, attrs, bias, scale, x_rank, out_rank):
    inits = [numpy_helper.from_array(np.asarray(words), "W")]
    names = ["X", "W", ""]
    if bias is not None:
        inits.append(numpy_helper.from_array(np.asarray(bias, np.float32), "B"))
        names[2] = "B"
    if scale is not None:
        inits.append(numpy_helper.from_array(np.asarray(scale, np.float32), "S"))
        names.append("S")
    while names and names[-1] == "":
        names.pop()
    node = helper.make_node(op, names, ["Y"], domain="fxshift", **attrs)
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [None] * x_rank)
    return _model(node, [x], inits, out_rank)


def _session(plugin, model, threads=1):
    so = ort.SessionOptions()
    so.register_custom_ops_library(plugin)
    so.intra_op_num_threads = threads
    so.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


CONV_ATTRS = dict(weight_shape=[16, 8, 3, 3], strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1], group=1,
                  bits=5, has_zero=1)


@pytest.mark.parametrize("with_bias", [True, False])
def test_conv_scale(plugin, with_bias):
    rng = np.random.default_rng(5)
    shape = CONV_ATTRS["weight_shape"]
    words = random_weights(rng, shape, 5, 1)
    bias = rng.standard_normal(16).astype(np.float32) if with_bias else None
    scale = rng.uniform(0.1, 3.0, 16).astype(np.float32)
    x = rng.standard_normal((2, 8, 10, 9)).astype(np.float32)
    y = _session(plugin, _node_model("ShiftConv2d", words, CONV_ATTRS, bias, scale, 4, 4)).run(None, {"X": x})[0]
    plain = reference_conv(x, unpack(words, shape, 5, 1), None, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    ref = plain * scale[None, :, None, None] + (0 if bias is None else bias[None, :, None, None])
    np.testing.assert_allclose(y, ref, rtol=RTOL, atol=ATOL * max(1.0, np.abs(ref).max()))
    # scale = 1 is the op without a scale, bit for bit
    ones = _node_model("ShiftConv2d", words, CONV_ATTRS, bias, np.ones(16, np.float32), 4, 4)
    none = _node_model("ShiftConv2d", words, CONV_ATTRS, bias, None, 4, 4)
    assert np.array_equal(_session(plugin, ones).run(None, {"X": x})[0],
                          _session(plugin, none).run(None, {"X": x})[0])


@pytest.mark.parametrize("batch", [1, 6])
def test_linear_scale(plugin, batch):
    rng = np.random.default_rng(6)
    words = random_weights(rng, (9, 40), 5, 1)
    bias = rng.standard_normal(9).astype(np.float32)
    scale = rng.uniform(-2.0, 2.0, 9).astype(np.float32)
    x = rng.standard_normal((batch, 40)).astype(np.float32)
    attrs = dict(in_features=40, out_features=9, bits=5, has_zero=1)
    y = _session(plugin, _node_model("ShiftLinear", words, attrs, bias, scale, 2, 2)).run(None, {"X": x})[0]
    ref = (x.astype(np.float64) @ unpack(words, (9, 40), 5, 1).T.astype(np.float64)) * scale + bias
    np.testing.assert_allclose(y, ref, rtol=RTOL, atol=ATOL * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("op", ["ShiftConv2d", "ShiftLinear"])
def test_bad_scale_raises(plugin, op):
    rng = np.random.default_rng(7)
    if op == "ShiftConv2d":
        words, attrs, x = random_weights(rng, CONV_ATTRS["weight_shape"], 5, 1), CONV_ATTRS, \
            np.ones((1, 8, 5, 5), np.float32)
        model = _node_model(op, words, attrs, None, np.ones(15, np.float32), 4, 4)
    else:
        words, attrs = random_weights(rng, (9, 40), 5, 1), dict(in_features=40, out_features=9, bits=5, has_zero=1)
        x = np.ones((2, 40), np.float32)
        model = _node_model(op, words, attrs, None, np.ones((9, 1), np.float32), 2, 2)
    with pytest.raises(Exception, match="scale has shape"):
        _session(plugin, model).run(None, {"X": x})


def _threads():
    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else None


def test_intra_op_pool_identical_and_no_second_pool(plugin):
    rng = np.random.default_rng(8)
    words = random_weights(rng, (32, 8, 3, 3), 5, 1)
    attrs = dict(CONV_ATTRS, weight_shape=[32, 8, 3, 3])
    bias = rng.standard_normal(32).astype(np.float32)
    model = _node_model("ShiftConv2d", words, attrs, bias, None, 4, 4)
    x = rng.standard_normal((4, 8, 20, 20)).astype(np.float32)
    lin_words = random_weights(rng, (64, 300), 5, 1)
    lin = _node_model("ShiftLinear", lin_words, dict(in_features=300, out_features=64, bits=5, has_zero=1),
                      None, None, 2, 2)
    xl = rng.standard_normal((3, 300)).astype(np.float32)
    want = _session(plugin, model, 1).run(None, {"X": x})[0]
    want_l = _session(plugin, lin, 1).run(None, {"X": xl})[0]
    for threads in (2, 4):
        sess, sess_l = _session(plugin, model, threads), _session(plugin, lin, threads)
        before = _threads()
        for _ in range(3):
            assert np.array_equal(sess.run(None, {"X": x})[0], want), f"{threads} threads differ"
            assert np.array_equal(sess_l.run(None, {"X": xl})[0], want_l), f"{threads} threads differ"
        # the kernels ran on onnxruntime's workers: no libfxshift pool threads were started
        assert _threads() == before
