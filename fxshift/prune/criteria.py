"""Block importance criteria for LayerPrune (docs/methods.md §8): a low score means "remove first".

Every criterion turns a filter-level measure into one number per block:

- ``l1`` / ``l2``: the mean, over the filters of every weight layer in the block (convolutions and
  linear layers, fxshift's decomposed chains included; a filter is one output channel of a conv,
  one row of a weight matrix), of the filter's mean absolute weight ‖f‖₁/n or root-mean-square
  weight ‖f‖₂/√n (n = the filter's size, so that layers of different fan-in compare).
- ``bn``: the mean |γ| over the channels of the block's BatchNorms.
- ``taylor``: for each filter Σ(w·∂L/∂w)² over its weights, accumulated over the calibration
  batches (loss ``loss_fn(output, target)``, cross-entropy by default), averaged over the filters.
- ``imprint``: weight imprinting. The features after the block (global-average-pooled, tokens of
  (N, T, C) activations averaged, L2-normed)
  give class means that act as a cosine classifier on the calibration data; the score is that
  classifier's accuracy after the block minus its accuracy on the block's input, i.e. what the
  block adds (accuracy alone grows with depth and would rank every block by its position).
- ``influence``: block influence (ShortGPT, Men et al. 2024): 1 − the mean cosine similarity of
  the block's input and output on the calibration data, per token over the channels for (N, T, C)
  activations (transformers), per sample over the whole activation otherwise. A block that barely
  changes its input scores low. Targets are not needed (batches may be bare inputs).
- ``ensemble``: the sum over criteria of each block's rank (0 = least important, ties averaged);
  ``"ensemble"`` means the paper's five (l1, l2, bn, taylor, imprint), a list of names an ensemble of those.
  On blocks without an affine BatchNorm (transformers, LayerNorm models) "ensemble" leaves ``bn`` out,
  with a warning; a list naming ``bn`` explicitly raises there.

Scoring never changes the model: weights, gradients and BatchNorm statistics stay as they were
(the data-driven criteria run in eval mode and take gradients with torch.autograd.grad).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .blocks import Block

__all__ = ["CRITERIA", "DATA_DRIVEN", "ENSEMBLE", "resolve_criterion", "score_blocks", "ensemble_ranks"]

Calibration = Optional[Iterable[tuple[Any, torch.Tensor]]]
Criterion = Callable[..., list[float]]

#: criterion name -> function(gm, blocks, calibration, loss_fn) -> one score per block.
CRITERIA: dict[str, Criterion] = {}
#: criteria that need calibration batches.
DATA_DRIVEN = frozenset({"taylor", "imprint", "influence"})
#: what criterion="ensemble" combines.
ENSEMBLE = ("l1", "l2", "bn", "taylor", "imprint")


def _register(name: str) -> Callable[[Criterion], Criterion]:
    def register(fn: Criterion) -> Criterion:
        CRITERIA[name] = fn
        return fn

    return register


def resolve_criterion(criterion: Any) -> tuple[str, ...]:
    """The criteria a `criterion` option names: one name, "ensemble", or a list (an ensemble).
    Raises ConfigError for unknown names."""
    if isinstance(criterion, str):
        names = ENSEMBLE if criterion == "ensemble" else (criterion,)
    elif isinstance(criterion, (list, tuple)) and criterion and all(isinstance(c, str) for c in criterion):
        names = tuple(dict.fromkeys(criterion))
    else:
        raise ConfigError(f"criterion={criterion!r}: give one of {', '.join(sorted(CRITERIA))}, 'ensemble', "
                          "or a list of those names (an ensemble of them)")
    unknown = [n for n in names if n not in CRITERIA]
    if unknown:
        raise ConfigError(f"criterion={criterion!r}: unknown criterion {', '.join(map(repr, unknown))}; "
                          f"known: {', '.join(sorted(CRITERIA))}, 'ensemble'")
    return names


def _modules(gm: fx.GraphModule, block: Block, types: tuple[type, ...]) -> list[nn.Module]:
    out: list[nn.Module] = []
    for name in block.modules:
        for m in gm.get_submodule(name).modules():
            if isinstance(m, types) and all(m is not o for o in out):
                out.append(m)
    return out


def _weights(gm: fx.GraphModule, block: Block) -> list[torch.Tensor]:
    """The weight matrices and kernels of the block's layers (parameters named *weight with 2 or
    more dims; embeddings excluded), each once."""
    out: list[torch.Tensor] = []
    for name in block.modules:
        for m in gm.get_submodule(name).modules():
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
                continue
            for pname, p in m.named_parameters(recurse=False):
                if pname.endswith("weight") and p.ndim >= 2 and all(p is not o for o in out):
                    out.append(p)
    if not out:
        raise ConfigError(f"block {block.name!r} has no weight layer (conv or linear) to score: use "
                          "criterion='influence' or 'imprint', or exclude the block")
    return out


def _filter_norm_score(gm: fx.GraphModule, blocks: Sequence[Block], p: int) -> list[float]:
    scores = []
    for block in blocks:
        per_filter = []
        for weight in _weights(gm, block):
            w = weight.detach().flatten(1).float()
            n = w.shape[1]
            per_filter.append(w.abs().mean(1) if p == 1 else w.pow(2).sum(1).div(n).sqrt())
        scores.append(torch.cat(per_filter).mean().item())
    return scores


@_register("l1")
def l1_score(gm: fx.GraphModule, blocks: Sequence[Block], calibration: Calibration = None,
             loss_fn: Any = None) -> list[float]:
    """Mean over the block's filters (conv output channels, weight-matrix rows) of their mean absolute weight."""
    return _filter_norm_score(gm, blocks, 1)


@_register("l2")
def l2_score(gm: fx.GraphModule, blocks: Sequence[Block], calibration: Calibration = None,
             loss_fn: Any = None) -> list[float]:
    """Mean over the block's filters (conv output channels, weight-matrix rows) of their root-mean-square weight."""
    return _filter_norm_score(gm, blocks, 2)


def _affine_norms(gm: fx.GraphModule, block: Block) -> list[nn.Module]:
    return [m for m in _modules(gm, block, (nn.modules.batchnorm._BatchNorm,)) if m.weight is not None]


@_register("bn")
def bn_score(gm: fx.GraphModule, blocks: Sequence[Block], calibration: Calibration = None,
             loss_fn: Any = None) -> list[float]:
    """Mean |γ| over the channels of the block's BatchNorms."""
    scores = []
    for block in blocks:
        norms = _affine_norms(gm, block)
        if not norms:
            raise ConfigError(f"block {block.name!r} has no affine BatchNorm, so criterion 'bn' cannot score it: "
                              "use 'l1', 'l2', 'taylor', 'influence' or 'imprint', or exclude the block")
        scores.append(torch.cat([m.weight.detach().abs().flatten().float() for m in norms]).mean().item())
    return scores


class _eval_mode:
    """Eval mode for the duration (BatchNorm statistics untouched), each module's mode restored."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self) -> nn.Module:
        self.modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()
        return self.module

    def __exit__(self, *exc: Any) -> None:
        for m, training in self.modes:
            m.training = training


def _as_args(inputs: Any) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _batches(calibration: Calibration, name: str, targets: bool = True) -> Iterable[tuple[tuple, Any]]:
    if calibration is None:
        raise ConfigError(f"criterion {name!r} is data-driven: give calibration=[(inputs, targets), ...] "
                          "(an iterable of batches, e.g. a DataLoader), or use 'l1', 'l2' or 'bn'")
    count = 0
    for batch in calibration:
        if not targets and isinstance(batch, torch.Tensor):
            count += 1
            yield (batch,), None
            continue
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ConfigError(f"criterion {name!r}: each calibration batch must be an (inputs, targets) pair")
        count += 1
        yield _as_args(batch[0]), batch[1]
    if count == 0:
        raise ConfigError(f"criterion {name!r}: the calibration iterable gave no batches")


@_register("taylor")
def taylor_score(gm: fx.GraphModule, blocks: Sequence[Block], calibration: Calibration = None,
                 loss_fn: Any = None) -> list[float]:
    """Σ(w·∂L/∂w)² per filter, accumulated over the calibration batches, averaged over the block's filters."""
    loss_fn = loss_fn or F.cross_entropy
    convs = [_weights(gm, b) for b in blocks]
    weights = [w for ws in convs for w in ws]
    unique = list({id(w): w for w in weights}.values())
    totals = {id(w): torch.zeros(w.shape[0]) for w in unique}
    flags = [(w, w.requires_grad) for w in unique]
    with _eval_mode(gm):
        try:
            for w in unique:
                w.requires_grad_(True)
            for args, target in _batches(calibration, "taylor"):
                loss = loss_fn(gm(*args), target)
                grads = torch.autograd.grad(loss, unique, allow_unused=True)
                for w, g in zip(unique, grads):
                    if g is not None:
                        totals[id(w)] += (w.detach() * g).pow(2).flatten(1).sum(1).float()
        finally:
            for w, flag in flags:
                w.requires_grad_(flag)
    return [torch.cat([totals[id(w)] for w in ws]).mean().item() for ws in convs]


def _imprint_accuracy(features: torch.Tensor, labels: torch.Tensor) -> float:
    f = F.normalize(features.float(), dim=1)
    classes = labels.unique()
    means = torch.stack([f[labels == c].mean(0) for c in classes])
    predicted = classes[(f @ F.normalize(means, dim=1).T).argmax(1)]
    return (predicted == labels).float().mean().item()


def _pooled(value: Any) -> Optional[torch.Tensor]:
    """(N, C) features: (N, C, H, W) averaged over space, (N, T, C) tokens averaged over T."""
    if not isinstance(value, torch.Tensor) or value.ndim < 2:
        return None
    if value.ndim == 3:
        return value.detach().mean(1)
    return value.detach().flatten(2).mean(2) if value.ndim > 2 else value.detach()


@_register("imprint")
def imprint_score(gm: fx.GraphModule, blocks: Sequence[Block], calibration: Calibration = None,
                  loss_fn: Any = None) -> list[float]:
    """Imprinted cosine-classifier accuracy after the block minus before it, on the calibration data."""
    wanted = {b.input for b in blocks} | {b.output for b in blocks}
    features: dict[str, list[torch.Tensor]] = {n: [] for n in wanted}
    labels: list[torch.Tensor] = []

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            value = super().run_node(n)
            if n.name in wanted:
                pooled = _pooled(value)
                if pooled is not None:
                    features[n.name].append(pooled)
            return value

    with _eval_mode(gm), torch.no_grad():
        for args, target in _batches(calibration, "imprint"):
            _Recorder(gm).run(*args)
            labels.append(target.detach().flatten())
    y = torch.cat(labels)
    accuracy = {}
    for name, parts in features.items():
        if not parts:
            raise ConfigError(f"criterion 'imprint': node {name} gives no (N, C, ...) features to imprint")
        accuracy[name] = _imprint_accuracy(torch.cat(parts), y)
    return [accuracy[b.output] - accuracy[b.input] for b in blocks]


def _similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarities of input and output: per token over the channels for (N, T, C), per sample otherwise."""
    a, b = a.detach().float(), b.detach().float()
    if a.ndim == 3:
        return F.cosine_similarity(a, b, dim=-1, eps=1e-8).flatten()
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=1e-8)


@_register("influence")
def influence_score(gm: fx.GraphModule, blocks: Sequence[Block], calibration: Calibration = None,
                    loss_fn: Any = None) -> list[float]:
    """Block influence 1 − E[cos(x_in, x_out)] over the calibration data (ShortGPT)."""
    wanted = {b.input for b in blocks} | {b.output for b in blocks}
    total = [0.0] * len(blocks)
    count = [0] * len(blocks)

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            value = super().run_node(n)
            if n.name in wanted and isinstance(value, torch.Tensor):
                values[n.name] = value
            return value

    with _eval_mode(gm), torch.no_grad():
        for args, _ in _batches(calibration, "influence", targets=False):
            values: dict[str, torch.Tensor] = {}
            _Recorder(gm).run(*args)
            for i, b in enumerate(blocks):
                if b.input not in values or b.output not in values or values[b.input].shape != values[b.output].shape:
                    raise ConfigError(f"criterion 'influence': block {b.name!r} gives no input and output tensors "
                                      "of one shape to compare")
                sims = _similarity(values[b.input], values[b.output])
                total[i] += sims.sum().item()
                count[i] += sims.numel()
    return [1.0 - t / c for t, c in zip(total, count)]


def ensemble_ranks(scores: dict[str, list[float]]) -> list[float]:
    """Sum over criteria of each block's rank (0 = lowest score; tied scores share their mean rank)."""
    total: Optional[list[float]] = None
    for values in scores.values():
        order = sorted(range(len(values)), key=lambda i: values[i])
        ranks = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                ranks[order[k]] = (i + j) / 2
            i = j + 1
        total = ranks if total is None else [a + b for a, b in zip(total, ranks)]
    return total or []


def score_blocks(gm: fx.GraphModule, blocks: Sequence[Block], criteria: Sequence[str], calibration: Calibration = None,
                 loss_fn: Any = None) -> tuple[list[float], dict[str, list[float]]]:
    """One score per block (an ensemble's summed ranks when several criteria are named) and the
    per-criterion scores. Calibration data is read once per data-driven criterion, so give a
    re-iterable (a list or a DataLoader), not a one-shot generator, for more than one."""
    if not blocks:
        return [], {}
    if calibration is not None and any(c in DATA_DRIVEN for c in criteria) and iter(calibration) is calibration \
            and sum(c in DATA_DRIVEN for c in criteria) > 1:
        calibration = list(calibration)
    if tuple(criteria) == ENSEMBLE and not all(_affine_norms(gm, b) for b in blocks):
        without = [b.name for b in blocks if not _affine_norms(gm, b)]
        warnings.warn(f"criterion='ensemble': {len(without)} block(s) have no affine BatchNorm ({without[0]!r} ...), "
                      "so 'bn' is left out of the ensemble (l1, l2, taylor, imprint remain)", stacklevel=3)
        criteria = tuple(c for c in criteria if c != "bn")
    per = {name: CRITERIA[name](gm, blocks, calibration, loss_fn) for name in criteria}
    if len(criteria) == 1:
        return per[criteria[0]], per
    return ensemble_ranks(per), per
