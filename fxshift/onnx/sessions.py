"""The one place that builds onnxruntime sessions: options, and registration of fxshift's custom-op
library (libfxshift_ort, built from native/ort; found by fxshift.ops.libraries).

Sessions never let their worker threads spin between runs (``allow_spinning=0``): a spinning pool
steals the core from everything else on a shared machine and turns ratios into a lottery (on a
busy 2-core machine resnet18 read 880 ms with spinning and 41 ms without). The settings are applied
by :func:`configure`, whose source also runs in fxshift.measure.process's timing children (they
import onnxruntime only, to start fast), so every session is built the same way.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import NativeError
from ..measure.timing import default_threads
from ..ops.libraries import find_library, library_filename

__all__ = ["library_path", "plugin_available", "session_options", "build_session", "settings", "configure",
           "child_session_code", "PluginNotFound", "BUILD_HINT"]

BUILD_HINT = ("build it with `bash scripts/fetch_ort_headers.sh && pip install -e .` (or `cmake -S . -B build/dev "
              "-G Ninja && cmake --build build/dev`); CMake says why it skipped the plugin when onnxruntime's "
              "headers are missing")

OPTIMIZATIONS = ("all", "extended", "basic", "none")


class PluginNotFound(NativeError):
    """libfxshift_ort was not found (the message lists where it was looked for and how to build it)."""


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


def settings(*, plugin: bool = True, threads: Optional[int] = None, optimization: str = "all",
             spinning: bool = False) -> dict[str, Any]:
    """The plain-data settings of a session (what :func:`configure` applies); see :func:`session_options`."""
    if optimization not in OPTIMIZATIONS:
        raise ValueError(f"optimization must be one of {sorted(OPTIMIZATIONS)}, got {optimization!r}")
    return {"plugin": os.fspath(library_path()) if plugin else None, "threads": int(threads or default_threads()),
            "optimization": optimization, "spinning": bool(spinning)}


def configure(so, ort, s):
    """Apply settings `s` to ``onnxruntime.SessionOptions`` `so` and return it. Uses nothing but its
    arguments (no annotations either): its source also runs in timing children."""
    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    if s["plugin"]:
        so.register_custom_ops_library(s["plugin"])
    so.graph_optimization_level = levels[s["optimization"]]
    so.intra_op_num_threads = s["threads"]
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if s["spinning"] else "0")
    return so


def child_session_code() -> str:
    """Python source that defines ``configure`` (this module's) for a child process importing only onnxruntime."""
    return inspect.getsource(configure)


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

    s = settings(plugin=plugin, threads=threads, optimization=optimization, spinning=spinning)
    so = options if options is not None else ort.SessionOptions()
    try:
        return configure(so, ort, s)
    except Exception as exc:  # onnxruntime raises its own RuntimeError subclasses; only the plugin can fail
        if s["plugin"] is None:
            raise
        raise NativeError(f"onnxruntime could not load {s['plugin']}: {exc}") from exc


def build_session(model: Union[str, os.PathLike, bytes], so: Any, providers: Optional[list] = None):
    """An ``onnxruntime.InferenceSession`` of `model` (a path or serialized bytes) with options `so`."""
    import onnxruntime as ort

    model = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(model, so, providers=providers or ["CPUExecutionProvider"])
