"""LayerPrunePass on torchvision models (random init, 1×3×64×64 inputs): the blocks found match
what each architecture declares (an independent oracle from the modules' own flags), removal
keeps the output shape, and params/MACs fall by what the report says. The big models are slow."""
import pytest
import torch
from torch import nn

import fxshift
from fxshift import LayerPrunePass
from fxshift.prune.blocks import find_blocks, node_shapes
from fxshift.trace import trace

from conftest import build_torchvision

X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))

FAST = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "mnasnet0_5"]
SLOW = ["resnet34", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "regnet_x_400mf", "regnet_y_400mf",
        "mobilenet_v2", "mobilenet_v3_large", "vgg11_bn", "vgg16_bn"]


pytestmark = pytest.mark.usefixtures("one_thread")


def residual_units(model: nn.Module) -> list[str]:
    """The identity-shortcut residual units, from the flags torchvision's blocks carry."""
    names = []
    for name, m in model.named_modules():
        kind = type(m).__name__
        if getattr(m, "use_res_connect", False) or getattr(m, "apply_residual", False):
            names.append(name)
        elif kind in ("BasicBlock", "Bottleneck") and m.downsample is None:
            names.append(name)
        elif kind == "ResBottleneckBlock" and m.proj is None:
            names.append(name)
    return names


def shape_keeping_convs(model: nn.Module) -> list[str]:
    """VGG: every 3×3 conv with as many outputs as inputs (stride 1, padding 1)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == m.out_channels]


def check(name: str) -> None:
    model = build_torchvision(name)
    gm = trace(model, (X,))
    blocks, _ = find_blocks(gm, node_shapes(gm, (X,)))
    residual = [b.name for b in blocks if b.kind == "residual"]
    assert residual == residual_units(model)
    if name.startswith("vgg"):
        assert [b.modules[0] for b in blocks] == shape_keeping_convs(model)
    count = min(2, len(blocks))
    out = fxshift.apply([LayerPrunePass(blocks=count)], model, X)
    rows = [r for r in fxshift.report(out).to_dicts() if r["action"] == "pruned"]
    assert len(rows) == count and {r["layer"] for r in rows} <= {b.name for b in blocks}
    assert out(X).shape == model(X).shape
    assert fxshift.parameter_count(model) - fxshift.parameter_count(out) == sum(r["params_before"] for r in rows)
    assert fxshift.macs(model, X) - fxshift.macs(out, X) == sum(r["macs_before"] for r in rows)


@pytest.mark.parametrize("name", FAST)
def test_torchvision_fast(name):
    check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_torchvision_slow(name):
    check(name)


def test_densenet_has_no_candidates_and_says_why():
    model = build_torchvision("densenet121")
    gm = trace(model, (X,))
    blocks, rejected = find_blocks(gm, node_shapes(gm, (X,)))
    assert blocks == [] and rejected and all("concatenation" in r.reason for r in rejected)
