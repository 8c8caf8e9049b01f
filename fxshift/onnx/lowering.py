"""Per node, the faster of fxshift's native kernel and the node's standard-op function body.

An exported fxshift node (fxshift.ShiftConv2d / ShiftLinear) runs either on libfxshift_ort's
kernel or, inlined, through its function body: onnxruntime then folds the decoded weights into a
float constant and runs its own (MLAS) convolution or GEMM, fused with what follows. Which is
faster depends on the layer and the machine: a memory-bound GEMV streams 5-bit weights instead
of 32-bit ones and wins several times over, while a compute-bound convolution on a CPU without
a faster-than-FMA path (AMX) does the same multiply-adds as MLAS once decoded, and MLAS is the
better-tuned of the two. So the choice is measured, not guessed:

1. every fxshift node's input is captured by one run of the model (batch `batch`, zeros);
2. each distinct node (op, attributes, weights' shape, input shape) is written as a one-node
   model and timed in onnxruntime both ways, round-robin (the plugin on onnxruntime's own thread
   pool, so only one pool runs);
3. a node keeps its kernel unless its body measured at least `margin` faster (the kernel keeps
   the weights packed, the body holds them decoded in float);
4. nodes timed alone miss what happens between them: inlined bodies let onnxruntime fuse a conv
   with its BatchNorm and ReLU and keep its blocked layout from one conv to the next, which a
   custom node in between breaks (on the demo CNN the per-node mix ran 12% slower than all
   bodies). So the whole model is timed three ways, round-robin: every node on the plugin, the
   per-node mix, every node through its body; the fastest wins (the plugin on a tie within
   `margin`).

`lowered(model, choice)` inlines the chosen bodies and keeps the rest as fxshift nodes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import numpy as np

from ..errors import ConfigError
from . import functions
from ..measure.timing import median_times, session_runner
from .sessions import build_session, session_options

__all__ = ["choose_lowering", "lowered", "Lowering", "LOWERINGS"]

#: what a node can run on
LOWERINGS = ("plugin", "body")
_INLINE = "Inline"  # suffix of the function copies that mark nodes to inline


def _session(model: bytes, *, plugin: bool, threads: Optional[int]):
    return build_session(model, session_options(plugin=plugin, threads=threads))


@dataclass
class Lowering:
    """What choose_lowering measured and chose.

    nodes: node name -> {"alone": the faster way timed alone, "plugin_ms", "body_ms"};
    model_ms: whole-model milliseconds of "plugin", "mixed" (the per-node choices) and "body";
    chosen: which of the three won. `choice` maps every node to its lowering in the winner.
    """

    nodes: dict[str, dict[str, Any]]
    model_ms: dict[str, float] = field(default_factory=dict)
    chosen: str = "mixed"

    @property
    def choice(self) -> dict[str, str]:
        if self.chosen == "mixed":
            return {name: info["alone"] for name, info in self.nodes.items()}
        return {name: self.chosen for name in self.nodes}


def _fxshift_nodes(model) -> list:
    return [n for n in model.graph.node if n.domain == functions.DOMAIN]


def _node_names(model) -> None:
    """Give every fxshift node a name (the choice is keyed by it)."""
    for i, node in enumerate(_fxshift_nodes(model)):
        if not node.name:
            node.name = f"fxshift_{node.op_type}_{i}"


def _captured_inputs(model, batch: int, threads: Optional[int]) -> dict[str, np.ndarray]:
    """The first input of every fxshift node, from one run on zeros at `batch` (bodies, stock ops)."""
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    wanted = [n.input[0] for n in _fxshift_nodes(probe)]
    known = {o.name for o in probe.graph.output}
    for name in dict.fromkeys(wanted):
        if name not in known:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    sess = _session(probe.SerializeToString(), plugin=False, threads=threads)
    feeds = {sess.get_inputs()[0].name: np.zeros(_input_shape(probe, batch), dtype=np.float32)}
    outputs = [o.name for o in sess.get_outputs()]
    values = dict(zip(outputs, sess.run(outputs, feeds)))
    return {name: values[name] for name in wanted}


def _one_node_model(model, node, x: np.ndarray):
    """`node` alone, its initializers copied, fed by one float input of x's shape."""
    import onnx
    from onnx import TensorProto, helper

    inits = {t.name: t for t in model.graph.initializer}
    tensors = []
    for name in node.input[1:]:
        if name and name not in inits:
            return None  # a weight computed in the graph: not timed alone
        if name:
            tensors.append(inits[name])
    graph = helper.make_graph([node], "node", [helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT,
                                                                            list(x.shape))],
                              [helper.make_empty_tensor_value_info(node.output[0])], initializer=tensors)
    one = helper.make_model(graph, opset_imports=list(model.opset_import))
    one.ir_version = model.ir_version
    functions.add_functions(one)
    return one


def _signature(model, node, x: np.ndarray) -> str:
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    attrs = sorted((a.name, str(a)) for a in node.attribute)
    return json.dumps([node.op_type, attrs, [inits.get(n) for n in node.input[1:]], list(x.shape)])


def choose_lowering(model: Union[str, bytes, Any], *, batch: int = 1, threads: Optional[int] = None,
                    margin: float = 0.05, min_time: float = 0.1) -> Lowering:
    """Time every fxshift node of `model` (a path, serialized bytes or a ModelProto) on the
    plugin and through its body at batch `batch`, then the whole model all-plugin, mixed and
    all-body, and choose (see the module docstring). Needs the plugin."""
    from .export import inline_functions

    proto = _load(model)
    _node_names(proto)
    captured = _captured_inputs(proto, batch, threads)
    timed: dict[str, dict[str, Any]] = {}
    out: dict[str, dict[str, Any]] = {}
    for node in _fxshift_nodes(proto):
        x = np.random.default_rng(0).standard_normal(captured[node.input[0]].shape).astype(np.float32)
        key = _signature(proto, node, x)
        if key not in timed:
            one = _one_node_model(proto, node, x)
            if one is None:
                timed[key] = {"alone": "plugin", "plugin_ms": None, "body_ms": None}
            else:
                runners = {"plugin": session_runner(_session(one.SerializeToString(), plugin=True, threads=threads), [x]),
                           "body": session_runner(_session(inline_functions(one).SerializeToString(), plugin=False,
                                                          threads=threads), [x])}
                t = median_times(runners, min_time=min_time)
                timed[key] = {"alone": "body" if t["body"] < (1.0 - margin) * t["plugin"] else "plugin",
                              "plugin_ms": 1e3 * t["plugin"], "body_ms": 1e3 * t["body"]}
        out[node.name] = dict(timed[key])
    result = Lowering(out)
    candidates = {"plugin": {n: "plugin" for n in out}, "mixed": result.choice, "body": {n: "body" for n in out}}
    x = [np.random.default_rng(0).standard_normal(_input_shape(proto, batch)).astype(np.float32)]
    runners = {}
    for kind, choice in candidates.items():
        if kind == "mixed" and choice in (candidates["plugin"], candidates["body"]):
            continue  # the same model as one of the other two
        runners[kind] = session_runner(_session(lowered(proto, choice).SerializeToString(), plugin=True,
                                               threads=threads), x)
    t = median_times(runners, min_time=3 * min_time)
    result.model_ms = {k: 1e3 * v for k, v in t.items()}
    best = min(t, key=t.get)
    result.chosen = best if t[best] < (1.0 - margin) * t["plugin"] else "plugin"
    return result


def _input_shape(model, batch: int) -> list[int]:
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(inputs) != 1:
        raise ConfigError(f"choose_lowering times models with one input; this one has {len(inputs)}")
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in inputs[0].type.tensor_type.shape.dim]
    if any(d is None for d in dims[1:]):
        raise ConfigError(f"input {inputs[0].name!r} has symbolic dimensions besides the batch: {dims}")
    return [batch, *dims[1:]]


def lowered(model: Union[str, bytes, Any], choice: Union[Lowering, Mapping[str, str]]):
    """A copy of `model` (path, bytes or ModelProto) with the nodes `choice` maps to "body"
    inlined (standard ops) and every other fxshift node kept for the plugin. `choice` is what
    choose_lowering returns, or node name -> "plugin" | "body"."""
    if isinstance(choice, Lowering):
        choice = choice.choice
    import onnx
    import onnx.inliner

    proto = _load(model)
    _node_names(proto)
    names = {n.name for n in _fxshift_nodes(proto)}
    wanted = {}
    for name, how in choice.items():
        if how not in LOWERINGS:
            raise ConfigError(f"node {name!r}: lowering {how!r} is not one of {', '.join(LOWERINGS)}")
        if name not in names:
            raise ConfigError(f"node {name!r} is not an fxshift node of this model (it has: {', '.join(sorted(names))})")
        wanted[name] = how
    inline = {n.op_type for n in _fxshift_nodes(proto) if wanted.get(n.name) == "body"}
    if not inline:
        return proto
    for node in _fxshift_nodes(proto):
        if wanted.get(node.name) == "body":
            node.op_type += _INLINE
    for fn in list(proto.functions):
        if fn.domain == functions.DOMAIN and fn.name in inline:
            twin = onnx.FunctionProto()
            twin.CopyFrom(fn)
            twin.name = fn.name + _INLINE
            proto.functions.append(twin)
    proto = onnx.inliner.inline_selected_functions(proto, [(functions.DOMAIN, op + _INLINE) for op in inline])
    kept = [f for f in proto.functions if not f.name.endswith(_INLINE)]
    del proto.functions[:]
    proto.functions.extend(kept)
    return proto


def _load(model: Union[str, bytes, Any]):
    import os

    import onnx

    if isinstance(model, (bytes, bytearray)):
        return onnx.load_from_string(bytes(model))
    if isinstance(model, (str, os.PathLike)):
        return onnx.load(os.fspath(model))
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy
