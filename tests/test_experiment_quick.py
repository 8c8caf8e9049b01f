"""The training-acceleration experiment in its CI-size mode (slow: about 20-60 s on 2 shared cores)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_accel_quick_runs_every_row(tmp_path):
    if not any(Path(p).exists() for p in ("/usr/share/datasets/fashion-mnist", Path.home() / ".cache" / "fxshift")):
        pytest.skip("Fashion-MNIST is not available offline")
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "train_accel.py"), "--quick", "--rank", "0.5",
                           "--shift-mode", "q", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    table = done.stdout
    for row in ("| original |", "| tucker-step0.9 |", "| tucker-step0.9+recompose |", "| tucker-0.5 |",
                "| tucker-0.5+recompose |", "| shift-q |"):
        assert row in table, table[-2000:]
    assert not list(tmp_path.iterdir())  # --quick writes nothing
