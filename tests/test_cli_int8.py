"""`fxshift compress --quantize int8 --calibration FILE`, inspect and bench of int8 files (issue 21)."""

import numpy as np
import pytest
import torch

from fxshift import cli

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture
def tiny(factory_module):
    """The CLI tests' tinynet:build model module, and 40 calibration samples beside it."""
    np.save(factory_module / "cal.npy", np.random.default_rng(0).standard_normal((40, 3, 16, 16)).astype(np.float32))
    return factory_module


def test_compress_int8_inspect_bench(tiny, capsys):
    out = tiny / "m.onnx"
    code = cli.main(["compress", "tinynet:build", "--pass", "shift:weight_bits=4", "--export", str(out),
                     "--quantize", "int8", "--calibration", "cal.npy", "--input-shape", "1,3,16,16"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "int8 layers: 3 int8 exact" in captured.out and "40 calibration samples" in captured.err
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["fxshift.model"] == "tinynet:build" and "fxshift.int8" in meta

    assert cli.main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "int8 layer" in text and text.count("int8 exact") == 3 and "DequantizeLinear" in text

    assert cli.main(["bench", str(out), "--rounds", "1", "--threads", "1", "--int8"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line[:1].isdigit()]
    assert {" ".join(r[1:-5]) for r in rows} == {"float", "int8", "float int8"}, rows


def test_inspect_says_which_shift_nodes_are_int8_exact(tiny, capsys):
    try:
        from fxshift.ops import native
        native.load()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"native shift kernels not available: {exc}")
    for bits, exact in ((4, "3"), (5, None)):
        out = tiny / f"s{bits}.onnx"
        assert cli.main(["compress", "tinynet:build", "--pass", f"shift:weight_bits={bits}", "--export", str(out),
                         "--input-shape", "1,3,16,16"]) == 0
        capsys.readouterr()
        info = cli.inspect_model(str(out))
        flags = [n["int8_exact"] for n in info["shift_nodes"]]
        if exact:
            assert flags == [True] * 3
        else:
            assert all(isinstance(f, bool) for f in flags)
        assert cli.main(["inspect", str(out)]) == 0
        assert "int8-exact" in capsys.readouterr().out


def _bad_files(folder):
    (folder / "junk.npy").write_bytes(b"not numpy at all")
    np.save(folder / "shape.npy", np.zeros((4, 3, 8, 8), np.float32))
    np.save(folder / "ints.npy", np.zeros((4, 3, 16, 16), np.int64))
    torch.save({"x": torch.zeros(2, 3, 16, 16)}, folder / "dict.pt")
    (folder / "cal.txt").write_text("1 2 3")
    return [("missing.npy", "no such file"), ("cal.txt", "give a .npy file"), ("junk.npy", "cannot read it"),
            ("shape.npy", "does not hold samples of the input shape (3, 16, 16)"), ("ints.npy", "must be float"),
            ("dict.pt", "not an array of inputs")]


def test_bad_calibration_files_are_one_line_errors(tiny, capsys):
    for name, message in _bad_files(tiny):
        code = cli.main(["compress", "tinynet:build", "--export", "x.onnx", "--quantize", "int8", "--calibration",
                         name, "--input-shape", "1,3,16,16"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(err) == 1, err
        assert err[0].startswith(f"fxshift compress: error: --calibration {name}: ") and message in err[0], err
    for argv, message in ((["--quantize", "int8"], "needs --calibration"),
                          (["--calibration", "cal.npy"], "used with --quantize int8")):
        assert cli.main(["compress", "tinynet:build", "--export", "x.onnx", *argv]) == 1
        assert message in capsys.readouterr().err
