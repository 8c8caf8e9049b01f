"""Capture (torch.fx / torch.export), canonicalization of weight ops and their report rows."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxshift
from fxshift.capture.sites import weight_sites
from fxshift.errors import TraceError
from fxshift.onnx.failure import export_failure

pytestmark = pytest.mark.usefixtures("one_thread")


class SameConv(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0)


def issue_model():
    torch.manual_seed(0)
    return nn.Sequential(SameConv(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(),
                         nn.Linear(2048, 10)).eval()


def rows_of(gm, pass_name):
    return {r.layer: r for r in fxshift.report(gm).rows if r.pass_name == pass_name}


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_subclass_with_own_forward_becomes_pad_and_standard_conv(capture):
    model, x = issue_model(), torch.randn(1, 3, 16, 16)
    gm = fxshift.apply([], model, x, capture=capture)
    assert fxshift.report(gm).capture == capture == fxshift.capture_info(gm)["method"]
    assert type(gm.get_submodule("0")) is nn.Conv2d and gm.get_submodule("0").padding == (0, 0)
    for batch in (1, 8):
        xb = torch.randn(batch, 3, 16, 16)
        torch.testing.assert_close(gm(xb), model(xb), rtol=1e-6, atol=1e-6)
    shifted = fxshift.apply([fxshift.ShiftQuantizePass(progress=False)], model, x, capture=capture)
    rows = rows_of(shifted, "ShiftQuantizePass")
    assert set(rows) == {"0", "2", "4"} and all(r.action == "shifted" for r in rows.values())
    assert dict(model.named_modules())["0"].forward.__func__ is SameConv.forward  # the user's model is unchanged


def test_leaf_subclass_with_own_forward_is_skipped_not_replaced():
    model, x = issue_model(), torch.randn(1, 3, 16, 16)
    gm = fxshift.apply([fxshift.ShiftQuantizePass(progress=False)], model, x, capture="fx", leaf_modules=[SameConv])
    row = rows_of(gm, "ShiftQuantizePass")["0"]
    assert row.action == "skipped" and "own forward" in row.reason and "leaf_modules" in row.reason
    assert type(gm.get_submodule("0")) is SameConv


class Shared(nn.Module):
    """One conv registered under two names and called at two call sites."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = self.a

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_module_called_at_two_sites_is_converted_at_both(capture):
    model, x = Shared().eval(), torch.randn(2, 4, 8, 8)
    gm = fxshift.apply([fxshift.ShiftQuantizePass(progress=False)], model, x, capture=capture)
    rows = rows_of(gm, "ShiftQuantizePass")
    assert len(rows) == 1
    (row,) = rows.values()
    assert row.action == "shifted" and row.extra["call_sites"] == 2
    called = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module" and n.target != "_guards_fn"]
    assert len(called) == 2 and all(isinstance(m, fxshift.nn.ShiftConv2d) for m in called)


def test_weight_standardisation_is_folded_in_eval_and_reported_in_training():
    from timm.layers import ScaledStdConv2d, StdConv2d

    torch.manual_seed(0)
    model = nn.Sequential(StdConv2d(3, 8, 3, padding=1), nn.ReLU(), ScaledStdConv2d(8, 8, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    gm = fxshift.apply([fxshift.TuckerDecomposePass(rank=1.0, only_if_cheaper=False)], model, x)
    assert "folded" in fxshift.capture_info(gm)["layers"]["0"]
    assert {r.action for r in rows_of(gm, "TuckerDecomposePass").values()} == {"decomposed"}
    with torch.no_grad():
        assert float((gm(x) - model(x)).norm() / model(x).norm()) < 1e-5
    training = fxshift.apply([fxshift.TuckerDecomposePass(rank=0.5)], model.train(), x, capture="fx")
    rows = rows_of(training, "TuckerDecomposePass")
    assert rows["0"].action == "skipped" and "computed from parameters" in rows["0"].reason


def wrapped_attention(x, qkv_weight, proj_weight):
    """Stands for torchvision's shifted_window_attention: a function torch.fx keeps opaque, taking weights."""
    q, k, v = F.linear(x, qkv_weight).chunk(3, dim=-1)
    return F.linear(torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v, proj_weight)


torch.fx.wrap("wrapped_attention")


class WrappedAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24, bias=False)
        self.proj = nn.Linear(8, 8, bias=False)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x.shape[0] * 0 + wrapped_attention(x, self.qkv.weight, self.proj.weight))


def test_weights_passed_to_an_fx_wrapped_function_are_reported_or_traced_by_export():
    model, x = WrappedAttention().eval(), torch.randn(2, 5, 8)
    fx_only = fxshift.apply([fxshift.ShiftQuantizePass(progress=False)], model, x, capture="fx")
    rows = rows_of(fx_only, "ShiftQuantizePass")
    assert set(rows) == {"qkv", "proj", "fc"} and rows["fc"].action == "shifted"
    for name in ("qkv", "proj"):
        assert rows[name].action == "skipped" and "wrapped_attention" in rows[name].reason
        assert "capture='export'" in rows[name].reason
    auto = fxshift.apply([fxshift.ShiftQuantizePass(progress=False)], model, x)
    assert fxshift.capture_info(auto)["method"] == "export"
    rows = rows_of(auto, "ShiftQuantizePass")
    assert set(rows) == {"qkv", "proj", "fc"} and {r.action for r in rows.values()} == {"shifted"}
    with torch.no_grad():
        torch.testing.assert_close(fxshift.apply([], model, x)(x), model(x), rtol=1e-6, atol=1e-6)


class MaskedBias(nn.Module):
    """Swin V2's qkv bias: cloned, then its middle third (the keys) zeroed in place before the linear."""

    def __init__(self, late=False):
        super().__init__()
        self.qkv = nn.Linear(6, 6)
        self.late = late

    def forward(self, x):
        bias = self.qkv.bias.clone()
        if not self.late:
            bias[2:4].zero_()
        y = F.linear(x, self.qkv.weight, bias)
        if self.late:
            bias[2:4].zero_()  # after the op read it: not part of the weight the op saw
        return y


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_bias_changed_in_place_before_the_op_is_folded_with_the_change(capture):
    model, x = MaskedBias().eval(), torch.randn(3, 6)
    gm = fxshift.apply([], model, x, capture=capture)
    assert type(gm.get_submodule("qkv")) is nn.Linear and "folded" in fxshift.capture_info(gm)["layers"]["qkv"]
    assert torch.equal(gm.get_submodule("qkv").bias[2:4], torch.zeros(2))
    torch.testing.assert_close(gm(x), model(x), rtol=1e-6, atol=1e-6)
    late = fxshift.apply([fxshift.ShiftQuantizePass(progress=False)], MaskedBias(late=True).eval(), x, capture=capture)
    row = rows_of(late, "ShiftQuantizePass")["qkv"]
    assert row.action == "skipped" and "changed in place after" in row.reason


class Mixed(nn.Module):
    """Weight ops fxshift has no layer for: a functional conv1d and a leaf MultiheadAttention."""

    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.randn(4, 4, 3))
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = F.conv1d(x, self.k, padding=1).transpose(1, 2)
        return self.fc(self.attn(y, y, y, need_weights=False)[0])


def test_every_weight_op_gets_a_row_with_a_reason():
    model, x = Mixed().eval(), torch.randn(2, 4, 6)
    gm = fxshift.apply([fxshift.TuckerDecomposePass(rank=1.0, only_if_cheaper=False)], model, x, capture="fx")
    rows = rows_of(gm, "TuckerDecomposePass")
    assert rows["k"].action == "skipped" and "conv1d" in rows["k"].reason
    assert "leaf module 'attn'" in rows["attn.in_proj"].reason
    assert rows["attn.out_proj"].action == "skipped" and rows["fc"].action == "decomposed"
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


class TorchAttention(nn.Module):
    """torch's own attention modules: torch.fx keeps them as leaves, their weights out of sight."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.enc(self.attn(x, x, x, need_weights=False)[0]))


ATTENTION_LAYERS = ["attn.in_proj", "attn.out_proj", "enc.self_attn.in_proj", "enc.self_attn.out_proj",
                    "enc.linear1", "enc.linear2", "fc"]


def test_torch_attention_modules_are_traced_by_export_and_packed_weights_become_layers(tmp_path):
    torch.manual_seed(0)
    model, x = TorchAttention().eval(), torch.randn(2, 5, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = fxshift.apply([], model, x)
    assert fxshift.capture_info(gm)["method"] == "export"
    in_proj = gm.get_submodule("attn.in_proj")
    assert type(in_proj) is nn.Linear and torch.equal(in_proj.weight, model.attn.in_proj_weight)
    params = dict(gm.named_parameters())
    assert {"attn.in_proj.weight", "attn.in_proj.bias"} <= set(params)
    assert not {"attn.in_proj_weight", "attn.in_proj_bias"} & set(params)  # moved, not copied
    assert set(gm.state_dict()) == set(model.state_dict())  # checkpoints keep the model's own keys
    for batch in (1, 3):
        xb = torch.randn(batch, 5, 8)
        torch.testing.assert_close(gm(xb), model(xb), rtol=1e-6, atol=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the user's model untouched

    # decomposed, then recomposed: the weights load into a fresh instance of the original model
    recomposed = fxshift.apply([fxshift.TuckerDecomposePass(rank=1.0, only_if_cheaper=False), fxshift.RecomposePass()],
                               model, x)
    original = TorchAttention().eval()
    original.load_state_dict(recomposed.state_dict())
    torch.testing.assert_close(original(x), model(x), rtol=1e-4, atol=1e-5)
    recomposed.load_state_dict(model.state_dict())
    torch.testing.assert_close(recomposed(x), model(x), rtol=1e-6, atol=1e-6)

    shifted = fxshift.apply([fxshift.ShiftQuantizePass(progress=False)], model, x)
    rows = rows_of(shifted, "ShiftQuantizePass")
    assert sorted(rows) == sorted(ATTENTION_LAYERS) and all(r.action == "shifted" for r in rows.values()), rows
    fxshift.save(shifted, tmp_path / "m.pt")
    loaded = fxshift.load(TorchAttention().eval(), tmp_path / "m.pt", x)
    torch.testing.assert_close(loaded(x), shifted(x), rtol=0, atol=0)
    import onnxruntime as ort
    path = fxshift.export_onnx(shifted, (x,), tmp_path / "m.onnx", target="portable")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), shifted(x).detach(), rtol=1e-4, atol=1e-5)


class CrossAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x[:, :1], x, x, need_weights=False)[0]


def test_cross_attention_packed_weight_read_in_slices_is_a_row_with_its_reason():
    model, x = CrossAttention().eval(), torch.randn(2, 5, 8)
    gm = fxshift.apply([fxshift.ShiftQuantizePass(progress=False)], model, x)
    rows = rows_of(gm, "ShiftQuantizePass")
    assert rows["attn.out_proj"].action == "shifted"
    assert rows["attn.in_proj"].action == "skipped" and "slices of one packed weight" in rows["attn.in_proj"].reason
    torch.testing.assert_close(fxshift.apply([], model, x)(x), model(x), rtol=1e-6, atol=1e-6)


def test_attention_modules_the_user_keeps_as_leaves_stay_fx_with_rows():
    model, x = TorchAttention().eval(), torch.randn(2, 5, 8)
    gm = fxshift.apply([fxshift.ShiftQuantizePass(progress=False)], model, x,
                       leaf_modules=[nn.MultiheadAttention, nn.TransformerEncoderLayer])
    assert fxshift.capture_info(gm)["method"] == "fx"
    rows = rows_of(gm, "ShiftQuantizePass")
    assert rows["fc"].action == "shifted"
    assert "leaf module 'attn'" in rows["attn.in_proj"].reason and rows["enc.linear1"].action == "skipped"


def test_keyword_inputs_and_model_outputs_for_transformers():
    from coverage_checks import bert

    model = bert()
    ids = torch.randint(0, 96, (1, 8))
    gm = fxshift.apply([fxshift.ShiftQuantizePass(progress=False)], model, {"input_ids": ids})
    assert fxshift.report(gm).capture == "export"
    rows = rows_of(gm, "ShiftQuantizePass")
    assert len(rows) == 13 and "encoder.layer.0.attention.self.query" in rows
    assert all(r.action == "shifted" for r in rows.values())
    ids8 = torch.randint(0, 96, (8, 8))
    out = gm(input_ids=ids8)
    assert type(out).__name__ == "BaseModelOutputWithPoolingAndCrossAttentions"
    assert out.last_hidden_state.shape == (8, 8, 32)
    torch.testing.assert_close(gm(ids8).last_hidden_state, out.last_hidden_state)


def test_gpt2_conv1d_addmm_layers_and_tied_head():
    from coverage_checks import gpt2

    model, ids = gpt2(), torch.randint(0, 96, (1, 8))
    gm = fxshift.apply([fxshift.TuckerDecomposePass(rank=1.0, only_if_cheaper=False)], model, (ids,))
    rows = rows_of(gm, "TuckerDecomposePass")
    assert rows["transformer.h.0.attn.c_attn"].action == "decomposed"
    assert rows["lm_head"].action == "skipped" and "tied" in rows["lm_head"].reason
    ids8 = torch.randint(0, 96, (8, 8))
    ref = model(ids8).logits
    assert float((gm(ids8).logits - ref).norm() / ref.norm()) < 1e-5


def test_exported_program_and_graph_module_are_accepted():
    model, x = issue_model(), torch.randn(2, 3, 16, 16)
    program = torch.export.export(model, (x,))
    gm = fxshift.apply([fxshift.ShiftQuantizePass(progress=False)], program, (x,))
    assert {r.action for r in rows_of(gm, "ShiftQuantizePass").values()} == {"shifted"}
    traced = torch.fx.symbolic_trace(model)
    gm = fxshift.apply([fxshift.ShiftQuantizePass(progress=False)], traced, (x,))
    assert set(rows_of(gm, "ShiftQuantizePass")) == {"0", "2", "4"}


class ShapeReader(nn.Module):
    """Reads x.shape (torch.fx cannot trace it): the batch must stay symbolic."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        if x.shape[1] != 3:
            raise ValueError("3 channels")
        y = self.bn(self.conv(x))
        return self.fc(y.reshape(y.shape[0], -1))


def test_shape_reading_model_keeps_a_symbolic_batch():
    model = ShapeReader().eval()
    gm = fxshift.apply([], model, torch.randn(1, 3, 4, 4))
    assert fxshift.report(gm).capture == "export"
    assert isinstance(gm.get_submodule("bn"), nn.BatchNorm2d)  # gm.train()/eval() still switch it
    x8 = torch.randn(8, 3, 4, 4)
    assert gm(x8).shape == (8, 5)
    torch.testing.assert_close(gm(x8), model(x8))


class FixedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(x.reshape(1, 16))


def test_a_forward_fixing_the_batch_fails_loudly_under_export():
    with pytest.raises(TraceError) as info:
        fxshift.apply([], FixedBatch(), torch.randn(1, 16), capture="export")
    message = str(info.value)
    assert "torch.export" in message and "capture='fx'" in message and "\x1b" not in message


class ValueBranch(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else -x


def test_capture_errors_name_what_was_tried_and_what_to_do():
    with pytest.raises(TraceError, match="tried torch.fx and torch.export"):
        fxshift.trace(ValueBranch(), (torch.randn(2, 3),))
    with pytest.raises(TraceError, match="capture='export'"):
        fxshift.trace(ValueBranch(), (torch.randn(2, 3),), capture="fx")
    with pytest.raises(fxshift.ConfigError, match="capture="):
        fxshift.trace(ValueBranch(), capture="jit")


def test_export_failure_message_has_the_cause_without_escape_codes_and_the_option():
    try:
        try:
            raise RuntimeError("\x1b[31mConstraints violated (batch)!\x1b[0m the symbolic batch was specialized")
        except RuntimeError as inner:
            raise ValueError("\x1b[1mfailed to export\x1b[0m") from inner
    except ValueError as exc:
        message = export_failure(exc, dynamic_batch=True)
    assert "\x1b" not in message and "Constraints violated (batch)" in message and "dynamic_batch=False" in message


def test_weight_sites_of_a_plain_model_are_its_layers():
    gm = fxshift.trace(issue_model(), (torch.randn(1, 3, 16, 16),), capture="fx")
    assert [(s.name, s.reason) for s in weight_sites(gm)] == [("0", None), ("2", None), ("4", None)]


class KeywordAddmm(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(torch.randn(6, 4))  # Conv1D layout: (in, out)
        self.proj.bias = nn.Parameter(torch.randn(4))
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        y = torch.addmm(input=self.proj.bias, mat1=x, mat2=self.proj.weight)
        return y @ self.w


def test_addmm_by_keyword_becomes_a_linear_and_a_bare_parameter_is_reported():
    model, x = KeywordAddmm().eval(), torch.randn(3, 6)
    gm = fxshift.apply([fxshift.TuckerDecomposePass(rank=1.0, only_if_cheaper=False)], model, x, capture="fx")
    rows = rows_of(gm, "TuckerDecomposePass")
    assert rows["proj"].action == "decomposed"
    assert rows["w"].action == "skipped" and "not a layer's 'weight'" in rows["w"].reason
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
