"""What travels with a GraphModule between passes: its report, the example inputs given to
apply(), and the Budget summaries. Everything that reads or writes them goes through here, so
the gm.meta keys are spelled in this file only."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Optional

import torch.fx as fx

from .report import Report

_REPORT = "fxshift_report"
_INPUTS = "fxshift_example_inputs"
_BUDGETS = "fxshift_budget"
_ONNX_PATH = "fxshift_onnx_path"
_REMOVED = "fxshift_removed_blocks"


def _meta(gm: Any) -> Optional[dict]:
    return getattr(gm, "meta", None)


def report_of(gm: fx.GraphModule) -> Report:
    """The report of every pass run on `gm` (created empty when missing; a fresh one for a module
    without meta)."""
    meta = _meta(gm)
    if meta is None:
        return Report()
    return meta.setdefault(_REPORT, Report())


def has_report(gm: fx.GraphModule) -> bool:
    """True when `gm` came out of fxshift.apply (or load) and carries a report."""
    return _REPORT in (_meta(gm) or {})


def set_report(gm: fx.GraphModule, report: Report) -> None:
    gm.meta[_REPORT] = report


def copy_report(source: fx.GraphModule, target: fx.GraphModule) -> None:
    """Give `target` its own copy of `source`'s report rows (so later passes do not share it)."""
    set_report(target, Report(list(report_of(source).rows)))


def as_inputs(example_inputs: Any) -> Optional[tuple]:
    """A tensor, tuple or list of example inputs as a tuple (None stays None)."""
    if example_inputs is None:
        return None
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def example_inputs_of(gm: fx.GraphModule) -> Optional[tuple]:
    """The example inputs given to apply(), for passes that need shapes or calibration data."""
    return (_meta(gm) or {}).get(_INPUTS)


def set_example_inputs(gm: fx.GraphModule, inputs: Any) -> None:
    gm.meta[_INPUTS] = as_inputs(inputs)


def add_budget_summary(gm: fx.GraphModule, summary: dict[str, Any]) -> None:
    """Record what one Budget run aimed at and reached (see fxshift.plan.planner)."""
    gm.meta.setdefault(_BUDGETS, []).append(summary)


def budget_summaries(gm: fx.GraphModule) -> list[dict[str, Any]]:
    """Every Budget summary recorded on `gm`, in the order the passes ran."""
    return list((_meta(gm) or {}).get(_BUDGETS, []))


def record_removed_blocks(gm: fx.GraphModule, entries: list[dict[str, Any]]) -> None:
    """Record blocks a pruning pass took out of the graph (fxshift.prune.blocks.Block.to_dict
    entries, in removal order), for the recipe that save() writes."""
    gm.meta.setdefault(_REMOVED, []).extend(entries)


def removed_blocks_of(gm: fx.GraphModule) -> list[dict[str, Any]]:
    """Every block removed from `gm` so far, in the order they were removed."""
    return list((_meta(gm) or {}).get(_REMOVED, []))


def set_onnx_path(gm: fx.GraphModule, path: Any) -> None:
    gm.meta[_ONNX_PATH] = path


def onnx_path_of(gm: fx.GraphModule) -> Any:
    """The file ExportOnnxPass wrote, or None."""
    return (_meta(gm) or {}).get(_ONNX_PATH)


# ----- planning under torch.distributed -----------------------------------------------------------
# fxshift.train.apply_synced runs a pipeline on every rank. Plans that depend on measurements
# (Budget(latency=...)) could differ between ranks, so inside apply_synced the planner lets one
# rank choose and broadcasts its plan. Outside it nothing is broadcast (a pipeline run on one rank
# alone must not wait for the others).
_SYNC: contextvars.ContextVar[Optional[tuple[Any, int]]] = contextvars.ContextVar("fxshift_sync", default=None)


@contextlib.contextmanager
def synced_planning(process_group: Any, src: int):
    """Within this block, plans are made on global rank `src` and broadcast over `process_group`."""
    token = _SYNC.set((process_group, src))
    try:
        yield
    finally:
        _SYNC.reset(token)


def planning_sync() -> Optional[tuple[Any, int]]:
    """(process_group, src) inside synced_planning, else None."""
    return _SYNC.get()
