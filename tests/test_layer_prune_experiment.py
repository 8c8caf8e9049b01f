"""The ViT LayerPrune experiment in its smoke mode (slow: about 1-2 min on 2 shared cores)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_layer_prune_vit_quick_writes_every_row(tmp_path):
    pytest.importorskip("torch_pruning")
    if not any(Path(p).exists() for p in ("/usr/share/datasets/fashion-mnist", Path.home() / ".cache" / "fxshift")):
        pytest.skip("Fashion-MNIST is not available offline")
    out = tmp_path / "vit"
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "layer_prune_vit.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["original", "LayerPrune (l1)", "LayerPrune (influence)",
                                           "width pruning (Torch-Pruning L1)"]
    original = rows[0]
    for r in rows[1:3]:
        assert len(r["removed"]) == 2 and r["params"] < original["params"] and r["macs"] < original["macs"]
    assert rows[3]["params"] < original["params"] and 0 < rows[3]["latency_ratio"] < 1.5
    assert "| LayerPrune (influence) | 2 |" in out.with_suffix(".md").read_text()
