"""The ``fxshift`` command: compress a model into an ONNX file, benchmark it, inspect it.

    fxshift compress MODEL --pass tucker:rank=0.5 --pass shift:weight_bits=5 --export out.onnx
    fxshift compress MODEL --pass shift:weight_bits=4 --export m.onnx --quantize int8 --calibration inputs.npy
    fxshift bench out.onnx [--batch 1 8] [--float MODEL]
    fxshift inspect out.onnx

MODEL is ``torchvision:NAME`` (random init: no weights are downloaded) or ``module:factory`` (a
callable returning an nn.Module; the current directory is importable). A pass is ``NAME`` or
``NAME:key=value,key=value`` with NAME a pass's ``cli_name`` (tucker, cp, spatial, shift, freeze,
recompose, ...; ``fxshift compress --help`` lists them); values
are Python literals (``rank=0.5``, ``activation_bits=(16,16)``) or plain strings (``rank=vbmf``).
Errors are reported in one line (``--debug`` shows the traceback).
"""
from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .ops.packed_weight import ShiftFormat

__all__ = ["main", "build_model", "parse_pass", "pass_classes"]


def pass_classes() -> dict[str, type]:
    """Every public fxshift pass by the `cli_name` it declares, in fxshift's export order."""
    import fxshift

    found = {}
    for name in fxshift.__all__:
        cli_name = getattr(getattr(fxshift, name), "cli_name", None)
        if isinstance(cli_name, str):
            found[cli_name] = getattr(fxshift, name)
    return found


class CliError(Exception):
    """A user error: printed as one line."""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------------
def build_model(spec: str):
    """An nn.Module from ``torchvision:NAME`` or ``module:factory``."""
    if ":" not in spec:
        raise CliError(f"MODEL must be torchvision:NAME or module:factory, got {spec!r}")
    source, name = spec.split(":", 1)
    if source == "torchvision":
        try:
            import torchvision
        except ImportError as exc:
            raise CliError(f"{spec}: torchvision is not installed ({exc})") from None
        factory = getattr(torchvision.models, name, None)
        if factory is None or not callable(factory) or name.startswith("_"):
            raise CliError(f"{spec}: torchvision.models has no model {name!r}")
        options = {"googlenet": {"init_weights": False, "aux_logits": False},
                   "inception_v3": {"init_weights": False, "aux_logits": False}}.get(name, {})
        model = factory(weights=None, **options)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(source)
        except ImportError as exc:
            raise CliError(f"{spec}: cannot import module {source!r} ({exc})") from None
        factory = getattr(module, name, None)
        if not callable(factory):
            raise CliError(f"{spec}: module {source!r} has no callable {name!r}")
        model = factory()
    import torch

    if not isinstance(model, torch.nn.Module):
        raise CliError(f"{spec}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current)
    return parts


def _value(text: str) -> Any:
    text = text.strip()
    if text in ("none", "None", "null"):
        return None
    if text in ("true", "false"):
        return text == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_pass(spec: str):
    """A pass object from ``NAME[:key=value,...]``."""
    name, _, args = spec.partition(":")
    name = name.strip().lower()
    known = pass_classes()
    if name not in known:
        raise CliError(f"--pass {spec!r}: unknown pass {name!r}; known: {', '.join(known)}")
    cls = known[name]
    kwargs = {}
    for item in _split_top(args):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise CliError(f"--pass {spec!r}: expected key=value, got {item!r}")
        kwargs[key.strip()] = _value(value)
    params = inspect.signature(cls).parameters
    unknown = [k for k in kwargs if k not in params]
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise CliError(f"--pass {spec!r}: {cls.__name__} has no option {unknown[0]!r}; options: "
                       f"{', '.join(p for p in params if p not in ('self', 'args', 'kwargs'))}")
    if "progress" in params and "progress" not in kwargs:
        kwargs["progress"] = True
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise CliError(f"--pass {spec!r}: {exc}") from None


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise CliError(f"--input-shape must be comma-separated ints like 1,3,224,224, got {text!r}") from None
    if not dims or any(d < 1 for d in dims):
        raise CliError(f"--input-shape must be positive ints, got {text!r}")
    return dims


# ------------------------------------------------------------------------------------------------
# compress
# ------------------------------------------------------------------------------------------------
class _Steps:
    """One line per step on stderr: what runs now, then how long it took."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    def run(self, label: str, fn: Callable[[], Any]) -> Any:
        self.done += 1
        _log(f"[{self.done}/{self.total}] {label} ...")
        start = time.perf_counter()
        result = fn()
        _log(f"[{self.done}/{self.total}] {label}: done in {time.perf_counter() - start:.1f} s")
        return result


def cmd_compress(args) -> int:
    import torch

    import fxshift
    from fxshift.pipeline import apply, pass_name, run_pass

    passes = [parse_pass(p) for p in args.passes]
    shape = _shape(args.input_shape)
    calibration = None
    if args.quantize is not None:
        if args.export is None:
            raise CliError("--quantize int8 writes an ONNX file: give --export OUT.onnx")
        if args.calibration is None:
            raise CliError("--quantize int8 needs --calibration FILE (.npy or .pt of input batches)")
        calibration = load_calibration(args.calibration, shape)
    elif args.calibration is not None:
        raise CliError("--calibration is used with --quantize int8 (for calibrated shift conversion give the "
                       "pass shift:calibration=... in Python)")
    if args.export is None and args.save is None:
        _log("fxshift compress: neither --export nor --save given; the result is only reported")
    steps = _Steps(1 + len(passes) + (args.export is not None) + (args.save is not None))
    torch.manual_seed(args.seed)
    model = steps.run(f"build {args.model}", lambda: build_model(args.model))
    example = torch.randn(*shape)
    gm = apply([], model, example)
    for p in passes:
        gm = steps.run(pass_name(p), lambda p=p: run_pass(p, gm))
    if args.report:
        print(fxshift.report(gm))
    if args.save is not None:
        steps.run(f"save {args.save}", lambda: fxshift.save(gm, args.save))
    if args.export is not None:
        metadata = {"fxshift.model": args.model, "fxshift.passes": ";".join(args.passes),
                    "fxshift.input_shape": ",".join(str(d) for d in shape)}
        if calibration is not None:
            from fxshift.onnx.export import export_int8

            result = steps.run(f"export {args.export} (int8, {sum(len(b[0]) for b in calibration)} calibration "
                               "samples)", lambda: export_int8(gm, example, args.export, calibration,
                                                               metadata=metadata))
            path = result.path
            counts: dict[str, int] = {}
            for e in result.layers:
                key = e["status"].split(":")[0].split(" (")[0]
                counts[key] = counts.get(key, 0) + 1
            print("int8 layers: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
                  + (f"; left float: {', '.join(result.float_layers)}" if result.float_layers else ""))
        else:
            path = steps.run(f"export {args.export}",
                             lambda: fxshift.export_onnx(gm, example, args.export, target=args.target,
                                                         metadata=metadata))
        print(f"{path}: {_mb(Path(path).stat().st_size)} (float model: "
              f"{_mb(4 * sum(p.numel() for p in model.parameters()))} of float32 parameters)")
    return 0


def load_calibration(path: str, shape: Sequence[int]) -> list:
    """Calibration batches from a .npy (one array of samples) or .pt file (a tensor, or a list of tensors
    of samples), each sample shaped like the model input without its batch dimension; batches of 32."""
    import numpy as np
    import torch

    file = Path(path)
    where = f"--calibration {path}"
    if not file.is_file():
        raise CliError(f"{where}: no such file")
    if file.suffix not in (".npy", ".pt", ".pth"):
        raise CliError(f"{where}: give a .npy file (one array of input samples) or a .pt file (a tensor or a list "
                       "of tensors)")
    try:
        if file.suffix == ".npy":
            data = [torch.from_numpy(np.load(file, allow_pickle=False))]
        else:
            loaded = torch.load(file, map_location="cpu", weights_only=True)
            data = list(loaded) if isinstance(loaded, (list, tuple)) else [loaded]
    except Exception as exc:  # noqa: BLE001 - numpy / torch raise many types on a bad file
        raise CliError(f"{where}: cannot read it ({type(exc).__name__}: {_one_line(exc)})") from None
    sample = tuple(shape[1:])
    batches = []
    for i, t in enumerate(data):
        if not isinstance(t, torch.Tensor):
            raise CliError(f"{where}: item {i} is a {type(t).__name__}, not an array of inputs")
        if not (t.is_floating_point() or t.dtype == torch.uint8):
            raise CliError(f"{where}: inputs must be float (or uint8 images), got {t.dtype}")
        if tuple(t.shape) == sample:
            t = t.unsqueeze(0)
        if t.dim() != len(shape) or tuple(t.shape[1:]) != sample or len(t) == 0:
            raise CliError(f"{where}: array of shape {tuple(t.shape)} does not hold samples of the input shape "
                           f"{sample} (give (N, {', '.join(map(str, sample))}); --input-shape sets the input)")
        batches += [(b,) for b in t.float().split(32)]
    if not batches:
        raise CliError(f"{where}: holds no samples")
    return batches


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


# ------------------------------------------------------------------------------------------------
# inspect
# ------------------------------------------------------------------------------------------------
def _load(path: str):
    import onnx

    if not Path(path).is_file():
        raise CliError(f"{path}: no such file")
    try:
        return onnx.load(path, load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types
        raise CliError(f"{path}: not an ONNX model ({type(exc).__name__}: {exc})") from None


def _dims(value_info) -> list:
    shape = value_info.type.tensor_type.shape
    return [d.dim_param if d.dim_param else d.dim_value for d in shape.dim]


def inspect_model(path: str) -> dict:
    """Op counts, weight bytes and the fxshift nodes of an ONNX file (as a dict)."""
    import numpy as np
    import onnx
    from onnx import helper

    model = _load(path)
    ops: dict[str, int] = {}
    for node in model.graph.node:
        key = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
        ops[key] = ops.get(key, 0) + 1
    by_type: dict[str, list[int]] = {}
    for init in model.graph.initializer:
        dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
        n = int(np.prod(init.dims)) if len(init.dims) else 1
        entry = by_type.setdefault(onnx.TensorProto.DataType.Name(init.data_type).lower(), [0, 0])
        entry[0] += 1
        entry[1] += n * np.dtype(dtype).itemsize
    shift_nodes = []
    for node in model.graph.node:
        if node.domain == "fxshift":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type == "ShiftConv2d":
                shape = list(attrs.get("weight_shape") or [0])  # a malformed node may lack it
                weights, rows = int(np.prod(shape)), int(shape[0])
            else:
                weights = int(attrs.get("in_features", 0)) * int(attrs.get("out_features", 0))
                rows = int(attrs.get("out_features", 0))
            shift_nodes.append({"name": node.name, "op": node.op_type, "bits": attrs.get("bits"),
                                "has_zero": attrs.get("has_zero"), "weights": weights,
                                "packed_bytes": _packed_bytes(attrs, rows, weights),
                                "int8_exact": _node_int8_exact(model, node, attrs, rows, weights)})
    return {"path": path, "bytes": Path(path).stat().st_size, "ir_version": model.ir_version,
            "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
            "functions": [f"{f.domain}::{f.name}" for f in model.functions],
            "inputs": {i.name: _dims(i) for i in model.graph.input},
            "outputs": {o.name: _dims(o) for o in model.graph.output},
            "metadata": {p.key: p.value for p in model.metadata_props},
            "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
            "initializers": {k: {"count": v[0], "bytes": v[1]} for k, v in sorted(by_type.items())},
            "shift_nodes": shift_nodes, "int8": _int8_layers(model)}


def _int8_layers(model) -> list:
    """Per-layer status of an int8 export (its fxshift.int8 metadata), [] for other files."""
    import json

    from fxshift.onnx.int8 import METADATA_KEY

    text = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
    try:
        return json.loads(text) if text else []
    except ValueError:
        return []


def cmd_inspect(args) -> int:
    from fxshift.report import format_table

    info = inspect_model(args.file)
    print(f"{info['path']}: {_mb(info['bytes'])}, IR {info['ir_version']}, opsets "
          + ", ".join(f"{k} {v}" for k, v in info["opsets"].items()))
    for kind in ("inputs", "outputs"):
        print(f"{kind}: " + ", ".join(f"{n} {v}" for n, v in info[kind].items()))
    shown = {k: v for k, v in info["metadata"].items() if k != "fxshift.int8"}  # fxshift.int8: the table below
    if shown:
        print("metadata: " + "; ".join(f"{k}={v}" for k, v in shown.items()))
    if info["functions"]:
        print("function bodies: " + ", ".join(info["functions"]) + " (stock onnxruntime runs the fxshift ops)")
    print()
    print(format_table([{"op": k, "count": v} for k, v in info["ops"].items()], ["op", "count"]))
    print()
    weights = [{"initializers": k, "count": v["count"], "bytes": v["bytes"], "MB": f"{v['bytes'] / 1e6:.2f}"}
               for k, v in info["initializers"].items()]
    total = sum(v["bytes"] for v in info["initializers"].values())
    weights.append({"initializers": "total", "count": sum(v["count"] for v in info["initializers"].values()),
                    "bytes": total, "MB": f"{total / 1e6:.2f}"})
    print(format_table(weights, ["initializers", "count", "bytes", "MB"]))
    if info["shift_nodes"]:
        groups: dict[tuple, list[int]] = {}
        for n in info["shift_nodes"]:
            g = groups.setdefault((n["op"], n["bits"], n["has_zero"]), [0, 0, 0])
            g[0] += 1
            g[1] += n["weights"]
            g[2] += n["packed_bytes"] or 0
        print()
        exact: dict[tuple, int] = {}
        for n in info["shift_nodes"]:
            key = (n["op"], n["bits"], n["has_zero"])
            exact[key] = exact.get(key, 0) + bool(n["int8_exact"])
        print(format_table([{"shift op": op, "bits": b, "has_zero": z, "nodes": c, "int8-exact": exact[(op, b, z)],
                             "weights": w, "float32 MB": f"{4 * w / 1e6:.2f}", "packed MB": f"{p / 1e6:.2f}"}
                            for (op, b, z), (c, w, p) in sorted(groups.items())],
                           ["shift op", "bits", "has_zero", "nodes", "int8-exact", "weights", "float32 MB",
                            "packed MB"]))
        inexact = [n["name"] for n in info["shift_nodes"] if n["int8_exact"] is False]
        if inexact:
            print(f"not int8-exact (a channel spans more than 7 octaves): {', '.join(inexact)}")
    if info["int8"]:
        print()
        print(format_table([{"int8 layer": e.get("layer") or "-", "node": e.get("node") or "-",
                             "status": e.get("status", "")} for e in info["int8"]],
                           ["int8 layer", "node", "status"]))
    return 0


def _node_int8_exact(model, node, attrs: dict, rows: int, weights: int) -> Optional[bool]:
    """Whether a shift node's packed weights are exact in int8 (every channel within 7 octaves); None when its
    words cannot be decoded."""
    from onnx import numpy_helper

    from fxshift.ops import packing
    from fxshift.quantize.int8_exact import is_int8_exact

    import torch

    init = next((i for i in model.graph.initializer if len(node.input) > 1 and i.name == node.input[1]), None)
    if init is None or rows < 1 or weights % rows:
        return None
    try:
        words = torch.from_numpy(numpy_helper.to_array(init).copy())
        w = packing.unpack(words, (rows, weights // rows), attrs.get("bits"), attrs.get("has_zero", 0))
    except Exception:  # noqa: BLE001 - malformed nodes are listed, not fatal
        return None
    return is_int8_exact(w)


def _packed_bytes(attrs: dict, rows: int, weights: int) -> Optional[int]:
    """Bytes of a shift node's packed words by its attributes; None when they do not name a valid format."""
    try:
        return ShiftFormat(attrs.get("bits"), attrs.get("has_zero", 0)).packed_bytes(rows, weights // max(rows, 1))
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------------------
def _input_shape(info: dict, override: Optional[str]) -> tuple[int, ...]:
    if override:
        return _shape(override)
    meta = info["metadata"].get("fxshift.input_shape")
    if meta:
        return _shape(meta)
    if len(info["inputs"]) != 1:
        raise CliError("the model has several inputs; bench supports one (give --input-shape for it)")
    dims = next(iter(info["inputs"].values()))
    rest = dims[1:]
    if any(not isinstance(d, int) or d < 1 for d in rest):
        raise CliError(f"the input's shape {dims} has symbolic dimensions besides the batch; give --input-shape")
    return (1, *rest)


def cmd_bench(args) -> int:
    from fxshift.onnx import export_plain, library_path, plugin_available
    import onnx

    from fxshift.onnx.lowering import choose_lowering, lowered
    from fxshift.measure.process import onnx_medians
    from fxshift.measure.timing import default_threads
    from fxshift.report import format_table

    info = inspect_model(args.file)
    shape = _input_shape(info, args.input_shape)
    float_spec = args.float or info["metadata"].get("fxshift.model")
    has_shift = bool(info["shift_nodes"])
    threads = int(args.threads or default_threads())
    # runtime -> (file, plugin library or None, bytes); each is timed in processes of its own
    runtimes: dict[str, tuple[Any, Any, int]] = {}
    with tempfile.TemporaryDirectory(prefix="fxshift-bench-") as tmp:
        if float_spec:
            if float_spec.endswith(".onnx"):
                float_path = Path(float_spec)
                if not float_path.is_file():
                    raise CliError(f"--float {float_spec}: no such file")
            else:
                import torch

                _log(f"exporting the float model {float_spec} (standard ops) ...")
                float_path = Path(tmp) / "float.onnx"
                export_plain(build_model(float_spec), (torch.randn(*shape),), float_path)
            runtimes["float"] = (float_path, None, float_path.stat().st_size)
        else:
            _log("no float model (give --float MODEL or a .onnx file): ratios are left out")
        size = info["bytes"]
        if has_shift and plugin_available():
            runtimes["plugin"] = (args.file, library_path(), size)
        elif has_shift:
            _log("libfxshift_ort not found: the plugin row is left out (" + "build it; see README)")
        runtimes["functions" if has_shift else "int8" if info["int8"] else "model"] = (args.file, None, size)
        if args.int8 and "float" in runtimes:
            _log("quantizing the float model with onnxruntime's own quantize_static (random-normal calibration: "
                 "for timing only) ...")
            own = Path(tmp) / "float_int8.onnx"
            _ort_int8(runtimes["float"][0], own, shape)
            runtimes["float int8"] = (own, None, own.stat().st_size)
        rows = []
        for batch in args.batch:
            timed = dict(runtimes)
            if "plugin" in runtimes:  # per node, the faster of kernel and body, measured at this batch
                _log(f"batch {batch}: timing each fxshift node on the plugin and through its body ...")
                auto = Path(tmp) / f"auto_b{batch}.onnx"
                onnx.save(lowered(args.file, choose_lowering(args.file, batch=batch, threads=threads)), auto)
                timed["plugin auto"] = (auto, library_path(), auto.stat().st_size)
            _log(f"batch {batch}: {args.rounds} rounds of {len(timed)} alternating processes ...")
            medians, load = onnx_medians({k: (f, lib) for k, (f, lib, _) in timed.items()},
                                         (batch, *shape[1:]), rounds=args.rounds, iters=5, warmup=1,
                                         min_time=0.2, threads=threads)
            base = medians.get("float")
            for name, (_, _, nbytes) in timed.items():
                rows.append({"batch": batch, "runtime": name, "ms": f"{1e3 * medians[name]:.2f}",
                             "speed vs float": f"{base / medians[name]:.2f}x" if base else "",
                             "MB": f"{nbytes / 1e6:.2f}",
                             "size vs float": f"{nbytes / runtimes['float'][2]:.3f}" if base else "",
                             "load": f"{load[0]:.2f}"})
    print(f"{args.file}: onnxruntime CPU latency ({threads} threads), each runtime in its own process, median "
          f"of {args.rounds} alternating rounds, input {(None, *shape[1:])}; load = 1-min load average")
    print(format_table(rows, ["batch", "runtime", "ms", "speed vs float", "MB", "size vs float", "load"]))
    print("runtime: float = the float model exported with standard ops; plugin = fxshift ops on libfxshift_ort; "
          "functions = fxshift ops through the file's function bodies (stock onnxruntime); plugin auto = each "
          "fxshift node on whichever of the two measured faster at that batch (fxshift.onnx.lowering); int8 = "
          "the file's QDQ int8 model on onnxruntime's own kernels; float int8 = onnxruntime's quantize_static of "
          "the float model (--int8)")
    return 0


def _ort_int8(float_path: Path, out: Path, shape: Sequence[int]) -> None:
    """onnxruntime's own static int8 of a float file, calibrated on random-normal inputs (the timing does not
    depend on the ranges)."""
    import torch

    from .onnx.int8 import ort_int8

    ort_int8(float_path, out, list(torch.randn(32, *shape[1:], generator=torch.Generator().manual_seed(0)).split(8)))


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxshift", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="apply passes to a model and export it to ONNX")
    p.add_argument("model", metavar="MODEL", help="torchvision:NAME or module:factory")
    p.add_argument("--pass", dest="passes", action="append", default=[], metavar="SPEC",
                   help="NAME[:key=value,...], NAME in " + ", ".join(pass_classes()) + " (repeatable, in order)")
    p.add_argument("--export", metavar="OUT.onnx", help="write the result to this ONNX file")
    p.add_argument("--target", choices=["fxshift", "portable"], default="fxshift")
    p.add_argument("--save", metavar="OUT.pt", help="also save weights + recipe (fxshift.save)")
    p.add_argument("--input-shape", default="1,3,224,224", help="example input shape (default 1,3,224,224)")
    p.add_argument("--report", action="store_true", help="print the per-layer report")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="write a QDQ int8 model for onnxruntime's own kernels (shift layers exact; needs "
                        "--calibration)")
    p.add_argument("--calibration", metavar="FILE", default=None,
                   help="input samples for --quantize int8: a .npy array (N, *input) or a .pt tensor / list")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("bench", help="onnxruntime latency with and without the plugin, against the float model")
    p.add_argument("file", metavar="FILE.onnx")
    p.add_argument("--float", metavar="MODEL|FILE.onnx",
                   help="the float model (default: the MODEL recorded by fxshift compress)")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (default 1)")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds of alternating processes, one per runtime (default 5)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--input-shape", default=None, help="input shape (default: recorded at export)")
    p.add_argument("--int8", action="store_true",
                   help="also time onnxruntime's own int8 (quantize_static) of the float model")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("inspect", help="op counts and weight bytes of an ONNX file")
    p.add_argument("file", metavar="FILE.onnx")
    p.set_defaults(func=cmd_inspect)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > 400:
        text = text[:400] + " ..."
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        _log("fxshift: interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - the command line reports every error in one line
        if args.debug:
            raise
        from fxshift.errors import FxshiftError

        known = isinstance(exc, (CliError, FxshiftError, OSError, ValueError))
        prefix = "" if known else f"{type(exc).__name__}: "
        _log(f"fxshift {args.command}: error: {prefix}{_one_line(exc)}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
