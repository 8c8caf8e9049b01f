"""onnxruntime CPU latency of single layers and whole models, for Budget(latency=...).

A layer (a Conv2d, a Linear, or a decomposed chain of them) is written straight into a small
ONNX graph with random weights (milliseconds, no exporter involved) and timed in an
onnxruntime CPU session at its input shape; results are cached in memory, and optionally in a
JSON file, keyed by the layer's structure (type, channels, kernel, stride, padding, dilation,
groups, ranks), its input shape and the thread count. Whole models go through the TorchScript
ONNX exporter (fast for plain models). Every figure is the median of repeated runs after a
warm-up, so a busy machine moves it less than a mean would.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..onnx.export import export_plain
from ..onnx.sessions import build_session, session_options
from .timing import default_threads, median_times, session_runner

__all__ = ["LatencyTimer", "layer_key", "layer_onnx", "model_onnx", "clear_cache"]

_MEMORY: dict[str, float] = {}
_LOCK = threading.Lock()


def _describe(module: nn.Module) -> Any:
    if type(module) is nn.Conv2d:
        return ["Conv2d", module.in_channels, module.out_channels, list(module.kernel_size), list(module.stride),
                module.padding if isinstance(module.padding, str) else list(module.padding), list(module.dilation),
                module.groups, module.bias is not None, module.padding_mode]
    if type(module) is nn.Linear:
        return ["Linear", module.in_features, module.out_features, module.bias is not None]
    children = list(module.named_children())
    if not children:
        raise ValueError(f"cannot describe {type(module).__name__} for latency measurement")
    return [type(module).__name__, [[n, _describe(c)] for n, c in children]]


def layer_key(module: nn.Module, input_shape: Sequence[int], threads: int) -> str:
    """The cache key of a layer's latency: structure, input shape, threads."""
    return json.dumps([_describe(module), list(input_shape), threads], separators=(",", ":"))


class _Graph:
    """A tiny ONNX graph builder for chains of Conv2d / Linear layers."""

    def __init__(self) -> None:
        from onnx import helper

        self.helper = helper
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.count = 0
        self.generator = torch.Generator().manual_seed(0)

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}{self.count}"

    def const(self, shape: Sequence[int]) -> str:
        from onnx import numpy_helper

        data = torch.randn(tuple(shape), generator=self.generator).mul_(0.05).numpy().astype(np.float32)
        name = self.name("w")
        self.inits.append(numpy_helper.from_array(data, name))
        return name

    def add(self, module: nn.Module, x: str) -> str:
        if type(module) is nn.Conv2d:
            if module.padding_mode != "zeros":
                raise ValueError("only zero padding is written directly")
            inputs = [x, self.const(module.weight.shape)]
            if module.bias is not None:
                inputs.append(self.const(module.bias.shape))
            attrs: dict[str, Any] = dict(kernel_shape=list(module.kernel_size), strides=list(module.stride),
                                         dilations=list(module.dilation), group=module.groups)
            if module.padding == "same":
                attrs["auto_pad"] = "SAME_UPPER"
            else:
                ph, pw = (0, 0) if module.padding == "valid" else module.padding
                attrs["pads"] = [ph, pw, ph, pw]
            y = self.name("y")
            self.nodes.append(self.helper.make_node("Conv", inputs, [y], **attrs))
            return y
        if type(module) is nn.Linear:
            y = self.name("y")
            weight = self.const((module.in_features, module.out_features))
            self.nodes.append(self.helper.make_node("MatMul", [x, weight], [y]))
            if module.bias is not None:
                z = self.name("y")
                self.nodes.append(self.helper.make_node("Add", [y, self.const((module.out_features,))], [z]))
                y = z
            return y
        if isinstance(module, nn.Sequential):
            for child in module:
                x = self.add(child, x)
            return x
        raise ValueError(f"{type(module).__name__} is not written directly")


def layer_onnx(module: nn.Module, input_shape: Sequence[int]) -> bytes:
    """A serialized ONNX model running `module` (Conv2d, Linear or an nn.Sequential of them, fxshift's
    decomposed chains included) with random weights on one float input of `input_shape`; other
    modules go through torch.onnx.export."""
    from onnx import TensorProto, helper

    try:
        g = _Graph()
        out = g.add(module, "x")
    except ValueError:
        return model_onnx(module, (torch.randn(tuple(input_shape)),))
    graph = helper.make_graph(g.nodes, "layer",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def model_onnx(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> bytes:
    """A serialized ONNX model of `model` at the example inputs' shapes (standard ops only)."""
    return export_plain(model, example_inputs, dynamic_batch=False)


class LatencyTimer:
    """Times layers (cached) and models in onnxruntime CPU sessions with `threads` intra-op threads.

    Args:
        threads: intra-op threads (default: the CPUs this process may use).
        cache: optional JSON file holding layer latencies across runs.
        min_time: seconds of timed runs per measurement (the median of the runs is kept).
    """

    def __init__(self, threads: Optional[int] = None, cache: Optional[str | os.PathLike] = None,
                 min_time: float = 0.1):
        self.threads = threads or default_threads()
        self.cache_path = Path(cache) if cache else None
        self.min_time = min_time
        self.measured = 0
        if self.cache_path is not None and self.cache_path.exists():
            try:
                stored = json.loads(self.cache_path.read_text())
                with _LOCK:
                    _MEMORY.update({k: float(v) for k, v in stored.items()})
            except (OSError, ValueError):
                pass  # an unreadable cache is rebuilt

    def session(self, onnx_bytes: bytes):
        """A plain (no plugin) onnxruntime session of `onnx_bytes` with this timer's threads."""
        return build_session(onnx_bytes, session_options(plugin=False, threads=self.threads))

    def prepared(self, model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> bytes:
        """What `models` takes for `model`, exported once: its serialized ONNX."""
        return model_onnx(model, example_inputs)

    def layer(self, module: nn.Module, input_shape: Sequence[int]) -> float:
        """Median seconds of one call of `module` on an input of `input_shape` (cached)."""
        return self.layers([module], input_shape)[0]

    def layers(self, modules: Sequence[nn.Module], input_shape: Sequence[int]) -> list[float]:
        """Median seconds of each module on an input of `input_shape`. When any is not cached, all
        of them are timed round-robin, so that they share the machine's noise (a layer and its
        candidate replacements are compared fairly), and the cache is updated."""
        keys = [layer_key(m, input_shape, self.threads) for m in modules]
        with _LOCK:
            if all(k in _MEMORY for k in keys):
                return [_MEMORY[k] for k in keys]
        x = np.random.default_rng(0).standard_normal(tuple(input_shape)).astype(np.float32)
        runners = {}
        for key, module in zip(keys, modules):
            if key not in runners:
                runners[key] = session_runner(self.session(layer_onnx(module, input_shape)), [x])
        medians = median_times(runners, min_time=self.min_time)
        self.measured += len(runners)
        with _LOCK:
            _MEMORY.update(medians)
        return [medians[k] for k in keys]

    def models(self, models: dict[str, nn.Module | bytes], example_inputs: Sequence[torch.Tensor],
               min_time: Optional[float] = None) -> dict[str, float]:
        """Median seconds per call of each model (an nn.Module or serialized ONNX), timed round-robin."""
        arrays = [x.detach().cpu().numpy() for x in example_inputs]
        runners = {}
        for name, model in models.items():
            onnx_bytes = model if isinstance(model, bytes) else model_onnx(model, example_inputs)
            runners[name] = session_runner(self.session(onnx_bytes), arrays)
        return median_times(runners, min_time=min_time if min_time is not None else 3 * self.min_time)

    def save(self) -> None:
        """Write the cache file (when one was given)."""
        if self.cache_path is None:
            return
        with _LOCK:
            data = dict(_MEMORY)
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_path.with_suffix(self.cache_path.suffix + ".tmp")
        tmp.write_text(json.dumps(data, indent=0, sort_keys=True))
        tmp.replace(self.cache_path)


def clear_cache() -> None:
    """Forget every in-memory layer latency."""
    with _LOCK:
        _MEMORY.clear()

