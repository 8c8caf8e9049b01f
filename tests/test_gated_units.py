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


def test_uniform_count_rounds_to_whole_channel_blocks_on_wide_layers():
    from fxshift.nn.mask_targets import uniform_count

    assert [uniform_count(c, 0.65) for c in (64, 128, 256)] == [42, 83, 166]              # exact rounding
    assert [uniform_count(c, 0.65, 16) for c in (64, 128, 256)] == [48, 80, 160]          # nearest multiple of 16
    assert uniform_count(256, 0.02, 16) == 16 and uniform_count(256, 0.99, 16) == 256     # at least one block, at most C
    assert uniform_count(48, 0.65, 16) == 31                                              # narrow layer: exact
    x = act(*range(1, 65))
    assert uniform_targets(x, 0.65).sum().item() == 42 and uniform_targets(x, 0.65, count=48).sum().item() == 48


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


@pytest.mark.parametrize("train_mask", ["predicted", "target", "none"])
def test_train_forward_masks_and_loss_is_bce(train_mask):
    import copy
    u1, _ = two_units(train_mask=train_mask)
    reference = nn.Sequential(copy.deepcopy(u1.conv), copy.deepcopy(u1.bn), nn.ReLU()).train()
    u1.train()
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    y, idx = u1(x)
    assert idx is None
    dense = reference(x)
    targets = mass_targets(dense, 0.9)
    assert 0 < targets.sum() < targets.numel()
    predicted = (u1.logits(x) > 0).float()
    assert 0 < predicted.sum() < predicted.numel() and not torch.equal(predicted, targets)
    mask = {"predicted": predicted, "target": targets, "none": torch.ones_like(targets)}[train_mask]
    assert torch.allclose(y, dense * mask[:, :, None, None], atol=1e-6)
    ref = nn.functional.binary_cross_entropy_with_logits(u1.logits(x), targets)
    assert abs(u1.last_loss.item() - ref.item()) < 1e-6
    y.sum().backward()                     # the predicted mask passes no gradient to the predictor
    assert u1.predictor.weight.grad is None and u1.conv.weight.grad.abs().sum() > 0


def test_train_mask_values():
    conv = nn.Conv2d(3, 4, 3)
    assert GatedConv2d(conv).train_mask == "predicted"
    assert GatedConv2d(conv, train_mask=True).train_mask == "target"       # recipes saved with a bool
    assert GatedConv2d(conv, train_mask=False).train_mask == "none"
    old_spec = {k: v for k, v in GatedConv2d(conv).spec().items() if k != "train_mask"}
    assert GatedConv2d.from_spec(conv, None, None, old_spec).train_mask == "none"
    assert GatedConv2d.from_spec(conv, None, None, {**old_spec, "train_mask": True}).train_mask == "target"
    with pytest.raises(ConfigError, match="train_mask must be 'predicted'"):
        GatedConv2d(conv, train_mask="dense")


@pytest.mark.parametrize("batch", [1, 3])
def test_uniform_selects_exactly_top_k(batch):
    """target="uniform": exactly round(ratio·C) filters per sample, the highest logits, in every mode."""
    u1, u2 = two_units(target="uniform", ratio=0.25)
    with torch.no_grad():
        u2.predictor.bias.add_(5.0)        # every logit > 0: a threshold would keep all 24 filters
    assert (u1.top_k, u2.top_k) == (4, 6)
    u1.eval(), u2.eval()
    x = torch.randn(batch, 3, 12, 12, generator=torch.Generator().manual_seed(4))
    skip, idx1, idx2 = run(u1, u2, x)
    if batch == 1:
        assert len(idx1) == 4 and len(idx2) == 6
        y1, _ = u1(x)
        logits = u2.logits(scatter_channels(y1, idx1, 16))
        assert set(idx2.tolist()) == set(logits[0].topk(6).indices.tolist())
    for u in (u1, u2):
        u.gating = "mask"
    mask, _, _ = run(u1, u2, x)
    assert ((mask.flatten(2).abs().sum(2) > 0).sum(1) <= 6).all()
    assert ((skip - mask).norm() / mask.norm()).item() < 1e-5
    u2.train()
    u2.train_mask = "predicted"
    y, _ = u2(torch.randn(batch, 16, 12, 12))
    assert ((y.flatten(2).abs().sum(2) > 0).sum(1) <= 6).all()


def test_unit_without_batchnorm_runs_in_eval_under_no_grad():
    g = torch.Generator().manual_seed(5)
    unit = GatedConv2d(nn.Conv2d(3, 8, 3, padding=1), None, nn.ReLU()).eval()
    unit.predictor.weight.data.normal_(0, 1, generator=g)
    x = torch.randn(1, 3, 10, 10, generator=g)
    with torch.no_grad():
        y, idx = unit(x)
        unit.gating = "mask"
        ref, _ = unit(x)
    assert 0 < len(idx) < 8
    assert torch.allclose(scatter_channels(y, idx, 8), ref, atol=1e-6)
    assert torch.allclose(ref, torch.relu(unit.conv(x)) * (unit.logits(x) > 0)[:, :, None, None], atol=1e-6)


def test_skip_follows_in_place_updates_through_data():
    """p.data updates bump no version counter: skip mode must not keep stale weights."""
    u1, u2 = two_units()
    u1.eval(), u2.eval()
    x = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        run(u1, u2, x)                              # a first forward (would fill any cache)
        u1.conv.weight.data.mul_(0.5)
        u2.bn.running_var.data.mul_(3.0)
        skip, _, _ = run(u1, u2, x)
        for u in (u1, u2):
            u.gating = "mask"
        mask, _, _ = run(u1, u2, x)
    assert ((skip - mask).norm() / mask.norm()).item() < 1e-5


def test_batchnorm_subclass_becomes_plain_batchnorm():
    class NormAct(nn.BatchNorm2d):          # like timm's BatchNormAct2d: the activation inside the norm
        def __init__(self, c):
            super().__init__(c)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(super().forward(x))

    bn = NormAct(4)
    bn.running_mean.fill_(0.3)
    unit = GatedConv2d(nn.Conv2d(3, 4, 1), bn, nn.ReLU())
    assert type(unit.bn) is nn.BatchNorm2d and torch.equal(unit.bn.running_mean, bn.running_mean)


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


def test_mask_loss_weight_cooldown():
    from fxshift.train import mask_loss_weight

    assert [mask_loss_weight(s, 10, 0.5) for s in range(10)] == [0.5] * 5 + [0.0] * 5     # FTWT: second half off
    assert [mask_loss_weight(s, 4, 2.0, cooldown=0.25) for s in range(4)] == [2.0, 2.0, 2.0, 0.0]
    assert mask_loss_weight(99, 100, 1.0, cooldown=0.0) == 1.0
    with pytest.raises(ConfigError, match="cooldown"):
        mask_loss_weight(0, 10, cooldown=1.0)


def test_recalibrate_batchnorm_under_predicted_masks():
    """The second unit's BatchNorm statistics are those of its conv over the first unit's masked output."""
    from fxshift.train import recalibrate_batchnorm

    u1, u2 = two_units(train_mask="none")
    x = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(7))

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.u1, self.u2 = u1, u2

        def forward(self, x):
            return self.u2(self.u1(x)[0])[0]

    chain = Chain().eval()
    recalibrate_batchnorm(chain, [(x, None)])
    assert not chain.training and not u1.bn.training and u1.train_mask == "none" and u1.bn.momentum == 0.1
    with torch.no_grad():
        c1 = u1.conv(x)
        y1 = torch.relu((c1 - c1.mean((0, 2, 3))[:, None, None]) / torch.sqrt(c1.var((0, 2, 3), unbiased=False)
                                                                              + u1.bn.eps)[:, None, None]
                        * u1.bn.weight[:, None, None] + u1.bn.bias[:, None, None])
        keep = u1.logits(x) > 0
        assert 0 < keep.sum() < keep.numel()
        c2 = u2.conv(y1 * keep[:, :, None, None])
    assert torch.allclose(u1.bn.running_mean, c1.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(u2.bn.running_mean, c2.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(u2.bn.running_var, c2.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="no batches"):
        recalibrate_batchnorm(chain, [])
