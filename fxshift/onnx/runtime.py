"""Running fxshift's ONNX files: :func:`session` (the public entry: fxshift's settings from
fxshift.onnx.sessions, plus the per-node lowering choice of fxshift.onnx.lowering) and
:func:`compare_in_onnxruntime` (export, run with and without the plugin, compare with torch, time).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from ..errors import ConfigError
from ..measure.timing import median_times, session_runner, torch_runner
from .export import _as_tuple, export_onnx, export_plain
from .lowering import choose_lowering, lowered
from .sessions import BUILD_HINT, PluginNotFound, build_session, library_path, plugin_available, session_options

__all__ = ["session", "compare_in_onnxruntime", "library_path", "plugin_available", "session_options", "PluginNotFound",
           "BUILD_HINT"]


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
    so = session_options(options, plugin=plugin, threads=threads, optimization=optimization, spinning=spinning)
    model = path if isinstance(path, bytes) else os.fspath(path)
    if plugin and lowering != "plugin":
        if isinstance(lowering, str) and lowering != "auto":
            raise ConfigError(f"lowering must be 'plugin', 'auto' or a mapping node -> 'plugin'|'body', got {lowering!r}")
        choice = choose_lowering(model, threads=threads) if lowering == "auto" else lowering
        model = lowered(model, choice).SerializeToString()
    return build_session(model, so, providers)


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
