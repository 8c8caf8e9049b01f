"""Removable blocks of a traced network, found by graph pattern (not by module class).

Two patterns make a block removable (LayerPrune, docs/methods.md §8):

- **residual**: a node ``add(branch(x), x)`` whose branch is computed from ``x`` (it reads no value
  computed before ``x``; it may read parameters, constants and extra graph inputs such as an
  attention mask), holds at least one weight layer (conv or linear), and whose values are used only
  by the add (dead nodes hanging off it, such as timm's ``x.ndim == 4`` asserts or unused shape
  reads, go with it). The shortcut may pass through ``nn.Identity`` (timm's ConvNeXt, RegNetY).
  Removing it rewires the add's users to ``x``. With shapes known, ``x`` and the add's output must
  have the same shape (an identity shortcut).
- **chain**: in a single-path part of the network (no node of it feeds or is fed by a residual
  branch or shortcut), a run of nodes from one ``nn.Conv2d`` (groups = 1) or decomposed conv towards the next weight layer, each the
  only user of the one before; the block is the longest prefix of the run whose output has the
  shape of the conv's input (VGG-style conv-BN-ReLU with equal channels and stride 1). Removing it
  rewires its users to the conv's input.

Everything else that looks like a block is reported as not removable, with the reason: an add with
a projection shortcut or a shape change, a residual branch holding other residual blocks (nested),
a branch whose values are used elsewhere, and concatenations (DenseNet). Finding needs no data;
with ``shapes`` (node name -> output shape, from :func:`node_shapes`) it also checks shapes.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
from torch import nn

from ..nn.base import DecomposedLayer

__all__ = ["Block", "Rejected", "find_blocks", "node_shapes", "profile_nodes", "remove_block", "remove_blocks", "block_from_dict",
           "replay_removals",
           "block_modules", "exclusive_modules"]

_ADDS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_CATS = {torch.cat, torch.concat, torch.concatenate} if hasattr(torch, "concatenate") else {torch.cat, torch.concat}


@dataclass
class Block:
    """A removable block: its name, pattern, the node it starts from (`input`, kept), its last node
    (`output`, whose users are rewired to `input`) and every node removed with it."""

    name: str
    kind: str  # "residual" or "chain"
    input: str
    output: str
    nodes: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"block": self.name, "kind": self.kind, "input": self.input, "output": self.output,
                "nodes": list(self.nodes)}


@dataclass
class Rejected:
    """Something that looks like a block but is not removable, and why."""

    name: str
    reason: str


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADDS:
        return True
    return node.op == "call_method" and node.target in _ADD_METHODS


def _is_cat(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _CATS


def _node_inputs(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


def _scope(node: fx.Node) -> Optional[str]:
    """The innermost module a node was traced inside (from fx's nn_module_stack), if recorded."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    return str(list(stack.keys())[-1]).split("@")[0]


def _common_prefix(names: Iterable[str]) -> str:
    parts = [n.split(".") for n in names]
    if not parts:
        return ""
    out = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        out.append(items[0])
    return ".".join(out)


def _modules_of(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> list[str]:
    """The modules the nodes call, and the conv/linear layers whose weights they read directly."""
    seen: list[str] = []
    for n in nodes:
        name = str(n.target) if n.op == "call_module" else _param_layer(gm, n)
        if name is not None and name not in seen:
            seen.append(name)
    return seen


def _param_layer(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    """For a get_attr of a layer's weight (a parameter named *weight with 2 or more dims, read
    directly: timm's StdConv2d runs F.conv2d on its standardized weight), that layer's name.
    (Tracing keeps only the attributes the graph reads, in plain Modules, so the type is gone.)"""
    if node.op != "get_attr":
        return None
    owner, _, attr = str(node.target).rpartition(".")
    if not owner or not attr.endswith("weight"):
        return None
    module = gm.get_submodule(owner)
    value = dict(module.named_parameters(recurse=False)).get(attr)
    if value is None or value.ndim < 2 or isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return None
    return owner


def profile_nodes(gm: fx.GraphModule, example_inputs: tuple
                  ) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Output shape of every tensor-valued node and the MACs per sample of every call_module node
    (its Conv2d/Linear layers, as fxshift.macs counts them, fxshift's chains included), from one
    eval-mode forward on `example_inputs`. BatchNorm statistics and train/eval modes are kept."""
    from ..costs import _rule_for

    shapes: dict[str, tuple[int, ...]] = {}
    macs: dict[str, int] = {}
    current: list[str] = []
    batch = example_inputs[0].shape[0] if example_inputs and isinstance(example_inputs[0], torch.Tensor) \
        and example_inputs[0].ndim > 1 else 1

    def hook(module: nn.Module, _args: Any, output: Any) -> None:
        rule = _rule_for(module)
        if current and rule is not None and isinstance(output, torch.Tensor):
            per = rule(module, output) * output.shape[0] // max(batch, 1) if output.ndim > 1 else rule(module, output)
            macs[current[-1]] = macs.get(current[-1], 0) + per

    class _Profile(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            current.append(n.name)
            try:
                value = super().run_node(n)
            finally:
                current.pop()
            if isinstance(value, torch.Tensor):
                shapes[n.name] = tuple(value.shape)
            return value

    modes = [(m, m.training) for m in gm.modules()]
    handles = [m.register_forward_hook(hook) for m in gm.modules() if _rule_for(m) is not None]
    gm.eval()
    try:
        with torch.no_grad():
            _Profile(gm).run(*example_inputs)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    return shapes, macs


def node_shapes(gm: fx.GraphModule, example_inputs: tuple) -> dict[str, tuple[int, ...]]:
    """Output shape of every tensor-valued node (see profile_nodes)."""
    return profile_nodes(gm, example_inputs)[0]


def _is_weight_layer(module: nn.Module) -> bool:
    """A layer that transforms with a weight matrix or kernel (a parameter of 2 or more dims:
    convolutions, linear layers, fxshift's decomposed chains); embeddings (lookups) are not."""
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return False
    return any(p.ndim >= 2 for p in module.parameters())


def _weight_nodes(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> list[fx.Node]:
    """The nodes that apply a weight layer: a call_module of one, or a get_attr of a conv or
    linear layer's parameter (functional convs such as timm's StdConv2d)."""
    return [n for n in nodes if (n.op == "call_module" and _is_weight_layer(gm.get_submodule(n.target)))
            or _param_layer(gm, n) is not None]


def _live(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value reaches the graph's output (the others are dead: asserts, unused shape reads)."""
    live: set[fx.Node] = set()
    for n in reversed(list(graph.nodes)):
        if n.op == "output" or any(u in live for u in n.users):
            live.add(n)
    return live


def _descendants(x: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = list(x.users)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.users)
    return seen


def _through_identity(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Follow a shortcut through nn.Identity modules used only on it (timm's ConvNeXt, RegNetY):
    the value it carries and the identity nodes passed."""
    passed = []
    while (node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.Identity
           and len(node.all_input_nodes) == 1 and len(node.users) == 1):
        passed.append(node)
        node = node.all_input_nodes[0]
    return node, passed


def _branch(x: fx.Node, start: fx.Node, stop: fx.Node, live: set[fx.Node]
            ) -> tuple[Optional[list[fx.Node]], str, int]:
    """The nodes removed with the branch computing `start` from `x` (graph order), or None, why
    not, and how far the match got (0: `start` is not computed from `x`; 1: it is, but the branch
    cannot be cut out). Besides `x` the branch may read other values (parameters, constants, extra
    graph inputs such as an attention mask): those used only inside it are removed with it, the
    others kept. Dead nodes hanging off the branch (shape asserts, unused shape reads) are removed
    with it."""
    if start is x:
        return None, "both inputs of the add are the same value", 0
    found: dict[fx.Node, None] = {}
    todo = [start]
    while todo:
        n = todo.pop()
        if n in found or n is x:
            continue
        found[n] = None
        todo.extend(n.all_input_nodes)
    order = [n for n in x.graph.nodes if n in found]
    reaches: dict[fx.Node, bool] = {}
    for n in order:
        reaches[n] = any(i is x or reaches.get(i, False) for i in n.all_input_nodes)
    if not reaches[start]:
        return None, (f"it adds {start.name}, which is not computed from {x.name}: a projection shortcut, "
                      "or a constant, parameter or other input added"), 0
    inner = [n for n in order if reaches[n]]
    dead: dict[fx.Node, None] = {}
    for n in inner:
        for user in n.users:
            if user is stop or user in found:
                continue
            if user in live:
                return None, (f"a value inside its branch ({n.name}) is also used outside it ({user.name})"), 1
            todo = [user]
            while todo:
                d = todo.pop()
                if d not in dead:
                    dead[d] = None
                    todo.extend(d.users)
    keep = set(inner) | set(dead)
    side = [n for n in order if not reaches[n]]
    for n in reversed(side):  # side values used only inside the branch go with it
        if all(u in keep or u is stop for u in n.users):
            keep.add(n)
    return [n for n in x.graph.nodes if n in keep], "", 1


def _residual(gm: fx.GraphModule, add: fx.Node, shapes: Optional[dict], live: set[fx.Node]
              ) -> tuple[Optional[Block], str]:
    operands = [a for a in add.args if isinstance(a, fx.Node)]
    if len(operands) != 2 or add.kwargs.get("alpha", 1) != 1:
        return None, "not a plain two-operand add"
    failures: list[tuple[int, str]] = []
    for shortcut, start in (operands[::-1], operands):  # prefer add(branch(x), x), then add(x, branch(x))
        x, passed = _through_identity(gm, shortcut)
        branch, why, stage = _branch(x, start, add, live)
        if branch is None:
            failures.append((stage, why))
            continue
        if not _weight_nodes(gm, branch):
            failures.append((2, "its branch has no weight layer (e.g. the add inside GELU-tanh, or an "
                                "elementwise formula): not a residual unit"))
            continue
        if shapes is not None and (x.name not in shapes or shapes.get(x.name) != shapes.get(add.name)):
            return None, (f"it changes the shape ({shapes.get(x.name)} -> {shapes.get(add.name)}): "
                          "only identity shortcuts can be removed")
        if shapes is not None and shapes.get(start.name) != shapes.get(x.name):
            return None, (f"its branch gives {shapes.get(start.name)}, broadcast onto the shortcut's "
                          f"{shapes.get(x.name)}: not a residual unit")
        inside = set(branch) | set(passed)
        nodes = [n for n in gm.graph.nodes if n in inside and n is not add] + [add]
        modules = _modules_of(gm, nodes)
        scope = _scope(add)
        if not scope:
            scope = _common_prefix(modules) or add.name
        return Block(scope, "residual", x.name, add.name, [n.name for n in nodes], modules), ""
    return None, max(failures, key=lambda f: f[0])[1] if failures else "no identity shortcut"


def _on_every_path(graph: fx.Graph) -> set[fx.Node]:
    """Nodes that every path from the inputs to the output goes through (the single-path parts of
    the network): those whose count of input-to-node paths times node-to-output paths equals the
    number of input-to-output paths. Parameters and constants do not start paths."""
    nodes = list(graph.nodes)
    into: dict[fx.Node, int] = {}
    for n in nodes:
        if n.op == "placeholder":
            into[n] = 1
        else:
            into[n] = sum(into.get(i, 0) for i in n.all_input_nodes)
    out_of: dict[fx.Node, int] = {}
    for n in reversed(nodes):
        out_of[n] = 1 if n.op == "output" else sum(out_of.get(u, 0) for u in n.users)
    sink = next((n for n in reversed(nodes) if n.op == "output"), None)
    total = into.get(sink, 0) if sink is not None else 0
    return {n for n in nodes if total and into[n] * out_of[n] == total}


def _chain(gm: fx.GraphModule, conv: fx.Node, shapes: dict, busy: set) -> Optional[Block]:
    """A shape-keeping run starting at `conv` in a single-path region (see the module docstring);
    `busy` are the nodes not on every input-to-output path."""
    ins = _node_inputs(conv)
    if len(ins) != 1 or len(ins[0].users) != 1 or ins[0] in busy or conv in busy:
        return None
    x = ins[0]
    if x.name not in shapes:
        return None
    run, node, best = [conv], conv, None
    while True:
        if shapes.get(node.name) == shapes[x.name]:
            best = len(run)
        users = list(node.users)
        if len(users) != 1:
            break
        nxt = users[0]
        if nxt.op in ("output", "placeholder") or nxt in busy or _node_inputs(nxt) != [node]:
            break
        if nxt.op == "call_module" and _is_weight_layer(gm.get_submodule(nxt.target)):
            break  # the next conv (fxshift's decomposed chains included) starts the next block
        run.append(nxt)
        node = nxt
    if best is None:
        return None
    run = run[:best]
    modules = _modules_of(gm, run)
    name = modules[0] if len(modules) == 1 else f"{modules[0]}..{modules[-1]}"
    return Block(name, "chain", x.name, run[-1].name, [n.name for n in run], modules)


def find_blocks(gm: fx.GraphModule, shapes: Optional[dict[str, tuple[int, ...]]] = None
                ) -> tuple[list[Block], list[Rejected]]:
    """The removable blocks of `gm` in graph order, and what was looked at and rejected.

    Without `shapes` only residual blocks are found (their shapes unchecked): that is how load()
    finds the blocks a recipe names again.
    """
    found: list[tuple[fx.Node, Block]] = []
    rejected: list[Rejected] = []
    live = _live(gm.graph)
    for node in gm.graph.nodes:
        if _is_cat(node):
            rejected.append(Rejected(_scope(node) or node.name, "concatenation (DenseNet-style): removing a "
                                                                   "part would change the channel count"))
            continue
        if not _is_add(node):
            continue
        block, why = _residual(gm, node, shapes, live)
        operands = [a for a in node.args if isinstance(a, fx.Node)]
        if block is None:
            if any(isinstance(a, fx.Node) for a in node.args) and len(operands) == 2:
                rejected.append(Rejected(_scope(node) or node.name, why))
            continue
        found.append((node, block))
    # nested residuals: a block whose branch holds another block's add is ambiguous
    names = {b.output: b for _, b in found}
    blocks: list[Block] = []
    for _, block in found:
        inner = [o for o in names if o != block.output and o in block.nodes]
        if inner:
            rejected.append(Rejected(block.name, f"its branch holds other residual blocks ({', '.join(inner)}): "
                                                 "remove those instead"))
        else:
            blocks.append(block)
    if shapes is not None:
        single = _on_every_path(gm.graph)
        busy = {n for n in gm.graph.nodes if n not in single}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                module = gm.get_submodule(node.target)
                if (type(module) is nn.Conv2d and module.groups == 1) or isinstance(module, DecomposedLayer):
                    block = _chain(gm, node, shapes, busy)
                    if block is not None:
                        blocks.append(block)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    blocks.sort(key=lambda b: order[b.output])
    _unique_names(blocks)
    return blocks, rejected


def _unique_names(blocks: list[Block]) -> None:
    seen: dict[str, int] = {}
    for b in blocks:
        if b.name in seen:
            seen[b.name] += 1
            b.name = f"{b.name}#{seen[b.name]}"
        else:
            seen[b.name] = 0


def block_modules(gm: fx.GraphModule, block: Block) -> list[tuple[str, nn.Module]]:
    """(name, module) of the modules the block's nodes call."""
    return [(m, gm.get_submodule(m)) for m in block.modules]


def exclusive_modules(gm: fx.GraphModule, block: Block) -> list[str]:
    """The block's modules that no node outside it uses: those its removal deletes."""
    inside = set(block.nodes)
    used = {str(n.target) for n in gm.graph.nodes if n.name not in inside and n.op in ("call_module", "get_attr")}
    return [m for m in block.modules if not any(u == m or u.startswith(m + ".") for u in used)]


def block_from_dict(gm: fx.GraphModule, entry: dict[str, Any]) -> Block:
    """A Block from a recipe entry (see Block.to_dict), checked against `gm`'s graph: its nodes
    exist, take their inputs only from the block's input, each other or parameters, and only its
    output is used outside it. Raises ValueError naming what does not fit."""
    nodes = {n.name: n for n in gm.graph.nodes}
    names = [str(n) for n in entry.get("nodes") or []]
    source, output = entry.get("input"), entry.get("output")
    missing = [n for n in names + [source] if n not in nodes]
    if missing or not names or output != names[-1]:
        raise ValueError(f"nodes {missing or names} do not form a block of this graph")
    inside = set(names)
    after = _descendants(nodes[source])
    for name in names:
        node = nodes[name]
        for i in node.all_input_nodes:
            if i.name not in inside and i.name != source and i in after:
                raise ValueError(f"node {name} reads {i.name}, which is computed from {source} outside the block")
        if name != output and any(u.name not in inside for u in node.users):
            raise ValueError(f"node {name} is used outside the block")
    block = Block(str(entry.get("block")), str(entry.get("kind")), source, output, names)
    block.modules = _modules_of(gm, [nodes[n] for n in names])
    return block


def replay_removals(gm: fx.GraphModule, entries: Iterable[dict[str, Any]]) -> None:
    """Remove recorded blocks (see Block.to_dict) from a freshly traced `gm` in the order they were
    removed, each checked against the graph as the removals before it left it (block_from_dict),
    so that iterative pruning (several passes, each removing blocks of the last one's result)
    replays. Raises ValueError naming the first block that does not fit. The caller recompiles."""
    alias: dict[str, str] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            raise ValueError(f"recipe entry {entry!r} is not a block")
        source = entry.get("input")
        while source in alias:
            source = alias[source]
        try:
            block = block_from_dict(gm, {**entry, "input": source})
        except ValueError as exc:
            raise ValueError(f"block {entry.get('block')!r}: {exc}") from None
        remove_block(gm, block)
        alias[block.output] = block.input


def remove_blocks(gm: fx.GraphModule, blocks: Iterable[Block]) -> None:
    """Remove blocks one after another (see remove_block). A block whose input was the output of
    one removed before it reads that one's input instead. The caller recompiles."""
    alias: dict[str, str] = {}
    for block in blocks:
        source = block.input
        while source in alias:
            source = alias[source]
        remove_block(gm, Block(block.name, block.kind, source, block.output, block.nodes, block.modules))
        alias[block.output] = source


def remove_block(gm: fx.GraphModule, block: Block) -> None:
    """Rewire the users of the block's output to its input, erase its nodes and delete the
    submodules no remaining node uses. The caller recompiles."""
    nodes = {n.name: n for n in gm.graph.nodes}
    missing = [n for n in block.nodes + [block.input] if n not in nodes]
    if missing:
        raise KeyError(f"block {block.name!r}: nodes {missing} are not in the graph")
    nodes[block.output].replace_all_uses_with(nodes[block.input])
    for name in reversed(block.nodes):
        node = nodes[name]
        if not node.users:
            gm.graph.erase_node(node)
    used = {str(n.target) for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    for name in block.modules:
        if not any(u == name or u.startswith(name + ".") for u in used):
            gm.delete_submodule(name)
