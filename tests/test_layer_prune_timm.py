"""LayerPrunePass(blocks=1) on timm models (random init, small inputs): every model with identity
residuals yields candidates, each candidate's branch holds a weight layer, the removed block
takes its parameters with it and the output keeps its shape. Oracle for the candidates: timm's
own modules (a ConvNeXt/RegNet/ResNet/EfficientNet block has an identity residual when its
shortcut is nn.Identity / absent or its has_skip flag says so; every ViT/DeiT/Mixer/Swin layer
has two). Two models run in the quick suite, the rest are slow."""
import pytest
import torch
from torch import nn

import fxshift
from fxshift import LayerPrunePass
from fxshift.prune.blocks import find_blocks, node_shapes
from fxshift.trace import trace

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.usefixtures("one_thread")

# name -> (create_model kwargs, input size, expected residual candidates or None to skip the count)
MODELS = {
    "convnext_atto": ({}, 64, 12),                         # 2+2+6+2 blocks, all identity
    "vit_tiny_patch16_224": ({"img_size": 64}, 64, 24),   # 12 layers × (attention, MLP)
    "resnet18": ({}, 64, 5),
    "resnet50": ({}, 64, 12),
    "regnety_002": ({}, 64, None),
    "efficientnet_b0": ({}, 64, None),
    "mobilenetv3_large_100": ({}, 64, None),
    "resnetv2_50x1_bit": ({}, 64, 12),
    "deit_tiny_patch16_224": ({"img_size": 64}, 64, 24),
    "mixer_s16_224": ({"img_size": 64}, 64, 16),          # 8 layers × (token, channel mixing)
    "swin_tiny_patch4_window7_224": ({}, 224, 24),        # 2+2+6+2 layers × 2
}
FAST = ["convnext_atto", "vit_tiny_patch16_224"]
SLOW = [m for m in MODELS if m not in FAST]


def _has_skip(module: nn.Module) -> bool:
    """timm's own flag for an identity residual in its CNN blocks."""
    if hasattr(module, "has_skip"):
        return bool(module.has_skip)
    return False


def expected_skips(model: nn.Module) -> int:
    """Identity residual blocks of the timm CNN families with a has_skip flag (EfficientNet,
    MobileNetV3); RegNet blocks: shortcut is nn.Identity (no downsample) and stride 1."""
    count = 0
    for _, m in model.named_modules():
        kind = type(m).__name__
        if kind in ("DepthwiseSeparableConv", "InvertedResidual", "EdgeResidual", "CondConvResidual"):
            count += _has_skip(m)
        elif kind == "Bottleneck" and hasattr(m, "downsample") and "regnet" in type(model).__name__.lower():
            count += m.downsample is None or isinstance(m.downsample, nn.Identity)
    return count


def check(name: str) -> None:
    kwargs, size, expected = MODELS[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    gm = trace(model, (x,))
    blocks, rejected = find_blocks(gm, node_shapes(gm, (x,)))
    residual = [b for b in blocks if b.kind == "residual"]
    if expected is None:
        expected = expected_skips(model)
    assert len(residual) == expected, [(r.name, r.reason) for r in rejected]
    for b in residual:  # each branch holds a weight layer
        assert any(p.ndim >= 2 for m in b.modules for p in gm.get_submodule(m).parameters()), b.name
    out = fxshift.apply([LayerPrunePass(blocks=1)], model, x)
    rows = [r for r in fxshift.report(out).to_dicts() if r["action"] == "pruned"]
    assert len(rows) == 1 and rows[0]["params_before"] > 0
    with torch.no_grad():
        assert out(x).shape == model(x).shape == (1, 10)
    assert fxshift.parameter_count(model) - fxshift.parameter_count(out) == rows[0]["params_before"]


@pytest.mark.parametrize("name", FAST)
def test_timm_fast(name):
    check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_timm_slow(name):
    check(name)


def test_vit_influence_on_calibration_data():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, depth=3).eval()
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randn(2, 3, 32, 32, generator=g) for _ in range(2)]
    out = fxshift.apply([LayerPrunePass(blocks=2, criterion="influence", calibration=calibration)], model,
                        torch.randn(1, 3, 32, 32))
    rows = [r for r in fxshift.report(out).to_dicts() if r["action"] in ("pruned", "kept")]
    assert len(rows) == 6 and all(0.0 <= r["score"] <= 2.0 for r in rows)
    pruned = sorted(r["score"] for r in rows if r["action"] == "pruned")
    kept = sorted(r["score"] for r in rows if r["action"] == "kept")
    assert len(pruned) == 2 and pruned[-1] <= kept[0]


def test_vit_and_convnext_iterative_pruning_save_and_load(tmp_path):
    for name, kwargs in (("vit_tiny_patch16_224", {"img_size": 32, "depth": 3}), ("convnext_atto", {})):
        def build():
            torch.manual_seed(0)
            return timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()

        x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        gm = fxshift.apply([LayerPrunePass(blocks=1), LayerPrunePass(blocks=2)], build(), x)
        fxshift.save(gm, tmp_path / f"{name}.pt")
        loaded = fxshift.load(build(), tmp_path / f"{name}.pt", x)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), gm(x), atol=1e-5, rtol=1e-5)
        assert fxshift.parameter_count(loaded) == fxshift.parameter_count(gm) < fxshift.parameter_count(build())
