"""Carrying an optimizer and its LR schedulers over to a model whose structure a pass changed.

After a switch (decompose, shift-quantize, recompose) the model has new parameter objects, some
under new names. `rebuild_optimizer` makes an optimizer of the same class, defaults and
param-group hyper-parameters (including the current, scheduled learning rates) over exactly the
new model's parameters, carries the per-parameter state (momentum, Adam moments, step) of every
parameter that survived unchanged, and moves LR schedulers onto it at the position they had.

Parameters are matched by name, so the optimizer need not be in the model's parameter order.
`optimizer_state_by_name` / `load_optimizer_state_by_name` save and restore an optimizer's state
keyed by parameter names for the same reason: a model reloaded with fxshift.load is a traced
GraphModule whose parameter order can differ from the original module's.
"""
from __future__ import annotations

import copy
import inspect
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn
from torch.optim import Optimizer

from ..errors import ConfigError

__all__ = ["rebuild_optimizer", "move_lr_scheduler", "unwrap_model", "optimizer_state_by_name",
           "load_optimizer_state_by_name", "GroupOf"]

#: group_of(name, parameter) -> index or "name" of the param group, or None for the default rule.
GroupOf = Callable[[str, nn.Parameter], Union[int, str, None]]

_SKIP_GROUP_KEYS = ("params", "param_names")
#: LR-scheduler attributes holding one entry per param group (torch.optim.lr_scheduler's schedulers).
_PER_GROUP_SCHEDULER_LISTS = ("base_lrs", "_last_lr", "lr_lambdas", "max_lrs", "base_momentums", "max_momentums",
                              "min_lrs")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers (the model itself otherwise)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _as_list(items: Any) -> list:
    if items is None:
        return []
    if isinstance(items, (list, tuple)):
        return [i for i in items if i is not None]
    return [items]


def _group_index(optimizer: Optimizer, key: Union[int, str], name: str) -> int:
    groups = optimizer.param_groups
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise ConfigError(f"group_of returned {key!r} for parameter {name!r}: give a group index, a group's "
                          "'name', or None")
    if isinstance(key, int):
        if not -len(groups) <= key < len(groups):
            raise ConfigError(f"group_of returned group {key} for parameter {name!r}, but the optimizer has "
                              f"{len(groups)} param groups")
        return key % len(groups)
    for i, group in enumerate(groups):
        if group.get("name") == key:
            return i
    named = [g.get("name") for g in groups if "name" in g]
    hint = named if named else "nothing (give param groups a 'name' key)"
    raise ConfigError(f"group_of returned group name {key!r} for parameter {name!r}; the optimizer's groups are "
                      f"named {hint}")


def _source_of(name: str, old_params: dict[str, nn.Parameter],
               old_modules: set[str]) -> tuple[Optional[str], list[str]]:
    """The old parameter `name` is the same as (if any), and the old parameters of the layer it replaced.

    "layer1.conv.core.weight" replaced the layer "layer1.conv" (the longest old module path that
    prefixes it), whose old parameters are "layer1.conv.weight" and "layer1.conv.bias"; after a
    recompose, "layer1.conv.weight" replaced the chain "layer1.conv" and its parameters
    "layer1.conv.core.weight", "layer1.conv.restore.bias", ….
    """
    if name in old_params:
        return name, [name]
    path = name.rpartition(".")[0]
    while path:
        if path in old_modules:
            prefix = path + "."
            owned = [n for n in old_params if n.startswith(prefix)]
            if owned:
                return None, owned
        path = path.rpartition(".")[0]
    return None, []


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    with torch.no_grad():
        return bool(torch.equal(a.detach().to(b.device), b.detach()))


def _survivor(name: str, param: nn.Parameter, exact: Optional[str], owned: list[str],
              old_params: dict[str, nn.Parameter]) -> Optional[str]:
    """The old parameter whose optimizer state `param` may take over: the same name, or the same
    attribute of the layer it replaced (a bias moved into a chain), with equal values."""
    if exact is not None:
        return exact if _same_tensor(old_params[exact], param) else None
    attr = name.rpartition(".")[2]
    same = [n for n in owned if n.rpartition(".")[2] == attr and _same_tensor(old_params[n], param)]
    return same[0] if len(same) == 1 else None


def _constructor_defaults(cls: type, defaults: dict[str, Any]) -> dict[str, Any]:
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return dict(defaults)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(defaults)
    return {k: v for k, v in defaults.items() if k in params}


def _move_state(state: dict[str, Any], param: torch.Tensor) -> dict[str, Any]:
    out = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().clone()
            if key != "step" and value.shape == param.shape:
                value = value.to(device=param.device, dtype=param.dtype if value.is_floating_point() else value.dtype)
        else:
            value = copy.deepcopy(value)
        out[key] = value
    return out


def rebuild_optimizer(optimizer: Optimizer, old_model: nn.Module, new_model: nn.Module, *,
                      lr_scheduler: Any = None, group_of: Optional[GroupOf] = None,
                      carry_state: bool = True,
                      no_decay: Optional[Callable[[str, nn.Parameter], bool]] = None) -> Optimizer:
    """An optimizer like `optimizer` over exactly the parameters of `new_model`.

    Args:
        optimizer: the optimizer training `old_model`.
        old_model, new_model: the model before and after the switch (DDP wrappers are looked
            through). Parameters are matched by qualified name.
        lr_scheduler: an LR scheduler (or a list of them) driving `optimizer`; each is moved to
            the new optimizer at its current position (see move_lr_scheduler).
        group_of: optional `(name, param) -> group index | group "name" | None`, choosing the
            param group of a new parameter (None falls back to the default rule below).
        carry_state: carry per-parameter state of parameters that survived unchanged.
        no_decay: optional `(name, param) -> bool`: parameters that must get no weight decay (e.g.
            DeepShift-PS shifts and signs). Where the default rule puts one into a group with
            weight decay, it goes to that group's no-decay twin instead: an existing group equal to
            it but for weight_decay=0, else a copy with weight_decay=0 appended after the old
            groups ("name" suffixed ".no_decay"); LR schedulers get the twin's entries copied from
            its source group. A group chosen by `group_of` is kept as given.

    Returns:
        A new optimizer of the same class, with the same `defaults` and the same param groups,
        in the same order, each keeping every hyper-parameter of the old group (current "lr",
        and scheduler keys such as "initial_lr", "max_lr"); a group may end up empty. A
        parameter goes to the group of the old parameter of the same name; a new parameter to
        the group of the layer it replaced (same attribute — weight/bias — when it has one,
        else the layer's weight); a parameter with no source to group 0. Parameters whose source
        was not in the old optimizer (frozen by the user), and new parameters with
        requires_grad=False, stay out. Per-parameter state is carried for a parameter with the
        same name (or the same attribute of the layer it replaced, e.g. a conv's bias now in the
        chain's last layer and back after a recompose), shape, dtype and values.

    The old optimizer is left as it was. Optimizer hooks are not carried.
    """
    old_model, new_model = unwrap_model(old_model), unwrap_model(new_model)
    old_params = dict(old_model.named_parameters())
    old_modules = {n for n, _ in old_model.named_modules()}
    group_by_id = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    old_group = {n: group_by_id[id(p)] for n, p in old_params.items() if id(p) in group_by_id}

    assigned: list[list[tuple[str, nn.Parameter]]] = [[] for _ in optimizer.param_groups]
    carried: list[tuple[nn.Parameter, nn.Parameter]] = []
    twin_of: dict[int, int] = {}  # old group index -> index of its no-decay twin
    sources: list[int] = []  # old group index of each appended twin
    for name, param in new_model.named_parameters():
        exact, owned = _source_of(name, old_params, old_modules)
        if exact is None and not param.requires_grad:
            continue  # a new parameter the pass froze (e.g. DeepShift-PS signs with freeze_sign)
        index = None
        if group_of is not None:
            key = group_of(name, param)
            if key is not None:
                index = _group_index(optimizer, key, name)
        if index is None:
            if owned:
                in_opt = [n for n in owned if n in old_group]
                if not in_opt:
                    continue  # its source was not being optimised
                attr = name.rpartition(".")[2]
                pick = ([n for n in in_opt if n.rpartition(".")[2] == attr]
                        or [n for n in in_opt if n.rpartition(".")[2] == "weight"] or in_opt)
                index = old_group[pick[0]]
            else:
                index = 0
            if no_decay is not None and optimizer.param_groups[index].get("weight_decay", 0.0) != 0 \
                    and no_decay(name, param):
                if index not in twin_of:
                    twin_of[index] = _no_decay_twin(optimizer.param_groups, index)
                    if twin_of[index] < 0:
                        sources.append(index)
                        assigned.append([])
                        twin_of[index] = len(assigned) - 1
                index = twin_of[index]
        assigned[index].append((name, param))
        if carry_state:
            source = _survivor(name, param, exact, owned, old_params)
            if source is not None and old_params[source] in optimizer.state:
                carried.append((old_params[source], param))

    if not any(assigned):
        raise ConfigError("the new model has no parameter to optimise (every source parameter was outside the "
                          "optimizer)")
    templates = list(optimizer.param_groups) + [_twin_settings(optimizer.param_groups[i]) for i in sources]
    groups = []
    for old, members in zip(templates, assigned):
        group = {k: v for k, v in old.items() if k not in _SKIP_GROUP_KEYS}
        group["params"] = [p for _, p in members]
        groups.append(group)
    cls = type(optimizer)
    new = cls(groups, **_constructor_defaults(cls, optimizer.defaults))
    new.defaults = dict(optimizer.defaults)
    for old, group, members in zip(templates, new.param_groups, assigned):
        for key, value in old.items():  # the constructor must not reset scheduled values
            if key not in _SKIP_GROUP_KEYS:
                group[key] = value
        if "param_names" in old:
            group["param_names"] = [n for n, _ in members]
    for old_p, new_p in carried:
        new.state[new_p] = _move_state(optimizer.state[old_p], new_p)
    if getattr(optimizer, "_opt_called", False):
        new._opt_called = True
    for scheduler in _as_list(lr_scheduler):
        move_lr_scheduler(scheduler, new, added=sources)
    return new


def _twin_settings(group: dict[str, Any]) -> dict[str, Any]:
    twin = {k: v for k, v in group.items() if k not in _SKIP_GROUP_KEYS}
    twin["weight_decay"] = 0.0
    if "name" in twin:
        twin["name"] = f"{twin['name']}.no_decay"
    if "param_names" in group:
        twin["param_names"] = []
    return twin


def _no_decay_twin(groups: Sequence[dict[str, Any]], index: int) -> int:
    """Index of an existing group equal to groups[index] but for weight_decay=0 (and name), or -1."""
    want = {k: v for k, v in groups[index].items() if k not in (*_SKIP_GROUP_KEYS, "weight_decay", "name")}
    for i, g in enumerate(groups):
        if i != index and g.get("weight_decay", 0.0) == 0 and \
                {k: v for k, v in g.items() if k not in (*_SKIP_GROUP_KEYS, "weight_decay", "name")} == want:
            return i
    return -1


def _patch_step_tracking(optimizer: Optimizer) -> None:
    """What LRScheduler.__init__ does to the optimizer: wrap step() so that the scheduler can warn
    when it is stepped before the optimizer."""
    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return
    import weakref
    from functools import wraps

    opt_ref = weakref.ref(optimizer)
    func = optimizer.step.__func__

    @wraps(func)
    def wrapper(*args, **kwargs):
        opt = opt_ref()
        opt._opt_called = True
        return func.__get__(opt, opt.__class__)(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True
    optimizer.step = wrapper


def move_lr_scheduler(scheduler: Any, optimizer: Optimizer, *, added: Sequence[int] = ()) -> None:
    """Point `scheduler` (and the schedulers inside SequentialLR / ChainedScheduler) at `optimizer`.

    The position (last_epoch, _step_count), base_lrs and any per-scheduler state are kept; the
    new optimizer must have the old one's param groups in the same order, as rebuild_optimizer
    gives, followed by one group per entry of `added` (the old group each copies; the
    scheduler's per-group entries are copied from it). Works for ReduceLROnPlateau too.
    """
    if not hasattr(scheduler, "optimizer"):
        raise ConfigError(f"{type(scheduler).__name__} has no 'optimizer' attribute; pass a torch.optim.lr_scheduler "
                          "scheduler")
    old = scheduler.optimizer
    if len(old.param_groups) + len(added) != len(optimizer.param_groups):
        raise ConfigError(f"cannot move {type(scheduler).__name__}: the new optimizer has "
                          f"{len(optimizer.param_groups)} param groups, the old one {len(old.param_groups)}"
                          + (f" plus {len(added)} added" if added else ""))
    scheduler.optimizer = optimizer
    for inner in getattr(scheduler, "_schedulers", ()) or ():
        move_lr_scheduler(inner, optimizer, added=added)
    for attr in _PER_GROUP_SCHEDULER_LISTS if added else ():
        values = getattr(scheduler, attr, None)
        if isinstance(values, list) and len(values) == len(old.param_groups):
            values.extend(copy.copy(values[i]) for i in added)
    _patch_step_tracking(optimizer)


def optimizer_state_by_name(optimizer: Optimizer, model: nn.Module) -> dict[str, Any]:
    """optimizer.state_dict() with parameters named instead of numbered.

    Returns {"param_groups": [{hyper-parameters..., "params": [names]}], "state": {name: state}},
    which torch.save / torch.load(weights_only=True) handle. Restore it with
    load_optimizer_state_by_name into an optimizer over a model with the same parameter names,
    in any order.
    """
    names = {id(p): n for n, p in unwrap_model(model).named_parameters()}
    full = optimizer.state_dict()
    index_to_name: dict[int, str] = {}
    groups = []
    for group, saved in zip(optimizer.param_groups, full["param_groups"]):
        for p, index in zip(group["params"], saved["params"]):
            if id(p) not in names:
                raise ConfigError("the optimizer holds a parameter that is not in the model given")
            index_to_name[index] = names[id(p)]
        groups.append({**{k: v for k, v in saved.items() if k not in _SKIP_GROUP_KEYS},
                       "params": [index_to_name[i] for i in saved["params"]]})
    state = {index_to_name[i]: s for i, s in full["state"].items()}
    return {"param_groups": groups, "state": state}


def load_optimizer_state_by_name(optimizer: Optimizer, model: nn.Module, state: dict[str, Any]) -> None:
    """Load what optimizer_state_by_name saved into `optimizer` (over `model`'s parameters).

    The optimizer's param groups must hold the same parameter names as the saved ones (order
    inside and across groups may differ); raises ConfigError naming the difference otherwise.
    """
    ids = {id(p): n for n, p in unwrap_model(model).named_parameters()}
    current = optimizer.state_dict()
    name_to_index: dict[str, int] = {}
    for group, saved in zip(optimizer.param_groups, current["param_groups"]):
        for p, index in zip(group["params"], saved["params"]):
            name_to_index[ids[id(p)]] = index
    wanted = {n for g in state["param_groups"] for n in g["params"]}
    if wanted != set(name_to_index) or len(state["param_groups"]) != len(optimizer.param_groups):
        missing, extra = sorted(wanted - set(name_to_index)), sorted(set(name_to_index) - wanted)
        raise ConfigError(f"saved optimizer state does not fit: {len(state['param_groups'])} saved groups vs "
                          f"{len(optimizer.param_groups)}; saved but not optimised {missing[:5]}, optimised but not "
                          f"saved {extra[:5]}")
    groups = []
    for saved, own in zip(state["param_groups"], current["param_groups"]):
        if sorted(saved["params"]) != sorted(ids[id(p)] for p in optimizer.param_groups[len(groups)]["params"]):
            raise ConfigError("saved optimizer groups hold different parameters than this optimizer's groups")
        groups.append({**{k: v for k, v in saved.items() if k not in _SKIP_GROUP_KEYS}, "params": own["params"],
                       **({"param_names": own["param_names"]} if "param_names" in own else {})})
    optimizer.load_state_dict({"state": {name_to_index[n]: s for n, s in state["state"].items()},
                               "param_groups": groups})
