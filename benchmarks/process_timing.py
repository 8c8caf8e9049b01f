"""Time each runtime in its own process, one process at a time, alternating, and report medians.

Two thread pools in one process steal each other's cores (a spinning onnxruntime pool beside torch's
OpenMP, libfxshift's pool beside either), so an in-process interleaved timing measures whichever pool
spun last. Here every candidate runs in a fresh child process (only its own runtime's pool exists),
the parent starts the children one after another, candidate by candidate, for `rounds` rounds, and
each candidate's time is the median over its rounds of the per-process medians. Ratios of those
medians compare candidates that saw the same machine state, round by round.

    medians = onnx_medians({"float": (path, None), "plugin": (path2, plugin_so)}, (1, 3, 224, 224))
    medians = torch_medians(["float", "native"], cases)   # the kernel shapes of bench_shift_kernels.py

The load average (os.getloadavg) is returned with the medians; record it next to every ratio.
"""
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

_ONNX_CHILD = r"""
import json, sys, time
import numpy as np
import onnxruntime as ort
a = json.loads(sys.argv[1])
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


_TORCH_CHILD = r"""
import json, sys, time
a = json.loads(sys.argv[1])
sys.path[:0] = a["sys_path"]
import torch
torch.set_num_threads(a["threads"])
import kernel_cases
print(json.dumps(kernel_cases.time_cases(a["runtime"], a["cases"], a["iters"], a["min_time"])))
"""


def torch_medians(runtimes: Sequence[str], cases: Sequence[dict], *, rounds: int = 3, iters: int = 10,
                  min_time: float = 0.1, threads: int = 2, timeout: float = 600.0):
    """Each runtime ("float" or "native") times every case of benchmarks/kernel_cases.py in its own process.
    Returns ({case name: {runtime: seconds}}, loadavg)."""
    here = str(Path(__file__).resolve().parent)
    per: Dict[str, Dict[str, list]] = {}
    for _ in range(rounds):
        for rt in runtimes:
            args = dict(runtime=rt, cases=list(cases), iters=iters, min_time=min_time, threads=threads,
                        sys_path=[here] + [p for p in sys.path if p])
            res = _run_child(_TORCH_CHILD, args, threads, timeout)
            for name, t in res.items():
                per.setdefault(name, {}).setdefault(rt, []).append(t)
    return ({n: {rt: statistics.median(ts) for rt, ts in d.items()} for n, d in per.items()}, os.getloadavg())
