"""onnxruntime latency with each candidate in its own process, one process at a time, alternating.

Two thread pools in one process steal each other's cores (a spinning onnxruntime pool beside torch's OpenMP,
libfxshift's pool beside either), so an in-process interleaved timing measures whichever pool spun last. Here
every candidate runs in a fresh child process (numpy + onnxruntime only, so it starts fast), the parent starts
the children one after another, candidate by candidate, for `rounds` rounds, and each candidate's time is the
median over its rounds of the per-process medians. The child builds its session with the settings of
fxshift.onnx.runtime.session_options (intra-op threads, one inter-op thread, no spinning, the plugin when
given).

    medians, load = onnx_medians({"float": (path, None), "plugin": (path2, plugin_so)}, (1, 3, 224, 224))

The load average (os.getloadavg) comes back with the medians; record it next to every ratio.
`onnx_peak_memory` runs the same children to measure what a session costs in memory: the peak resident set
(VmHWM) of the process after building the session and running it, less its resident set once numpy and
onnxruntime are imported (the plugin library's own pages count on the plugin's side).
"""
import json
import os
import statistics
import subprocess
import sys
from typing import Dict, Optional, Sequence, Tuple

__all__ = ["onnx_medians", "onnx_peak_memory"]

_SESSION = r"""
import json, sys, time
import numpy as np
import onnxruntime as ort
a = json.loads(sys.argv[1])
def status_kb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
rss_imported = status_kb("VmRSS")
so = ort.SessionOptions()
if a["plugin"]:
    so.register_custom_ops_library(a["plugin"])
so.intra_op_num_threads = a["threads"]
so.inter_op_num_threads = 1
so.add_session_config_entry("session.intra_op.allow_spinning", "0")
so.log_severity_level = 3
sess = ort.InferenceSession(a["path"], so, providers=["CPUExecutionProvider"])
name = sess.get_inputs()[0].name
x = np.random.default_rng(0).standard_normal(a["shape"]).astype(np.float32)
"""

_ONNX_CHILD = _SESSION + r"""
for _ in range(a["warmup"]):
    sess.run(None, {name: x})
times = []
t_end = time.perf_counter() + a["min_time"]
while len(times) < a["iters"] or time.perf_counter() < t_end:
    t0 = time.perf_counter()
    sess.run(None, {name: x})
    times.append(time.perf_counter() - t0)
    if len(times) >= 10 * a["iters"]:
        break
times.sort()
print(json.dumps({"median": times[len(times) // 2]}))
"""


_MEMORY_CHILD = _SESSION + r"""
for _ in range(a["runs"]):
    sess.run(None, {name: x})
print(json.dumps({"imported_kb": rss_imported, "peak_kb": status_kb("VmHWM")}))
"""


def _child_env(threads: int) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("FXSHIFT_NUM_THREADS", str(threads))
    return env


def _run_child(code: str, args: dict, threads: int, timeout: float) -> dict:
    out = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True,
                         timeout=timeout, env=_child_env(threads))
    if out.returncode != 0:
        raise RuntimeError(f"timing child failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def onnx_medians(candidates: Dict[str, Tuple[str, Optional[str]]], shape: Sequence[int], *, rounds: int = 5,
                 iters: int = 10, warmup: int = 2, min_time: float = 0.2, threads: int = 2,
                 timeout: float = 600.0) -> Tuple[Dict[str, float], Tuple[float, float, float]]:
    """candidates: kind -> (onnx path, plugin library path or None). Returns (kind -> seconds, loadavg)."""
    per_round: Dict[str, list] = {k: [] for k in candidates}
    for _ in range(rounds):
        for kind, (path, plugin) in candidates.items():
            args = dict(path=str(path), plugin=str(plugin) if plugin else None, shape=list(shape), iters=iters,
                        warmup=warmup, min_time=min_time, threads=threads)
            per_round[kind].append(_run_child(_ONNX_CHILD, args, threads, timeout)["median"])
    return {k: statistics.median(v) for k, v in per_round.items()}, os.getloadavg()


def onnx_peak_memory(candidates: Dict[str, Tuple[str, Optional[str]]], shape: Sequence[int], *, runs: int = 3,
                     threads: int = 2, timeout: float = 600.0) -> Dict[str, int]:
    """candidates: kind -> (onnx path, plugin library or None). Returns kind -> bytes a session added to the
    peak resident set of its own fresh process (session built, `runs` inferences on `shape`)."""
    out = {}
    for kind, (path, plugin) in candidates.items():
        args = dict(path=str(path), plugin=str(plugin) if plugin else None, shape=list(shape), runs=runs,
                    threads=threads)
        r = _run_child(_MEMORY_CHILD, args, threads, timeout)
        out[kind] = 1024 * (r["peak_kb"] - r["imported_kb"])
    return out
