"""fxshift.freeze: packed shift layers equal the trained layers' eval outputs; the custom ops trace,
export and reject wrong packed sizes and shapes with exceptions."""
import copy
import math

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import fxshift
from fxshift import FreezePass, ShiftQuantizePass
from fxshift.errors import FxshiftError
from fxshift.nn import FrozenShiftConv2d, FrozenShiftLinear, ShiftConv2d, ShiftLinear, TuckerConv2d
from fxshift.ops import shift_ops  # noqa: F401  (registers torch.ops.fxshift.*)

RTOL, ATOL = 1e-5, 1e-5  # float summation order only: the packed weights are exactly the trained ones


def _native_or_skip():
    try:
        from fxshift.ops import native, packing  # noqa: F401
        x = torch.ones(1, 1)
        words = packing.pack(torch.ones(1, 1, dtype=torch.int8), torch.zeros(1, 1, dtype=torch.uint8), 5, 0)
        native.shift_linear(x, words, 1, 5, 0, None)
    except (ImportError, OSError, FxshiftError) as exc:
        pytest.skip(f"native shift kernels not available (build with cmake -S . -B build/dev): {exc}")


@pytest.fixture(autouse=True)
def native_available():
    _native_or_skip()


def _close(a, b):
    scale = max(1.0, b.abs().max().item())
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL * scale)


CONVS = [  # in, out, kernel, stride, padding, dilation, groups, bias, padding_mode
    (3, 8, 3, 1, 1, 1, 1, True, "zeros"),
    (8, 16, 3, 2, 1, 1, 1, False, "zeros"),
    (8, 8, 3, 1, 2, 2, 4, True, "zeros"),
    (12, 12, 5, 2, 2, 1, 12, True, "zeros"),  # depthwise
    (6, 10, (3, 1), (1, 2), (1, 0), (2, 1), 2, True, "zeros"),
    (16, 7, 1, 1, 0, 1, 1, True, "zeros"),
    (5, 4, (2, 4), 1, "same", 1, 1, True, "zeros"),  # asymmetric padding
    (4, 6, 3, 1, 1, 1, 2, True, "reflect"),
    (4, 4, 3, 2, "valid", 1, 1, False, "zeros"),
]


MODES = [("q", 5, None), ("ps", 5, None), ("q", 3, (16, 16)), ("ps", 8, (8, 8)), ("q", 8, None), ("ps", 2, None),
         ("q", 2, (3, 5))]
CASES = [(cfg, mode) for cfg in CONVS for mode in MODES[:2]] + [(CONVS[2], mode) for mode in MODES[2:]]


@pytest.mark.parametrize("cfg,mode_wb_act", CASES, ids=[f"conv{CONVS.index(c)}-{m[0]}{m[1]}" for c, m in CASES])
def test_frozen_conv_equals_eval(cfg, mode_wb_act):
    mode, wb, act = mode_wb_act
    cin, cout, k, s, p, d, g, bias, pm = cfg
    torch.manual_seed(cin * 100 + cout + wb)
    conv = nn.Conv2d(cin, cout, k, s, p, d, g, bias, pm)
    layer = ShiftConv2d.from_conv(conv, mode=mode, weight_bits=wb, activation_bits=act).eval()
    frozen = fxshift.freeze(layer)
    assert isinstance(frozen, FrozenShiftConv2d)
    x = torch.randn(2, cin, 11, 10)
    with torch.no_grad():
        _close(frozen(x), layer(x))
    assert torch.equal(frozen.unpacked_weight(), layer.quantized_weight().detach())
    assert frozen.bits == wb and frozen.has_zero == (1 if mode == "ps" else 0)


@pytest.mark.parametrize("mode", ["q", "ps"])
@pytest.mark.parametrize("act", [None, (16, 16)])
def test_frozen_linear_equals_eval(mode, act):
    torch.manual_seed(7)
    lin = nn.Linear(37, 13)
    layer = ShiftLinear.from_linear(lin, mode=mode, activation_bits=act).eval()
    frozen = fxshift.freeze(layer)
    assert isinstance(frozen, FrozenShiftLinear)
    for shape in [(5, 37), (2, 3, 37), (37,)]:
        x = torch.randn(*shape) * 3
        with torch.no_grad():
            _close(frozen(x), layer(x))
    nobias = ShiftLinear.from_linear(nn.Linear(64, 9, bias=False), mode=mode).eval()
    x = torch.randn(4, 64)
    with torch.no_grad():
        _close(fxshift.freeze(nobias)(x), nobias(x))


def test_q_with_exact_zeros_packs_one_bit_wider():
    lin = nn.Linear(10, 4)
    with torch.no_grad():
        lin.weight[1, ::3] = 0.0
    layer = ShiftLinear.from_linear(lin, mode="q", weight_bits=5).eval()
    frozen = fxshift.freeze(layer)
    assert (frozen.bits, frozen.has_zero) == (6, 1)
    assert frozen.words.shape == (4, math.ceil(10 / 5))
    assert torch.equal(frozen.unpacked_weight(), layer.quantized_weight().detach())
    x = torch.randn(3, 10)
    with torch.no_grad():
        _close(frozen(x), layer(x))


def test_packed_sizes_about_five_bits():
    layer = ShiftLinear.from_linear(nn.Linear(600, 100), mode="q", weight_bits=5)
    frozen = fxshift.freeze(layer)
    assert frozen.words.dtype == torch.int32 and frozen.words.shape == (100, 100)  # 6 codes a word
    assert frozen.weight_bytes == 100 * 100 * 4  # 5.33 bits a weight
    assert frozen.weight_bytes * 8 / (600 * 100) < 5.4
    four = fxshift.freeze(ShiftLinear.from_linear(nn.Linear(64, 8), mode="q", weight_bits=4))
    assert four.words.shape == (8, 8)  # 8 codes a word: exactly 4 bits


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 16, 3, padding=2, dilation=2, groups=2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        x = torch.relu(self.c2(x))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("mode", ["q", "ps"])
def test_freeze_model_report_and_caller_untouched(mode):
    torch.manual_seed(8)
    x = torch.randn(2, 3, 12, 12)
    gm = fxshift.apply(ShiftQuantizePass(mode=mode, weight_bits=5), Net().eval(), x).eval()
    frozen = fxshift.freeze(gm)
    assert isinstance(frozen, fx.GraphModule) and frozen is not gm
    assert isinstance(gm.c1, ShiftConv2d) and isinstance(gm.fc, ShiftLinear)  # caller's model unchanged
    assert isinstance(frozen.c1, FrozenShiftConv2d) and isinstance(frozen.fc, FrozenShiftLinear)
    with torch.no_grad():
        _close(frozen(x), gm(x))
    rows = [r for r in fxshift.report(frozen).rows if r.pass_name == "FreezePass"]
    assert [r.layer for r in rows] == ["c1", "c2", "fc"]
    assert all(r.action == "frozen" and r.extra["bits"] == 5 for r in rows)
    assert not any(r.pass_name == "FreezePass" for r in fxshift.report(gm).rows)
    c2 = rows[1].extra
    assert c2["weight_bytes_before"] == 16 * 4 * 9 * 4 and c2["weight_bytes_after"] == 16 * math.ceil(36 / 6) * 4
    # as a pass in a pipeline
    piped = fxshift.apply([ShiftQuantizePass(mode=mode), FreezePass()], Net().eval(), x)
    assert isinstance(piped.c2, FrozenShiftConv2d)


def test_freeze_inside_tucker_chain_and_save_load(tmp_path):
    torch.manual_seed(9)
    x = torch.randn(1, 3, 12, 12)
    gm = fxshift.apply([fxshift.TuckerDecomposePass(rank=0.5), ShiftQuantizePass(mode="ps")], Net().eval(), x).eval()
    frozen = fxshift.freeze(gm)
    assert isinstance(frozen.c1, TuckerConv2d) and isinstance(frozen.c1.core, FrozenShiftConv2d)
    assert isinstance(frozen.c2, FrozenShiftConv2d)  # grouped: Tucker left it, the shift pass took it
    assert isinstance(frozen.fc.second, FrozenShiftLinear)
    with torch.no_grad():
        _close(frozen(x), gm(x))
    fxshift.save(frozen, tmp_path / "frozen.pt")
    loaded = fxshift.load(Net(), tmp_path / "frozen.pt").eval()
    assert isinstance(loaded.c1.core, FrozenShiftConv2d) and isinstance(loaded.fc.first, FrozenShiftLinear)
    assert torch.equal(loaded.c1.core.words, frozen.c1.core.words)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), frozen(x), rtol=0, atol=0)


def test_fx_trace_and_torch_export_of_frozen_model():
    torch.manual_seed(10)
    x = torch.randn(2, 3, 12, 12)
    gm = fxshift.apply(ShiftQuantizePass(mode="q", activation_bits=(16, 16)), Net().eval(), x).eval()
    frozen = fxshift.freeze(gm).eval()
    with torch.no_grad():
        expected = frozen(x)
    # torch.fx: symbolic tracing through the frozen layers records the custom ops
    plain = nn.Sequential(frozen.c1, nn.ReLU(), frozen.c2)
    traced = fx.symbolic_trace(plain)
    targets = {str(n.target) for n in traced.graph.nodes if n.op == "call_function"}
    assert any("fxshift.shift_conv2d" in t for t in targets), targets
    torch.testing.assert_close(traced(x), plain(x), rtol=0, atol=0)
    # torch.export: the fake implementations give the shapes
    exported = torch.export.export(frozen, (x,))
    names = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert any("fxshift.shift_conv2d" in t for t in names) and any("fxshift.shift_linear" in t for t in names)
    torch.testing.assert_close(exported.module()(x), expected, rtol=0, atol=0)


def test_fake_impl_shapes_on_meta():
    words = torch.zeros(8, math.ceil(3 * 9 / 6), dtype=torch.int32, device="meta")
    x = torch.empty(2, 3, 11, 10, device="meta")
    y = torch.ops.fxshift.shift_conv2d(x, words, [8, 3, 3, 3], [2, 1], [1, 0], [1, 2], 1, 5, False, None)
    assert y.shape == (2, 8, 6, 6) and y.device.type == "meta"
    lw = torch.zeros(4, 2, dtype=torch.int32, device="meta")
    y = torch.ops.fxshift.shift_linear(torch.empty(7, 3, 12, device="meta"), lw, 4, 5, False, None)
    assert y.shape == (7, 3, 4)


# ---------------------------------------------------------------------------------------------- bad input
def _packed_linear(o=4, k=12, bits=5):
    layer = fxshift.freeze(ShiftLinear.from_linear(nn.Linear(k, o), mode="q", weight_bits=bits))
    return layer.words, layer.bias


@pytest.mark.parametrize("case", ["rows", "row_words", "flat", "dtype", "bits", "bias_len", "bias_dtype", "in_dtype"])
def test_linear_op_rejects_bad_packed_input(case):
    words, bias = _packed_linear()
    x = torch.randn(3, 12)
    args = dict(x=x, words=words, out_features=4, bits=5, has_zero=False, bias=bias)
    if case == "rows":
        args["words"] = words[:3]
    elif case == "row_words":
        args["words"] = torch.cat([words, words[:, :1]], 1)
    elif case == "flat":
        args["words"] = words.flatten()
    elif case == "dtype":
        args["words"] = words.to(torch.int64)
    elif case == "bits":
        args["bits"] = 12
    elif case == "bias_len":
        args["bias"] = bias[:3]
    elif case == "bias_dtype":
        args["bias"] = bias.double()
    elif case == "in_dtype":
        args["x"] = x.double()
    with pytest.raises((ValueError, RuntimeError)):
        torch.ops.fxshift.shift_linear(args["x"], args["words"], args["out_features"], args["bits"],
                                       args["has_zero"], args["bias"])


def test_linear_op_rejects_wrong_in_features():
    words, bias = _packed_linear(k=12)
    with pytest.raises(ValueError, match="packed weights"):
        torch.ops.fxshift.shift_linear(torch.randn(3, 20), words, 4, 5, False, bias)


@pytest.mark.parametrize("case", ["channels", "words", "groups", "kernel_too_big", "ndim", "stride"])
def test_conv_op_rejects_bad_input(case):
    layer = fxshift.freeze(ShiftConv2d.from_conv(nn.Conv2d(4, 8, 3, groups=2), mode="ps"))
    x = torch.randn(1, 4, 6, 6)
    args = [x, layer.words, [8, 2, 3, 3], [1, 1], [0, 0], [1, 1], 2, layer.bits, True, layer.bias]
    if case == "channels":
        args[0] = torch.randn(1, 6, 6, 6)
    elif case == "words":
        args[1] = layer.words[:, :-1].contiguous()
    elif case == "groups":
        args[6] = 3
    elif case == "kernel_too_big":
        args[0] = torch.randn(1, 4, 2, 2)
    elif case == "ndim":
        args[0] = torch.randn(4, 6, 6)
    elif case == "stride":
        args[3] = [0, 1]
    with pytest.raises((ValueError, RuntimeError)):
        torch.ops.fxshift.shift_conv2d(*args)


def test_native_layer_rejects_wrong_word_count_directly():
    """Below the op's Python checks the native entry points still raise instead of crashing."""
    from fxshift.ops import native

    words, bias = _packed_linear()
    with pytest.raises(FxshiftError):
        native.shift_linear(torch.randn(3, 12), words[:2].contiguous(), 4, 5, 0, bias)
    with pytest.raises(FxshiftError):
        native.shift_conv2d(torch.randn(1, 4, 6, 6), torch.zeros(8, 1, dtype=torch.int32), (8, 2, 3, 3), (1, 1),
                            (0, 0), (1, 1), 2, 5, 1, None)


def test_frozen_load_with_wrong_word_shape_raises(tmp_path):
    gm = fxshift.apply(ShiftQuantizePass(mode="q"), Net().eval(), torch.randn(1, 3, 12, 12))
    frozen = fxshift.freeze(gm)
    fxshift.save(frozen, tmp_path / "f.pt")
    blob = torch.load(tmp_path / "f.pt", weights_only=True)
    blob["state_dict"]["c2.words"] = blob["state_dict"]["c2.words"][:, :-1].clone()
    torch.save(blob, tmp_path / "bad.pt")
    with pytest.raises(fxshift.RecipeError):
        fxshift.load(Net(), tmp_path / "bad.pt")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_frozen_on_cuda_matches_cpu():
    torch.manual_seed(11)
    x = torch.randn(2, 3, 12, 12)
    frozen = fxshift.freeze(fxshift.apply(ShiftQuantizePass(mode="ps"), Net().eval(), x)).eval()
    with torch.no_grad():
        cpu = frozen(x)
        gpu = copy.deepcopy(frozen).cuda()(x.cuda()).cpu()
    _close(gpu, cpu)


@pytest.mark.parametrize("mode", ["q", "ps"])
@pytest.mark.parametrize("wb", range(2, 9))
def test_frozen_equals_trained_at_the_smallest_shift(mode, wb):
    # Weights far below 2^p_min clamp to the smallest shift the mode trains; every decoder must
    # read that shift back (Q at 8 bits once trained 2^-127, which the packed format decodes to 0).
    layer = ShiftLinear(8, 3, mode=mode, weight_bits=wb).eval()
    with torch.no_grad():
        if mode == "q":
            layer.weight.copy_(torch.tensor([1e-39, -1e-39, 2.0 ** -127, 0.5, -0.25, 1e-3, -1e-6, 1.0]).repeat(3, 1))
        else:
            layer.shift.fill_(-200.0)
            layer.sign.fill_(1.0)
    trained = layer.quantized_weight().detach()
    p_min, _ = layer.shift_range
    assert trained[0, 0].item() == 2.0 ** p_min != 0.0
    frozen = fxshift.freeze(layer)
    assert torch.equal(frozen.unpacked_weight(), trained)
    x = torch.randn(4, 8)
    with torch.no_grad():
        _close(frozen(x), layer(x))
