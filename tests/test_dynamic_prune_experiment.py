"""The dynamic-pruning experiment in its CI-size mode (slow: about a minute on 2 shared cores)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dynamic_prune_quick_runs_every_row(tmp_path):
    if not any(Path(p).exists() for p in ("/usr/share/datasets/fashion-mnist", Path.home() / ".cache" / "fxshift")):
        pytest.skip("Fashion-MNIST is not available offline")
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "dynamic_prune.py"), "--quick", "--out",
                           str(tmp_path), "--cache", str(tmp_path)], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    for row in ("| vgg | 0 | dynamic | mass 0.9 |", "| vgg | 0 | dynamic | uniform 0.5 |",
                "| resnet | 0 | dynamic | mass 0.9 |", "| resnet | 0 | dynamic | uniform 0.5 |"):
        assert row in done.stdout, done.stdout[-2000:]
    assert not list(tmp_path.iterdir())  # --quick writes nothing


@pytest.mark.slow
def test_dynamic_prune_digits_static_rows(tmp_path):
    """The digits model beside Torch-Pruning's static L1 filter pruning at equal MACs (about a minute)."""
    pytest.importorskip("torch_pruning")
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "dynamic_prune.py"), "--models", "digits",
                           "--epochs", "2", "--finetune", "1", "--ratios", "0.5", "--thresholds", "--static",
                           "--no-latency", "--out", str(tmp_path), "--cache", str(tmp_path), "--name", "d"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    rows = json.loads((tmp_path / "d.json").read_text())
    assert [r["kind"] for r in rows] == ["dynamic", "static L1"]
    dynamic, static = rows
    assert dynamic["macs_reduction"] > 0.5                     # uniform 0.5 with compact inputs: ~0.34 of the MACs
    assert static["macs"] <= dynamic["macs"] and static["macs"] > 0.9 * dynamic["macs"]   # equal MACs, from below
