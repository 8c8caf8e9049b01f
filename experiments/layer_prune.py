"""LayerPrune vs filter pruning at equal measured onnxruntime latency (docs/methods.md §8), on Fashion-MNIST.

The claim under test (LayerPrune, Elkerdawy, Elhoushi et al., ACCV 2020): at the same measured
latency, removing whole residual blocks keeps more accuracy than removing filters.

Steps, all with one seed:
  1. Train a ResNet with several BasicBlocks per stage (3 stages) for --epochs epochs.
  2. For each latency target t (fractions of the trained model's onnxruntime latency):
     - LayerPrune: ``fxshift.LayerPrunePass(blocks=fxshift.Budget(latency=t, threads=1), criterion=c,
       calibration=...)`` for every criterion c in l1, l2, bn, taylor, imprint and the ensemble;
     - filter pruning: Torch-Pruning's MagnitudePruner (L1 group magnitude, the same ratio for
       every layer, the classifier kept), its ratio found by bisection so that the pruned model's
       measured latency matches t.
  3. Fine-tune every pruned model --finetune epochs with the same optimizer and schedule (runs that
     remove the same blocks are fine-tuned once and share the result).
  4. Time every final model in one onnxruntime round-robin run (1 thread, --latency-batch images
     per call) and report test accuracy against the measured latency ratio.

Writes experiments/results/layer_prune.{md,json,png}. Needs the experiment extra:
``pip install -e .[experiment]`` (torch-pruning).

    python experiments/layer_prune.py            # default size: about 10-15 min on one thread
    python experiments/layer_prune.py --quick    # a smoke run, about a minute
    python experiments/layer_prune.py --train 60000 --epochs 15 --finetune 3 --widths 32,64,128 --blocks 5
                                                 # a fuller run for a quiet machine
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fxshift  # noqa: E402
from fxshift.data import fashion_mnist  # noqa: E402
from fxshift.models import SmallResNet  # noqa: E402

CRITERIA = ("l1", "l2", "bn", "taylor", "imprint", "ensemble")


# ------------------------------------------------------------------------------------------ model
# --------------------------------------------------------------------------------------- training
def train(model: nn.Module, loader: DataLoader, epochs: int, lr: float, seed: int) -> float:
    """SGD with momentum and a cosine schedule over `epochs`; returns the seconds spent."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = max(1, epochs * len(loader))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    right = total = 0
    for x, y in loader:
        right += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return 100.0 * right / total


# ---------------------------------------------------------------------------------------- latency
def latency_ratios(models: dict[str, nn.Module], example: torch.Tensor, min_time: float) -> dict[str, float]:
    """Median onnxruntime latency of each model over the first one's, timed round-robin in one run."""
    from fxshift.measure.latency import LatencyTimer

    timer = LatencyTimer(threads=1)
    for m in models.values():
        m.eval()
    times = timer.models(dict(models), (example,), min_time=min_time)
    base = times[next(iter(models))]
    return {name: t / base for name, t in times.items()}


def filter_prune(model: nn.Module, ratio: float, example: torch.Tensor) -> nn.Module:
    """Torch-Pruning L1 group-magnitude filter pruning of a copy of `model` at `ratio` per layer."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model).eval()
    if ratio <= 0:
        return pruned
    importance = tp.importance.GroupMagnitudeImportance(p=1)
    pruner = tp.pruner.MagnitudePruner(pruned, example, importance=importance, pruning_ratio=ratio,
                                       ignored_layers=[pruned.fc])
    pruner.step()
    return pruned


def match_filter_ratio(model: nn.Module, target: float, example: torch.Tensor, min_time: float,
                       probes: int) -> tuple[float, nn.Module, float]:
    """Bisection on the filter-pruning ratio until the measured latency ratio is near `target`."""
    lo, hi = 0.0, 0.9
    best: Optional[tuple[float, nn.Module, float]] = None
    for _ in range(probes):
        mid = (lo + hi) / 2
        candidate = filter_prune(model, mid, example)
        measured = latency_ratios({"base": model, "pruned": candidate}, example, min_time)["pruned"]
        if best is None or abs(measured - target) < abs(best[2] - target):
            best = (mid, candidate, measured)
        if measured > target:
            lo = mid
        else:
            hi = mid
    assert best is not None
    return best


def layer_prune(model: nn.Module, target: float, criterion: str, calibration: list, example: torch.Tensor
                ) -> tuple[nn.Module, list[str], float]:
    """The LayerPrune model for a latency target, the blocks it removed and the latency ratio the
    pass measured for it."""
    from fxshift.context import budget_summaries

    pass_ = fxshift.LayerPrunePass(blocks=fxshift.Budget(latency=target, threads=1), criterion=criterion,
                                   calibration=calibration)
    gm = fxshift.apply([pass_], model, example)
    removed = [r["layer"] for r in fxshift.report(gm).to_dicts() if r["action"] == "pruned"]
    return gm, removed, float(budget_summaries(gm)[-1]["fraction"])


# ------------------------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=8000, help="training images (first N of the 60k)")
    p.add_argument("--test", type=int, default=5000, help="test images (first N of the 10k)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs of the original model")
    p.add_argument("--finetune", type=int, default=1, help="fine-tuning epochs of every pruned model")
    p.add_argument("--widths", default="16,32,64", help="channels of the three stages")
    p.add_argument("--blocks", type=int, default=3, help="BasicBlocks per stage")
    p.add_argument("--targets", default="0.8,0.65,0.5", help="latency fractions to reach")
    p.add_argument("--criteria", default=",".join(CRITERIA))
    p.add_argument("--calibration", type=int, default=512, help="training images used to score blocks")
    p.add_argument("--latency-batch", type=int, default=32, help="images per onnxruntime call when timing")
    p.add_argument("--min-time", type=float, default=0.5, help="seconds of timed runs per model per measurement")
    p.add_argument("--probes", type=int, default=7, help="bisection steps matching the filter-pruning latency")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a smoke run: 2k images, 1+1 epochs, one target")
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "layer_prune"))
    args = p.parse_args(argv)
    if args.quick:
        args.train, args.test, args.epochs, args.finetune = 2000, 1000, 1, 1
        args.targets, args.criteria, args.calibration, args.probes, args.min_time = "0.7", "l1,ensemble", 256, 3, 0.2
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    widths = tuple(int(w) for w in args.widths.split(","))
    targets = [float(t) for t in args.targets.split(",")]
    criteria = [c for c in args.criteria.split(",") if c]

    train_set = fashion_mnist(train=True, limit=args.train)
    test_set = fashion_mnist(train=False, limit=args.test)
    g = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train_set, batch_size=128, shuffle=True, generator=g)
    test_loader = DataLoader(test_set, batch_size=500)
    calib_idx = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed + 1))[:args.calibration]
    calib_loader = DataLoader(Subset(train_set, calib_idx.tolist()), batch_size=128)
    calibration = [(x, y) for x, y in calib_loader]
    example = torch.randn(args.latency_batch, 1, 28, 28)

    load = os.getloadavg()
    base = SmallResNet(widths, args.blocks)
    t_train = train(base, train_loader, args.epochs, args.lr, args.seed)
    base_acc = accuracy(base, test_loader)
    print(f"base: {base_acc:.2f}% after {args.epochs} epochs ({t_train:.0f} s), "
          f"{fxshift.macs(base, example[:1]) / 1e6:.2f}M MACs, {fxshift.parameter_count(base)} params", flush=True)

    runs: list[dict[str, Any]] = []
    finetuned: dict[tuple, nn.Module] = {}
    models: dict[str, nn.Module] = {"original": base}
    for target in targets:
        reached = []
        for criterion in criteria:
            gm, removed, fraction = layer_prune(base, target, criterion, calibration, example)
            reached.append(fraction)
            key = ("layerprune", tuple(sorted(removed)))
            name = f"layerprune-{criterion}@{target:g}"
            if key not in finetuned:
                train(gm, train_loader, args.finetune, args.lr / 5, args.seed)
                finetuned[key] = gm
            runs.append({"method": f"LayerPrune ({criterion})", "criterion": criterion, "target": target, "name": name,
                         "removed": removed, "key": key})
            models[name] = finetuned[key]
            print(f"{name}: removed {removed}", flush=True)
        # filter pruning is matched to the latency LayerPrune reached (blocks come in steps), not the target
        matched = sorted(reached)[len(reached) // 2]
        ratio, pruned, measured = match_filter_ratio(base, matched, example, args.min_time, args.probes)
        name = f"filter-l1@{target:g}"
        train(pruned, train_loader, args.finetune, args.lr / 5, args.seed)
        runs.append({"method": "filter pruning (Torch-Pruning L1)", "criterion": "l1-filter", "target": target,
                     "name": name, "ratio": ratio, "key": ("filter", target)})
        models[name] = pruned
        print(f"{name}: ratio {ratio:.3f} (latency {measured:.3f} when matched to {matched:.3f})", flush=True)

    # every distinct final model timed once, all round-robin in one run (runs that removed the same
    # blocks share one model and so one timing)
    load_timing = os.getloadavg()
    distinct: dict[int, str] = {}
    for name, model in models.items():
        distinct.setdefault(id(model), name)
    timed = latency_ratios({n: models[n] for n in distinct.values()}, example, 2 * args.min_time)
    ratios = {name: timed[distinct[id(model)]] for name, model in models.items()}
    rows = [{"method": "original", "target": 1.0, "latency_ratio": 1.0, "accuracy": base_acc,
             "macs": fxshift.macs(base, example[:1]), "params": fxshift.parameter_count(base)}]
    for run in runs:
        model = models[run["name"]]
        rows.append({"method": run["method"], "target": run["target"], "latency_ratio": ratios[run["name"]],
                     "accuracy": accuracy(model, test_loader), "macs": fxshift.macs(model, example[:1]),
                     "params": fxshift.parameter_count(model),
                     "removed": run.get("removed"), "filter_ratio": run.get("ratio")})
    result = {"args": vars(args), "loadavg_start": load, "loadavg_timing": load_timing, "rows": rows,
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    write(result, Path(args.out))
    return result


def write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = result["rows"]
    a = result["args"]
    lines = [
        "# LayerPrune vs filter pruning at equal measured latency (Fashion-MNIST)",
        "",
        f"SmallResNet (fxshift.models) widths {a['widths']}, {a['blocks']} BasicBlocks per stage; {a['train']} training images, "
        f"{a['test']} test images; {a['epochs']} training epochs, {a['finetune']} fine-tuning epoch(s) for every "
        f"pruned model; blocks scored on {a['calibration']} training images. Latency: onnxruntime CPU, 1 thread, "
        f"batch {a['latency_batch']}, every model timed round-robin in one run (median), as a ratio to the "
        f"original. Load average {result['loadavg_timing'][0]:.2f} / {result['loadavg_timing'][1]:.2f} "
        f"(1 / 5 min) while timing.",
        "",
        "| method | latency target | measured latency ratio | test accuracy % | MACs | params | removed blocks / filter ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        what = ", ".join(r["removed"]) if r.get("removed") else (f"{r['filter_ratio']:.3f}" if r.get("filter_ratio")
                                                                else "-")
        lines.append(f"| {r['method']} | {r['target']:g} | {r['latency_ratio']:.3f} | {r['accuracy']:.2f} | "
                     f"{r['macs'] / 1e6:.2f}M | {r['params'] / 1e3:.1f}k | {what} |")
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    print(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for method in methods:
        pts = sorted((r["latency_ratio"], r["accuracy"]) for r in rows if r["method"] == method)
        style = "s-" if method.startswith("filter") else ("*" if method == "original" else "o--")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=method, markersize=9 if method == "original" else 6)
    ax.set_xlabel("measured onnxruntime latency / original")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("LayerPrune vs filter pruning, Fashion-MNIST")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
