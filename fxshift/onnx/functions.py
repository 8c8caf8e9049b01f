"""The ``fxshift`` ONNX domain: operator schemas and model-local function bodies.

Two operators, both float32 in and out, weights in the packed shift format of
:mod:`fxshift.ops.packing` (int32 words, ``bits``-wide codes: top bit the sign, the
low ``bits - 1`` bits the shift magnitude ``m`` of ``±2**-m``; with ``has_zero`` the
code ``2**bits - 1`` is the weight 0; ``32 // bits`` codes per word, every output row
starting on a new word):

``fxshift.ShiftConv2d(X, W, B?) -> Y``
    ``Y = Conv(X, unpack(W), B)``; attributes ``weight_shape`` (O, C/group, kh, kw),
    ``strides`` (2), ``pads`` (4, ONNX order, begin == end), ``dilations`` (2),
    ``group``, ``bits``, ``has_zero``.
``fxshift.ShiftLinear(X, W, B?) -> Y``
    ``Y = X @ unpack(W)ᵀ + B`` over the last axis of ``X`` (any rank ≥ 1);
    attributes ``in_features``, ``out_features``, ``bits``, ``has_zero``.

Each operator also ships in the exported file as a model-local ``FunctionProto`` of the
same domain and name whose body mirrors :func:`fxshift.ops.packing.unpack` with
standard ops (Cast → BitShift/BitwiseAnd on uint32 → the codes → Gather from a table of
the ``2**bits`` values, built exactly with reciprocals of ``1 << m`` → Reshape) followed by
``Conv`` or ``Gemm``. A stock onnxruntime runs such a file exactly (it inlines the body and folds
the decode into constants at session start); with fxshift's plugin registered
(:func:`fxshift.onnx.session_options`) the native kernels run instead.

The body also checks the packed size: ``W`` is reshaped to ``(O, ceil(K / (32 // bits)))``,
so a wrong word count fails in Reshape instead of decoding garbage.
"""
from __future__ import annotations

import threading
from typing import Iterable, Optional

import onnx
from onnx import AttributeProto, TensorProto, helper
from onnx.defs import OpSchema

__all__ = ["DOMAIN", "DOMAIN_VERSION", "OPS", "MIN_OPSET", "register_schemas", "shift_conv2d_function",
           "shift_linear_function", "functions_for", "add_functions"]

DOMAIN = "fxshift"
DOMAIN_VERSION = 1
OPS = ("ShiftConv2d", "ShiftLinear")
MIN_OPSET = 18  # BitwiseAnd

_lock = threading.Lock()
_registered = False


# ---------------------------------------------------------------------------------------------
# schemas (let onnxscript / the torch exporter build typed nodes, and onnx's checker and shape
# inference know the ops in this process)
# ---------------------------------------------------------------------------------------------
def _schemas() -> list[OpSchema]:
    A = OpSchema.AttrType
    optional = OpSchema.FormalParameterOption.Optional

    def io() -> dict:
        return dict(
            inputs=[OpSchema.FormalParameter("X", "T", "input, float32"),
                    OpSchema.FormalParameter("W", "tensor(int32)", "packed shift codes, (O, row_words) int32 words"),
                    OpSchema.FormalParameter("B", "T", "bias (O,)", param_option=optional)],
            outputs=[OpSchema.FormalParameter("Y", "T", "output")],
            type_constraints=[("T", ["tensor(float)"], "float32 only (the native kernels' type)")])

    fmt = [OpSchema.Attribute("bits", A.INT, "code width, 2..9", required=True),
           OpSchema.Attribute("has_zero", A.INT, "1: code 2**bits-1 is the weight 0", required=True)]
    conv = OpSchema(
        "ShiftConv2d", DOMAIN, DOMAIN_VERSION,
        doc="Conv (NCHW, zero padding, groups, dilation) with power-of-two weights packed as fxshift shift codes.",
        attributes=[OpSchema.Attribute("weight_shape", A.INTS, "(O, C/group, kh, kw)", required=True),
                    OpSchema.Attribute("strides", A.INTS, "(stride_h, stride_w)", required=True),
                    OpSchema.Attribute("pads", A.INTS, "(top, left, bottom, right), begin == end", required=True),
                    OpSchema.Attribute("dilations", A.INTS, "(dilation_h, dilation_w)", required=True),
                    OpSchema.Attribute("group", A.INT, "groups", required=True)] + fmt,
        **io())
    linear = OpSchema(
        "ShiftLinear", DOMAIN, DOMAIN_VERSION,
        doc="Y = X @ Wᵀ + B over the last axis, W power-of-two weights packed as fxshift shift codes.",
        attributes=[OpSchema.Attribute("in_features", A.INT, "K (last axis of X)", required=True),
                    OpSchema.Attribute("out_features", A.INT, "O", required=True)] + fmt,
        **io())
    return [conv, linear]


def register_schemas() -> None:
    """Registers the fxshift-domain operator schemas with onnx (once per process)."""
    global _registered
    if _registered:
        return
    with _lock:
        if _registered:
            return
        for schema in _schemas():
            try:
                onnx.defs.get_schema(schema.name, DOMAIN_VERSION, DOMAIN)
            except onnx.defs.SchemaError:
                onnx.defs.register_schema(schema)
        _registered = True


# ---------------------------------------------------------------------------------------------
# function bodies
# ---------------------------------------------------------------------------------------------
class _Body:
    """A tiny builder of FunctionProto bodies: each call adds one node and returns its output name."""

    def __init__(self, prefix: str):
        self.nodes: list[onnx.NodeProto] = []
        self.prefix = prefix
        self.count = 0

    def __call__(self, op: str, *inputs: str, refs: Optional[dict] = None, **attrs) -> str:
        self.count += 1
        out = f"{self.prefix}{self.count}_{op.lower()}"
        node = helper.make_node(op, list(inputs), [out], **attrs)
        for name, (ref, kind) in (refs or {}).items():
            a = AttributeProto()
            a.name, a.ref_attr_name, a.type = name, ref, kind
            node.attribute.append(a)
        self.nodes.append(node)
        return out

    def const(self, value, dtype=TensorProto.INT64) -> str:
        if isinstance(value, (list, tuple)):
            t = helper.make_tensor("v", dtype, [len(value)], list(value))
        else:
            t = helper.make_tensor("v", dtype, [], [value])
        return self("Constant", value=t)

    def attr_int(self, name: str) -> str:
        return self("Constant", refs={"value_int": (name, AttributeProto.INT)})

    def attr_ints(self, name: str) -> str:
        return self("Constant", refs={"value_ints": (name, AttributeProto.INTS)})


def _decode(b: _Body, words: str, rows: str, k: str) -> str:
    """Nodes decoding `words` into a float (rows, k) weight; `rows`, `k`: int64 [1] tensors.

    The codes are cut out of the words with unsigned shifts and masks, then looked up in a table
    of the 2**bits values a code can stand for (built with the same exact arithmetic on at most 512
    entries), so the large intermediates are one uint32/int32 tensor per step, not a float chain.
    """
    U32, U64, I32, I64, F32 = (TensorProto.UINT32, TensorProto.UINT64, TensorProto.INT32, TensorProto.INT64,
                               TensorProto.FLOAT)
    bits = b.attr_int("bits")                                   # int64 scalar
    has_zero = b.attr_int("has_zero")
    per = b("Div", b.const(32), bits)                           # codes per word
    row_words = b("Div", b("Sub", b("Add", k, per), b.const(1)), per)   # ceil(k / per), [1]
    # the word count is checked here: Reshape fails unless W has rows * row_words elements
    w = b("Reshape", words, b("Concat", rows, row_words, axis=0))
    w = b("Cast", b("BitwiseAnd", b("Cast", w, to=I64), b.const(0xFFFFFFFF)), to=U32)   # the uint32 bits
    shifts = b("Cast", b("Mul", b("Range", b.const(0), per, b.const(1)), bits), to=U32)
    n_codes = b("BitShift", b.const(1, U64), b("Cast", bits, to=U64), direction="LEFT")  # 2**bits
    code_mask = b("Cast", b("Sub", n_codes, b.const(1, U64)), to=U32)
    codes = b("BitShift", b("Unsqueeze", w, b.const([-1])), shifts, direction="RIGHT")   # (rows, rw, per)
    codes = b("Cast", b("BitwiseAnd", codes, code_mask), to=I32)
    codes = b("Reshape", codes, b("Concat", rows, b.const([-1]), axis=0))
    codes = b("Slice", codes, b.const([0]), k, b.const([1]))                               # (rows, k)

    # table[c] = the weight code c stands for, c = 0 .. 2**bits - 1
    c = b("Range", b.const(0), b("Cast", n_codes, to=I64), b.const(1))                      # int64
    m_mask = b("Sub", b("Cast", b("BitShift", b.const(1, U64), b("Cast", b("Sub", bits, b.const(1)), to=U64),
                                  direction="LEFT"), to=I64), b.const(1))                 # 2**(bits-1) - 1
    m = b("BitwiseAnd", c, m_mask)
    negative = b("Cast", b("Greater", c, m_mask), to=F32)                                  # the top bit
    # 2**-m exactly, m <= 126 (a larger m is below float32's normal range and decodes to ±0, as in C):
    # 2**-m = 1 / (1 << a) * 1 / (1 << r) with a = min(m, 63), r = m - a, every factor a power of two.
    mc = b("Min", m, b.const(126))
    a = b("Min", mc, b.const(63))

    def inv_pow2(e: str) -> str:
        p = b("BitShift", b.const(1, U64), b("Cast", e, to=U64), direction="LEFT")
        return b("Reciprocal", b("Cast", p, to=F32))

    mag = b("Mul", inv_pow2(a), inv_pow2(b("Sub", mc, a)))
    mag = b("Where", b("Greater", m, b.const(126)), b.const(0.0, F32), mag)
    value = b("Mul", mag, b("Sub", b.const(1.0, F32), b("Mul", negative, b.const(2.0, F32))))
    is_zero = b("And", b("Cast", has_zero, to=TensorProto.BOOL), b("Equal", c, b("Cast", code_mask, to=I64)))
    table = b("Where", is_zero, b.const(0.0, F32), value)
    return b("Gather", table, codes, axis=0)


def shift_conv2d_function(opset: int) -> onnx.FunctionProto:
    """The standard-op body of fxshift.ShiftConv2d (opset `opset` of the default domain)."""
    b = _Body("sc")
    shape = b.attr_ints("weight_shape")                               # int64 [4]
    rows = b("Slice", shape, b.const([0]), b.const([1]), b.const([0]))
    k = b("ReduceProd", b("Slice", shape, b.const([1]), b.const([4]), b.const([0])), keepdims=1)
    weight = b("Reshape", _decode(b, "W", rows, k), shape)
    b.nodes.append(helper.make_node("Conv", ["X", weight, "B"], ["Y"]))
    conv = b.nodes[-1]
    for name, kind in (("strides", AttributeProto.INTS), ("pads", AttributeProto.INTS),
                       ("dilations", AttributeProto.INTS), ("group", AttributeProto.INT)):
        a = AttributeProto()
        a.name, a.ref_attr_name, a.type = name, name, kind
        conv.attribute.append(a)
    return helper.make_function(
        DOMAIN, "ShiftConv2d", ["X", "W", "B"], ["Y"], b.nodes, [helper.make_opsetid("", opset)],
        attributes=["weight_shape", "strides", "pads", "dilations", "group", "bits", "has_zero"],
        doc_string="Conv(X, unpack(W), B): the packed shift weights decoded with standard ops.")


def shift_linear_function(opset: int) -> onnx.FunctionProto:
    """The standard-op body of fxshift.ShiftLinear: X reshaped to 2-D, Gemm(transB=1), reshaped back."""
    b = _Body("sl")
    rows = b("Unsqueeze", b.attr_int("out_features"), b.const([0]))
    k = b("Unsqueeze", b.attr_int("in_features"), b.const([0]))
    weight = _decode(b, "W", rows, k)                                  # (O, K)
    x_shape = b("Shape", "X")
    x2 = b("Reshape", "X", b("Concat", b.const([-1]), k, axis=0))
    y2 = b("Gemm", x2, weight, "B", transB=1)
    lead = b("Slice", x_shape, b.const([0]), b.const([-1]), b.const([0]))
    b.nodes.append(helper.make_node("Reshape", [y2, b("Concat", lead, rows, axis=0)], ["Y"]))
    return helper.make_function(
        DOMAIN, "ShiftLinear", ["X", "W", "B"], ["Y"], b.nodes, [helper.make_opsetid("", opset)],
        attributes=["in_features", "out_features", "bits", "has_zero"],
        doc_string="X @ unpack(W)ᵀ + B over the last axis: the packed shift weights decoded with standard ops.")


_BUILDERS = {"ShiftConv2d": shift_conv2d_function, "ShiftLinear": shift_linear_function}


def functions_for(op_types: Iterable[str], opset: int) -> list[onnx.FunctionProto]:
    """Function bodies of the given fxshift op types (unknown names are ignored)."""
    return [_BUILDERS[name](opset) for name in sorted(set(op_types)) if name in _BUILDERS]


def add_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Adds (in place) the bodies of the fxshift ops the graph uses and the domain's opset import."""
    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    if not used:
        return model
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset < MIN_OPSET:
        raise ValueError(f"the fxshift function bodies need opset >= {MIN_OPSET} of the default domain, "
                         f"the model imports {opset}")
    have = {(f.domain, f.name) for f in model.functions}
    for fn in functions_for(used, opset):
        if (fn.domain, fn.name) not in have:
            model.functions.append(fn)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    return model
