"""LayerPrunePass: remove whole blocks, chosen by importance and by cost (docs/methods.md §8)."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..context import add_budget_summary, example_inputs_of, record_removed_blocks, report_of
from ..costs import parameter_count
from ..plan.budget import Budget
from ..errors import ConfigError
from ..graph import LayerFilter, Selector
from ..prune.blocks import Block, exclusive_modules, find_blocks, profile_nodes, remove_blocks
from ..prune.criteria import DATA_DRIVEN, resolve_criterion, score_blocks
from ..plan.block_count import BlocksSetting, blocks_to_remove
from ..report import ReportRow


def _check_blocks(blocks: Any) -> BlocksSetting:
    if isinstance(blocks, Budget):
        return blocks
    if isinstance(blocks, bool) or not isinstance(blocks, (int, float)):
        raise ConfigError(f"LayerPrunePass(blocks={blocks!r}): give an int (how many blocks to remove), a float in "
                          "(0, 1) (that fraction of the removable blocks) or fxshift.Budget(macs=/params=/latency=)")
    if isinstance(blocks, int) and blocks < 1:
        raise ConfigError(f"LayerPrunePass(blocks={blocks}): remove at least 1 block (or leave the pass out)")
    if isinstance(blocks, float) and not 0.0 < blocks < 1.0:
        raise ConfigError(f"LayerPrunePass(blocks={blocks}): a fraction of the removable blocks must lie in (0, 1); "
                          "give an int for a count")
    return blocks


class LayerPrunePass(PassBase):
    """Remove whole blocks (LayerPrune, Elkerdawy, Elhoushi et al. 2020; docs/methods.md §8).

    Removable blocks are found by pattern in the traced graph (fxshift.prune.blocks): residual
    units ``add(branch(x), x)`` with an identity shortcut, removed by rewiring the add's users to
    ``x``, and in single-path parts of a network, shape-keeping runs of layers from one conv
    towards the next (VGG-style conv-BN-ReLU). Each is scored (fxshift.prune.criteria) and the
    lowest-scoring ones are removed; the block's modules are deleted from the GraphModule.

    Args:
        blocks: an int (how many blocks to remove), a float in (0, 1) (that fraction of the
            candidates, rounded, at least 1), or ``fxshift.Budget(macs=r)`` / ``Budget(params=r)`` /
            ``Budget(latency=r)``: the fewest blocks, lowest score first, that bring the whole
            model to the fraction r of its cost (latency measured in onnxruntime, each candidate
            model timed round-robin against the original).
        criterion: "l1" (default: works on every block, each has a conv or linear layer), "l2",
            "bn", "taylor", "imprint", "influence" (ShortGPT block influence, for transformers),
            "ensemble" (the paper's five), or a list of names (an ensemble of those: the sum of
            per-criterion ranks).
        calibration: an iterable of (inputs, targets) batches, needed by "taylor", "imprint" and
            "influence" (which takes bare input batches too).
        loss_fn: ``loss_fn(output, target)`` for "taylor" (default cross-entropy).
        include, exclude: name patterns (``"layer3.*"``) or module types choosing the blocks.

    The pass needs the example_inputs given to fxshift.apply (shapes decide which blocks keep
    their shape). Report rows, one per block looked at: action "pruned" / "kept" / "skipped",
    params and MACs before/after, and an extra key "score" (for an ensemble the summed ranks; the
    lowest go first). The removed blocks go into the recipe, so fxshift.save / fxshift.load
    rebuild the pruned structure without scoring again.

    Example:
        >>> gm = fxshift.apply([LayerPrunePass(blocks=fxshift.Budget(latency=0.7), criterion="l1")],
        ...                    torchvision.models.resnet50(), torch.randn(1, 3, 224, 224))
    """

    cli_name = "layerprune"

    def __init__(self, blocks: BlocksSetting = 1, criterion: Union[str, Iterable[str]] = "l1",
                 calibration: Optional[Iterable[Any]] = None, loss_fn: Optional[Callable[..., torch.Tensor]] = None,
                 include: Selector = None, exclude: Selector = None):
        self.blocks = _check_blocks(blocks)
        self.criteria = resolve_criterion(list(criterion) if isinstance(criterion, (list, tuple)) else criterion)
        self.criterion = criterion
        needs_data = [c for c in self.criteria if c in DATA_DRIVEN]
        if needs_data and calibration is None:
            raise ConfigError(f"LayerPrunePass(criterion={criterion!r}): {', '.join(needs_data)} needs calibration "
                              "data: give calibration=[(inputs, targets), ...] (e.g. a DataLoader over training "
                              "data), or use 'l1' or 'l2'")
        if loss_fn is not None and not callable(loss_fn):
            raise ConfigError(f"LayerPrunePass(loss_fn={loss_fn!r}): give a callable loss_fn(output, target)")
        self.calibration = calibration
        self.loss_fn = loss_fn
        self.filter = LayerFilter(include, exclude)

    # ------------------------------------------------------------------------------ the pass
    def call(self, gm: fx.GraphModule) -> PassResult:
        name = type(self).__name__
        inputs = example_inputs_of(gm)
        if inputs is None:
            raise ConfigError(f"{name} needs the model's input shapes to tell which blocks keep their shape: give "
                              f"example_inputs, e.g. fxshift.apply([{name}()], model, torch.randn(1, 3, 224, 224))")
        shapes, node_macs = profile_nodes(gm, inputs)
        found, rejected = find_blocks(gm, shapes)
        rows = report_of(gm)
        candidates: list[Block] = []
        excluded: list[Block] = []
        for block in found:
            (candidates if self.filter(block.name, self._owner(gm, block)) else excluded).append(block)
        if not candidates:
            why = "; ".join(sorted({r.reason for r in rejected})) or "no residual add or shape-keeping conv run"
            raise ConfigError(f"{name}: the model has no removable block{' left by include/exclude' if found else ''} "
                              f"({why}); nothing to prune with blocks={self.blocks!r}")
        cost = {b.name: self._cost(gm, b, node_macs) for b in candidates}
        scores, _ = score_blocks(gm, candidates, self.criteria, self.calibration, self.loss_fn)
        score = dict(zip([b.name for b in candidates], scores))
        index = {b.name: i for i, b in enumerate(candidates)}
        order = sorted(candidates, key=lambda b: (score[b.name], index[b.name]))
        count, summary = blocks_to_remove(gm, order, self.blocks, cost, node_macs, inputs, name)
        chosen = {b.name for b in order[:count]}
        rank = {b.name: i + 1 for i, b in enumerate(order)}
        for block in found:
            params, macs = cost.get(block.name) or self._cost(gm, block, node_macs)
            row = ReportRow(layer=block.name, pass_name=name, action="kept", params_before=params, params_after=params,
                            macs_before=macs, macs_after=macs, extra={"score": score.get(block.name)})
            if block.name in chosen:
                row.action, row.params_after, row.macs_after = "pruned", 0, 0
                row.reason = f"{block.kind} block, score rank {rank[block.name]} of {len(order)} (lowest first)"
            elif block.name in score:
                row.reason = f"{block.kind} block, score rank {rank[block.name]} of {len(order)}: kept"
            else:
                row.action, row.reason = "skipped", "excluded by include/exclude"
            rows.add(row)
        for r in rejected:
            rows.add(ReportRow(layer=r.name, pass_name=name, action="skipped", reason=f"not removable: {r.reason}",
                               extra={"score": None}))
        removed = [b for b in candidates if b.name in chosen]  # graph order
        remove_blocks(gm, removed)
        record_removed_blocks(gm, [{"pass": name, **b.to_dict()} for b in removed])
        if summary is not None:
            add_budget_summary(gm, summary)
        return PassResult(gm, bool(removed))

    # --------------------------------------------------------------------------- the helpers
    @staticmethod
    def _owner(gm: fx.GraphModule, block: Block) -> torch.nn.Module:
        try:
            return gm.get_submodule(block.name)
        except AttributeError:
            return gm.get_submodule(block.modules[0]) if block.modules else gm

    @staticmethod
    def _cost(gm: fx.GraphModule, block: Block, node_macs: dict[str, int]) -> tuple[int, int]:
        params = sum(parameter_count(gm.get_submodule(m)) for m in exclusive_modules(gm, block))
        return params, sum(node_macs.get(n, 0) for n in block.nodes)
