"""libfxshift_ort on crafted ONNX files: valid nodes agree with onnxruntime's own Conv/Gemm on the
decoded weights; a wrong packed size, wrong attributes or mismatched shapes give an onnxruntime
error (a Python exception), never a crash; 8 threads running one session agree bit for bit.

This file needs only numpy, onnx and onnxruntime (no torch, no conftest): native/ort/run_asan_tests.sh
runs it with `--noconftest` against a plugin built with AddressSanitizer + UBSan, so an out-of-bounds
read in the adapter or the kernels fails the run. The plugin is $FXSHIFT_ORT_PLUGIN when set, else
fxshift.onnx.library_path().
"""
import os
import threading

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

OPSET = 18


def _plugin():
    path = os.environ.get("FXSHIFT_ORT_PLUGIN")
    if path:
        return path
    try:
        from fxshift.onnx import library_path
        return str(library_path())
    except Exception as exc:  # noqa: BLE001 - any failure means "not built"
        pytest.skip(f"libfxshift_ort not available: {exc}")


@pytest.fixture(scope="module")
def plugin():
    return _plugin()


# ------------------------------------------------------------------------------------------------
# a numpy reference of the packed format (independent of fxshift's torch code)
# ------------------------------------------------------------------------------------------------
def pack(sign: np.ndarray, mag: np.ndarray, bits: int, has_zero: int) -> np.ndarray:
    rows = sign.shape[0]
    s, m = sign.reshape(rows, -1).astype(np.int64), mag.reshape(rows, -1).astype(np.int64)
    k = s.shape[1]
    per = 32 // bits
    rw = -(-k // per)
    codes = np.where(s == 0, (1 << bits) - 1, ((s < 0).astype(np.int64) << (bits - 1)) | m)
    padded = np.zeros((rows, rw * per), dtype=np.int64)
    padded[:, :k] = codes
    words = (padded.reshape(rows, rw, per) << (np.arange(per) * bits)).sum(-1)
    return words.astype(np.uint32).view(np.int32)


def unpack(words: np.ndarray, shape, bits: int, has_zero: int) -> np.ndarray:
    rows, k = shape[0], int(np.prod(shape[1:]))
    per = 32 // bits
    rw = -(-k // per)
    w = words.reshape(rows, rw).view(np.uint32).astype(np.int64)
    codes = ((w[..., None] >> (np.arange(per) * bits)) & ((1 << bits) - 1)).reshape(rows, -1)[:, :k]
    m = codes & ((1 << (bits - 1)) - 1)
    neg = codes >> (bits - 1)
    val = np.where(m > 126, 0.0, np.ldexp(1.0, -np.minimum(m, 126))) * (1 - 2 * neg)
    if has_zero:
        val = np.where(codes == (1 << bits) - 1, 0.0, val)
    return val.astype(np.float32).reshape(shape)


def random_weights(rng, shape, bits, has_zero):
    sign = rng.choice([-1, 1] + ([0] if has_zero else []), size=shape)
    mmax = (1 << (bits - 1)) - 1
    mag = rng.integers(0, mmax, size=shape)  # < mmax: fits negative weights with has_zero too
    return pack(sign, mag, bits, has_zero)


# ------------------------------------------------------------------------------------------------
# crafted models
# ------------------------------------------------------------------------------------------------
def _model(node, inputs, initializers, output_rank):
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT,
                                                                                 [None] * output_rank)],
                              initializer=initializers)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("fxshift", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=9)


def conv_model(words, *, weight_shape, strides=(1, 1), pads=(1, 1, 1, 1), dilations=(1, 1), group=1, bits=5,
               has_zero=0, bias=None, x_rank=4, drop=(), extra=None):
    attrs = dict(weight_shape=list(weight_shape), strides=list(strides), pads=list(pads), dilations=list(dilations),
                 group=group, bits=bits, has_zero=has_zero)
    for name in drop:
        attrs.pop(name)
    attrs.update(extra or {})
    inits = [numpy_helper.from_array(np.asarray(words), "W")]
    names = ["X", "W"]
    if bias is not None:
        inits.append(numpy_helper.from_array(np.asarray(bias, dtype=np.float32), "B"))
        names.append("B")
    node = helper.make_node("ShiftConv2d", names, ["Y"], domain="fxshift", **attrs)
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [None] * x_rank)
    return _model(node, [x], inits, 4)


def linear_model(words, *, in_features, out_features, bits=5, has_zero=0, bias=None, x_rank=2, drop=(),
                 extra=None):
    attrs = dict(in_features=in_features, out_features=out_features, bits=bits, has_zero=has_zero)
    for name in drop:
        attrs.pop(name)
    attrs.update(extra or {})
    inits = [numpy_helper.from_array(np.asarray(words), "W")]
    names = ["X", "W"]
    if bias is not None:
        inits.append(numpy_helper.from_array(np.asarray(bias, dtype=np.float32), "B"))
        names.append("B")
    node = helper.make_node("ShiftLinear", names, ["Y"], domain="fxshift", **attrs)
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [None] * x_rank)
    return _model(node, [x], inits, x_rank)


def reference_conv(x, weight, bias, strides, pads, dilations, group):
    """onnxruntime's own Conv on the decoded float weight."""
    inits = [numpy_helper.from_array(weight, "W")]
    names = ["X", "W"]
    if bias is not None:
        inits.append(numpy_helper.from_array(np.asarray(bias, dtype=np.float32), "B"))
        names.append("B")
    node = helper.make_node("Conv", names, ["Y"], strides=list(strides), pads=list(pads), dilations=list(dilations),
                            group=group)
    graph = helper.make_graph([node], "ref", [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=9)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]


def session(plugin, model):
    so = ort.SessionOptions()
    so.register_custom_ops_library(plugin)
    so.intra_op_num_threads = 1
    so.log_severity_level = 4  # the expected errors come back as exceptions; keep the log quiet
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(plugin, model, x):
    return session(plugin, model).run(None, {"X": x})[0]


RTOL, ATOL = 1e-5, 1e-5  # float summation order only: the weights are the same powers of two


# ------------------------------------------------------------------------------------------------
# valid nodes
# ------------------------------------------------------------------------------------------------
CONVS = [  # weight_shape, strides, pads, dilations, group, bits, has_zero, bias, x shape
    ((8, 3, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, 5, 0, True, (2, 3, 9, 9)),
    ((6, 2, 3, 1), (2, 1), (1, 0, 1, 0), (2, 1), 2, 4, 1, False, (1, 4, 11, 7)),
    ((12, 1, 5, 5), (2, 2), (2, 2, 2, 2), (1, 1), 12, 9, 1, True, (3, 12, 8, 8)),
    ((5, 7, 1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, 2, 0, True, (1, 7, 4, 5)),
]


@pytest.mark.parametrize("case", CONVS, ids=[f"conv{i}" for i in range(len(CONVS))])
def test_valid_conv_matches_ort_conv(plugin, case):
    shape, strides, pads, dilations, group, bits, has_zero, with_bias, x_shape = case
    rng = np.random.default_rng(len(str(case)))
    words = random_weights(rng, shape, bits, has_zero)
    bias = rng.standard_normal(shape[0]).astype(np.float32) if with_bias else None
    x = rng.standard_normal(x_shape).astype(np.float32)
    y = run(plugin, conv_model(words, weight_shape=shape, strides=strides, pads=pads, dilations=dilations,
                               group=group, bits=bits, has_zero=has_zero, bias=bias), x)
    ref = reference_conv(x, unpack(words, shape, bits, has_zero), bias, strides, pads, dilations, group)
    np.testing.assert_allclose(y, ref, rtol=RTOL, atol=ATOL * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("x_shape", [(4, 10), (2, 3, 10), (10,), (0, 10)])
def test_valid_linear(plugin, x_shape):
    rng = np.random.default_rng(1)
    words = random_weights(rng, (7, 10), 5, 1)
    bias = rng.standard_normal(7).astype(np.float32)
    x = rng.standard_normal(x_shape).astype(np.float32)
    y = run(plugin, linear_model(words, in_features=10, out_features=7, has_zero=1, bias=bias, x_rank=len(x_shape)), x)
    ref = x @ unpack(words, (7, 10), 5, 1).T + bias
    assert y.shape == (*x_shape[:-1], 7)
    np.testing.assert_allclose(y, ref, rtol=RTOL, atol=ATOL * max(1.0, np.abs(ref).max(initial=0)))


def test_empty_batch_conv(plugin):
    words = random_weights(np.random.default_rng(2), (4, 3, 3, 3), 5, 0)
    y = run(plugin, conv_model(words, weight_shape=(4, 3, 3, 3)), np.zeros((0, 3, 5, 5), np.float32))
    assert y.shape == (0, 4, 5, 5)


# ------------------------------------------------------------------------------------------------
# invalid nodes: an exception, never a crash or an out-of-bounds read
# ------------------------------------------------------------------------------------------------
def _conv_words(shape=(4, 3, 3, 3), bits=5):
    return random_weights(np.random.default_rng(3), shape, bits, 0)


X4 = np.ones((1, 3, 6, 6), np.float32)
CONV_BAD = {
    "too_few_words": (dict(words=_conv_words()[:, :-1], weight_shape=(4, 3, 3, 3)), X4),
    "too_many_words": (dict(words=np.zeros((4, 6), np.int32), weight_shape=(4, 3, 3, 3)), X4),
    "no_words": (dict(words=np.zeros((0,), np.int32), weight_shape=(4, 3, 3, 3)), X4),
    "words_for_other_bits": (dict(words=_conv_words(bits=3), weight_shape=(4, 3, 3, 3)), X4),
    "bits_1": (dict(words=_conv_words(), weight_shape=(4, 3, 3, 3), bits=1), X4),
    "bits_10": (dict(words=_conv_words(), weight_shape=(4, 3, 3, 3), bits=10), X4),
    "bits_negative": (dict(words=_conv_words(), weight_shape=(4, 3, 3, 3), bits=-5), X4),
    "has_zero_2": (dict(words=_conv_words(), weight_shape=(4, 3, 3, 3), has_zero=2), X4),
    "weight_shape_3_values": (dict(words=_conv_words(), weight_shape=(4, 3, 9)), X4),
    "weight_shape_zero": (dict(words=_conv_words(), weight_shape=(4, 0, 3, 3)), X4),
    "weight_shape_huge": (dict(words=_conv_words(), weight_shape=(4, 3, 2**40, 2**40)), X4),
    "weight_shape_negative": (dict(words=_conv_words(), weight_shape=(4, -3, 3, 3)), X4),
    "missing_bits": (dict(words=_conv_words(), weight_shape=(4, 3, 3, 3), drop=("bits",)), X4),
    "missing_weight_shape": (dict(words=_conv_words(), weight_shape=(4, 3, 3, 3), drop=("weight_shape",)), X4),
    "float_bits": (dict(words=_conv_words(), weight_shape=(4, 3, 3, 3), drop=("bits",), extra={"bits": 5.0}), X4),
    "asymmetric_pads": (dict(words=_conv_words(), weight_shape=(4, 3, 3, 3), pads=(1, 1, 0, 0)), X4),
    "negative_pads": (dict(words=_conv_words(), weight_shape=(4, 3, 3, 3), pads=(-1, -1, -1, -1)), X4),
    "pads_2_values": (dict(words=_conv_words(), weight_shape=(4, 3, 3, 3), pads=(1, 1)), X4),
    "stride_0": (dict(words=_conv_words(), weight_shape=(4, 3, 3, 3), strides=(0, 1)), X4),
    "dilation_negative": (dict(words=_conv_words(), weight_shape=(4, 3, 3, 3), dilations=(1, -2)), X4),
    "group_not_dividing": (dict(words=_conv_words(), weight_shape=(4, 3, 3, 3), group=3), np.ones((1, 9, 6, 6),
                                                                                                    np.float32)),
    "group_0": (dict(words=_conv_words(), weight_shape=(4, 3, 3, 3), group=0), X4),
    "channel_mismatch": (dict(words=_conv_words(), weight_shape=(4, 3, 3, 3)), np.ones((1, 5, 6, 6), np.float32)),
    "x_rank_3": (dict(words=_conv_words(), weight_shape=(4, 3, 3, 3), x_rank=3), np.ones((3, 6, 6), np.float32)),
    "input_smaller_than_kernel": (dict(words=_conv_words(), weight_shape=(4, 3, 3, 3), pads=(0, 0, 0, 0)),
                                  np.ones((1, 3, 2, 2), np.float32)),
    "bias_wrong_size": (dict(words=_conv_words(), weight_shape=(4, 3, 3, 3), bias=np.zeros(3)), X4),
    "bias_2d": (dict(words=_conv_words(), weight_shape=(4, 3, 3, 3), bias=np.zeros((2, 2))), X4),
}


@pytest.mark.parametrize("name", sorted(CONV_BAD))
def test_bad_conv_raises(plugin, name):
    kwargs, x = CONV_BAD[name]
    kwargs = dict(kwargs)
    words = kwargs.pop("words")
    with pytest.raises(Exception) as info:
        run(plugin, conv_model(words, **kwargs), x)
    assert "fxshift.ShiftConv2d: " in str(info.value)


X2 = np.ones((2, 10), np.float32)
LINEAR_BAD = {
    "too_few_words": (dict(words=np.zeros((7, 1), np.int32), in_features=10, out_features=7), X2),
    "too_many_words": (dict(words=np.zeros((7, 3), np.int32), in_features=10, out_features=7), X2),
    "out_features_0": (dict(words=np.zeros((7, 2), np.int32), in_features=10, out_features=0), X2),
    "in_features_mismatch": (dict(words=np.zeros((7, 2), np.int32), in_features=12, out_features=7), X2),
    "x_last_dim_mismatch": (dict(words=np.zeros((7, 2), np.int32), in_features=10, out_features=7),
                            np.ones((2, 11), np.float32)),
    "x_scalar": (dict(words=np.zeros((7, 2), np.int32), in_features=10, out_features=7, x_rank=0),
                 np.ones((), np.float32)),
    "bits_0": (dict(words=np.zeros((7, 2), np.int32), in_features=10, out_features=7, bits=0), X2),
    "missing_in_features": (dict(words=np.zeros((7, 2), np.int32), in_features=10, out_features=7,
                                 drop=("in_features",)), X2),
    "huge_features": (dict(words=np.zeros((7, 2), np.int32), in_features=2**62, out_features=2**62), X2),
    "bias_wrong_size": (dict(words=np.zeros((7, 2), np.int32), in_features=10, out_features=7, bias=np.zeros(8)), X2),
    "words_float": (dict(words=np.zeros((7, 2), np.float32), in_features=10, out_features=7), X2),
}


@pytest.mark.parametrize("name", sorted(LINEAR_BAD))
def test_bad_linear_raises(plugin, name):
    kwargs, x = LINEAR_BAD[name]
    kwargs = dict(kwargs)
    words = kwargs.pop("words")
    with pytest.raises(Exception) as info:
        run(plugin, linear_model(words, **kwargs), x)
    # a float W fails onnxruntime's own type check, everything else the plugin's checks
    assert ("Type Error" if name == "words_float" else "fxshift.ShiftLinear: ") in str(info.value)


def test_error_message_names_the_problem(plugin):
    with pytest.raises(Exception, match=r"ShiftConv2d: W has 8 words"):
        run(plugin, conv_model(np.zeros((4, 2), np.int32), weight_shape=(4, 3, 3, 3)), X4)
    with pytest.raises(Exception, match=r"bits=10"):
        run(plugin, conv_model(_conv_words(), weight_shape=(4, 3, 3, 3), bits=10), X4)


def test_session_survives_a_bad_input(plugin):
    """A failed run leaves the session usable."""
    s = session(plugin, conv_model(_conv_words(), weight_shape=(4, 3, 3, 3)))
    good = s.run(None, {"X": X4})[0]
    with pytest.raises(Exception):
        s.run(None, {"X": np.ones((1, 2, 6, 6), np.float32)})
    np.testing.assert_array_equal(s.run(None, {"X": X4})[0], good)


# ------------------------------------------------------------------------------------------------
# threads
# ------------------------------------------------------------------------------------------------
def test_eight_threads_one_session_identical(plugin):
    rng = np.random.default_rng(5)
    shape = (16, 8, 3, 3)
    words = random_weights(rng, shape, 5, 1)
    so = ort.SessionOptions()
    so.register_custom_ops_library(plugin)
    s = ort.InferenceSession(conv_model(words, weight_shape=shape, has_zero=1,
                                        bias=rng.standard_normal(16)).SerializeToString(), so,
                             providers=["CPUExecutionProvider"])
    xs = [rng.standard_normal((2, 8, 12, 12)).astype(np.float32) for _ in range(4)]
    expected = [s.run(None, {"X": x})[0] for x in xs]
    results, errors = {}, []

    def worker(t):
        try:
            for r in range(6):
                i = (t + r) % len(xs)
                results[(t, r)] = (i, s.run(None, {"X": xs[i]})[0])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 48
    for i, y in results.values():
        np.testing.assert_array_equal(y, expected[i])
