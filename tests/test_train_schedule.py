"""Tests of fxshift.train.DecomposeSchedule and the optimizer rebuild, on sklearn digits (fast)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxshift
from fxshift import RecomposePass, ShiftQuantizePass, TuckerDecomposePass
from fxshift.data import digits
from fxshift.errors import ConfigError
from fxshift.nn.tucker import TuckerConv2d
from fxshift.train import (DecomposeSchedule, load_optimizer_state_by_name, optimizer_state_by_name,
                           rebuild_optimizer)


class DigitsNet(nn.Module):
    """A small CNN for 8×8 digits: three convs (the last with a bias), BatchNorm, a Linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, bias=True)
        self.bn3 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    return digits(train=True).tensors


def _model(seed=0):
    torch.manual_seed(seed)
    return DigitsNet()


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


def _epoch(model, optimizer, data, epoch, batch=96):
    """One epoch over the digits with a shuffle fixed by the epoch number; returns the mean loss."""
    x, y = data
    model.train()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1000 + epoch))
    total = 0.0
    steps = 0
    for start in range(0, len(y), batch):
        idx = order[start:start + batch]
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        total += loss.item()
        steps += 1
    return total / steps


def _schedule(**kw):
    options = dict(at_epoch=2, pipeline=[TuckerDecomposePass(rank=0.5)], example_inputs=torch.zeros(1, 1, 8, 8))
    options.update(kw)
    return DecomposeSchedule(**options)


def _train(data, epochs=4, sched=None, checkpoints=None, model=None, optimizer=None, scheduler=None, start=0):
    """A plain training loop with the schedule's one call per epoch; returns (model, losses, seen)."""
    model = model if model is not None else _model()
    optimizer = optimizer if optimizer is not None else _sgd(model)
    scheduler = scheduler if scheduler is not None else torch.optim.lr_scheduler.StepLR(optimizer, 2, gamma=0.5)
    sched = sched if sched is not None else _schedule()
    losses, seen = [], []
    for epoch in range(start, epochs):
        model, optimizer = sched.on_epoch_start(epoch, model, optimizer, lr_scheduler=scheduler)
        seen.append((epoch, model, optimizer))
        losses.append(_epoch(model, optimizer, data, epoch))
        scheduler.step()
        if checkpoints is not None:
            checkpoints(epoch, model, optimizer, scheduler)
    return model, optimizer, scheduler, losses, seen


def _param_ids(module):
    return {id(p) for p in module.parameters()}


def _opt_ids(optimizer):
    return {id(p) for g in optimizer.param_groups for p in g["params"]}


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """One 5-epoch run with the switch at epoch 2 and recompose_at_end, checkpointed after epochs 1 and 2."""
    folder = tmp_path_factory.mktemp("checkpoints")
    sched = _schedule(recompose_at_end=True)
    original = _model()
    initial = copy.deepcopy(original.state_dict())

    def checkpoint(epoch, model, optimizer, scheduler):
        if epoch in (1, 2):
            (folder / str(epoch)).mkdir()
            _save(folder / str(epoch), model, optimizer, scheduler, sched, epoch)

    model, optimizer, scheduler, losses, seen = _train(data, epochs=5, sched=sched, model=original,
                                                       checkpoints=checkpoint)
    return dict(sched=sched, original=original, initial=initial, model=model, optimizer=optimizer,
                scheduler=scheduler, losses=losses, seen=seen, folder=folder)


def test_switch_happens_at_the_epoch_and_optimizer_covers_the_new_parameters(run):
    original, seen, losses, scheduler = run["original"], run["seen"], run["losses"], run["scheduler"]
    # epochs 0 and 1 train the caller's model; the switch happens at the start of epoch 2
    assert seen[0][1] is original and seen[1][1] is original
    switched = seen[2][1]
    assert isinstance(switched, torch.fx.GraphModule)
    assert isinstance(switched.get_submodule("conv2"), TuckerConv2d)
    assert seen[3][1] is switched and seen[4][1] is switched
    assert not any(isinstance(m, TuckerConv2d) for m in original.modules())  # never changed in place
    assert any(not torch.equal(run["initial"][k], v) for k, v in original.state_dict().items())  # it did train
    assert [(e["event"], e["epoch"]) for e in run["sched"].events[:1]] == [("switch", 2)]
    # the optimizer: same class and hyper-parameters, exactly the new model's parameters
    opt = seen[2][2]
    assert opt is not seen[1][2] and type(opt) is torch.optim.SGD
    assert _opt_ids(opt) == _param_ids(switched)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(switched.parameters()))
    assert opt.defaults == seen[1][2].defaults
    for key in ("momentum", "weight_decay", "dampening", "nesterov", "initial_lr"):
        assert opt.param_groups[0][key] == seen[1][2].param_groups[0][key]
    assert scheduler.optimizer is opt
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5 ** 2)  # StepLR(2, 0.5) after 4 epochs
    assert scheduler.last_epoch == 5
    # the loss keeps falling through the switch
    assert losses[1] < losses[0]
    assert losses[4] < losses[2] < losses[0]
    assert losses[2] < 2 * losses[1]


def test_state_carried_for_parameters_that_survived(data):
    model = _model()
    optimizer = _sgd(model)
    _epoch(model, optimizer, data, 0)
    old = {n: optimizer.state[p]["momentum_buffer"].clone() for n, p in model.named_parameters()}
    sched = _schedule(at_epoch=0)
    new_model, new_opt = sched.on_epoch_start(0, model, optimizer)
    names = dict(new_model.named_parameters())
    for name in ("bn1.weight", "bn2.bias", "bn3.weight"):  # untouched: same name, same values
        assert torch.equal(new_opt.state[names[name]]["momentum_buffer"], old[name])
        old_buffer = optimizer.state[dict(model.named_parameters())[name]]["momentum_buffer"]
        assert new_opt.state[names[name]]["momentum_buffer"] is not old_buffer  # a copy
    # the conv's bias moved into the chain's last 1×1 conv with its value, so its momentum follows it
    assert torch.equal(new_opt.state[names["conv3.restore.bias"]]["momentum_buffer"], old["conv3.bias"])
    # decomposed factors start with no state
    for name in ("conv2.core.weight", "conv2.reduce.weight", "conv3.restore.weight"):
        assert names[name] not in new_opt.state
    assert sched.events and sched.events[0]["event"] == "switch" and sched.events[0]["seconds"] > 0


def _lr_trajectory(make_scheduler, at_epoch, opt_cls=torch.optim.SGD, opt_kw=None, per_batch=False):
    torch.manual_seed(0)
    model = DigitsNet()
    optimizer = opt_cls(model.parameters(), **(opt_kw or {"lr": 0.1, "momentum": 0.9}))
    scheduler = make_scheduler(optimizer)
    sched = _schedule(at_epoch=at_epoch)
    x = torch.randn(8, 1, 8, 8)
    lrs, betas = [], []
    for epoch in range(5):
        model, optimizer = sched.on_epoch_start(epoch, model, optimizer, lr_scheduler=scheduler)
        for _ in range(3):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
            lrs.append(optimizer.param_groups[0]["lr"])
            betas.append(optimizer.param_groups[0].get("betas", optimizer.param_groups[0].get("momentum")))
            if per_batch:
                scheduler.step()
        if not per_batch:
            scheduler.step()
    assert scheduler.optimizer is optimizer
    assert scheduler.get_last_lr()[0] == optimizer.param_groups[0]["lr"]
    return lrs, betas, sched.switched


@pytest.mark.parametrize("name", ["step", "cosine", "onecycle", "sequential"])
def test_lr_schedule_keeps_its_position(name):
    S = torch.optim.lr_scheduler
    makers = {
        "step": (lambda o: S.StepLR(o, step_size=2, gamma=0.3), False, torch.optim.SGD, None),
        "cosine": (lambda o: S.CosineAnnealingLR(o, T_max=5), False, torch.optim.SGD, None),
        "onecycle": (lambda o: S.OneCycleLR(o, max_lr=0.1, total_steps=15), True, torch.optim.Adam, {"lr": 0.01}),
        "sequential": (lambda o: S.SequentialLR(o, [S.LinearLR(o, 0.1, total_iters=2), S.ExponentialLR(o, 0.8)],
                                               milestones=[2]), False, torch.optim.SGD, None),
    }
    make, per_batch, opt_cls, opt_kw = makers[name]
    switched_lrs, switched_betas, did = _lr_trajectory(make, 2, opt_cls, opt_kw, per_batch)
    plain_lrs, plain_betas, did_not = _lr_trajectory(make, 99, opt_cls, opt_kw, per_batch)
    assert did and not did_not
    assert switched_lrs == pytest.approx(plain_lrs)
    assert switched_betas == plain_betas
    assert len(set(plain_lrs)) > 2  # the schedule did move


def test_recompose_at_end_loads_into_the_original_architecture(run, data):
    sched, model, optimizer, scheduler = run["sched"], run["model"], run["optimizer"], run["scheduler"]
    model.eval()
    x = data[0][:32]
    with torch.no_grad():
        decomposed_out = model(x)
    final, final_opt = sched.on_train_end(model, optimizer, lr_scheduler=scheduler)
    assert sched.recomposed and [e["event"] for e in sched.events] == ["switch", "recompose"]
    # the conv3 bias went into the chain and back with its value, so its momentum followed it both ways
    chain_bias = dict(model.named_parameters())["conv3.restore.bias"]
    folded_bias = dict(final.named_parameters())["conv3.bias"]
    assert torch.equal(final_opt.state[folded_bias]["momentum_buffer"], optimizer.state[chain_bias]["momentum_buffer"])
    assert dict(final.named_parameters())["conv2.weight"] not in final_opt.state
    assert not any(isinstance(m, TuckerConv2d) for m in final.modules())
    assert _opt_ids(final_opt) == _param_ids(final) and scheduler.optimizer is final_opt
    fresh = DigitsNet()
    fresh.load_state_dict(final.state_dict())  # strict: same names and shapes as the original
    fresh.eval()
    final.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(x), final(x), atol=1e-5)
        assert torch.allclose(fresh(x), decomposed_out, atol=1e-3, rtol=1e-3)
    # without recompose_at_end, or with nothing decomposed, on_train_end changes nothing
    plain = _schedule()
    m, o = plain.on_train_end(model, optimizer)
    assert m is model and o is optimizer
    m, o = sched.on_train_end(final, final_opt)
    assert m is final and o is final_opt
    scheduler.optimizer = optimizer  # leave the shared run as it was


def _save(path, model, optimizer, scheduler, sched, epoch):
    fxshift.save(model, path / "model.pt")
    torch.save({"optimizer": optimizer_state_by_name(optimizer, model), "scheduler": scheduler.state_dict(),
                "schedule": sched.state_dict(), "epoch": epoch}, path / "train.pt")


def _resume(path):
    model = fxshift.load(DigitsNet(), path / "model.pt", torch.zeros(1, 1, 8, 8))
    state = torch.load(path / "train.pt", weights_only=True)
    optimizer = _sgd(model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2, gamma=0.5)
    load_optimizer_state_by_name(optimizer, model, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    sched = _schedule()
    sched.load_state_dict(state["schedule"])
    return model, optimizer, scheduler, sched, state["epoch"] + 1


@pytest.mark.parametrize("saved_after_epoch", [1, 2], ids=["before-switch", "after-switch"])
def test_checkpoint_resumes_across_the_switch(run, data, saved_after_epoch):
    """Resume in a 'new process' (fresh objects, fxshift.load) from a checkpoint taken before or
    after the switch; training to the end gives the uninterrupted run's weights and outputs."""
    model, optimizer, scheduler, resumed_sched, start = _resume(run["folder"] / str(saved_after_epoch))
    assert resumed_sched.switched == (saved_after_epoch >= 2)
    assert isinstance(model.get_submodule("conv2"), TuckerConv2d) == (saved_after_epoch >= 2)
    resumed, _, resumed_scheduler, losses, _ = _train(data, epochs=5, sched=resumed_sched, model=model,
                                                      optimizer=optimizer, scheduler=scheduler, start=start)
    full = run["model"]
    assert isinstance(resumed.get_submodule("conv2"), TuckerConv2d)
    assert resumed_scheduler.last_epoch == run["scheduler"].last_epoch
    assert losses == pytest.approx(run["losses"][start:], rel=1e-5)
    want, got = full.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.allclose(want[key].float(), got[key].float(), atol=1e-6, rtol=1e-5), key
    full.eval()
    resumed.eval()
    x = data[0][:64]
    with torch.no_grad():
        assert torch.allclose(full(x), resumed(x), atol=1e-5)


def test_resumed_process_without_schedule_state_does_not_switch_twice(run):
    """A new schedule object (no state loaded) resumed after the switch leaves the loaded model alone."""
    loaded = fxshift.load(DigitsNet(), run["folder"] / "2" / "model.pt")
    fresh = _schedule()
    opt = _sgd(loaded)
    out, out_opt = fresh.on_epoch_start(3, loaded, opt)
    assert out is loaded and out_opt is opt and not fresh.switched


def test_shift_quantize_in_the_schedule(data):
    """Train in float, switch to DeepShift-Q: the float weights keep their names and momentum."""
    model = _model()
    optimizer = _sgd(model)
    _epoch(model, optimizer, data, 0)
    old = {n: optimizer.state[p]["momentum_buffer"].clone() for n, p in model.named_parameters()}
    sched = DecomposeSchedule(1, ShiftQuantizePass(mode="q", weight_bits=5), example_inputs=torch.zeros(1, 1, 8, 8))
    new_model, new_opt = sched.on_epoch_start(1, model, optimizer)
    from fxshift.nn.shift import ShiftConv2d
    assert isinstance(new_model.get_submodule("conv2"), ShiftConv2d)
    assert _opt_ids(new_opt) == _param_ids(new_model)
    names = dict(new_model.named_parameters())
    assert torch.equal(new_opt.state[names["conv2.weight"]]["momentum_buffer"], old["conv2.weight"])
    losses = [_epoch(new_model, new_opt, data, e) for e in (1, 2)]
    assert losses[1] < losses[0] + 0.05


def test_shift_ps_parameters_go_to_a_named_group(data):
    """group_of routes DeepShift-PS shifts and signs into a group made empty from the start."""
    model = _model()
    optimizer = torch.optim.Adam([{"params": list(model.parameters()), "name": "weights", "weight_decay": 1e-4},
                                  {"params": [], "name": "shift", "weight_decay": 0.0, "lr": 1e-3}], lr=1e-2)
    sched = DecomposeSchedule(0, ShiftQuantizePass(mode="ps", weight_bits=5),
                              group_of=lambda n, p: "shift" if n.endswith((".shift", ".sign")) else None)
    new_model, new_opt = sched.on_epoch_start(0, model, optimizer)
    shift_group = {id(p) for p in new_opt.param_groups[1]["params"]}
    expected = {id(p) for n, p in new_model.named_parameters() if n.endswith((".shift", ".sign"))}
    assert expected and shift_group == expected
    assert new_opt.param_groups[1]["lr"] == 1e-3 and new_opt.param_groups[1]["weight_decay"] == 0.0
    assert _opt_ids(new_opt) == _param_ids(new_model)
    _epoch(new_model, new_opt, data, 0)


def test_shift_ps_parameters_get_no_weight_decay_by_default(data):
    """A switch to DeepShift-PS sends P and S to a no-decay twin of their layer's group; the LR
    scheduler drives the twin as it drives the source group."""
    model = _model()
    optimizer = _sgd(model)  # one group, weight_decay=1e-4
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 0.5 ** e)
    sched = DecomposeSchedule(1, ShiftQuantizePass(mode="ps", weight_bits=5))
    optimizer.step()  # (no gradients yet: nothing moves) keeps the scheduler from warning
    scheduler.step()
    new_model, new_opt = sched.on_epoch_start(1, model, optimizer, lr_scheduler=scheduler)
    ps = {id(p) for n, p in new_model.named_parameters() if n.endswith((".shift", ".sign"))}
    assert ps
    decay = {id(p) for g in new_opt.param_groups if g["weight_decay"] != 0 for p in g["params"]}
    assert not ps & decay
    assert len(new_opt.param_groups) == 2 and {id(p) for p in new_opt.param_groups[1]["params"]} == ps
    assert new_opt.param_groups[0]["weight_decay"] == 1e-4 and new_opt.param_groups[1]["weight_decay"] == 0.0
    assert _opt_ids(new_opt) == _param_ids(new_model)
    _epoch(new_model, new_opt, data, 1)
    scheduler.step()
    assert [g["lr"] for g in new_opt.param_groups] == pytest.approx([0.05 * 0.25] * 2, rel=1e-12)
    # DeepShift-Q trains ordinary weights: no extra group
    q_model = _model()
    _, q_opt = DecomposeSchedule(0, ShiftQuantizePass(mode="q", weight_bits=5)).on_epoch_start(0, q_model, _sgd(q_model))
    assert len(q_opt.param_groups) == 1 and q_opt.param_groups[0]["weight_decay"] == 1e-4


def test_frozen_parameters_stay_out_and_named_groups_keep_names():
    model = _model()
    model.conv1.weight.requires_grad_(False)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1, momentum=0.9)  # named parameters (torch ≥ 2.6)
    gm = fxshift.apply(TuckerDecomposePass(rank=0.5), model, torch.zeros(1, 1, 8, 8))
    new = rebuild_optimizer(optimizer, model, gm)
    in_opt = {n for n, p in gm.named_parameters() if id(p) in _opt_ids(new)}
    assert not any(n.startswith("conv1.") and n.endswith("weight") for n in in_opt)
    assert {"conv2.core.weight", "fc.first.weight", "fc.second.bias"} <= in_opt
    assert not any(n.startswith("conv1.") for n in in_opt)
    if "param_names" in optimizer.param_groups[0]:
        assert sorted(new.param_groups[0]["param_names"]) == sorted(in_opt)


def test_errors_are_clear():
    with pytest.raises(ConfigError, match="at_epoch"):
        DecomposeSchedule(-1, TuckerDecomposePass())
    with pytest.raises(ConfigError, match="pipeline is empty"):
        DecomposeSchedule(1, [])
    model = _model()
    optimizer = _sgd(model)
    sched = DecomposeSchedule(0, TuckerDecomposePass(rank=0.5), group_of=lambda n, p: "nope")
    with pytest.raises(ConfigError, match="group name 'nope'"):
        sched.on_epoch_start(0, model, optimizer)


def test_warns_when_a_scheduler_is_not_passed():
    model = _model()
    optimizer = _sgd(model)
    torch.optim.lr_scheduler.StepLR(optimizer, 2)
    with pytest.warns(UserWarning, match="lr_scheduler="):
        _schedule(at_epoch=0).on_epoch_start(0, model, optimizer)


def test_recompose_pass_directly_in_a_schedule_pipeline(data):
    """Any pass is accepted: a second schedule can recompose mid-training and training goes on."""
    model = _model()
    optimizer = _sgd(model)
    first = _schedule(at_epoch=0)
    second = DecomposeSchedule(1, RecomposePass())
    model, optimizer = first.on_epoch_start(0, model, optimizer)
    _epoch(model, optimizer, data, 0)
    model, optimizer = second.on_epoch_start(1, model, optimizer)
    assert not any(isinstance(m, TuckerConv2d) for m in model.modules())
    assert _opt_ids(optimizer) == _param_ids(model)
    _epoch(model, optimizer, data, 1)


def test_device_mode_and_channels_last_are_kept():
    model = _model().to(memory_format=torch.channels_last)
    model.eval()
    new, _ = _schedule(at_epoch=0).on_epoch_start(0, model, None)
    assert not new.training
    core = new.get_submodule("conv2.core").weight
    assert core.is_contiguous(memory_format=torch.channels_last) and not core.is_contiguous()
    assert all(p.device == torch.device("cpu") for p in new.parameters())
