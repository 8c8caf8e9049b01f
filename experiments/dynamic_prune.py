"""Dynamic pruning (FTWT, docs/methods.md §9) with real skipping, on Fashion-MNIST and sklearn digits,
beside Torch-Pruning's static L1 filter pruning at equal MACs.

For a VGG-style and a ResNet-style CNN trained here on Fashion-MNIST, and a small conv-BN-ReLU CNN on
sklearn's 8×8 digits ("digits"):
  dense      trained for --epochs epochs (cached in --cache, keyed by the sizes, so reruns skip it);
  <setting>  DynamicPrunePass(target=…) on the dense model, then --finetune epochs of
             cross-entropy + λ·fxshift.train.mask_loss (λ = --mask-weight), for each threshold
             (target="mass") and ratio (target="uniform"), trained under the predictors' own masks
             (--train-mask, default "predicted"), the mask loss off for the last --cooldown of the steps;
  static L1  (--static) Torch-Pruning's MagnitudePruner (L1 filter norms, the same ratio in every layer,
             the classifier kept) at the ratio whose MACs equal the dynamic row's mean MACs, then the same
             fine-tune without the mask loss.
Per row: test accuracy (eval mode; batched evaluation uses gating "mask", whose outputs equal
"skip" — tests/test_dynamic_prune.py), the mean per-sample MAC reduction against the dense model
with the predictors counted (fxshift.dynamic_macs), and the measured batch-1 latency of the gated
model in skip mode against the dense model, in torch and in onnxruntime (both 1 thread, timed
round-robin in one process over the same --latency-images test images; ratio = dense / gated).

The claim under test (Elkerdawy et al. 2022): ≥ 50% fewer MACs within 1.5 points of the dense
accuracy (VGG16-BN CIFAR-10: 65% at −0.27).

    python experiments/dynamic_prune.py             # the default size (10k train, 2k test; ~15 min, 1 thread)
    python experiments/dynamic_prune.py --train 60000 --test 10000 --epochs 8 --finetune 4   # full size
    python experiments/dynamic_prune.py --quick     # CI size, writes nothing
    python experiments/dynamic_prune.py --models digits --epochs 30 --finetune 12 --seeds 0 1 2 --static
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fxshift  # noqa: E402
from fxshift import DynamicPrunePass  # noqa: E402
from fxshift.data import digits, fashion_mnist  # noqa: E402
from fxshift.models import BasicBlock  # noqa: E402
from fxshift.nn import set_gating  # noqa: E402
from fxshift.nn.gated import gated_units  # noqa: E402
from fxshift.train import mask_loss, mask_loss_weight  # noqa: E402

from fxshift.measure.timing import median_times, session_runner  # noqa: E402
from fxshift.onnx import session  # noqa: E402


# ------------------------------------------------------------------------------------------ models
def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class VGGStyle(nn.Module):
    """conv blocks [32 | M | 64 64 | M | 128 128 | M] → global pool → linear (about 22M MACs at 28×28)."""

    def __init__(self, widths=(32, "M", 64, 64, "M", 128, 128, "M"), classes: int = 10):
        super().__init__()
        layers, cin = [], 1
        for w in widths:
            if w == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += conv_bn_relu(cin, w)
                cin = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class ResNetStyle(nn.Module):
    """stem 24 @28² → blocks 24→48 (s2), 48→48, 48→96 (s2) → global pool → linear (about 21M MACs)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn_relu(1, 24))
        self.blocks = nn.Sequential(BasicBlock(24, 48, 2), BasicBlock(48, 48, 1), BasicBlock(48, 96, 2))
        self.fc = nn.Linear(96, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


class DigitsCNN(nn.Module):
    """conv-BN-ReLU 1→32→64→64 at 8×8 → global average pool → linear (the issue-20 digits model)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(*conv_bn_relu(1, 32), *conv_bn_relu(32, 64), *conv_bn_relu(64, 64))
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


MODELS = {"vgg": VGGStyle, "resnet": ResNetStyle, "digits": DigitsCNN}


def dataset(name: str, args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, labels, test images, labels) of the model's dataset."""
    if name == "digits":
        train_set, test_set = digits(True), digits(False)
    else:
        train_set, test_set = fashion_mnist(True, limit=args.train), fashion_mnist(False, limit=args.test)
    return (*train_set.tensors, *test_set.tensors)


# ------------------------------------------------------------------------------------------ training
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    return evaluate_as_is(model, x, y, batch)


def evaluate_as_is(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    with torch.no_grad():
        correct = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    return 100.0 * correct / len(x)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int,
          mask_weight: float = 0.0, batch: int = 128, predictor_lr: float = 0.0, cooldown: float = 0.0) -> float:
    """Adam with cosine decay; adds mask_weight · mask_loss when the model has gated units (whose
    predictors get `predictor_lr`), switched off for the last `cooldown` of the steps. Returns seconds."""
    predictors = [p for n, p in model.named_parameters() if ".predictor." in n]
    others = [p for n, p in model.named_parameters() if ".predictor." not in n]
    groups = [{"params": others}] + ([{"params": predictors, "lr": predictor_lr or lr}] if predictors else [])
    optimizer = torch.optim.Adam(groups, lr=lr)
    steps = epochs * ((len(x) + batch - 1) // batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    step = 0
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            weight = mask_loss_weight(step, max(steps, 1), mask_weight, cooldown) if mask_weight else 0.0
            step += 1
            if weight:
                loss = loss + weight * mask_loss(model)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return time.perf_counter() - start


def dense_model(name: str, args, data, seed: int) -> tuple[nn.Module, float]:
    size = "all" if name == "digits" else args.train
    key = f"{name}-n{size}-e{args.epochs}-s{seed}.pt"
    path = Path(args.cache) / key
    torch.manual_seed(seed)
    model = MODELS[name]()
    if path.exists() and not args.quick:
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), float("nan")
    seconds = train(model, data["x"], data["y"], args.epochs, args.lr, seed, batch=args.batch)
    if not args.quick:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval(), seconds


# ------------------------------------------------------------------------------------------ measurements
def mean_dynamic_macs(gm: nn.Module, x: torch.Tensor, batch: int = 500) -> float:
    return torch.cat([fxshift.dynamic_macs(gm, x[i:i + batch]) for i in range(0, len(x), batch)]).mean().item()


def oracle_accuracy(gm: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy when every unit keeps the filters its own training target picks from its dense output
    (top-k / mass of the actual activations) instead of the predictor's choice: how much of the gap to
    the dense model is the predictors' and how much the selection rule's."""
    units = [u for _, u in gated_units(gm)]
    saved = [u.train_mask for u in units]
    gm.eval()
    try:
        for u in units:   # the unit's own training forward (dense, then × targets); its BN stays in eval
            u.training, u.train_mask = True, "target"
        return evaluate_as_is(gm, x, y)
    finally:
        for u, mask in zip(units, saved):
            u.training, u.train_mask = False, mask


def latencies(dense: nn.Module, gm: nn.Module, images: torch.Tensor, args) -> dict[str, float]:
    """Median seconds per image at batch 1 of dense and gated (skip) in torch and onnxruntime, timed round-robin."""
    samples = [images[i:i + 1] for i in range(len(images))]
    set_gating(gm, "skip")
    gm.eval()

    def torch_runner(model):
        def run():
            with torch.inference_mode():
                for s in samples:
                    model(s)
        return run

    runners = {"torch dense": torch_runner(dense), "torch skip": torch_runner(gm)}
    if not args.no_onnx:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            fxshift.export_onnx(dense, samples[0], Path(tmp) / "dense.onnx", dynamic_batch=False)
            fxshift.export_onnx(gm, samples[0], Path(tmp) / "gated.onnx", dynamic_batch=False)
            sessions = {k: session(str(Path(tmp) / f"{k}.onnx"), plugin=False, threads=1) for k in ("dense", "gated")}
        for key, sess in sessions.items():
            per = [session_runner(sess, (s,)) for s in samples]
            runners[f"ort {'dense' if key == 'dense' else 'skip'}"] = (lambda per=per: [r() for r in per])
        # the exported gated model gives torch's outputs
        gated_out = torch.cat([torch.as_tensor(sessions["gated"].run(None, {sessions["gated"].get_inputs()[0].name:
                                                                           s.numpy()})[0]) for s in samples])
        with torch.no_grad():
            ref = torch.cat([gm(s) for s in samples])
        err = ((gated_out - ref).norm() / ref.norm()).item()
        if err > 1e-4:
            raise RuntimeError(f"onnxruntime output of the gated model differs from torch: rel {err:.2e}")
    times = median_times(runners, rounds=args.rounds)
    return {k: v / len(samples) for k, v in times.items()}


def static_l1(dense: nn.Module, example: torch.Tensor, target_macs: float) -> tuple[nn.Module, float]:
    """Torch-Pruning's L1 filter pruning (one ratio for every layer, the classifier kept) at the ratio
    whose MACs come closest to `target_macs` from below (bisection); returns (pruned copy, ratio)."""
    import copy

    import torch_pruning as tp

    def pruned(ratio: float) -> nn.Module:
        model = copy.deepcopy(dense).eval()
        if ratio > 0:
            tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=ratio, ignored_layers=[model.fc]).step()
        return model

    lo, hi = 0.0, 0.95
    for _ in range(14):
        mid = (lo + hi) / 2
        if fxshift.macs(pruned(mid), example) > target_macs:
            lo = mid
        else:
            hi = mid
    return pruned(hi), hi


# ------------------------------------------------------------------------------------------ driver
def settings(args) -> list[tuple[str, dict[str, Any]]]:
    out = [(f"mass {t}", dict(target="mass", threshold=t)) for t in args.thresholds]
    out += [(f"uniform {r}", dict(target="uniform", ratio=r)) for r in args.ratios]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vgg", "resnet"], choices=sorted(MODELS))
    p.add_argument("--train", type=int, default=10000, help="training images (first N of the 60k; Fashion-MNIST)")
    p.add_argument("--test", type=int, default=2000, help="test images (first N of the 10k; Fashion-MNIST)")
    p.add_argument("--epochs", type=int, default=3, help="dense training epochs")
    p.add_argument("--finetune", type=int, default=1, help="fine-tuning epochs after the pass")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--finetune-lr", type=float, default=5e-4)
    p.add_argument("--predictor-lr", type=float, default=1e-2, help="Adam learning rate of the mask predictors")
    p.add_argument("--mask-weight", type=float, default=1.0, help="λ of the mask loss")
    p.add_argument("--train-mask", default="predicted", choices=["predicted", "target", "none"],
                   help="what multiplies each unit's output in fine-tuning (GatedConv2d train_mask)")
    p.add_argument("--cooldown", type=float, default=0.0,
                   help="fraction of the fine-tune steps, at the end, without the mask loss (FTWT: 0.5)")
    p.add_argument("--channel-multiple", type=int, default=16,
                   help="DynamicPrunePass channel_multiple (uniform k rounded to whole channel blocks; 1: exact)")
    p.add_argument("--static", action="store_true", help="add Torch-Pruning static L1 rows at equal MACs")
    p.add_argument("--thresholds", type=float, nargs="*", default=[0.8, 0.9])
    p.add_argument("--ratios", type=float, nargs="*", default=[0.25, 0.5])
    p.add_argument("--latency-images", type=int, default=32)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--cache", default=os.environ.get("FXSHIFT_CACHE", "/tmp/fxshift-dynamic-prune"))
    p.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    p.add_argument("--name", default="dynamic_prune", help="stem of the result files")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one setting each, writes nothing")
    p.add_argument("--dense-only", action="store_true", help="train (and cache) the dense models, then stop")
    args = p.parse_args(argv)
    if args.quick:
        args.train, args.test, args.epochs, args.finetune = 512, 256, 1, 1
        args.thresholds, args.ratios, args.latency_images, args.rounds = [0.9], [0.5], 4, 3
    torch.set_num_threads(args.threads)
    rows, started = [], time.perf_counter()
    for name in args.models:
        x, y, xt, yt = dataset(name, args)
        data = {"x": x, "y": y}
        images = xt[:args.latency_images]
        for seed in args.seeds:
            dense, seconds = dense_model(name, args, data, seed)
            if args.dense_only:
                print(f"{name} seed {seed}: dense trained in {seconds:.0f} s, accuracy {evaluate(dense, xt, yt):.2f}")
                continue
            base_acc = evaluate(dense, xt, yt)
            base_macs = fxshift.macs(dense, xt[:1])
            common = {"model": name, "seed": seed, "dense_acc": base_acc, "dense_macs": base_macs}
            for label, options in settings(args):
                torch.manual_seed(seed)
                gm = fxshift.apply(DynamicPrunePass(**options, train_mask=args.train_mask,
                                                    channel_multiple=args.channel_multiple), dense, xt[:1])
                tune = train(gm, x, y, args.finetune, args.finetune_lr, seed + 1, args.mask_weight, batch=args.batch,
                             predictor_lr=args.predictor_lr, cooldown=args.cooldown)
                set_gating(gm, "mask")
                acc = evaluate(gm, xt, yt)
                macs = mean_dynamic_macs(gm, xt)
                row = {**common, "setting": label, "kind": "dynamic", "acc": acc, "delta": acc - base_acc, "macs": macs,
                       "oracle_acc": oracle_accuracy(gm, xt, yt),
                       "macs_reduction": 1 - macs / base_macs, "finetune_s": tune, "load": os.getloadavg()[0]}
                if not args.no_latency:
                    times = latencies(dense, gm, images, args)
                    row.update({f"t {k}": v for k, v in times.items()}, load=os.getloadavg()[0])
                    row["torch_speedup"] = times["torch dense"] / times["torch skip"]
                    if "ort skip" in times:
                        row["ort_speedup"] = times["ort dense"] / times["ort skip"]
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.static:
                    static, ratio = static_l1(dense, xt[:1], macs)
                    tune = train(static, x, y, args.finetune, args.finetune_lr, seed + 1, batch=args.batch)
                    acc_s, macs_s = evaluate(static, xt, yt), fxshift.macs(static, xt[:1])
                    rows.append({**common, "setting": f"{label} (L1 ratio {ratio:.2f})", "kind": "static L1",
                                 "acc": acc_s, "delta": acc_s - base_acc, "macs": macs_s,
                                 "macs_reduction": 1 - macs_s / base_macs, "finetune_s": tune,
                                 "load": os.getloadavg()[0]})
                    print(json.dumps(rows[-1]), flush=True)
    if args.dense_only:
        return 0
    table = markdown(rows, args, time.perf_counter() - started)
    print(table)
    if not args.quick:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.name}.md").write_text(table)
        (out / f"{args.name}.json").write_text(json.dumps(rows, indent=1))
        if not args.no_latency:
            plot([r for r in rows if r["kind"] == "dynamic"], out / f"{args.name}.png")
    return 0


def markdown(rows: list[dict], args, seconds: float) -> str:
    data = ", ".join(sorted({"sklearn digits (1,347 train / 450 test)" if r["model"] == "digits" else
                             f"Fashion-MNIST ({args.train} train / {args.test} test)" for r in rows}))
    lines = [f"# Dynamic pruning (FTWT) with real skipping, beside static L1 filter pruning", "",
             f"{data}; dense {args.epochs} epochs, fine-tune {args.finetune} epoch(s) (Adam, lr {args.finetune_lr}, "
             f"predictors {args.predictor_lr}, batch {args.batch}) with cross-entropy + {args.mask_weight}·mask_loss "
             f"(train_mask={args.train_mask}, cooldown {args.cooldown}, channel_multiple {args.channel_multiple}); static L1: Torch-Pruning MagnitudePruner at "
             f"the dynamic row's mean MACs, the same fine-tune without mask loss; seeds {args.seeds}; "
             f"{args.threads} thread(s), torch {torch.__version__}, {platform.processor() or platform.machine()}; "
             f"latency: median of {args.rounds} round-robin rounds over {args.latency_images} test images at batch 1; "
             f"speed-up = dense time / gated (skip) time. Total {seconds / 60:.1f} min.", "",
             "Oracle: each unit keeps the filters its training target picks from its own dense output (not "
             "computable at inference: it needs the dense output), with the same fine-tuned weights.", "",
             "| model | seed | kind | setting | dense acc | acc | oracle acc | Δ points | MACs dense | MACs (mean, with predictors) "
             "| MAC reduction | torch dense µs | torch skip µs | torch speed-up | ORT dense µs | ORT skip µs "
             "| ORT speed-up | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        torch_t = (f"{r['t torch dense'] * 1e6:.0f} | {r['t torch skip'] * 1e6:.0f} | {r['torch_speedup']:.2f}×"
                   if "torch_speedup" in r else "- | - | -")
        ort = (f"{r['t ort dense'] * 1e6:.0f} | {r['t ort skip'] * 1e6:.0f} | {r['ort_speedup']:.2f}×"
               if "ort_speedup" in r else "- | - | -")
        oracle = f"{r['oracle_acc']:.2f}" if "oracle_acc" in r else "-"
        lines.append(f"| {r['model']} | {r['seed']} | {r['kind']} | {r['setting']} | {r['dense_acc']:.2f} | "
                     f"{r['acc']:.2f} | {oracle} | {r['delta']:+.2f} | {r['dense_macs'] / 1e6:.2f}M | {r['macs'] / 1e6:.3f}M | "
                     f"{100 * r['macs_reduction']:.1f}% | {torch_t} | {ort} | {r['load']:.2f} |")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["kind"], r["setting"].split(" (")[0]), []).append(r)
    if any(len(v) > 1 for v in groups.values()):
        lines += ["", "| model | kind | setting | seeds | acc mean (min–max) | Δ mean | MAC reduction mean |",
                  "|---|---|---|---|---|---|---|"]
        for (model, kind, setting), rs in groups.items():
            accs = [r["acc"] for r in rs]
            lines.append(f"| {model} | {kind} | {setting} | {len(rs)} | {sum(accs) / len(accs):.2f} "
                         f"({min(accs):.2f}–{max(accs):.2f}) | {sum(r['delta'] for r in rs) / len(rs):+.2f} | "
                         f"{100 * sum(r['macs_reduction'] for r in rs) / len(rs):.1f}% |")
    met = [r for r in rows if r["kind"] == "dynamic" and r["macs_reduction"] >= 0.5 and r["delta"] >= -1.0]
    lines += ["", "Goal (≥ 50% fewer MACs within 1 point of dense): " +
              (("met by " + ", ".join(f"{r['model']} {r['setting']} seed {r['seed']}" for r in met)) if met
               else "not met by any dynamic row")]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, marker in (("vgg", "o"), ("resnet", "s")):
        sel = [r for r in rows if r["model"] == name]
        if not sel:
            continue
        red = [100 * r["macs_reduction"] for r in sel]
        axes[0].scatter(red, [r["delta"] for r in sel], marker=marker, label=name)
        axes[1].scatter(red, [r["torch_speedup"] for r in sel], marker=marker, label=f"{name} torch")
        if all("ort_speedup" in r for r in sel):
            axes[1].scatter(red, [r["ort_speedup"] for r in sel], marker=marker, facecolors="none",
                            edgecolors="k", label=f"{name} onnxruntime")
        for r, x in zip(sel, red):
            axes[0].annotate(r["setting"], (x, r["delta"]), fontsize=7)
    axes[0].axhline(-1.5, color="r", ls="--", lw=0.8)
    axes[0].axvline(50, color="r", ls="--", lw=0.8)
    axes[0].set(xlabel="mean per-sample MAC reduction (%)", ylabel="accuracy change (points)")
    axes[1].axhline(1.0, color="gray", lw=0.8)
    axes[1].set(xlabel="mean per-sample MAC reduction (%)", ylabel="batch-1 speed-up (dense / skip)")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
