"""onnxruntime with fxshift's custom-op library (libfxshift_ort, built from native/ort).

The library is looked up like libfxshift (fxshift.ops.native), in order:
  1. ``$FXSHIFT_NATIVE_DIR``,
  2. ``<fxshift package>/_native`` (wheels),
  3. ``<platlib>/fxshift/_native`` (scikit-build-core editable installs),
  4. ``<repo>/build/**/`` (a development build, newest first; sanitizer builds are skipped).
"""
from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import NativeError

__all__ = ["library_path", "plugin_available", "session_options", "session", "compare_in_onnxruntime", "PluginNotFound",
           "BUILD_HINT"]

BUILD_HINT = ("build it with `bash scripts/fetch_ort_headers.sh && pip install -e .` (or `cmake -S . -B build/dev "
              "-G Ninja && cmake --build build/dev`); CMake says why it skipped the plugin when onnxruntime's "
              "headers are missing")


class PluginNotFound(NativeError):
    """libfxshift_ort was not found (the message lists where it was looked for and how to build it)."""


def _lib_filename() -> str:
    if sys.platform == "darwin":
        return "libfxshift_ort.dylib"
    if sys.platform == "win32":
        return "fxshift_ort.dll"
    return "libfxshift_ort.so"


def _candidates() -> list[Path]:
    name = _lib_filename()
    pkg = Path(__file__).resolve().parent.parent
    out: list[Path] = []
    env = os.environ.get("FXSHIFT_NATIVE_DIR")
    if env:
        out.append(Path(env) / name)
    out.append(pkg / "_native" / name)
    try:
        out.append(Path(sysconfig.get_paths()["platlib"]) / "fxshift" / "_native" / name)
    except KeyError:  # pragma: no cover - exotic interpreters
        pass
    build = pkg.parent / "build"
    if build.is_dir():
        found = [p for p in build.glob(f"**/{name}")
                 if not any("sanitize" in part or "asan" in part for part in p.relative_to(build).parts)]
        out.extend(sorted(found, key=lambda p: p.stat().st_mtime, reverse=True))
    return out


def library_path(required: bool = True) -> Optional[Path]:
    """Path of libfxshift_ort, the onnxruntime custom-op library of the ``fxshift`` domain.

    Raises :class:`PluginNotFound` (or returns None with ``required=False``) when it was not built.
    """
    tried = []
    for path in _candidates():
        if path.is_file():
            return path
        tried.append(str(path))
    if not required:
        return None
    raise PluginNotFound(f"fxshift's onnxruntime plugin ({_lib_filename()}) was not found; {BUILD_HINT}. "
                         f"Looked in: {'; '.join(tried)}")


def plugin_available() -> bool:
    """True when libfxshift_ort can be found."""
    return library_path(required=False) is not None


def session_options(options: Any = None, *, threads: Optional[int] = None, optimization: str = "all"):
    """``onnxruntime.SessionOptions`` with libfxshift_ort registered (fxshift-domain ops on native kernels).

    Parameters
    ----------
    options : onnxruntime.SessionOptions, optional
        Options to register the plugin into (changed in place); new ones when None.
    threads : int, optional
        intra-op threads (onnxruntime's default when None).
    optimization : {"all", "extended", "basic", "none"}
        onnxruntime's graph optimisation level.
    """
    import onnxruntime as ort

    so = options if options is not None else ort.SessionOptions()
    path = library_path()
    try:
        so.register_custom_ops_library(os.fspath(path))
    except Exception as exc:  # onnxruntime raises its own RuntimeError subclasses
        raise NativeError(f"onnxruntime could not load {path}: {exc}") from exc
    _configure(so, threads, optimization)
    return so


def _configure(so, threads: Optional[int], optimization: str) -> None:
    import onnxruntime as ort

    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    if optimization not in levels:
        raise ValueError(f"optimization must be one of {sorted(levels)}, got {optimization!r}")
    so.graph_optimization_level = levels[optimization]
    if threads is not None:
        so.intra_op_num_threads = int(threads)


def session(path: Union[str, os.PathLike, bytes], *, plugin: bool = True, threads: Optional[int] = None,
            optimization: str = "all", options: Any = None, providers: Optional[list] = None):
    """An ``onnxruntime.InferenceSession`` of ``path`` (a file or serialized model bytes).

    Parameters
    ----------
    plugin : bool
        Register libfxshift_ort (default). With False, fxshift-domain nodes run through the
        function bodies the exported file carries (standard ops; stock onnxruntime).
    threads, optimization, options
        As for :func:`session_options`.
    providers : list, optional
        Execution providers (default: CPU; the plugin's kernels are CPU kernels).
    """
    import onnxruntime as ort

    if plugin:
        so = session_options(options, threads=threads, optimization=optimization)
    else:
        so = options if options is not None else ort.SessionOptions()
        _configure(so, threads, optimization)
    model = path if isinstance(path, bytes) else os.fspath(path)
    return ort.InferenceSession(model, so, providers=providers or ["CPUExecutionProvider"])


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
    from pathlib import Path as _Path

    import torch

    from ..latency import export_plain, interleaved_medians, session_runner, torch_runner
    from .export import _as_tuple, export_onnx

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
    result: dict[str, Any] = {"path": str(path), "bytes": _Path(path).stat().st_size, "float_bytes": None,
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
            float_path = _Path(path).with_suffix(".float.onnx")
            export_plain(baseline, inputs, float_path)
            result["float_bytes"] = float_path.stat().st_size
            runners["float"] = session_runner(session(float_path, plugin=False, threads=threads), inputs)
        result["latency_ms"] = {k: 1e3 * v for k, v in interleaved_medians(runners, rounds=rounds).items()}
    return result
