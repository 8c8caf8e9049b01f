"""Per-node lowering: each fxshift node on the plugin's kernel or through its function body."""
import numpy as np
import pytest
import torch

import fxshift
from fxshift import ConfigError, ShiftQuantizePass
from fxshift.models import small_cnn
from fxshift.onnx import functions, plugin_available, runtime
from fxshift.onnx.lowering import choose_lowering, lowered

pytestmark = pytest.mark.skipif(not plugin_available(), reason="libfxshift_ort not built (" + runtime.BUILD_HINT + ")")
RTOL = 1e-4  # as tests/test_onnx_plugin.py: kernels and bodies both decode the same exact powers of two


@pytest.fixture(scope="module")
def shift_cnn(tmp_path_factory):
    torch.manual_seed(0)
    x = torch.randn(1, 1, 28, 28)
    gm = fxshift.apply([ShiftQuantizePass(weight_bits=5)], small_cnn().eval(), x)
    path = tmp_path_factory.mktemp("lowering") / "cnn.onnx"
    fxshift.export_onnx(gm, x, path)
    return path, x.numpy()


def run(model_bytes, x, plugin=True):
    sess = runtime.session(model_bytes, plugin=plugin, threads=1)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def fxshift_ops(proto):
    return [n.op_type for n in proto.graph.node if n.domain == functions.DOMAIN]


def assert_close(y, ref):
    assert y.shape == ref.shape
    assert float(np.abs(y - ref).max()) <= RTOL * float(np.abs(ref).max())


def test_choice_times_every_node_and_the_whole_model(shift_cnn):
    path, _ = shift_cnn
    result = choose_lowering(path, threads=1, min_time=0.02)
    assert len(result.nodes) == 5  # four convs and the classifier
    for info in result.nodes.values():
        assert info["alone"] in ("plugin", "body") and info["plugin_ms"] > 0 and info["body_ms"] > 0
    assert {"plugin", "body"} <= set(result.model_ms) and result.chosen in result.model_ms
    # another lowering replaces all-plugin only when it measured at least the margin (5%) faster
    assert result.chosen == "plugin" or result.model_ms[result.chosen] < 0.95 * result.model_ms["plugin"]
    assert set(result.choice) == set(result.nodes)


def test_lowered_models_keep_exactly_the_plugin_nodes_and_the_outputs(shift_cnn):
    path, x = shift_cnn
    names = list(choose_lowering(path, threads=1, min_time=0.01).nodes)
    reference = run(open(path, "rb").read(), x)
    mix = {name: ("body" if i % 2 else "plugin") for i, name in enumerate(names)}
    for choice, left in [({n: "plugin" for n in names}, 5), ({n: "body" for n in names}, 0), (mix, 3)]:
        proto = lowered(path, choice)
        assert len(fxshift_ops(proto)) == left
        assert all(not f.name.endswith("Inline") for f in proto.functions)
        assert_close(run(proto.SerializeToString(), x, plugin=left > 0), reference)


def test_session_auto_lowering_matches_the_plugin(shift_cnn):
    path, x = shift_cnn
    sess = runtime.session(path, threads=1, lowering="auto")
    assert_close(sess.run(None, {sess.get_inputs()[0].name: x})[0], run(open(path, "rb").read(), x))


@pytest.mark.parametrize("choice, match", [({"nope": "body"}, "not an fxshift node"),
                                           (None, "not one of")])
def test_bad_choices_are_config_errors(shift_cnn, choice, match):
    path, _ = shift_cnn
    if choice is None:
        first = next(iter(choose_lowering(path, threads=1, min_time=0.01).nodes))
        choice = {first: "gpu"}
    with pytest.raises(ConfigError, match=match):
        lowered(path, choice)
    with pytest.raises(ConfigError, match="lowering must be"):
        runtime.session(path, lowering="fastest")
