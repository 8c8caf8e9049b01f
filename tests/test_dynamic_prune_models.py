"""DynamicPrunePass on 22 torchvision and timm architectures (random init, 64×64): it gates, skip equals
mask, and the per-sample MACs drop (slow: about a minute on 2 shared cores)."""
import pytest
import torch
import torchvision

import fxshift
from fxshift import DynamicPrunePass
from fxshift.nn import set_gating
from fxshift.nn.gated import gated_units

TORCHVISION = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "squeezenet1_0",
               "shufflenet_v2_x0_5", "vgg11_bn", "convnext_tiny", "densenet121", "mnasnet0_5"]
TIMM = ["resnet18", "efficientnet_b0", "mobilenetv3_small_100", "regnety_002", "convnext_atto", "resnetv2_50",
        "ghostnet_100", "repvgg_a0", "dla34", "cspresnet50", "rexnet_100"]


def build(source: str, name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if source == "torchvision":
        return getattr(torchvision.models, name)(num_classes=10).eval()
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, num_classes=10).eval()


@pytest.mark.slow
@pytest.mark.parametrize("source, name", [("torchvision", n) for n in TORCHVISION] + [("timm", n) for n in TIMM])
def test_architecture_runs(source, name):
    model = build(source, name)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    gm = fxshift.apply(DynamicPrunePass(target="uniform", ratio=0.5), model, x[:1])
    units = gated_units(gm)
    assert units and not any(u.training for _, u in units)
    g = torch.Generator().manual_seed(0)
    for _, unit in units:
        unit.predictor.weight.data.normal_(0, 1, generator=g)
    with torch.no_grad():
        skip = gm(x)
        mask = set_gating(gm, "mask")(x)
    assert ((skip - mask).norm() / mask.norm()).item() < 1e-5
    assert (fxshift.dynamic_macs(gm, x) < 0.99 * fxshift.macs(model, x[:1])).all()
