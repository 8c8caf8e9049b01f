"""Tucker, CP and spatial (Tai) decompositions of one trained CNN at the same whole-model MAC budget.

A small CNN (fxshift.models.small_cnn: four conv blocks and a linear classifier) is trained on
Fashion-MNIST in float, then each decomposition pass is applied with the same
``fxshift.Budget(macs=B)`` (each chooses its own per-layer ranks), and each decomposed model is
fine-tuned for one epoch with the same optimizer and schedule. Reported per model: test accuracy
right after decomposition and after the fine-tune, MACs and parameters, Σ relative error² the
budget allocation reached, and onnxruntime CPU latency at batch 1 and 64 (all models timed
round-robin in one loop, one intra-op thread: on a CPU shared with other jobs two-thread
timings swing by several percent).

Writes the markdown table to experiments/results/decompose_budget.md and prints it.

    python experiments/decompose_budget.py            # the full run (about 10 minutes on 2 cores)
    python experiments/decompose_budget.py --quick    # a CI-size run, well under a minute
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fxshift  # noqa: E402
from fxshift.data import fashion_mnist  # noqa: E402
from fxshift.measure.latency import LatencyTimer  # noqa: E402
from fxshift.models import small_cnn  # noqa: E402
from fxshift.train.loops import accuracy, train_epochs  # noqa: E402
from fxshift.passes.decompose_base import budget_summary  # noqa: E402
from fxshift.report import format_table  # noqa: E402

RESULTS = ROOT / "experiments" / "results" / "decompose_budget.md"

METHODS = {
    "Tucker": lambda budget: fxshift.TuckerDecomposePass(rank=budget),
    "CP": lambda budget: fxshift.CPDecomposePass(rank=budget),
    "spatial (Tai)": lambda budget: fxshift.SpatialSVDPass(rank=budget),
}


def main(argv: Optional[list[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.5, help="fraction of the MACs to keep")
    parser.add_argument("--epochs", type=int, default=2, help="float training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--train-samples", type=int, default=20000, help="training images used (of 60,000)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2,000 training images, 1 epoch, no file written")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.train_samples, args.epochs = 2000, 1

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    train = fashion_mnist(train=True, limit=args.train_samples)
    test = fashion_mnist(train=False, limit=2000 if args.quick else None)
    test_loader = DataLoader(test, batch_size=512)
    example = test.tensors[0][:1]

    def loader(seed: int) -> DataLoader:  # the same data order for every fine-tune
        return DataLoader(train, batch_size=args.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(seed))

    model = small_cnn()
    train_epochs(model, loader(args.seed), args.epochs, lr=3e-3, desc="float")
    float_acc = accuracy(model, test_loader)
    print(f"float: {float_acc:.2f}% after {args.epochs} epochs on {len(train)} images "
          f"({time.perf_counter() - started:.0f} s)")

    budget = fxshift.Budget(macs=args.budget)
    models = {"float": model}
    rows = {"float": dict(before=float_acc, after=float_acc, seconds=0.0, error=0.0, layers=0)}
    for name, make in METHODS.items():
        start = time.perf_counter()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the passes' small SVDs and ALS steps: one thread is faster on a shared CPU
        try:
            gm = fxshift.apply([make(budget)], model, example)
        finally:
            torch.set_num_threads(threads)
        seconds = time.perf_counter() - start
        summary = budget_summary(gm)[-1]
        before = accuracy(gm, test_loader)
        tuned = copy.deepcopy(gm)
        torch.manual_seed(args.seed + 1)
        train_epochs(tuned, loader(args.seed + 1), args.finetune_epochs, lr=1e-3, desc=f"{name} fine-tune")
        after = accuracy(tuned, test_loader)
        models[name] = tuned.eval()
        rows[name] = dict(before=before, after=after, seconds=seconds, error=summary["squared_error"],
                          layers=summary["layers_decomposed"])
        print(f"{name}: {before:.2f}% after decomposition ({seconds:.1f} s, {summary['layers_decomposed']} layers), "
              f"{after:.2f}% after fine-tuning")

    timer = LatencyTimer(threads=1)
    latency = {batch: timer.models(models, (test.tensors[0][:batch],), min_time=1.0) for batch in (1, 64)}
    base_macs = fxshift.macs(model, example)
    table = []
    for name, m in models.items():
        r = rows[name]
        macs = fxshift.macs(m, example)
        table.append({
            "model": name if name == "float" else f"{name}, Budget(macs={args.budget:g})",
            "acc. decomposed %": f"{r['before']:.2f}",
            f"acc. +{args.finetune_epochs} epoch %": f"{r['after']:.2f}",
            "MACs": f"{macs / 1e6:.2f}M ({macs / base_macs:.1%})",
            "params": f"{fxshift.parameter_count(m) / 1e3:.1f}k",
            "Σ rel. err²": f"{r['error']:.3f}",
            "ORT b1 ms": f"{1e3 * latency[1][name]:.3f}",
            "ORT b64 ms": f"{1e3 * latency[64][name]:.2f}",
            "b64 speedup": f"{latency[64]['float'] / latency[64][name]:.2f}x",
            "pass s": f"{r['seconds']:.1f}",
        })
    text = format_table(table, list(table[0]))
    header = list(table[0])
    markdown = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                         + ["| " + " | ".join(row[h] for h in header) + " |" for row in table])
    total = time.perf_counter() - started
    print()
    print(text)
    print(f"\ndone in {total:.0f} s")
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            "# Tucker vs CP vs spatial at one MAC budget (Fashion-MNIST)\n\n"
            f"Reproduce: `python experiments/decompose_budget.py` (seed {args.seed}; "
            f"{total / 60:.0f} minutes here).\n\n"
            f"Small CNN (fxshift.models.small_cnn) trained {args.epochs} epochs on {len(train)} Fashion-MNIST training "
            f"images (AdamW, one-cycle LR 3e-3), tested on all {len(test)} test images. Each pass gets "
            f"`rank=fxshift.Budget(macs={args.budget:g})` and chooses its own per-layer ranks; each decomposed model "
            f"is fine-tuned {args.finetune_epochs} epoch (one-cycle LR 1e-3, same data order). MACs per image at "
            "28×28. Latency: onnxruntime CPU, one intra-op thread, median of round-robin runs of all models.\n\n"
            + markdown + "\n\n"
            f"Machine: {platform.machine()}, {os.cpu_count()} CPUs shared with other jobs; torch {torch.__version__}, "
            f"onnxruntime {__import__('onnxruntime').__version__}.\n")
        print(f"written to {args.out}")
    return markdown


if __name__ == "__main__":
    main()
