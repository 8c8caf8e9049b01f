"""Measurement: every timing and memory figure fxshift takes, in one place.

- :mod:`.timing`: round-robin medians of in-process runners (onnxruntime sessions, torch models);
- :mod:`.latency`: onnxruntime latency of single layers and whole models (``Budget(latency=)``);
- :mod:`.train_step`: torch forward+backward time of layers and models (``Budget(train_step=)``);
- :mod:`.process`: each candidate in its own process (one thread pool at a time), and a session's
  peak memory.

Sessions are built by fxshift.onnx.runtime, the one place that knows how fxshift runs onnxruntime.
Only :mod:`.timing` is imported here: it depends on nothing else of fxshift, so fxshift.onnx can
time its lowering choices with it.
"""
from .timing import default_threads, median_times, session_runner, torch_runner

__all__ = ["default_threads", "median_times", "session_runner", "torch_runner"]
