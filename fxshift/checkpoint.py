"""save/load: the weights plus a JSON recipe of structural decisions, never a pickled model.

The file is a torch.save'd dict {"recipe": <JSON text>, "state_dict": {name: tensor}} that
torch.load(weights_only=True) reads. The recipe lists, in order, every module fxshift put into
the model (layer name, method, ranks, options) and, under "removed", the blocks a pruning pass
took out of the graph (block name, its input and output nodes and the nodes removed with it);
load() rebuilds that structure on a fresh instance of the original model without recomputing
any decomposition or block score (removals first, then the modules), then loads the weights.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Optional

import torch
import torch.fx as fx

from .errors import RecipeError
from .nn.base import STRUCTURES
from .context import record_removed_blocks, removed_blocks_of, set_report
from .graph import replace_module
from .prune.gated_graph import rebuild_units, unit_recipe
from .prune.blocks import replay_removals
from .report import Report
from .trace import LeafSpec, trace

FORMAT = "fxshift-recipe"
VERSION = 2  # 2: the "removed" list of pruned blocks


def recipe(gm: torch.nn.Module) -> dict[str, Any]:
    """The structural decisions in `gm`: one entry per fxshift module, outermost first."""
    layers = []
    for name, module in gm.named_modules():
        if name and type(module) in STRUCTURES.values():
            layers.append({"layer": name, **module.spec()})
    out = {"format": FORMAT, "version": VERSION, "layers": layers, "removed": removed_blocks_of(gm)}
    gated = unit_recipe(gm)
    if gated:  # gated units (DynamicPrunePass) fuse conv + BN + activation nodes: rebuilt on the graph
        out["gated"] = gated
    return out


def save(gm: torch.nn.Module, path: str | os.PathLike) -> None:
    """Write `gm`'s weights and recipe to `path` (one file, readable with weights_only=True)."""
    torch.save({"recipe": json.dumps(recipe(gm)), "state_dict": gm.state_dict()}, path)


def _read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise RecipeError(f"{os.fspath(path)!r} is not a readable fxshift checkpoint: {exc}") from exc
    if not isinstance(blob, dict) or not isinstance(blob.get("recipe"), str) or not isinstance(blob.get("state_dict"), dict):
        raise RecipeError(f"{os.fspath(path)!r} is not an fxshift checkpoint (expected keys 'recipe' and 'state_dict')")
    try:
        parsed = json.loads(blob["recipe"])
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{os.fspath(path)!r}: the recipe is not valid JSON ({exc})") from exc
    if parsed.get("format") != FORMAT or not isinstance(parsed.get("layers"), list):
        raise RecipeError(f"{os.fspath(path)!r}: unknown recipe format {parsed.get('format')!r}")
    if parsed.get("version", 0) > VERSION:
        raise RecipeError(f"{os.fspath(path)!r}: recipe version {parsed['version']} is newer than this fxshift "
                          f"understands ({VERSION}); upgrade fxshift")
    return parsed, blob["state_dict"]


def rebuild(gm: fx.GraphModule, layers: list[dict[str, Any]]) -> None:
    """Apply recipe entries to a traced model, in order (outer chains before the layers inside them)."""
    for entry in layers:
        name, method = entry.get("layer"), entry.get("method")
        if method not in STRUCTURES:
            raise RecipeError(f"recipe entry for layer {name!r}: unknown method {method!r} "
                              f"(known: {', '.join(sorted(STRUCTURES))})")
        try:
            original = gm.get_submodule(name)
        except AttributeError:
            raise RecipeError(f"recipe names layer {name!r}, which this model does not have; "
                              "load the checkpoint into the architecture it was saved from") from None
        try:
            replace_module(gm, name, STRUCTURES[method].from_spec(original, entry))
        except RecipeError:
            raise
        except Exception as exc:
            raise RecipeError(f"recipe entry {entry} does not fit layer {name!r} "
                              f"({type(original).__name__}): {exc}") from exc


def remove_recorded_blocks(gm: fx.GraphModule, removed: list[dict[str, Any]]) -> None:
    """Take out of a freshly traced model the blocks a recipe lists as removed, in order."""
    if not isinstance(removed, list):
        raise RecipeError(f"recipe 'removed' must be a list of blocks, got {type(removed).__name__}")
    try:
        replay_removals(gm, removed)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise RecipeError(f"recipe removes a block which does not fit this model ({exc}); load the "
                          "checkpoint into the architecture it was saved from, traced the same way") from None
    record_removed_blocks(gm, removed)


def load(model: torch.nn.Module, path: str | os.PathLike, example_inputs: Any = None, *,
         leaf_modules: LeafSpec = None, concrete_args: Optional[dict[str, Any]] = None) -> fx.GraphModule:
    """Rebuild what `save` wrote onto a fresh instance of the original model and load its weights.

    Nothing is recomputed (no decomposition runs) and the model given is not changed. Tracing
    options must be those used by apply(). Raises RecipeError when the recipe or the weights do
    not fit the model.
    """
    parsed, state = _read(path)
    inputs = example_inputs if example_inputs is None or isinstance(example_inputs, tuple) else (example_inputs,)
    gm = trace(copy.deepcopy(model), inputs, leaf_modules=leaf_modules, concrete_args=concrete_args)
    remove_recorded_blocks(gm, parsed.get("removed", []))
    rebuild(gm, parsed["layers"])
    if parsed.get("gated"):
        rebuild_units(gm, parsed["gated"])
    try:
        gm.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RecipeError(f"the saved weights do not fit the rebuilt model: {exc}") from exc
    set_report(gm, Report())
    gm.recompile()
    return gm
