"""Tracing: torchvision models, shape-reading forwards, leaves, and errors that name the culprit."""
import pytest
import torch
from torch import nn

import fxshift
from fxshift.errors import TraceError
from fxshift.trace import trace

from conftest import build_torchvision

MODELS = ["resnet18", "resnet50", "vgg16", "mobilenet_v2", "googlenet", "alexnet"]


@pytest.mark.parametrize("name", MODELS)
def test_torchvision_models_trace_and_keep_every_weight(name):
    model = build_torchvision(name)
    x = torch.randn(1, 3, 64, 64)
    gm = trace(model, (x,))
    assert set(gm.state_dict()) == set(model.state_dict())
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_unused_submodules_are_kept_so_state_dict_round_trips():
    import torchvision

    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False).eval()
    gm = trace(model, (torch.randn(1, 3, 64, 64),))  # eval mode never calls the auxiliary heads
    assert any(k.startswith("aux1.") for k in gm.state_dict())
    fresh = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    fresh.load_state_dict(gm.state_dict(), strict=True)


class ShapeChecked(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        if x.shape[1] != 3:
            raise ValueError("expected 3 channels")
        y = self.conv(x)
        return self.fc(y.reshape(x.shape[0], -1))


def test_shape_reading_forward_needs_and_uses_example_inputs():
    model = ShapeChecked().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(TraceError, match="example_inputs"):
        trace(model)
    gm = trace(model, (x,))
    torch.testing.assert_close(gm(x), model(x))
    gm = fxshift.apply([fxshift.TuckerDecomposePass(rank=1.0, only_if_cheaper=False)], model, x)
    assert isinstance(gm.conv, fxshift.nn.TuckerConv2d)


class ValueBranch(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return -x


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.block = nn.Sequential(nn.ReLU(), ValueBranch())

    def forward(self, x):
        return self.block(self.stem(x))


def test_untraceable_submodule_is_named_with_remedies():
    with pytest.raises(TraceError) as info:
        trace(Outer(), (torch.randn(1, 3, 4, 4),))
    message = str(info.value)
    assert "'block.1'" in message
    assert "control flow" in message
    assert "leaf_modules" in message and "concrete_args" in message


@pytest.mark.parametrize("leaf", [ValueBranch, "block.1"])
def test_leaf_modules_by_type_or_name_make_it_traceable(leaf):
    model = Outer().eval()
    x = torch.randn(1, 3, 4, 4)
    gm = trace(model, leaf_modules=[leaf])
    assert any(n.op == "call_module" and n.target == "block.1" for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), model(x))


class FlagBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x, double: bool = False):
        y = self.conv(x)
        if double:
            return y * 2
        return y


def test_concrete_args_pin_a_branch():
    model = FlagBranch().eval()
    x = torch.randn(1, 3, 4, 4)
    gm = fxshift.apply([], model, concrete_args={"double": True})
    torch.testing.assert_close(gm(x, True), model(x, True))


def test_bad_leaf_entry_is_rejected():
    with pytest.raises(TypeError, match="leaf_modules"):
        trace(Outer(), leaf_modules=[42])


def test_fxshift_reference_models_are_traced_through_not_kept_opaque():
    # fxshift.models.BasicBlock lives in the fxshift package but is a user-style module: its convs
    # must be visible to the passes (only fxshift.nn modules, which passes insert, stay opaque).
    from fxshift.models import SmallResNet

    gm = fxshift.apply([fxshift.TuckerDecomposePass(rank=0.5, linear=False)], SmallResNet((8, 16, 32), 1),
                       torch.randn(1, 1, 28, 28))
    decomposed = {row["layer"] for row in fxshift.report(gm).to_dicts() if row["action"] == "decomposed"}
    assert {"layer1.0.conv1", "layer2.0.conv2", "layer3.0.conv1"} <= decomposed
