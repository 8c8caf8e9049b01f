"""Canonicalization, right after capture: every op whose weight comes from parameters (conv2d,
linear, addmm, mm, matmul, in torch.fx or aten spelling) becomes a call to a standard nn.Conv2d /
nn.Linear named after the parameter's owner in the original model (a packed "<name>_weight",
e.g. nn.MultiheadAttention's in_proj_weight, gets a layer "<name>" beside it, which then holds it
in the state dict); the forward's other ops stay (a "same" conv keeps its pad). A weight computed
from parameters (weight standardisation) is folded to a constant when the model is in eval mode
(exact at inference). Ops that cannot get a layer keep running as they are, with the reason in
``node.meta["fxshift_skip"]`` (read by fxshift.capture.sites).
Under torch.export, batch_norm and dropout ops become nn.BatchNorm / nn.Dropout modules again so
that ``gm.train()`` / ``gm.eval()`` still switch them.

This module is the one place where fxshift learns what a layer is."""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn

aten = torch.ops.aten

# op -> (kind, parameter names in positional order)
_CONV = ("conv2d", ("input", "weight", "bias", "stride", "padding", "dilation", "groups"))
_LINEAR = ("linear", ("input", "weight", "bias"))
_ADDMM = ("addmm", ("bias", "input", "weight", "beta", "alpha"))
_MM = ("mm", ("input", "weight"))
WEIGHT_OPS: dict[Any, tuple[str, tuple[str, ...]]] = {
    torch.conv2d: _CONV, aten.conv2d.default: _CONV, aten.conv2d.padding: _CONV,
    torch._C._nn.linear: _LINEAR, aten.linear.default: _LINEAR,
    torch.addmm: _ADDMM, aten.addmm.default: _ADDMM,
    torch.mm: _MM, aten.mm.default: _MM, torch.matmul: _MM, operator.matmul: _MM, aten.matmul.default: _MM,
}
_KW_ALIASES = {"self": "input", "mat1": "input", "mat2": "weight", "other": "weight"}
_ADDMM_ALIASES = {"self": "bias", "input": "bias", "mat1": "input", "mat2": "weight"}  # addmm(bias, x, W)
_METHOD_OPS = {"matmul": _MM, "mm": _MM, "__matmul__": _MM}

# Weight ops fxshift has no layer for: reported, never converted.
UNSUPPORTED_OPS: dict[Any, str] = {}
for _name in ("conv1d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "bilinear"):
    UNSUPPORTED_OPS[getattr(torch, _name)] = _name
    for _overload in ("default", "input", "padding"):
        if hasattr(getattr(aten, _name, None), _overload):
            UNSUPPORTED_OPS[getattr(getattr(aten, _name), _overload)] = _name
UNSUPPORTED_OPS[aten.convolution.default] = "convolution"

# ops through which a computed weight is still the parameter itself, rearranged (exact in training too)
_LAYOUT = {"t", "transpose", "permute", "view", "reshape", "contiguous", "flatten", "unsqueeze", "squeeze",
           "clone", "detach", "alias", "expand"}
# ops whose result aliases their input: an in-place op on the result changes the input too
_VIEWS = {"getitem", "slice", "select", "narrow", "view", "reshape", "t", "transpose", "permute", "unsqueeze",
          "squeeze", "expand", "as_strided", "diagonal", "unflatten", "flatten", "alias", "chunk", "split", "unbind"}

SKIP_KEY = "fxshift_skip"
SITE_KEY = "fxshift_site"
OPAQUE_KEY = "fxshift_opaque"  # {layer name: reason} for parameters passed to an opaque function

# Modules whose functions torch.fx records as ordinary ops (anything else called as call_function is
# user code that torch.fx.wrap kept opaque, e.g. torchvision's shifted_window_attention).
_TORCH_MODULES = ("torch", "_operator", "operator", "builtins", "math", "_functools", "functools")


def site_name(param: str) -> str:
    """The layer name of a weight parameter: its owner's path ("layer1.0.conv1" for
    "layer1.0.conv1.weight"), "attn.in_proj" for a packed "attn.in_proj_weight"; any other
    parameter keeps its full name."""
    if param.endswith(".weight"):
        return param[: -len(".weight")]
    return packed_layer_name(param) or param


def packed_layer_name(param: str) -> Optional[str]:
    """Where the layer of a packed parameter lives: "attn.in_proj" for "attn.in_proj_weight"
    (nn.MultiheadAttention's), None for a parameter not named "<name>_weight"."""
    owner, _, attr = param.rpartition(".")
    if not attr.endswith("_weight") or attr == "_weight":
        return None
    return ".".join(x for x in (owner, attr[: -len("_weight")]) if x)


def weight_op(node: fx.Node) -> Optional[tuple[str, tuple[str, ...]]]:
    """(kind, argument names) when `node` is a conv2d/linear/addmm/mm/matmul call, else None."""
    if node.op == "call_function":
        return WEIGHT_OPS.get(node.target)
    if node.op == "call_method":
        return _METHOD_OPS.get(node.target)
    return None


def unsupported_op(node: fx.Node) -> Optional[str]:
    """The name of a weight op fxshift has no layer for (conv1d, conv3d, transposed convs ...)."""
    if node.op == "call_function":
        return UNSUPPORTED_OPS.get(node.target)
    return None


def opaque_function(node: fx.Node) -> Optional[str]:
    """The name of a function torch.fx did not trace into (torch.fx.wrap), else None."""
    if node.op != "call_function" or node.target in WEIGHT_OPS or node.target in UNSUPPORTED_OPS:
        return None
    module = getattr(node.target, "__module__", None) or ""
    if isinstance(node.target, torch._ops.OpOverload) or module.split(".")[0] in _TORCH_MODULES:
        return None
    return f"{module}.{getattr(node.target, '__qualname__', node.target)}"


def opaque_weights(gm: fx.GraphModule, node: fx.Node) -> list[str]:
    """Layer names of the matrix or kernel parameters (dim >= 2) that reach `node`, a call of a
    function torch.fx kept opaque: fxshift cannot see the ops inside, so no pass converts them."""
    names: list[str] = []
    for arg in node.all_input_nodes:
        src = source_of(gm, arg)
        for param in [] if src.from_inputs else src.params:
            if _attr(gm, param).dim() >= 2 and site_name(param) not in names:
                names.append(site_name(param))
    return names


def bind(node: fx.Node, names: tuple[str, ...]) -> dict[str, Any]:
    """The op's arguments by name (positional, then keyword, with the aliases torch uses)."""
    out = dict(zip(names, node.args))
    aliases = _ADDMM_ALIASES if names is _ADDMM[1] else _KW_ALIASES
    for key, value in node.kwargs.items():
        out[aliases.get(key, key)] = value
    return out


@dataclass
class Source:
    """Where a tensor argument comes from: parameters only (with the nodes computing it), or not."""

    params: list[str] = field(default_factory=list)   # get_attr targets of Parameters, in graph order
    constants: list[str] = field(default_factory=list)  # get_attr targets of buffers / plain tensors
    nodes: list[fx.Node] = field(default_factory=list)  # the computing nodes (get_attr excluded), graph order
    from_inputs: bool = False
    layout_only: bool = True

    @property
    def computed(self) -> bool:
        return bool(self.nodes)


def _attr(gm: fx.GraphModule, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def source_of(gm: fx.GraphModule, arg: Any) -> Source:
    """Trace `arg` back through the graph: which parameters, constants and computing nodes it
    depends on, and whether it depends on the model's inputs."""
    src = Source()
    if not isinstance(arg, fx.Node):
        return src
    seen: set[fx.Node] = set()
    stack = [arg]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            src.from_inputs = True
        elif node.op == "get_attr":
            value = _attr(gm, node.target)
            (src.params if isinstance(value, nn.Parameter) else src.constants).append(node.target)
        else:
            src.nodes.append(node)
            if _op_name(node) not in _LAYOUT:
                src.layout_only = False
            stack.extend(node.all_input_nodes)
            stack.extend(_mutations(node))  # qkv_bias = b.clone(); qkv_bias[n:2 * n].zero_() (Swin V2)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    src.nodes.sort(key=order.__getitem__)
    return src


def _op_name(node: fx.Node) -> str:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name.split(".")[0]


def _in_place(node: fx.Node) -> bool:
    name = _op_name(node)
    if node.op == "call_function" and node.target is operator.setitem:
        return True
    return node.op in ("call_function", "call_method") and name.endswith("_") and not name.startswith("_")


def _mutations(node: fx.Node) -> list[fx.Node]:
    """In-place ops that change `node`'s value, directly or through views of it."""
    found, stack = [], list(node.users)
    while stack:
        user = stack.pop()
        if _in_place(user):
            found.append(user)
        elif _op_name(user) in _VIEWS:
            stack.extend(user.users)
    return found


def evaluate(gm: fx.GraphModule, arg: fx.Node) -> torch.Tensor:
    """The value of a node computed from parameters and constants only (no model input), after the
    in-place ops that change it."""
    values: dict[fx.Node, Any] = {}

    def value(n: Any) -> Any:
        return fx.node.map_arg(n, lambda m: values[m]) if isinstance(n, (fx.Node, tuple, list, dict)) else n

    order = [n for n in gm.graph.nodes]
    needed = set()
    stack = [arg]
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(n.all_input_nodes)
            stack.extend(_mutations(n) if n.op != "get_attr" else ())
    with torch.no_grad():
        for n in order:
            if n not in needed:
                continue
            if n.op == "get_attr":
                values[n] = _attr(gm, n.target)
            elif n.op == "call_function":
                values[n] = n.target(*value(n.args), **value(n.kwargs))
            elif n.op == "call_method":
                self_arg, *rest = value(n.args)
                values[n] = getattr(self_arg, n.target)(*rest, **value(n.kwargs))
            elif n.op == "call_module":
                values[n] = gm.get_submodule(n.target)(*value(n.args), **value(n.kwargs))
    return values[arg].detach().clone()


@dataclass
class Site:
    """One weight op to canonicalize: its node, kind and bound arguments, and the weight's source."""

    node: fx.Node
    kind: str
    args: dict[str, Any]
    weight: Source
    bias: Source

    def settings(self) -> tuple:
        """What must agree between call sites sharing one layer."""
        a = self.args
        conv = tuple(_tuple(a.get(k, d)) for k, d in (("stride", 1), ("padding", 0), ("dilation", 1),
                                                      ("groups", 1))) if self.kind == "conv2d" else ()
        return (self.kind, tuple(self.bias.params), conv, a.get("beta", 1), a.get("alpha", 1))


def _tuple(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return value


def _reason(gm: fx.GraphModule, site: Site, training: bool) -> Optional[str]:
    """Why the op cannot become a standard layer, or None."""
    w, b = site.weight, site.bias
    if w.from_inputs or not w.params:
        return "weight is not a parameter"
    if w.constants and not w.computed:
        return "weight is a buffer or constant, not a parameter"
    if w.computed and training and not w.layout_only:
        return ("weight computed from parameters (e.g. weight standardisation); call model.eval() before capture "
                "to fold it into a constant weight (exact at inference)")
    if b.from_inputs or (b.computed and training and not b.layout_only) or (b.constants and not b.params):
        return "bias is not a parameter"
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    if any(_in_place(n) and order[n] > order[site.node] for n in w.nodes + b.nodes):
        return "weight or bias changed in place after the op reads it"
    if site.kind == "addmm" and (site.args.get("beta", 1) != 1 or site.args.get("alpha", 1) != 1):
        return "addmm with beta/alpha other than 1"
    value = evaluate(gm, site.args["weight"]) if w.computed else _attr(gm, site.args["weight"].target)
    if site.kind == "conv2d" and value.dim() != 4:
        return f"conv2d weight of {value.dim()} dimensions"
    if site.kind in ("mm", "addmm") or site.kind == "linear":
        if value.dim() != 2:
            return f"{site.kind} weight of {value.dim()} dimensions"
    return None


def _owner_param(site: Site) -> str:
    weights = [p for p in site.weight.params if p.endswith(".weight")]
    return (weights or site.weight.params)[0]


def _build(gm: fx.GraphModule, site: Site) -> nn.Module:
    w_arg, b_arg = site.args["weight"], site.args.get("bias")
    weight = evaluate(gm, w_arg) if site.weight.computed else _attr(gm, w_arg.target)
    bias = None
    if isinstance(b_arg, fx.Node):
        bias = evaluate(gm, b_arg) if site.bias.computed else _attr(gm, b_arg.target)
    if site.kind == "conv2d":
        a = site.args
        groups = a.get("groups", 1)
        layer = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=_tuple(a.get("stride", 1)),
                          padding=_tuple(a.get("padding", 0)), dilation=_tuple(a.get("dilation", 1)), groups=groups,
                          bias=bias is not None, device="meta")
    else:
        if site.kind in ("addmm", "mm"):  # x @ W with W stored (in, out): the Linear weight is W.T
            weight = weight.detach().t().contiguous()
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=True)
    if bias is not None:
        layer.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
    return layer


def _graph_uses(gm: fx.GraphModule, prefix: str) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op in ("get_attr", "call_module")
            and (n.target == prefix or n.target.startswith(prefix + "."))]


@dataclass
class Canonicalized:
    """What canonicalize did: layers made ({name: note}) and ops left alone ({name: reason})."""

    layers: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    modules: dict[str, str] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)  # state_dict key before -> after (packed weights)


def canonicalize(gm: fx.GraphModule) -> Canonicalized:
    """Rewrite `gm` in place (see the module docstring) and return what was done."""
    result = Canonicalized()
    training = gm.training
    groups: dict[str, list[Site]] = {}
    for node in list(gm.graph.nodes):
        op = weight_op(node)
        if op is None and opaque_function(node) is not None:
            _mark_opaque(gm, node, result)
            continue
        if op is None:
            name = unsupported_op(node)
            if name is not None:
                params = [s for a in node.args[1:2] for s in source_of(gm, a).params]
                if params:
                    node.meta[SITE_KEY] = site_name(params[0])
                    node.meta[SKIP_KEY] = f"unsupported op {name}"
                    result.skipped[site_name(params[0])] = f"unsupported op {name}"
            continue
        kind, names = op
        args = bind(node, names)
        w = source_of(gm, args.get("weight"))
        if (w.from_inputs or not w.params) and kind == "mm":
            left = source_of(gm, args.get("input"))
            if left.params and not left.from_inputs:  # W @ x: the parameter is the left operand
                node.meta[SITE_KEY] = site_name(left.params[0])
                node.meta[SKIP_KEY] = "parameter is the left operand of a matmul (W @ x has no Linear form)"
                result.skipped[site_name(left.params[0])] = node.meta[SKIP_KEY]
            continue
        if w.from_inputs or not w.params:
            continue  # activations times activations (attention): not a weight op
        site = Site(node, kind, args, w, source_of(gm, args.get("bias")))
        groups.setdefault(_owner_param(site), []).append(site)
    packed: list[list[str]] = []
    for param, sites in groups.items():
        name = site_name(param)
        reason = _group_reason(gm, param, sites, training)
        if reason is not None:
            for s in sites:
                s.node.meta[SITE_KEY] = name
                s.node.meta[SKIP_KEY] = reason
            result.skipped[name] = reason
            continue
        if not param.endswith(".weight"):  # a packed weight: the layer is new, beside the parameters
            packed.append([param] + sites[0].bias.params)
            result.renamed.update(zip(packed[-1], (f"{name}.weight", f"{name}.bias")))
        layer = _build(gm, sites[0])
        layer.train(training)
        _install(gm, name, layer)
        for s in sites:
            _replace_call(gm, s.node, name, s.args["input"])
        note = _note(sites[0], len(sites))
        result.layers[name] = note
    _drop_dead(gm, {n for sites in groups.values() for s in sites for n in s.weight.nodes + s.bias.nodes})
    for params in packed:  # now unread: the layer holds them
        for path in params:
            owner, _, attr = path.rpartition(".")
            del (gm.get_submodule(owner) if owner else gm)._parameters[attr]
    result.modules.update(_modules_from_ops(gm, training))
    gm.graph.lint()
    gm.recompile()
    return result


def _mark_opaque(gm: fx.GraphModule, node: fx.Node, result: Canonicalized) -> None:
    reason = (f"passed to {opaque_function(node)}, which torch.fx keeps opaque (torch.fx.wrap): no pass sees "
              "the ops inside; capture='export' traces into it")
    marks = {name: reason for name in opaque_weights(gm, node)}
    if marks:
        node.meta[OPAQUE_KEY] = marks
        result.skipped.update(marks)


def _note(site: Site, calls: int) -> str:
    parts = [f"{site.kind} op"]
    if site.weight.computed:
        parts.append("weight folded to a constant" if not site.weight.layout_only else "weight rearranged")
    if site.bias.computed and not site.bias.layout_only:
        parts.append("bias folded to a constant")
    if calls > 1:
        parts.append(f"{calls} call sites")
    return ", ".join(parts)


def _group_reason(gm: fx.GraphModule, param: str, sites: list[Site], training: bool) -> Optional[str]:
    for s in sites:
        reason = _reason(gm, s, training)
        if reason is not None:
            return reason
    if len({s.settings() for s in sites}) > 1:
        return f"weight shared by {len(sites)} ops with different settings"
    packed = not param.endswith(".weight")
    reason = _packed_reason(gm, param, sites[0]) if packed else None
    if reason is not None:
        return reason
    used = {param} | set(sites[0].bias.params)
    consumed = {s.node for s in sites} | {n for s in sites for n in s.weight.nodes + s.bias.nodes}
    # a layer's owner module, or a packed weight and its bias (their parent keeps other state)
    holders = [param] + sites[0].bias.params if packed else [site_name(param)]
    for node in [n for holder in holders for n in _graph_uses(gm, holder)]:
        others = [u for u in node.users if u not in consumed]
        if node.op == "get_attr" and not others:
            continue  # read only to compute this layer's weight (e.g. a standardisation gain)
        if node.op == "get_attr" and node.target in used:
            return f"weight also used by {len(others)} other op(s) ({others[0].name}: tied weights)"
        return f"module {site_name(param)!r} is also used by {node.name} ({node.target}): the op cannot get a layer of its own"
    return None


def _packed_reason(gm: fx.GraphModule, param: str, site: Site) -> Optional[str]:
    """Why a parameter not called "weight" cannot get a layer beside it, or None. It can when it is
    "<name>_weight", its bias (if any) is the sibling "<name>_bias" and "<name>" is free."""
    not_a_weight = f"parameter {param.rpartition('.')[2]!r} is not a layer's 'weight'"
    name = packed_layer_name(param)
    if name is None:
        return not_a_weight
    if site.weight.computed or site.bias.computed:
        return (f"{not_a_weight}, and its ops read parts of it (nn.MultiheadAttention with a query other "
                "than its key/value projects them with slices of one packed weight), which fxshift does not "
                "split into layers")
    owner, _, attr = name.rpartition(".")
    if site.bias.params and site.bias.params != [f"{name}_bias"]:
        return f"{not_a_weight}, and its bias is not the sibling {attr + '_bias'!r}"
    parent = gm.get_submodule(owner) if owner else gm
    if hasattr(parent, attr):
        return f"{not_a_weight}, and {name!r} (where its layer would go) is taken"
    return None


def _install(gm: fx.GraphModule, name: str, layer: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    try:
        parent = gm.get_submodule(parent_name) if parent_name else gm
    except AttributeError:
        gm.add_submodule(name, layer)
        return
    if attr in parent._parameters:
        del parent._parameters[attr]
    setattr(parent, attr, layer)


def _replace_call(gm: fx.GraphModule, node: fx.Node, name: str, x: fx.Node) -> None:
    with gm.graph.inserting_before(node):
        call = gm.graph.call_module(name, (x,))
    call.meta.update(node.meta)
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)


def _drop_dead(gm: fx.GraphModule, computed: set[fx.Node]) -> None:
    """Erase get_attr nodes, and the weights' old computations (`computed`), left without users."""
    for node in reversed(list(gm.graph.nodes)):
        if not node.users and (node.op == "get_attr" or node in computed):
            gm.graph.erase_node(node)


def _module_path(node: fx.Node, fallback: str) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1][0]
        return path or fallback
    return fallback


def _free_name(gm: fx.GraphModule, name: str) -> str:
    base, i = name, 1
    while True:
        try:
            gm.get_submodule(name)
        except AttributeError:
            owner, _, attr = name.rpartition(".")
            try:
                parent = gm.get_submodule(owner) if owner else gm
            except AttributeError:
                return name
            if not hasattr(parent, attr):
                return name
        name, i = f"{base}_{i}", i + 1


def _modules_from_ops(gm: fx.GraphModule, training: bool) -> dict[str, str]:
    """aten batch_norm / dropout (torch.export spells modules as ops) back to nn modules."""
    made: dict[str, str] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.batch_norm.default:
            name = _batch_norm(gm, node, training)
        elif node.target is aten.dropout.default and len(node.args) >= 2:
            name = _free_name(gm, _module_path(node, "dropout"))
            layer = nn.Dropout(float(node.args[1]))
            layer.train(training)
            _install(gm, name, layer)
            _replace_call(gm, node, name, node.args[0])
        else:
            continue
        if name:
            made[name] = str(node.target)
    _drop_dead(gm, set())
    return made


def _batch_norm(gm: fx.GraphModule, node: fx.Node, training: bool) -> Optional[str]:
    x, w, b, mean, var, *rest = node.args
    if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in (w, b, mean, var)):
        return None
    owners = {a.target.rpartition(".")[0] for a in (w, b, mean, var)}
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if len(owners) != 1 or val is None or val.dim() not in (2, 3, 4, 5):
        return None
    owner = owners.pop()
    allowed = {f"{owner}.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    if any(n.target not in allowed or any(u is not node for u in n.users) and n.target in
           {a.target for a in (w, b, mean, var)} for n in _graph_uses(gm, owner)):
        return None
    momentum, eps = (rest[1], rest[2]) if len(rest) >= 3 else (0.1, 1e-5)
    weight = _attr(gm, w.target)
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[val.dim()]
    layer = cls(weight.shape[0], eps=float(eps), momentum=momentum, device="meta")
    layer.weight, layer.bias = weight, _attr(gm, b.target)
    layer.running_mean, layer.running_var = _attr(gm, mean.target), _attr(gm, var.target)
    container = gm.get_submodule(owner)
    if hasattr(container, "num_batches_tracked"):
        layer.num_batches_tracked = container.num_batches_tracked
    else:
        layer.num_batches_tracked = torch.tensor(0, dtype=torch.long)
    layer.train(training)
    _install(gm, owner, layer)
    _replace_call(gm, node, owner, x)
    return owner
