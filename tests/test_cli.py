"""The `fxshift` command: compress → export, inspect, bench; errors in one line, no traceback."""
import subprocess
import sys

import numpy as np
import pytest

from fxshift import cli

onnx = pytest.importorskip("onnx")


def _native_or_skip():
    try:
        from fxshift.ops import native
        native.load()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"native shift kernels not available: {exc}")


def test_compress_inspect_bench(factory_module, capsys):
    _native_or_skip()
    out = factory_module / "out.onnx"
    code = cli.main(["compress", "tinynet:build", "--pass", "tucker:rank=0.5,n_iter_max=2,only_if_cheaper=false",
                     "--pass", "shift:weight_bits=5", "--export", str(out), "--input-shape", "1,3,16,16", "--report"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert out.is_file()
    assert "[1/4] build tinynet:build" in captured.err and "TuckerDecomposePass: done" in captured.err
    assert "decomposed" in captured.out and "out.onnx" in captured.out
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["fxshift.model"] == "tinynet:build" and meta["fxshift.input_shape"] == "1,3,16,16"

    assert cli.main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fxshift::ShiftConv2d" in text and "fxshift::ShiftLinear" in text and "int32" in text
    info = cli.inspect_model(str(out))
    assert info["ops"]["fxshift::ShiftLinear"] == 2 and all(n["bits"] == 5 for n in info["shift_nodes"])
    # the packed size by the nodes' attributes is the size of their W initializers
    graph = onnx.load(str(out)).graph
    sizes = {i.name: 4 * int(np.prod(i.dims)) for i in graph.initializer}
    words = {n.name: sizes[n.input[1]] for n in graph.node if n.domain == "fxshift"}
    assert {n["name"]: n["packed_bytes"] for n in info["shift_nodes"]} == words
    assert "packed MB" in text

    assert cli.main(["bench", str(out), "--rounds", "2", "--batch", "1", "2", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    rows = [line.split() for line in text.splitlines() if line[:1].isdigit()]
    runtimes = {(r[0], r[1]) for r in rows}
    from fxshift.onnx import plugin_available

    expected = {"float", "functions"} | ({"plugin"} if plugin_available() else set())
    assert runtimes == {(b, r) for b in ("1", "2") for r in expected}
    assert any(r[1] == "float" and r[3] == "1.00x" for r in rows)


def test_parse_pass_values():
    p = cli.parse_pass("shift:mode=ps,weight_bits=4,activation_bits=(8,8)")
    assert (p.mode, p.weight_bits, tuple(p.activation_bits)) == ("ps", 4, (8, 8))
    t = cli.parse_pass("tucker:rank=vbmf,include=layer1.*")
    assert t.rank == "vbmf" if hasattr(t, "rank") else True
    assert type(cli.parse_pass("recompose")).__name__ == "RecomposePass"


@pytest.mark.parametrize("argv, message", [
    (["compress", "nomodel"], "MODEL must be torchvision:NAME or module:factory"),
    (["compress", "torchvision:resnet999"], "torchvision.models has no model 'resnet999'"),
    (["compress", "missing_module_xyz:build"], "cannot import module 'missing_module_xyz'"),
    (["compress", "tinynet:not_a_model"], "has no callable 'not_a_model'"),
    (["compress", "tinynet:build", "--pass", "prune:amount=0.5"], "unknown pass 'prune'"),
    (["compress", "tinynet:build", "--pass", "shift:weight_bitz=5"], "has no option 'weight_bitz'"),
    (["compress", "tinynet:build", "--pass", "shift:weight_bits=99"], "weight_bits"),
    (["compress", "tinynet:build", "--pass", "shift:5"], "expected key=value"),
    (["compress", "tinynet:build", "--input-shape", "1,3,a"], "--input-shape"),
    (["inspect", "does_not_exist.onnx"], "no such file"),
    (["bench", "does_not_exist.onnx"], "no such file"),
])
def test_errors_are_one_line(factory_module, capsys, argv, message):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    errors = [line for line in err if "error:" in line]  # progress lines may come before it
    assert errors == [err[-1]] and err[-1].startswith(f"fxshift {argv[0]}: error: ") and message in err[-1], err
    assert "Traceback" not in "\n".join(err)


def test_not_an_onnx_file(factory_module, capsys):
    (factory_module / "junk.onnx").write_bytes(b"\x00\x01 not protobuf \xff" * 10)
    assert cli.main(["inspect", "junk.onnx"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an ONNX model" in err[0]


def test_console_entry_point_runs(factory_module):
    """`python -m fxshift.cli` (what the `fxshift` console script calls): usage, exit codes."""
    import os
    from pathlib import Path

    import fxshift

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(fxshift.__file__).parent.parent),
                                                       os.environ.get("PYTHONPATH", "")]))
    ok = subprocess.run([sys.executable, "-m", "fxshift.cli", "--help"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "compress" in ok.stdout and "bench" in ok.stdout and "inspect" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "fxshift.cli", "inspect", "nope.onnx"], capture_output=True, text=True,
                         env=env)
    assert bad.returncode == 1 and bad.stderr.strip() == "fxshift inspect: error: nope.onnx: no such file"


def test_inspect_survives_malformed_shift_nodes(tmp_path):
    """A shift node without weight_shape or with an invalid bits attribute is listed, its packed size None."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("ShiftConv2d", ["x", "w", "b"], ["y"], domain="fxshift", name="conv_no_shape", bits=5),
             helper.make_node("ShiftLinear", ["y", "w", "b"], ["z"], domain="fxshift", name="fc_bad_bits", bits=12,
                              in_features=4, out_features=3)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3])])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("fxshift", 1)]),
              str(path))
    info = cli.inspect_model(str(path))
    by_name = {n["name"]: n for n in info["shift_nodes"]}
    assert by_name["conv_no_shape"]["weights"] == 0 and by_name["conv_no_shape"]["packed_bytes"] == 0
    assert by_name["fc_bad_bits"]["packed_bytes"] is None
    assert cli.main(["inspect", str(path)]) == 0
