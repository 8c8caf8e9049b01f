"""LayerPrune on a small vision transformer: block removal by each criterion vs width pruning, at
measured onnxruntime latency (docs/methods.md §8), on Fashion-MNIST.

The question: on a transformer, does removing whole residual units (attention or MLP, each
``x + f(norm(x))``), chosen by weight norms, Taylor, imprinting or block influence (ShortGPT),
keep more accuracy than removing width (MLP hidden channels and the embedding width, Torch-Pruning
L1 magnitude) at the same measured latency?

Steps, one seed:
  1. Train a 6-layer ViT (patch 4, 7×7 tokens, width --dim, --heads heads; every layer is two
     residual units, so 12 candidates) for --epochs epochs.
  2. For every count k in --counts and every criterion: ``fxshift.LayerPrunePass(blocks=k,
     criterion=c, calibration=...)``; fine-tune --finetune epochs (runs that remove the same units
     share one fine-tune).
  3. Width pruning: Torch-Pruning's MagnitudePruner (L1, the same ratio on every prunable group:
     embedding width and MLP hidden channels; qkv and the classifier kept), its ratio found by
     bisection so its measured latency matches the median LayerPrune latency of that count;
     fine-tuned the same way.
  4. Every final model timed round-robin in one onnxruntime run (1 thread, batch --latency-batch).

Writes experiments/results/layer_prune_vit.{md,json}. Needs torch-pruning (``pip install -e .[experiment]``).

    python experiments/layer_prune_vit.py           # default size: 29 min on a shared 2-core machine (load 5-8)
    python experiments/layer_prune_vit.py --quick   # a smoke run, about 2 minutes
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fxshift  # noqa: E402
from fxshift.data import fashion_mnist  # noqa: E402
from layer_prune import accuracy, latency_ratios  # noqa: E402

CRITERIA = ("l1", "l2", "taylor", "imprint", "influence", "ensemble")
ENSEMBLE = ["l1", "l2", "taylor", "imprint", "influence"]  # no BatchNorm in a ViT: 'bn' cannot score


# ------------------------------------------------------------------------------------------ model
class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        a = (q @ k.transpose(-2, -1) * self.head_dim ** -0.5).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SmallViT(nn.Module):
    """Patch embedding (patch 4 on 28×28: 49 tokens), learned positions, pre-norm layers, mean-pooled head."""

    def __init__(self, dim: int = 64, depth: int = 6, heads: int = 4, mlp: int = 2, classes: int = 10):
        super().__init__()
        self.embed = nn.Conv2d(1, dim, 4, 4)
        self.pos = nn.Parameter(torch.randn(1, 49, dim) * 0.02)
        self.blocks = nn.Sequential(*[Layer(dim, heads, mlp * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


# --------------------------------------------------------------------------------------- training
def train(model: nn.Module, loader: DataLoader, epochs: int, lr: float, seed: int) -> None:
    """AdamW with a one-cycle schedule."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * len(loader)),
                                                pct_start=0.15)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


def width_prune(model: nn.Module, ratio: float, example: torch.Tensor) -> nn.Module:
    """Torch-Pruning L1 magnitude pruning of a copy: embedding width and MLP hidden channels."""
    import copy

    import torch_pruning as tp

    pruned = copy.deepcopy(model).eval()
    if ratio <= 0:
        return pruned
    ignored = [pruned.head] + [layer.attn.qkv for layer in pruned.blocks]
    pruner = tp.pruner.MagnitudePruner(pruned, example[:1], importance=tp.importance.GroupMagnitudeImportance(p=1),
                                       pruning_ratio=ratio, ignored_layers=ignored)
    pruner.step()
    return pruned


def match_width(model: nn.Module, target: float, example: torch.Tensor, min_time: float, probes: int
                ) -> tuple[float, nn.Module, float]:
    lo, hi = 0.0, 0.9
    best: Optional[tuple[float, nn.Module, float]] = None
    for _ in range(probes):
        mid = (lo + hi) / 2
        candidate = width_prune(model, mid, example)
        measured = latency_ratios({"base": model, "pruned": candidate}, example, min_time)["pruned"]
        if best is None or abs(measured - target) < abs(best[2] - target):
            best = (mid, candidate, measured)
        lo, hi = (mid, hi) if measured > target else (lo, mid)
    assert best is not None
    return best


# ------------------------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=10000, help="training images (first N of the 60k)")
    p.add_argument("--test", type=int, default=5000, help="test images (first N of the 10k)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--finetune", type=int, default=1)
    p.add_argument("--finetune-images", type=int, default=4000, help="training images each fine-tune sees per epoch")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--counts", default="2,4,6", help="residual units to remove (2 per transformer layer)")
    p.add_argument("--criteria", default=",".join(CRITERIA))
    p.add_argument("--calibration", type=int, default=512)
    p.add_argument("--latency-batch", type=int, default=1)
    p.add_argument("--min-time", type=float, default=0.3)
    p.add_argument("--probes", type=int, default=6)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "layer_prune_vit"))
    args = p.parse_args(argv)
    if args.quick:
        args.train, args.test, args.epochs, args.counts, args.criteria, args.probes = 2000, 1000, 1, "2", "l1,influence", 3
        args.finetune_images = 1000
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    counts = [int(c) for c in args.counts.split(",")]
    criteria = [c for c in args.criteria.split(",") if c]
    train_set, test_set = fashion_mnist(True, limit=args.train), fashion_mnist(False, limit=args.test)
    loader = DataLoader(train_set, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    test_loader = DataLoader(test_set, batch_size=500)
    tune_idx = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed + 2))
    tune_loader = DataLoader(Subset(train_set, tune_idx[:args.finetune_images].tolist()), batch_size=128, shuffle=True,
                             generator=torch.Generator().manual_seed(args.seed))
    idx = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed + 1))[:args.calibration]
    calibration = list(DataLoader(Subset(train_set, idx.tolist()), batch_size=128))
    example = torch.randn(args.latency_batch, 1, 28, 28)
    load_start = os.getloadavg()

    base = SmallViT(args.dim, args.depth, args.heads)
    train(base, loader, args.epochs, args.lr, args.seed)
    base_acc = accuracy(base, test_loader)
    print(f"base: {base_acc:.2f}%  {fxshift.macs(base, example[:1]) / 1e6:.2f}M MACs", flush=True)

    models: dict[str, nn.Module] = {"original": base}
    runs: list[dict[str, Any]] = []
    shared: dict[tuple, nn.Module] = {}
    for k in counts:
        names = []
        for criterion in criteria:
            crit = ENSEMBLE if criterion == "ensemble" else criterion
            gm = fxshift.apply([fxshift.LayerPrunePass(blocks=k, criterion=crit, calibration=calibration)], base,
                               example[:1])
            rows = fxshift.report(gm).to_dicts()
            removed = sorted(r["layer"] for r in rows if r["action"] == "pruned")
            key = tuple(removed)
            pre = accuracy(gm, test_loader)
            if key not in shared:
                train(gm, tune_loader, args.finetune, args.lr / 4, args.seed)
                shared[key] = gm
            name = f"{criterion}@{k}"
            models[name] = shared[key]
            names.append(name)
            runs.append({"method": f"LayerPrune ({criterion})", "count": k, "name": name, "removed": removed,
                         "before_finetune": pre})
            print(f"{name}: removed {removed}, {pre:.2f}% before fine-tune", flush=True)
        ratios = latency_ratios({"original": base, **{n: models[n] for n in names}}, example, args.min_time)
        target = statistics.median(ratios[n] for n in names)
        ratio, pruned, measured = match_width(base, target, example, args.min_time, args.probes)
        pre = accuracy(pruned, test_loader)
        train(pruned, tune_loader, args.finetune, args.lr / 4, args.seed)
        name = f"width@{k}"
        models[name] = pruned
        runs.append({"method": "width pruning (Torch-Pruning L1)", "count": k, "name": name, "ratio": ratio,
                     "before_finetune": pre})
        print(f"{name}: ratio {ratio:.3f}, latency {measured:.3f} matched to {target:.3f}", flush=True)

    load_timing = os.getloadavg()
    distinct: dict[int, str] = {}
    for name, model in models.items():
        distinct.setdefault(id(model), name)
    timed = latency_ratios({n: models[n] for n in distinct.values()}, example, 2 * args.min_time)
    rows = [{"method": "original", "count": 0, "latency_ratio": 1.0, "accuracy": base_acc, "before_finetune": base_acc,
             "macs": fxshift.macs(base, example[:1]), "params": fxshift.parameter_count(base)}]
    for run in runs:
        model = models[run["name"]]
        rows.append({**{k: v for k, v in run.items() if k != "name"},
                     "latency_ratio": timed[distinct[id(model)]], "accuracy": accuracy(model, test_loader),
                     "macs": fxshift.macs(model, example[:1]), "params": fxshift.parameter_count(model)})
    result = {"args": vars(args), "loadavg_start": load_start, "loadavg_timing": load_timing, "rows": rows,
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "torch": torch.__version__}
    write(result, Path(args.out))
    return result


def write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    a = result["args"]
    lines = [
        "# LayerPrune on a small ViT vs width pruning at measured latency (Fashion-MNIST)",
        "",
        f"ViT: {a['depth']} layers (each an attention and an MLP residual unit: {2 * a['depth']} candidates), "
        f"width {a['dim']}, {a['heads']} heads, patch 4; {a['train']} training / {a['test']} test images, "
        f"{a['epochs']} training epochs, {a['finetune']} fine-tune epoch(s) of {a['finetune_images']} images per pruned "
        f"model, units scored on "
        f"{a['calibration']} training images. Latency: onnxruntime CPU, 1 thread, batch {a['latency_batch']}, every "
        f"model timed round-robin in one run (median), over the original. Shared 2-core machine, load average "
        f"{result['loadavg_timing'][0]:.2f} / {result['loadavg_timing'][1]:.2f} (1 / 5 min) while timing. "
        "Unit names: blocks.k is layer k's attention unit, blocks.k#1 its MLP unit. Models that removed the same "
        "units are one model, fine-tuned and timed once.",
        "",
        "| method | units removed | latency ratio | accuracy % after fine-tune | before fine-tune | MACs | params | removed / ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        what = ", ".join(r["removed"]) if r.get("removed") else (f"{r['ratio']:.3f}" if r.get("ratio") else "-")
        lines.append(f"| {r['method']} | {r['count']} | {r['latency_ratio']:.3f} | {r['accuracy']:.2f} | "
                     f"{r['before_finetune']:.2f} | {r['macs'] / 1e6:.2f}M | {r['params'] / 1e3:.1f}k | {what} |")
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    main()
