"""The one place that builds onnxruntime sessions: session options, registration of fxshift's
custom-op library (libfxshift_ort, built from native/ort; found by fxshift.ops.libraries), and the
timing helpers every benchmark, the CLI and Budget(latency=...) use.

Sessions never let their worker threads spin between runs (``allow_spinning=0``): a spinning pool
steals the core from everything else on a shared machine and turns ratios into a lottery (on a
busy 2-core machine resnet18 read 880 ms with spinning and 41 ms without). Timings are medians of
round-robin runs, so every candidate sees the same background load.
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from ..errors import ConfigError, NativeError
from ..ops.libraries import find_library, library_filename
from .export import _as_tuple, export_onnx, export_plain

__all__ = ["library_path", "plugin_available", "session_options", "session", "compare_in_onnxruntime", "PluginNotFound",
           "BUILD_HINT", "default_threads", "session_runner", "torch_runner", "median_times"]

BUILD_HINT = ("build it with `bash scripts/fetch_ort_headers.sh && pip install -e .` (or `cmake -S . -B build/dev "
              "-G Ninja && cmake --build build/dev`); CMake says why it skipped the plugin when onnxruntime's "
              "headers are missing")


class PluginNotFound(NativeError):
    """libfxshift_ort was not found (the message lists where it was looked for and how to build it)."""


def default_threads() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def library_path(required: bool = True) -> Optional[Path]:
    """Path of libfxshift_ort, the onnxruntime custom-op library of the ``fxshift`` domain.

    Raises :class:`PluginNotFound` (or returns None with ``required=False``) when it was not built.
    """
    path, tried = find_library("fxshift_ort")
    if path is not None or not required:
        return path
    raise PluginNotFound(f"fxshift's onnxruntime plugin ({library_filename('fxshift_ort')}) was not found; {BUILD_HINT}. "
                         f"Looked in: {'; '.join(tried)}")


def plugin_available() -> bool:
    """True when libfxshift_ort can be found."""
    return library_path(required=False) is not None


def session_options(options: Any = None, *, plugin: bool = True, threads: Optional[int] = None,
                    optimization: str = "all", spinning: bool = False):
    """``onnxruntime.SessionOptions`` as fxshift runs every session, libfxshift_ort registered.

    Parameters
    ----------
    options : onnxruntime.SessionOptions, optional
        Options to configure (changed in place); new ones when None.
    plugin : bool
        Register libfxshift_ort (fxshift-domain ops on native kernels); raises PluginNotFound
        when it was not built.
    threads : int, optional
        intra-op threads (default: the CPUs this process may use).
    optimization : {"all", "extended", "basic", "none"}
        onnxruntime's graph optimisation level.
    spinning : bool
        Let worker threads spin between runs (off by default: see the module docstring).
    """
    import onnxruntime as ort

    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    if optimization not in levels:
        raise ValueError(f"optimization must be one of {sorted(levels)}, got {optimization!r}")
    so = options if options is not None else ort.SessionOptions()
    if plugin:
        path = library_path()
        try:
            so.register_custom_ops_library(os.fspath(path))
        except Exception as exc:  # onnxruntime raises its own RuntimeError subclasses
            raise NativeError(f"onnxruntime could not load {path}: {exc}") from exc
    so.graph_optimization_level = levels[optimization]
    so.intra_op_num_threads = int(threads or default_threads())
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return so


def session(path: Union[str, os.PathLike, bytes], *, plugin: bool = True, threads: Optional[int] = None,
            optimization: str = "all", spinning: bool = False, options: Any = None,
            providers: Optional[list] = None, lowering: Union[str, Mapping[str, Any]] = "plugin"):
    """An ``onnxruntime.InferenceSession`` of ``path`` (a file or serialized model bytes).

    Parameters
    ----------
    plugin : bool
        Register libfxshift_ort (default). With False, fxshift-domain nodes run through the
        function bodies the exported file carries (standard ops; stock onnxruntime).
    lowering : "plugin", "auto" or a mapping
        With the plugin: ``"plugin"`` runs every fxshift node on its native kernel; ``"auto"``
        first times each node both ways at batch 1 and inlines the bodies that measured faster
        (fxshift.onnx.lowering; seconds at session creation); a mapping node name -> "plugin" |
        "body" (what :func:`fxshift.onnx.lowering.choose_lowering` returns, e.g. for another
        batch size) applies that choice.
    threads, optimization, spinning, options
        As for :func:`session_options`.
    providers : list, optional
        Execution providers (default: CPU; the plugin's kernels are CPU kernels).
    """
    import onnxruntime as ort

    so = session_options(options, plugin=plugin, threads=threads, optimization=optimization, spinning=spinning)
    model = path if isinstance(path, bytes) else os.fspath(path)
    if plugin and lowering != "plugin":
        from .lowering import choose_lowering, lowered

        if isinstance(lowering, str) and lowering != "auto":
            raise ConfigError(f"lowering must be 'plugin', 'auto' or a mapping node -> 'plugin'|'body', got {lowering!r}")
        choice = choose_lowering(model, threads=threads) if lowering == "auto" else lowering
        model = lowered(model, choice).SerializeToString()
    return ort.InferenceSession(model, so, providers=providers or ["CPUExecutionProvider"])


def session_runner(sess, inputs: Sequence[Any]) -> Callable[[], Any]:
    """A no-argument callable running `sess` on `inputs` (tensors or numpy arrays)."""
    arrays = [x.detach().cpu().numpy() if hasattr(x, "detach") else x for x in inputs]
    feeds = {i.name: x for i, x in zip(sess.get_inputs(), arrays)}
    return lambda: sess.run(None, feeds)


def torch_runner(model, inputs: Sequence[Any]) -> Callable[[], Any]:
    """A no-argument callable running `model` on `inputs` in inference mode."""
    import torch

    def run():
        with torch.inference_mode():
            return model(*inputs)

    return run


def median_times(runners: Mapping[str, Callable[[], Any]], rounds: int = 5, min_time: float = 0.0,
                 max_rounds: int = 200, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each runner, timed round-robin (each sees the same machine noise):
    at least `rounds` rounds, more (up to `max_rounds`) until every runner has had `min_time`
    seconds on average."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    spent = 0.0
    done = 0
    while done < max_rounds and (done < rounds or spent < min_time * len(runners)):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            samples[name].append(elapsed)
            spent += elapsed
        done += 1
    return {name: statistics.median(values) for name, values in samples.items()}


def _numpy_inputs(session_, inputs) -> dict:
    return {i.name: t.detach().cpu().numpy() for i, t in zip(session_.get_inputs(), inputs)}


def compare_in_onnxruntime(gm, example_inputs, path: Union[str, os.PathLike], *, baseline=None, rounds: int = 20,
                           threads: Optional[int] = None, rtol: float = 1e-4) -> dict:
    """Export ``gm`` to ``path`` and run it in onnxruntime, with the plugin and through the function bodies.

    Parameters
    ----------
    gm : nn.Module
        The compressed model (shift layers are frozen on export).
    example_inputs : tensor or tuple of tensors
        Inputs to export with and to compare on.
    path : the ``.onnx`` file to write.
    baseline : nn.Module, optional
        The float model: exported beside ``path`` (``<stem>.float.onnx``, standard ops) and timed too.
    rounds : interleaved timing rounds (0: no timing).
    rtol : the agreement asked for: ``max|y - y_torch| <= rtol * max|y_torch|``.

    Returns
    -------
    dict
        ``path``, ``bytes`` (file size), ``float_bytes`` (baseline's, or None), ``plugin`` (whether
        libfxshift_ort was found), ``max_abs_error`` and ``rel_error`` per runtime ("plugin",
        "functions"), ``ok`` (every rel_error <= rtol), ``latency_ms`` per runner ("torch",
        "plugin", "functions", "float") — medians of interleaved runs.

    Example
    -------
    >>> r = fxshift.onnx.compare_in_onnxruntime(frozen, example, "model.onnx", baseline=float_model)
    >>> print(r["rel_error"], r["latency_ms"])
    """
    import torch

    inputs = _as_tuple(example_inputs)
    path = export_onnx(gm, inputs, path)
    with torch.no_grad():
        was_training = gm.training
        gm.eval()
        try:
            reference = gm(*inputs)
        finally:
            gm.train(was_training)
    reference = (reference[0] if isinstance(reference, (tuple, list)) else reference).detach().cpu().numpy()
    scale = float(abs(reference).max()) or 1.0
    sessions = {}
    have_plugin = plugin_available()
    if have_plugin:
        sessions["plugin"] = session(path, plugin=True, threads=threads)
    sessions["functions"] = session(path, plugin=False, threads=threads)
    result: dict[str, Any] = {"path": str(path), "bytes": Path(path).stat().st_size, "float_bytes": None,
                              "plugin": have_plugin, "max_abs_error": {}, "rel_error": {}, "latency_ms": {}}
    for name, s in sessions.items():
        out = s.run(None, _numpy_inputs(s, inputs))[0]
        err = float(abs(out - reference).max())
        result["max_abs_error"][name] = err
        result["rel_error"][name] = err / scale
    result["ok"] = all(e <= rtol for e in result["rel_error"].values())
    if rounds:
        runners = {"torch": torch_runner(gm.eval(), inputs)}
        runners.update({name: session_runner(s, inputs) for name, s in sessions.items()})
        if baseline is not None:
            float_path = Path(path).with_suffix(".float.onnx")
            export_plain(baseline, inputs, float_path)
            result["float_bytes"] = float_path.stat().st_size
            runners["float"] = session_runner(session(float_path, plugin=False, threads=threads), inputs)
        result["latency_ms"] = {k: 1e3 * v for k, v in median_times(runners, rounds=rounds).items()}
    return result
