"""Time each runtime in its own process, one process at a time, alternating, and report medians
(onnxruntime candidates: fxshift.onnx.process_timing.onnx_medians, also used by `fxshift bench`; torch
kernel shapes: torch_medians below).

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
import os
import statistics
import sys
from pathlib import Path
from typing import Dict, Sequence

from fxshift.onnx.process_timing import _run_child, onnx_medians  # noqa: F401 (re-exported)

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
