"""Measured CPU latency: plain ONNX export, onnxruntime sessions, interleaved timing.

Timing several candidates in one loop, round-robin, keeps their ratio fair on a noisy machine:
every candidate sees the same background load.
"""
from __future__ import annotations

import os
import statistics
import time
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence

import torch


def export_plain(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor], path: str | os.PathLike,
                 dynamic_batch: bool = True) -> None:
    """torch.onnx.export with standard ops only (the TorchScript exporter: fast for timing studies)."""
    names = [f"input{i}" for i in range(len(example_inputs))]
    axes = {n: {0: "batch"} for n in names} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), tuple(example_inputs), os.fspath(path), dynamo=False, input_names=names,
                          output_names=["output"], dynamic_axes=axes, opset_version=17)


def ort_session(path: str | os.PathLike, threads: Optional[int] = None, options: Any = None):
    """An onnxruntime CPU session using `threads` intra-op threads (default: all cores)."""
    import onnxruntime as ort

    so = options or ort.SessionOptions()
    so.intra_op_num_threads = threads or os.cpu_count() or 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning worker threads steal the core from everything else on a shared machine and distort ratios.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(os.fspath(path), so, providers=["CPUExecutionProvider"])


def session_runner(session, inputs: Sequence[torch.Tensor]) -> Callable[[], Any]:
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs)}
    return lambda: session.run(None, feeds)


def interleaved_medians(runners: Mapping[str, Callable[[], Any]], rounds: int = 20, warmup: int = 2
                        ) -> dict[str, float]:
    """Median seconds per call of each runner, timed round-robin so they share the machine's noise."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def torch_runner(model: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> Callable[[], Any]:
    def run():
        with torch.inference_mode():
            return model(*inputs)

    return run
