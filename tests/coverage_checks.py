"""The coverage checks shared by tests/test_coverage.py and scripts/coverage.py: models nobody on the
team wrote (timm, transformers, torchvision; random init, small inputs), an independent torch.export
census of their weight ops, and per model and pass: capture at batch 1 and 8, every census weight
op reported (converted or skipped with a reason), Tucker at full rank exact, shift → freeze →
export_onnx → onnxruntime with fxshift's plugin, save/load exact."""
from __future__ import annotations

import copy
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.utils._pytree as pytree
from torch import nn

import fxshift

TUCKER_EXACT = 1e-5   # relative weight reconstruction error of each layer, Tucker at full rank
TUCKER_OUTPUT = 1e-4  # relative output error of the whole model, Tucker at full rank (float32 through ~50 layers)
ONNX_TOL = 1e-4       # relative error onnxruntime (with the plugin) vs torch, shift-quantised model
CAPTURE_TOL = 1e-5    # relative error of the captured graph vs the model, batch 1 and 8
CONVERTED = {"decomposed", "shifted", "pruned", "gated", "kept"}


@dataclass
class Spec:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], tuple]
    quick: bool = False


def _image(size: int) -> Callable[[int], tuple]:
    def make(batch: int) -> tuple:
        return (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)),)
    return make


def _ids(batch: int) -> tuple:
    return (torch.randint(0, 96, (batch, 8), generator=torch.Generator().manual_seed(batch)),)


def _randomise(model: nn.Module) -> nn.Module:
    """Random init everywhere (timm zero-initialises some weights, e.g. last BN of residual branches)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn_like(p) * (1.0 / max(1, p[0].numel())) ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def timm_model(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        torch.manual_seed(0)
        return _randomise(timm.create_model(name, pretrained=False, **kwargs))
    return build


def timm_layers_toy() -> nn.Module:
    """timm's own layer classes the passes could not see before canonicalization: "same" padding
    (Conv2dSame: pad then F.conv2d), weight standardisation (StdConv2d, ScaledStdConv2d), timm's Linear."""
    from timm.layers import Conv2dSame, Linear, ScaledStdConv2d, StdConv2d

    torch.manual_seed(0)
    model = nn.Sequential(Conv2dSame(3, 8, 3, stride=2), nn.ReLU(), StdConv2d(8, 16, 3, padding=1), nn.ReLU(),
                          ScaledStdConv2d(16, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), Linear(16, 10))
    return _randomise(model)


def bert() -> nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=96, max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()


def gpt2() -> nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=96, n_positions=32, use_cache=False,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def vit_hf() -> nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=32, patch_size=8)
    return transformers.ViTModel(cfg, add_pooling_layer=False).eval()


def torchvision_model(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        torch.manual_seed(0)
        options = {"googlenet": {"init_weights": False, "aux_logits": False},
                   "inception_v3": {"init_weights": False, "aux_logits": False}}.get(name, {})
        return torchvision.models.get_model(name, weights=None, **options).eval()
    return build


SPECS: list[Spec] = [
    Spec("timm_layers_toy", timm_layers_toy, _image(16), quick=True),
    Spec("BertModel", bert, _ids, quick=True),
    Spec("GPT2LMHeadModel", gpt2, _ids, quick=True),
    Spec("mobilevit_xxs", timm_model("mobilevit_xxs"), _image(64)),
    Spec("ViTModel", vit_hf, _image(32)),
    Spec("resnet50", timm_model("resnet50"), _image(64)),
    Spec("efficientnet_b0", timm_model("efficientnet_b0"), _image(64)),
    Spec("tf_efficientnet_b0", timm_model("tf_efficientnet_b0"), _image(64)),
    Spec("resnetv2_50x1_bit", timm_model("resnetv2_50x1_bit"), _image(64)),
    Spec("mobilenetv3_large_100", timm_model("mobilenetv3_large_100"), _image(64)),
    Spec("convnext_atto", timm_model("convnext_atto"), _image(64)),
    Spec("regnety_002", timm_model("regnety_002"), _image(64)),
    Spec("vit_tiny_patch16_224", timm_model("vit_tiny_patch16_224", img_size=64), _image(64)),
    Spec("swin_tiny_patch4_window7_224", timm_model("swin_tiny_patch4_window7_224", img_size=112), _image(112)),
]


def torchvision_specs() -> list[Spec]:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    def size(name: str) -> int:  # the smallest input each family takes
        return 224 if name.startswith(("vit_", "maxvit")) else 96 if name == "inception_v3" else 64
    return [Spec(f"torchvision.{n}", torchvision_model(n), _image(size(n))) for n in names]


# ----------------------------------------------------------------------------- census
_CENSUS_OPS = {  # aten op -> index of the weight argument
    "aten.conv1d.default": 1, "aten.conv2d.default": 1, "aten.conv3d.default": 1, "aten.conv2d.padding": 1,
    "aten.convolution.default": 1, "aten.conv_transpose2d.input": 1, "aten.linear.default": 1,
    "aten.addmm.default": 2, "aten.mm.default": 1, "aten.matmul.default": 1, "aten.bmm.default": 1,
}


def census(model: nn.Module, inputs: tuple) -> dict[str, str]:
    """{layer name: aten op} for every op of a fresh torch.export of `model` whose weight depends on
    parameters and not on the inputs (independent of fxshift's capture). A layer is named after its
    weight parameter's owner ("blocks.0.attn.qkv" for "blocks.0.attn.qkv.weight"; "attn.in_proj" for a
    packed "attn.in_proj_weight")."""
    program = torch.export.export(copy.deepcopy(model), inputs, strict=False)
    to_param = program.graph_signature.inputs_to_parameters
    user = set(program.graph_signature.user_inputs)
    found: dict[str, str] = {}
    for node in program.graph.nodes:
        index = _CENSUS_OPS.get(str(node.target)) if node.op == "call_function" else None
        if index is None or len(node.args) <= index:
            continue
        for arg_index in (index, 0) if str(node.target) in ("aten.mm.default", "aten.matmul.default") else (index,):
            params, from_input = _upstream(node.args[arg_index], to_param, user)
            if params and not from_input:
                weights = [p for p in params if p.endswith(".weight")] or params
                name = re.sub(r"(\.weight|(?<=[^.])_weight)$", "", weights[0])
                found.setdefault(name, str(node.target))
                break
    return found


def _upstream(arg: Any, to_param: dict[str, str], user: set[str]) -> tuple[list[str], bool]:
    params, from_input, stack, seen = [], False, [arg], set()
    while stack:
        node = stack.pop()
        if not isinstance(node, torch.fx.Node) or node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            if node.name in to_param:
                params.append(to_param[node.name])
            elif node.name in user:
                from_input = True
        stack.extend(node.all_input_nodes)
    return params, from_input


# ----------------------------------------------------------------------------- checks
def rel(a: Any, b: Any) -> float:
    a, b = first_tensor(a).double(), first_tensor(b).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)][0]


PASSES: dict[str, Callable[[], Any]] = {
    "tucker_full": lambda: fxshift.TuckerDecomposePass(rank=1.0, only_if_cheaper=False),
    "tucker_0.5": lambda: fxshift.TuckerDecomposePass(rank=0.5),
    "shift_q5": lambda: fxshift.ShiftQuantizePass(weight_bits=5, progress=False),
    "layer_prune": lambda: fxshift.LayerPrunePass(blocks=1),
    "dynamic_prune": lambda: fxshift.DynamicPrunePass(),
}


@dataclass
class PassResult:
    converted: int = 0
    skipped: int = 0
    silent: list[str] = field(default_factory=list)
    false_claims: list[str] = field(default_factory=list)
    note: str = ""
    error: Optional[str] = None


def check_pass(model: nn.Module, inputs: tuple, key: str, sites: dict[str, str]) -> tuple[PassResult, Any]:
    """Apply one pass; count census sites converted / skipped / silent (no row)."""
    p = PASSES[key]()
    out = PassResult()
    try:
        gm = fxshift.apply([p], model, inputs)
    except fxshift.ConfigError as exc:  # LayerPrunePass refusing a model (no removable block, nothing to score)
        if key not in ("layer_prune", "dynamic_prune"):
            raise
        out.note = "refused: " + str(exc).split(";")[0][:160]
        return out, None
    rows = [r for r in fxshift.report(gm).rows if r.pass_name == type(p).__name__]
    by_layer: dict[str, list] = {}
    for r in rows:
        by_layer.setdefault(r.layer, []).append(r)
    prefix = key == "layer_prune"
    for site in sites:
        hits = by_layer.get(site, [])
        if not hits and prefix:  # a block's row covers the layers inside it
            hits = [r for r in rows if site.startswith(r.layer + ".") or site in r.extra.get("layers", ())]
        if not hits:
            out.silent.append(site)
        elif any(r.action in CONVERTED and r.action != "kept" for r in hits):
            out.converted += 1
        else:
            out.skipped += 1
            if any(not r.reason for r in hits if r.action == "skipped"):
                out.silent.append(site + " (no reason)")
    out.false_claims = _false_claims(gm, rows)
    return out, gm


def _false_claims(gm: Any, rows: list) -> list[str]:
    """Rows saying converted whose layer the graph still calls as a plain Conv2d / Linear."""
    from fxshift.capture.sites import is_standard_layer

    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    bad = []
    for r in rows:
        if r.action in ("decomposed", "shifted") and r.layer in called:
            if is_standard_layer(gm.get_submodule(r.layer)):
                bad.append(r.layer)
    return bad


@dataclass
class ModelResult:
    name: str
    capture: str = "-"
    census: int = 0
    capture_error: float = float("nan")
    passes: dict[str, PassResult] = field(default_factory=dict)
    tucker_full_error: float = float("nan")
    tucker_full_layer_error: float = float("nan")
    onnx_error: dict[int, float] = field(default_factory=dict)
    onnx_note: str = ""
    save_load_error: float = float("nan")
    seconds: float = 0.0
    error: Optional[str] = None

    def ok(self) -> bool:
        return (self.error is None and self.capture_error <= CAPTURE_TOL
                and all(not p.silent and not p.false_claims and p.error is None for p in self.passes.values())
                and self.tucker_full_layer_error <= TUCKER_EXACT and self.tucker_full_error <= TUCKER_OUTPUT
                and len(self.onnx_error) == 2 and all(e <= ONNX_TOL for e in self.onnx_error.values())
                and self.save_load_error == 0.0)


def run_model(spec: Spec, passes: Optional[list[str]] = None) -> ModelResult:
    """Every check on one model (see the module docstring)."""
    start = time.perf_counter()
    res = ModelResult(spec.name)
    try:
        _run(spec, res, passes or list(PASSES))
    except Exception as exc:  # noqa: BLE001 - the table records the failure
        text = re.sub(r"\s+", " ", str(exc))[:300]
        res.error = f"{type(exc).__name__}: {text}"
    res.seconds = time.perf_counter() - start
    return res


def _run(spec: Spec, res: ModelResult, passes: list[str]) -> None:
    model = spec.build()
    x1, x2, x8 = spec.inputs(1), spec.inputs(2), spec.inputs(8)
    sites = census(model, x2)
    res.census = len(sites)
    gm = fxshift.apply([], model, x1)
    res.capture = fxshift.report(gm).capture
    with torch.no_grad():
        res.capture_error = max(rel(gm(*x1), model(*x1)), rel(gm(*x8), model(*x8)))
    del gm   # one copy of the model at a time beside the original (torchvision's giants hold 2.5 GB each)
    for key in passes:
        out = None
        result, out = check_pass(model, x1, key, sites)
        res.passes[key] = result
        if key == "tucker_full" and out is not None:
            with torch.no_grad():
                res.tucker_full_error = max(rel(out(*x1), model(*x1)), rel(out(*x8), model(*x8)))
            errors = [r.rel_error for r in fxshift.report(out).rows if r.action == "decomposed"]
            res.tucker_full_layer_error = max(errors) if errors else float("nan")
        if key == "shift_q5" and out is not None:
            _onnx_and_save(model, out, x1, x2, res)


def _onnx_and_save(model: nn.Module, gm: Any, x1: tuple, x2: tuple, res: ModelResult) -> None:
    import numpy as np

    from fxshift.onnx import session

    frozen = fxshift.freeze(gm)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        try:
            fxshift.export_onnx(frozen, x1, path)
            files = {1: path, 2: path}
        except fxshift.FxshiftError as exc:
            res.onnx_note = f"dynamic batch: {str(exc)[:160]}; exported per batch with dynamic_batch=False"
            assert "\x1b" not in str(exc), "escape codes in the export error"
            files = {}
            for b, x in ((1, x1), (2, x2)):
                files[b] = os.path.join(folder, f"model{b}.onnx")
                fxshift.export_onnx(frozen, x, files[b], dynamic_batch=False)
        for b, x in ((1, x1), (2, x2)):
            sess = session(files[b])
            feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), [t for t in x if t is not None])}
            got = torch.from_numpy(np.asarray(sess.run(None, feed)[0]))
            with torch.no_grad():
                res.onnx_error[b] = rel(got, first_tensor(frozen(*x)))
        ckpt = os.path.join(folder, "model.pt")
        fxshift.save(gm, ckpt)
        loaded = fxshift.load(model, ckpt, x1)
        with torch.no_grad():
            res.save_load_error = max(rel(loaded(*x), gm(*x)) for x in (x1, x2))


# ----------------------------------------------------------------------------- the table
def markdown(results: list[ModelResult], command: str) -> str:
    """docs/coverage.md: one row per model, one column per pass (converted / skipped / silent)."""
    keys = list(PASSES)
    lines = ["# Coverage: models nobody on the team wrote", "",
             f"Generated by `{command}` (random init, small inputs, torch {torch.__version__}). Each pass column: "
             "weight ops converted / skipped with a reason / **silent** (no report row), against an independent "
             "`torch.export` census of the model's weight ops (conv / linear / addmm / mm / matmul whose weight "
             "comes from parameters). Tucker full: Tucker at full rank (`only_if_cheaper=False`): largest relative "
             f"weight reconstruction error of a layer (≤ {TUCKER_EXACT:g}) / relative output error at batch 1 and 8 "
             f"(≤ {TUCKER_OUTPUT:g}: float32 rounding grows through deep networks). ONNX: shift q5 → freeze → export_onnx → "
             f"onnxruntime with fxshift's plugin, relative error at batch 1 / 2 (≤ {ONNX_TOL:g}). Save/load: "
             "relative difference after fxshift.save / fxshift.load (0 required). Capture error: batch 1 and 8 "
             f"vs the model (≤ {CAPTURE_TOL:g}).", "",
             "| model | capture | weight ops | " + " | ".join(keys) + " | capture err | Tucker full layer / output err | ONNX b1 / b2 "
             "| save/load | ok | s |",
             "|" + "---|" * (len(keys) + 9)]
    for r in results:
        if r.error:
            lines.append(f"| {r.name} | {r.capture} | {r.census} | " + " | ".join("-" for _ in keys)
                         + f" | error: {r.error.replace('|', '/')} | | | | no | {r.seconds:.0f} |")
            continue
        cells = []
        for k in keys:
            p = r.passes.get(k)
            if p is None:
                cells.append("-")
            elif p.note.startswith("refused"):
                cells.append("refused (ConfigError)")
            else:
                silent = len(p.silent) + len(p.false_claims)
                cells.append(f"{p.converted} / {p.skipped} / {'**' + str(silent) + '**' if silent else 0}")
        onnx = " / ".join(f"{r.onnx_error.get(b, float('nan')):.1e}" for b in (1, 2))
        lines.append(f"| {r.name} | {r.capture} | {r.census} | " + " | ".join(cells)
                     + f" | {r.capture_error:.1e} | {r.tucker_full_layer_error:.1e} / {r.tucker_full_error:.1e} | {onnx}"
                     + f"{' (fixed batch)' if r.onnx_note else ''} | {r.save_load_error:.1e} | "
                     + ("yes" if r.ok() else "no") + f" | {r.seconds:.0f} |")
    ok = sum(r.ok() for r in results)
    silent = sum(len(p.silent) + len(p.false_claims) for r in results for p in r.passes.values())
    refusals = sum(1 for r in results for p in r.passes.values() if p.note.startswith("refused"))
    lines += ["", f"**{ok} of {len(results)} models pass every check; {silent} silent weight ops in total; "
              f"{refusals} (model, pass) pairs refused with a ConfigError.**", ""]
    notes = [f"- {r.name}: {r.onnx_note}" for r in results if r.onnx_note]
    if notes:
        lines += ["ONNX notes:", ""] + notes + [""]
    refused = [f"- {r.name}, {k}: {p.note}" for r in results for k, p in r.passes.items() if p.note]
    if refused:
        lines += ["Passes that refused a model with a ConfigError naming why and what to do (their weights got "
                  "no rows):", ""] + refused + [""]
    return "\n".join(lines)
