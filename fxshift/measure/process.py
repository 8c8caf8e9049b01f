"""Timing with each candidate in its own process, one process at a time, alternating.

Two thread pools in one process steal each other's cores (a spinning onnxruntime pool beside torch's OpenMP,
libfxshift's pool beside either), so an in-process interleaved timing measures whichever pool spun last. Here
every candidate runs in a fresh child process, the parent starts the children one after another, candidate by
candidate, for `rounds` rounds, and each candidate's time is the median over its rounds of the per-process
medians. onnxruntime children import numpy + onnxruntime only (they start fast) and build their session with
fxshift.onnx.sessions' own settings and `configure` (intra-op threads, one inter-op thread, no spinning, the
plugin when given); torch children time the cases of a module the caller names (benchmarks/kernel_cases.py).

    medians, load = onnx_medians({"float": (path, None), "plugin": (path2, plugin_so)}, (1, 3, 224, 224))
    medians, load = torch_medians(["float", "native"], cases, "kernel_cases", [benchmarks_dir])

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

from ..onnx.sessions import child_session_code, settings

__all__ = ["onnx_medians", "onnx_peak_memory", "torch_medians"]

_SESSION = r"""
import json, sys, time
import numpy as np
import onnxruntime as ort
a = json.loads(sys.argv[1])
def status_kb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
rss_imported = status_kb("VmRSS")
""" + child_session_code() + r"""
sess = ort.InferenceSession(a["path"], configure(ort.SessionOptions(), ort, a["session"]),
                            providers=["CPUExecutionProvider"])
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


def _session_settings(plugin: Optional[str], threads: int) -> dict:
    s = settings(plugin=False, threads=threads)
    s["plugin"] = str(plugin) if plugin else None
    return s


def onnx_medians(candidates: Dict[str, Tuple[str, Optional[str]]], shape: Sequence[int], *, rounds: int = 5,
                 iters: int = 10, warmup: int = 2, min_time: float = 0.2, threads: int = 2,
                 timeout: float = 600.0) -> Tuple[Dict[str, float], Tuple[float, float, float]]:
    """candidates: kind -> (onnx path, plugin library path or None). Returns (kind -> seconds, loadavg)."""
    per_round: Dict[str, list] = {k: [] for k in candidates}
    for _ in range(rounds):
        for kind, (path, plugin) in candidates.items():
            args = dict(path=str(path), session=_session_settings(plugin, threads), shape=list(shape), iters=iters,
                        warmup=warmup, min_time=min_time)
            per_round[kind].append(_run_child(_ONNX_CHILD, args, threads, timeout)["median"])
    return {k: statistics.median(v) for k, v in per_round.items()}, os.getloadavg()


def onnx_peak_memory(candidates: Dict[str, Tuple[str, Optional[str]]], shape: Sequence[int], *, runs: int = 3,
                     threads: int = 2, timeout: float = 600.0) -> Dict[str, int]:
    """candidates: kind -> (onnx path, plugin library or None). Returns kind -> bytes a session added to the
    peak resident set of its own fresh process (session built, `runs` inferences on `shape`)."""
    out = {}
    for kind, (path, plugin) in candidates.items():
        args = dict(path=str(path), session=_session_settings(plugin, threads), shape=list(shape), runs=runs)
        r = _run_child(_MEMORY_CHILD, args, threads, timeout)
        out[kind] = 1024 * (r["peak_kb"] - r["imported_kb"])
    return out


_TORCH_CHILD = r"""
import json, sys, importlib
a = json.loads(sys.argv[1])
sys.path[:0] = a["sys_path"]
import torch
torch.set_num_threads(a["threads"])
cases = importlib.import_module(a["module"])
print(json.dumps(cases.time_cases(a["runtime"], a["cases"], a["iters"], a["min_time"])))
"""


def torch_medians(runtimes: Sequence[str], cases: Sequence[dict], module: str, sys_path: Sequence[str] = (), *,
                  rounds: int = 3, iters: int = 10, min_time: float = 0.1, threads: int = 2,
                  timeout: float = 600.0) -> Tuple[Dict[str, Dict[str, float]], Tuple[float, float, float]]:
    """Each runtime times every case in its own process through ``<module>.time_cases(runtime, cases, iters,
    min_time)`` (a module on `sys_path` returning {case name: seconds}, e.g. benchmarks/kernel_cases.py).
    Returns ({case name: {runtime: seconds}}, loadavg)."""
    per: Dict[str, Dict[str, list]] = {}
    for _ in range(rounds):
        for rt in runtimes:
            args = dict(runtime=rt, cases=list(cases), iters=iters, min_time=min_time, threads=threads, module=module,
                        sys_path=list(sys_path) + [p for p in sys.path if p])
            res = _run_child(_TORCH_CHILD, args, threads, timeout)
            for name, t in res.items():
                per.setdefault(name, {}).setdefault(rt, []).append(t)
    return ({n: {rt: statistics.median(ts) for rt, ts in d.items()} for n, d in per.items()}, os.getloadavg())
