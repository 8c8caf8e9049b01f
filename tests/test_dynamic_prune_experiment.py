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
    for row in ("| vgg | mass 0.9 |", "| vgg | uniform 0.5 |", "| resnet | mass 0.9 |", "| resnet | uniform 0.5 |"):
        assert row in done.stdout, done.stdout[-2000:]
    assert not list(tmp_path.iterdir())  # --quick writes nothing
