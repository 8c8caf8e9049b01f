"""How many blocks to remove: a count, a fraction of the candidates, or a whole-model Budget.

The candidates come ordered lowest score first; for a Budget the answer is the fewest of them
that bring the model to the target. MACs and parameters are additive over disjoint blocks and
are summed exactly. Latency (and training-step time) is measured: the original and the model with
each count of blocks removed are timed round-robin in one run (exported to ONNX and timed in
onnxruntime by fxshift.measure.latency; forward+backward in torch by fxshift.measure.train_step),
so every ratio shares the same machine noise; the smallest count whose measured ratio reaches
the target wins. (Timing the counts in separate runs on a busy machine gave ratios that did not
fall with the count.) With Budget.verify (the default) the chosen count is timed again alone
against the original, longer, and the next count taken while that check misses the target
(within its tolerance). Inside fxshift.train.apply_synced one rank measures and broadcasts the count.
"""
from __future__ import annotations

import copy
from typing import Any, Optional, Sequence, Union

import torch.fx as fx

from ..context import planning_sync
from ..costs import parameter_count
from .budget import Budget
from ..errors import ConfigError
from ..prune.blocks import Block, remove_blocks

__all__ = ["BlocksSetting", "blocks_to_remove", "measure_removals"]

BlocksSetting = Union[int, float, Budget]
Summary = Optional[dict[str, Any]]


def blocks_to_remove(gm: fx.GraphModule, order: Sequence[Block], setting: BlocksSetting,
                     cost: dict[str, tuple[int, int]], node_macs: dict[str, int], inputs: tuple, pass_name: str
                     ) -> tuple[int, Summary]:
    """How many of `order` (lowest score first) to remove, and the Budget summary when one was given.

    `cost` maps a block's name to the (params, MACs) its removal saves; `node_macs` holds the MACs
    per sample of every node of `gm` (their sum is the model's total).
    """
    n = len(order)
    if isinstance(setting, bool):
        raise ConfigError(f"{pass_name}(blocks={setting!r}): give an int, a float in (0, 1) or a Budget")
    if isinstance(setting, int):
        if setting > n:
            raise ConfigError(f"{pass_name}(blocks={setting}): the model has only {n} removable blocks "
                              f"({', '.join(b.name for b in order)}); ask for at most {n}, or a fraction")
        return setting, None
    if isinstance(setting, float):  # a fraction that rounds to 0 still removes one block
        return max(1, int(round(setting * n))), None
    budget = setting
    if budget.measured:
        sync = planning_sync()
        if sync is None:
            return _measured_count(gm, order, budget, inputs, pass_name)
        import torch.distributed as dist

        group, src = sync
        box = [_measured_count(gm, order, budget, inputs, pass_name) if dist.get_rank() == src else None]
        dist.broadcast_object_list(box, src=src, group=group)
        return box[0]
    column = 1 if budget.kind == "macs" else 0
    total = sum(node_macs.values()) if budget.kind == "macs" else parameter_count(gm)
    remaining, count = float(total), 0
    goal = budget.target * total
    while remaining > goal and count < n:
        remaining -= cost[order[count].name][column]
        count += 1
    if remaining > goal * (1 + budget.tolerance):
        raise ConfigError(f"{pass_name}(blocks={budget!r}): removing all {n} removable blocks leaves "
                          f"{remaining / total:.1%} of the model's {budget.kind}; the budget cannot be met by block "
                          "removal alone: raise the target, or follow with a decomposition pass")
    return count, {"pass": pass_name, **budget.to_dict(), "total_before": total, "total_after": remaining,
                   "fraction": remaining / total if total else 1.0, "blocks": count}


def measure_removals(gm: fx.GraphModule, order: Sequence[Block], inputs: tuple, timer: Any
                     ) -> tuple[dict[int, float], dict[str, Any]]:
    """Measured time of `gm` with its first k blocks of `order` removed, over the original's, for
    k = 1..len(order), all timed round-robin in one run by `timer` (a LatencyTimer or a
    TrainStepTimer); and what the timer took for each (ONNX bytes or modules; "0" is the
    original). `gm` is not changed."""
    models = {"0": timer.prepared(gm, inputs)}
    for k in range(1, len(order) + 1):
        pruned = copy.deepcopy(gm)
        remove_blocks(pruned, order[:k])
        pruned.graph.lint()
        pruned.recompile()
        models[str(k)] = timer.prepared(pruned, inputs)
    times = timer.models(models, inputs)
    return {int(k): t / times["0"] for k, t in times.items() if k != "0"}, models


def _measured_count(gm: fx.GraphModule, order: Sequence[Block], budget: Budget, inputs: tuple, pass_name: str
                    ) -> tuple[int, dict[str, Any]]:
    from ..measure.train_step import is_channels_last

    timer = budget.timer(channels_last=is_channels_last(gm))
    measured, onnx = measure_removals(gm, order, inputs, timer)
    n = len(order)
    reached = [k for k in range(1, n + 1) if measured[k] <= budget.target]
    if not reached:
        best = min(measured, key=measured.get)
        if measured[best] > budget.target * (1 + budget.tolerance):
            raise ConfigError(f"{pass_name}(blocks={budget!r}): removing the removable blocks (up to all {n}) "
                              f"measured at best {measured[best]:.1%} of the model's {budget.what}; the budget "
                              "cannot be met by block removal alone: raise the target, or follow with a "
                              "decomposition pass")
        reached = [best]
    count = reached[0]
    summary = {"pass": pass_name, **budget.to_dict(), "blocks": count, "fraction": measured[count],
               "measured": {str(k): round(v, 4) for k, v in sorted(measured.items())}, "threads": timer.threads}
    if budget.verify:
        # a second, longer timing of the choice alone against the original; on a busy machine one
        # short round over every count can land a count below the target by luck
        verified = {}
        while count <= n:
            times = timer.models({"0": onnx["0"], "k": onnx[str(count)]}, inputs, min_time=0.5)
            verified[count] = times["k"] / times["0"]
            if verified[count] <= budget.target * (1 + budget.tolerance):
                break
            count += 1
        if count > n:
            raise ConfigError(f"{pass_name}(blocks={budget!r}): timed again, no count of removed blocks stayed "
                              f"within the target (measured {', '.join(f'{v:.1%}' for v in verified.values())}); "
                              "raise the target, or retry on a quieter machine")
        summary.update(blocks=count, fraction=verified[count], verified={str(k): round(v, 4)
                                                                          for k, v in verified.items()})
    return count, summary
