"""The main job: compress a small CNN trained on Fashion-MNIST, stage by stage, and tabulate it.

    python -m fxshift.demo [--epochs 2] [--train-samples 20000]

Stages: train in float → TuckerDecomposePass(0.5) → fine-tune → RecomposePass (the original
architecture again); LayerPrunePass removing one conv block, fine-tuned; DynamicPrunePass (FTWT,
mass 0.9) on the float model, fine-tuned with the mask loss under its own predicted masks (its MACs:
per sample on the example image, predictors included; a closing line says whether skipping pays at
28×28); DeepShift-Q 5-bit on the float model and on the fine-tuned Tucker
model, each fine-tuned and frozen to packed 5-bit codes. Each row: test accuracy, parameters, MACs, weight
bytes, CPU latency (batch 1, median of interleaved runs). Last, the fully compressed model is
exported to ONNX and run in onnxruntime with fxshift's plugin and through the function bodies.
"""
from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

import fxshift
from fxshift.costs import state_bytes
from fxshift.data import fashion_mnist
from fxshift.models import small_cnn
from fxshift.measure.timing import median_times, torch_runner
from fxshift.report import format_table
from fxshift.train.loops import accuracy, train_epochs


@dataclass
class Stage:
    name: str
    model: nn.Module
    accuracy: float


def _macs(model: nn.Module, example: torch.Tensor) -> float:
    """Static MACs; for a gated (dynamically pruned) model the per-sample count on `example`, predictors included."""
    if any(isinstance(m, fxshift.nn.GatedConv2d) for m in model.modules()):
        return float(fxshift.dynamic_macs(model, example).mean())
    return fxshift.macs(model, example)


def stage_table(stages: list[Stage], example: torch.Tensor) -> str:
    """Accuracy, parameters, MACs and interleaved CPU latency (batch 1) of each stage."""
    latency = median_times({s.name: torch_runner(s.model, (example,)) for s in stages}, rounds=50)
    base = stages[0]
    base_macs = fxshift.macs(base.model, example)
    rows = []
    for s in stages:
        params, macs = fxshift.parameter_count(s.model), _macs(s.model, example)
        rows.append({"stage": s.name, "accuracy %": f"{s.accuracy:.2f}", "params": f"{params / 1e3:.1f}k",
                     "MACs": f"{macs / 1e6:.2f}M", "weights kB": f"{state_bytes(s.model) / 1e3:.1f}",
                     "latency ms": f"{1e3 * latency[s.name]:.3f}", "MACs vs float": f"{base_macs / macs:.2f}x",
                     "speed vs float": f"{latency[base.name] / latency[s.name]:.2f}x"})
    return format_table(rows, list(rows[0]))


def dynamic_note(dense: nn.Module, gated: nn.Module, example: torch.Tensor) -> str:
    """A plain sentence on whether skipping filters pays at this input size: the gated model in skip mode
    against the dense model at batch 1 (interleaved medians), and where it does pay."""
    times = median_times({"dense": torch_runner(dense, (example,)), "skip": torch_runner(gated, (example,))},
                         rounds=50)
    ratio = times["dense"] / times["skip"]
    size = "×".join(str(d) for d in example.shape[2:])
    verdict = ("skipping pays here" if ratio >= 1.05 else
               "skipping does not pay at this size: selecting and gathering filters per input costs as much as "
               "the small convolutions it saves")
    return (f"\ndynamic pruning at {size}, batch 1: skip mode runs at {ratio:.2f}× the float model's speed "
            f"({1e3 * times['dense']:.3f} → {1e3 * times['skip']:.3f} ms); {verdict}. It pays on larger inputs: "
            "benchmarks/bench_dynamic_prune.py (VGG at 64×64 and 224×224) and docs/methods.md §9.")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="float training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--train-samples", type=int, default=20000, help="training images used (of 60,000)")
    parser.add_argument("--rank", type=float, default=0.5, help="Tucker rank fraction")
    parser.add_argument("--weight-bits", type=int, default=5, help="DeepShift weight bits")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--onnx", default="fxshift_demo.onnx", help="where to write the compressed model")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    started = time.perf_counter()
    train = fashion_mnist(train=True, limit=args.train_samples)
    test = fashion_mnist(train=False)
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True)
    test_loader = DataLoader(test, batch_size=512)
    example = test.tensors[0][:1]
    print(f"Fashion-MNIST: {len(train)} training and {len(test)} test images")

    model = small_cnn()
    train_epochs(model, train_loader, args.epochs, lr=3e-3, desc="float")
    stages = [Stage("float", model, accuracy(model, test_loader))]

    tucker = fxshift.apply([fxshift.TuckerDecomposePass(rank=args.rank)], model, example)
    stages.append(Stage(f"tucker({args.rank})", tucker, accuracy(tucker, test_loader)))
    print(fxshift.report(tucker))
    tuned = copy.deepcopy(tucker)
    train_epochs(tuned, train_loader, args.finetune_epochs, lr=1e-3, desc="fine-tune")
    stages.append(Stage("tucker+fine-tune", tuned, accuracy(tuned, test_loader)))

    recomposed = fxshift.apply([fxshift.RecomposePass()], tuned)
    original_again = small_cnn()
    original_again.load_state_dict(recomposed.state_dict())
    stages.append(Stage("recomposed", original_again.eval(), accuracy(original_again, test_loader)))

    # LayerPrune: what it is for is latency. The one shape-keeping conv-BN-ReLU block (128->128 at
    # 7×7, about half the MACs) goes; the fine-tune must relearn what the block did, so it runs at
    # the training learning rate. The line printed weighs the measured speed-up against accuracy.
    pruned = fxshift.apply([fxshift.LayerPrunePass(blocks=1)], model, example)
    removed = [r["layer"] for r in fxshift.report(pruned).to_dicts() if r["action"] == "pruned"]
    before = accuracy(pruned, test_loader)
    train_epochs(pruned, train_loader, args.finetune_epochs, lr=3e-3, desc="layerprune fine-tune")
    stages.append(Stage("layerprune(1)+fine-tune", pruned.eval(), accuracy(pruned, test_loader)))
    speed = median_times({"float": torch_runner(model.eval(), (example,)),
                          "pruned": torch_runner(pruned, (example,))}, rounds=50)
    print(f"layerprune: removed {', '.join(removed)} ({1 - fxshift.macs(pruned, example) / fxshift.macs(model, example):.0%} "
          f"of the MACs): {speed['float'] / speed['pruned']:.2f}x faster (batch 1, torch CPU); accuracy "
          f"{stages[0].accuracy:.2f} -> {before:.2f} after removal -> {stages[-1].accuracy:.2f} after "
          f"{args.finetune_epochs} fine-tune epoch(s)")

    # FTWT dynamic pruning (docs/methods.md §9): per-input filter skipping, fine-tuned with the mask loss under
    # the predictors' own masks (train_mask="predicted", the default: training sees what inference runs).
    gated = fxshift.apply([fxshift.DynamicPrunePass(threshold=0.9)], model, example)
    train_epochs(gated, train_loader, args.finetune_epochs, lr=3e-3, desc="dynamic-prune fine-tune",
                 extra_loss=fxshift.train.mask_loss)
    stages.append(Stage("dynamic-prune(mass 0.9)", gated, accuracy(gated, test_loader)))

    for name, start in (("shift-q5", model), ("tucker+shift-q5", tuned)):
        shifted = fxshift.apply([fxshift.ShiftQuantizePass(mode="q", weight_bits=args.weight_bits)], start, example)
        train_epochs(shifted, train_loader, args.finetune_epochs, lr=5e-4, desc=f"{name} fine-tune")
        frozen = fxshift.freeze(shifted).eval()
        stages.append(Stage(f"{name} frozen", frozen, accuracy(frozen, test_loader)))

    print()
    print(stage_table(stages, example))
    print(dynamic_note(model, gated, example))

    # Deployment: the fully compressed model as an ONNX file, run in onnxruntime with fxshift's plugin.
    from fxshift.onnx import compare_in_onnxruntime

    result = compare_in_onnxruntime(stages[-1].model, example, args.onnx, baseline=model)
    runtimes = ", ".join(f"{k} {v:.2e}" for k, v in result["rel_error"].items())
    timings = ", ".join(f"{k} {v:.3f} ms" for k, v in result["latency_ms"].items())
    print(f"\nonnxruntime: {result['path']} ({result['bytes'] / 1e3:.1f} kB vs float "
          f"{result['float_bytes'] / 1e3:.1f} kB), plugin {'loaded' if result['plugin'] else 'NOT found'}; "
          f"relative error vs torch: {runtimes}; latency: {timings}")
    print(f"\ndone in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
