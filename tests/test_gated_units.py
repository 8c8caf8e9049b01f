"""Mask targets, the gated unit (skip == mask, decoupled gradients) and mask_loss, without any pass."""
import pytest
import torch
from torch import nn

from fxshift import ConfigError
from fxshift.nn.gated import GatedConv2d, scatter_channels, select_filters, set_gating
from fxshift.nn.mask_targets import check_target, mass_targets, uniform_targets
from fxshift.train import mask_loss


def act(*peaks):
    """(1, C, 2, 2) activations whose per-channel spatial max |·| are the given peaks."""
    x = torch.zeros(1, len(peaks), 2, 2)
    for c, p in enumerate(peaks):
        x[0, c, 1, 0] = -p if c % 2 else p     # sign must not matter
        x[0, c, 0, 1] = p / 4
    return x


def test_mass_targets_hand_made():
    # p = 0.4, 0.3, 0.2, 0.1 (channel order shuffled below): 0.9 needs the top three
    x = act(2.0, 4.0, 1.0, 3.0)
    assert mass_targets(x, 0.9).tolist() == [[1.0, 1.0, 0.0, 1.0]]
    assert mass_targets(x, 0.7).tolist() == [[0.0, 1.0, 0.0, 1.0]]       # 0.4 + 0.3 reaches 0.7
    assert mass_targets(x, 0.71).tolist() == [[1.0, 1.0, 0.0, 1.0]]
    assert mass_targets(x, 0.4).tolist() == [[0.0, 1.0, 0.0, 0.0]]
    assert mass_targets(x, 1.0).tolist() == [[1.0, 1.0, 1.0, 1.0]]
    # a zero filter is never kept; an all-zero sample keeps nothing; samples are independent
    both = torch.cat([act(1.0, 0.0, 1.0), act(0.0, 0.0, 0.0)])
    assert mass_targets(both, 1.0).tolist() == [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]


def test_uniform_targets_hand_made():
    x = torch.cat([act(2.0, 4.0, 1.0, 3.0), act(5.0, 1.0, 2.0, 0.5)])
    assert uniform_targets(x, 0.5).tolist() == [[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0]]
    assert uniform_targets(x, 0.25).tolist() == [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    assert uniform_targets(x, 0.01).sum(1).tolist() == [1.0, 1.0]          # at least one


@pytest.mark.parametrize("kwargs, match", [
    (dict(target="mass", threshold=0.0), r"threshold must be .*\(0, 1\]"),
    (dict(target="mass", threshold=1.5), r"threshold must be"),
    (dict(target="uniform", ratio=1.0), r"ratio must be .*\(0, 1\)"),
    (dict(target="uniform", ratio=0.0), r"ratio must be"),
    (dict(target="uniform", threshold=0.9), r"threshold=0.9 belongs to target='mass'"),
    (dict(target="mass", ratio=0.5), r"ratio=0.5 belongs to target='uniform'"),
    (dict(target="topk"), r"unknown target 'topk'"),
])
def test_bad_target_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        check_target(kwargs.pop("target"), kwargs.get("threshold"), kwargs.get("ratio"))


def test_defaults():
    assert check_target("mass", None, None) == ("mass", 0.9, None)
    assert check_target("uniform", None, None) == ("uniform", None, 0.5)


def test_select_filters_keeps_at_least_one():
    logits = torch.tensor([[-1.0, 2.0, 0.5], [-3.0, -1.0, -2.0]])
    assert select_filters(logits).tolist() == [[False, True, True], [False, True, False]]


def two_units(seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    c1, c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 24, 3, padding=1, stride=2)
    b1, b2 = nn.BatchNorm2d(16), nn.BatchNorm2d(24)
    for bn in (b1, b2):
        bn.running_mean.uniform_(-0.5, 0.5, generator=g)
        bn.running_var.uniform_(0.5, 2.0, generator=g)
        bn.weight.data.uniform_(0.5, 1.5, generator=g)
        bn.bias.data.uniform_(-0.2, 0.2, generator=g)
    u1, u2 = GatedConv2d(c1, b1, nn.ReLU(), **kw), GatedConv2d(c2, b2, nn.ReLU(), **kw)
    for u in (u1, u2):   # predictors that switch some filters off
        u.predictor.weight.data.normal_(0, 1, generator=g)
        u.predictor.bias.data.normal_(0, 0.5, generator=g)
    return u1, u2


def run(u1, u2, x):
    y, idx = u1(x)
    z, idx2 = u2(y, idx)
    return scatter_channels(z, idx2, u2.out_channels), idx, idx2


@pytest.mark.parametrize("batch", [1, 3])
def test_skip_equals_mask(batch):
    u1, u2 = two_units()
    u1.eval(), u2.eval()
    x = torch.randn(batch, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    skip, idx1, idx2 = run(u1, u2, x)
    for u in (u1, u2):
        u.gating = "mask"
    mask, none1, none2 = run(u1, u2, x)
    assert none1 is None and none2 is None
    assert idx1 is not None and 0 < len(idx1) < 16 and 0 < len(idx2) < 24    # something was really skipped
    assert ((skip - mask).norm() / mask.norm()).item() < 1e-5


def test_skip_equals_mask_when_no_logit_passes():
    """Batch 1 with every logit negative: skip keeps the top filter only (the select_filters rule), as mask does."""
    u1, u2 = two_units()
    with torch.no_grad():
        u2.predictor.bias.sub_(100.0)           # no filter of u2 reaches logit > 0 for this input
    u1.eval(), u2.eval()
    x = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    skip, _, idx2 = run(u1, u2, x)
    assert len(idx2) == 1
    for u in (u1, u2):
        u.gating = "mask"
    mask, _, _ = run(u1, u2, x)
    assert (mask[0].flatten(1).abs().sum(1) > 0).sum() <= 1
    assert ((skip - mask).norm() / mask.norm().clamp_min(1e-12)).item() < 1e-5


def test_decoupled_mask_loss_reaches_only_predictors():
    for decoupled in (True, False):
        u1, u2 = two_units(decoupled=decoupled)
        holder = nn.ModuleList([u1, u2]).train()
        run(u1, u2, torch.randn(2, 3, 12, 12))
        mask_loss(holder).backward()
        assert u2.predictor.weight.grad.abs().sum() > 0 and u1.predictor.weight.grad.abs().sum() > 0
        assert u2.conv.weight.grad is None and u2.bn.weight.grad is None   # own conv: never
        if decoupled:
            assert u1.conv.weight.grad is None and u1.bn.weight.grad is None
        else:                            # u2's predictor reads u1's output
            assert u1.conv.weight.grad.abs().sum() > 0


def test_train_forward_is_dense_and_loss_is_bce():
    import copy
    u1, _ = two_units()
    reference = nn.Sequential(copy.deepcopy(u1.conv), copy.deepcopy(u1.bn), nn.ReLU()).train()
    u1.train()
    x = torch.randn(2, 3, 12, 12)
    y, idx = u1(x)
    assert idx is None
    assert torch.allclose(y, reference(x), atol=1e-6)         # dense: nothing masked in training
    targets = mass_targets(y, 0.9)
    assert 0 < targets.sum() < targets.numel()
    ref = nn.functional.binary_cross_entropy_with_logits(u1.logits(x), targets)
    assert abs(u1.last_loss.item() - ref.item()) < 1e-6


def test_mask_loss_errors():
    with pytest.raises(ConfigError, match="no gated units"):
        mask_loss(nn.Sequential(nn.Conv2d(3, 4, 1)))
    u1, u2 = two_units()
    holder = nn.ModuleList([u1, u2])
    with pytest.raises(ConfigError, match="training-mode forward"):
        mask_loss(holder)
    holder.train()
    run(u1, u2, torch.randn(1, 3, 8, 8))
    assert mask_loss(holder).requires_grad
    holder.eval()
    run(u1, u2, torch.randn(1, 3, 8, 8))
    with pytest.raises(ConfigError, match="training-mode forward"):
        mask_loss(holder)


def test_set_gating_errors():
    with pytest.raises(ConfigError, match="no gated units"):
        set_gating(nn.Sequential(nn.Conv2d(3, 4, 1)), "skip")
    holder = nn.ModuleList(two_units())
    with pytest.raises(ConfigError, match="'skip' or 'mask'"):
        set_gating(holder, "dense")
    assert set_gating(holder, "mask") is holder and all(u.gating == "mask" for u in holder)


def test_unit_rejects_grouped_conv():
    with pytest.raises(ConfigError, match="ungrouped"):
        GatedConv2d(nn.Conv2d(4, 4, 3, groups=4))
