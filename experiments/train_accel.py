"""Training acceleration by decomposition mid-training (docs/methods.md §7), reproduced on Fashion-MNIST.

Runs, all with the same seed, data order, optimizer and LR schedule:
  (a) original   the small ResNet trained for E epochs;
  (b) M-step-b   trained in its original form for k epochs, decomposed at the start of epoch k by method
                 M (tucker, cp, spatial) with rank=Budget(train_step=b, batch=<batch size>): every layer's
                 rank chosen so that the measured forward+backward time of a training step is about b of
                 the original's (fxshift.train.DecomposeSchedule), then trained to E;
  (c) tucker-r   the same with a fixed Tucker rank fraction r (--rank, none by default);
  (d) +recompose (b)/(c) folded back into the original architecture at the end (on_train_end);
  (e) shift-q    trained in float for k epochs, switched to DeepShift (ShiftQuantizePass) (--shift-mode).

Wall-clock time per epoch is measured around the schedule call and the training loop, so the
decomposition (and optimizer rebuild) counts in the epoch where it happens; evaluation is not
counted. By default (b)-(d) share the first k epochs with (a): those epochs are the same
computation (same seed, same data order), so they are run once and their times reused; pass
--no-share to train every run from scratch.

Outputs a markdown table (printed and written to experiments/results/train_accel.md) and a plot
of test accuracy against training time (experiments/results/train_accel.png).

    python experiments/train_accel.py                 # the full run (about 15 minutes on 2 idle cores)
    python experiments/train_accel.py --quick         # a CI-size run, under a minute
"""
from __future__ import annotations

import argparse
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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fxshift  # noqa: E402
from fxshift import Budget, CPDecomposePass, ShiftQuantizePass, SpatialSVDPass, TuckerDecomposePass  # noqa: E402
from fxshift.data import fashion_mnist  # noqa: E402
from fxshift.models import SmallResNet  # noqa: E402
from fxshift.train import DecomposeSchedule  # noqa: E402


METHODS = {"tucker": TuckerDecomposePass, "spatial": SpatialSVDPass, "cp": CPDecomposePass}


# ------------------------------------------------------------------------------------------- runs
def make_model(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(args.seed)
    model = SmallResNet(tuple(args.widths), args.blocks)
    if args.channels_last:  # about 1.3× faster on this CPU; the schedule keeps the format after a switch
        model = model.to(memory_format=torch.channels_last)
    return model


def make_optimizer(model: nn.Module, args: argparse.Namespace):
    # The second, empty group is where DeepShift-PS shifts and signs go after a switch (no weight
    # decay on P, as DeepShift advises); it changes nothing for the other runs.
    groups = [{"params": list(model.parameters()), "name": "weights"},
              {"params": [], "name": "shift", "weight_decay": 0.0}]
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    return optimizer, scheduler


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    was_training = model.training
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch))
    model.train(was_training)
    return 100.0 * correct / len(y)


def train_epoch(model: nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor, epoch: int,
                args: argparse.Namespace) -> float:
    model.train()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
    total, steps = 0.0, 0
    for start in range(0, len(y) - args.batch_size + 1, args.batch_size):  # full batches only
        idx = order[start:start + args.batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        total += loss.item()
        steps += 1
    return total / max(steps, 1)


def macs_of(model: nn.Module, sample: torch.Tensor) -> int:
    was_training = model.training
    model.eval()
    count = fxshift.macs(model, sample)
    model.train(was_training)
    return count


def run(name: str, args: argparse.Namespace, data: dict, sched: Optional[DecomposeSchedule] = None,
        start: Optional[dict] = None, snapshot_at: Optional[int] = None) -> dict[str, Any]:
    """Train from epoch 0 (or from a shared snapshot `start`) to args.epochs; returns the record."""
    xtr, ytr, xcurve, ycurve = data["xtr"], data["ytr"], data["xcurve"], data["ycurve"]
    model = make_model(args)
    optimizer, scheduler = make_optimizer(model, args)
    record: dict[str, Any] = {"name": name, "epoch_seconds": [], "curve": [], "losses": [], "events": []}
    first = 0
    if start is not None:
        model.load_state_dict(start["model"])
        optimizer.load_state_dict(start["optimizer"])
        scheduler.load_state_dict(start["scheduler"])
        record["epoch_seconds"] = list(start["epoch_seconds"])
        record["curve"] = list(start["curve"])
        record["losses"] = list(start["losses"])
        first = start["epoch"]
    snapshot = None
    for epoch in range(first, args.epochs):
        if epoch == snapshot_at:
            snapshot = {"epoch": epoch, "model": {k: v.clone() for k, v in model.state_dict().items()},
                        "optimizer": _clone(optimizer.state_dict()), "scheduler": _clone(scheduler.state_dict()),
                        "epoch_seconds": list(record["epoch_seconds"]), "curve": list(record["curve"]),
                        "losses": list(record["losses"])}
        tick = time.perf_counter()
        if sched is not None:
            model, optimizer = sched.on_epoch_start(epoch, model, optimizer, lr_scheduler=scheduler)
        loss = train_epoch(model, optimizer, xtr, ytr, epoch, args)
        scheduler.step()
        record["epoch_seconds"].append(time.perf_counter() - tick)
        record["losses"].append(loss)
        elapsed = sum(record["epoch_seconds"])
        record["curve"].append((elapsed, evaluate(model, xcurve, ycurve)))
        print(f"  {name:<14} epoch {epoch + 1}/{args.epochs}  {record['epoch_seconds'][-1]:6.1f} s  "
              f"loss {loss:.4f}  acc {record['curve'][-1][1]:.2f}%", flush=True)
    record["model"] = model
    record["optimizer"], record["scheduler"] = optimizer, scheduler
    record["snapshot"] = snapshot
    if sched is not None:
        record["events"] = [dict(e) for e in sched.events]
    return record


def _clone(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {k: _clone(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_clone(v) for v in state]
    return state


def summarize(record: dict, data: dict, sample: torch.Tensor, switch_epoch: Optional[int]) -> dict[str, Any]:
    seconds = record["epoch_seconds"]
    before = seconds[:switch_epoch] if switch_epoch is not None else seconds
    after = seconds[switch_epoch + 1:] if switch_epoch is not None else []
    model = record["model"]
    return {
        "run": record["name"],
        "switch_epoch": switch_epoch,
        "s_per_epoch_before": sum(before) / len(before) if before else None,
        "s_switch_epoch": seconds[switch_epoch] if switch_epoch is not None else None,
        "s_per_epoch_after": sum(after) / len(after) if after else None,
        "switch_seconds": sum(e["seconds"] for e in record["events"] if e["event"] == "switch") or None,
        "total_s": sum(seconds) + record.get("extra_seconds", 0.0),
        "test_acc": evaluate(model, data["xte"], data["yte"]),
        "macs": macs_of(model, sample),
        "params": sum(p.numel() for p in model.parameters()),
        "final_loss": record["losses"][-1],
        "planned_step_fraction": record.get("planned_step_fraction"),
    }


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(rows: list[dict], args: argparse.Namespace, meta: dict) -> str:
    base = rows[0]
    lines = [
        "# Training acceleration by decomposition mid-training (Fashion-MNIST)",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"SmallResNet widths {tuple(args.widths)}, {args.blocks} block(s)/stage; {args.train_size} training images "
        f"(first of the 60k), accuracy on the full {meta['test_size']}-image test set; {args.epochs} epochs, batch "
        f"{args.batch_size}, SGD(lr={args.lr}, momentum 0.9, nesterov, wd {args.weight_decay}) with cosine annealing; "
        f"switch at the start of epoch {args.decompose_at + 1} (after {args.decompose_at} epoch(s) of the original "
        f"model). torch {torch.__version__}, {meta['threads']} thread(s), {meta['cpu']}; "
        f"load average {meta['load_before']} before, {meta['load_after']} after (shared machine). "
        f"Memory format: {'channels-last' if args.channels_last else 'NCHW'}. Runs (b)-(d) "
        + ("share the first epochs with (a) (same computation, timed once)." if not args.no_share
           else "were trained from scratch."),
        "",
        "| run | s/epoch before | switch epoch (s) | s/epoch after | total train s | speed-up | test acc % | Δ acc "
        "| MACs/sample | params | step time at the switch (measured) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = base["total_s"] / r["total_s"]
        delta = r["test_acc"] - base["test_acc"]
        switch = _fmt(r["s_switch_epoch"], ".1f")
        if r["switch_seconds"] is not None:
            switch += f" (of which switch {r['switch_seconds']:.1f})"
        lines.append(
            f"| {r['run']} | {_fmt(r['s_per_epoch_before'], '.1f')} | {switch} | "
            f"{_fmt(r['s_per_epoch_after'], '.1f')} | {r['total_s']:.1f} | {speed:.2f}× | {r['test_acc']:.2f} | "
            f"{delta:+.2f} | {r['macs'] / 1e6:.2f}M | {r['params'] / 1e3:.0f}k | "
            f"{_fmt(r['planned_step_fraction'], '.0%')} |")
    lines += ["", "Per-epoch speed-up after the switch (s/epoch original ÷ s/epoch run): " + ", ".join(
        f"{r['run']} {base['s_per_epoch_before'] / r['s_per_epoch_after']:.2f}×" for r in rows[1:]
        if r["s_per_epoch_after"]) + ".", ""]
    return "\n".join(lines)


def plot(records: list[dict], recomposed: list[tuple[str, float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {}
    for record in records:
        (line,) = ax.plot([t for t, _ in record["curve"]], [a for _, a in record["curve"]], marker="o",
                          label=record["name"])
        colors[record["name"]] = line.get_color()
    for name, seconds, acc in recomposed:
        ax.scatter([seconds], [acc], marker="*", s=220, zorder=5, color=colors.get(name.split("+")[0]),
                   edgecolors="black", label=name)
    ax.set_xlabel("cumulative training time (s, wall-clock)")
    ax.set_ylabel("test accuracy (%, curve on a test subset)")
    ax.set_title("Fashion-MNIST: original vs decomposed/shifted mid-training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=20, help="total epochs E")
    p.add_argument("--decompose-at", type=int, default=2, help="switch at the start of this epoch (0-based): k")
    p.add_argument("--methods", nargs="*", default=["tucker", "spatial", "cp"], choices=sorted(METHODS),
                   help="decomposition methods run with the training-step budget, one run each")
    p.add_argument("--step-budget", type=float, default=0.4,
                   help="Budget(train_step=...): the fraction of the original training-step time to keep")
    p.add_argument("--rank", type=float, nargs="*", default=[],
                   help="fixed Tucker rank fraction(s), one run each (none by default)")
    p.add_argument("--shift-mode", choices=["q", "ps", "none"], default="none", help="DeepShift row mode (none: skip)")
    p.add_argument("--widths", type=int, nargs=3, default=[48, 96, 192])
    p.add_argument("--blocks", type=int, default=1, help="BasicBlocks per stage")
    p.add_argument("--train-size", type=int, default=20000, help="training images (the first N of 60k)")
    p.add_argument("--curve-size", type=int, default=2000, help="test images for the per-epoch accuracy curve")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads (on a shared, busy 2-core machine 1 thread is steadier)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="keep conv weights in the default (NCHW) memory format")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-share", action="store_true", help="train every run from scratch")
    p.add_argument("--quick", action="store_true", help="CI-size run (< 1 minute); results not written")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.decompose_at, args.widths = 3, 1, [16, 32, 64]
        args.train_size, args.curve_size = 1536, 500
        args.methods, args.rank = args.methods[:1], args.rank[:1]
        args.step_budget = 0.9  # a model this small is mostly per-call overhead: little step time to save
    if not 0 <= args.decompose_at < args.epochs:
        p.error("--decompose-at must be in 0 … epochs−1")
    return args


def main(argv: Optional[list[str]] = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = " ".join(f"{v:.1f}" for v in os.getloadavg())
    train = fashion_mnist(train=True, limit=args.train_size)
    test = fashion_mnist(train=False, limit=1000 if args.quick else None)
    data = {"xtr": train.tensors[0], "ytr": train.tensors[1], "xte": test.tensors[0], "yte": test.tensors[1],
            "xcurve": test.tensors[0][:args.curve_size], "ycurve": test.tensors[1][:args.curve_size]}
    sample = data["xtr"][:1]
    k = args.decompose_at
    print(f"Fashion-MNIST: {len(data['ytr'])} train, {len(data['yte'])} test; widths {args.widths}; "
          f"{args.epochs} epochs, switch at epoch {k}; {args.threads} thread(s)", flush=True)

    share = not args.no_share
    original = run("original", args, data, snapshot_at=k if share else None)
    start = original["snapshot"] if share else None
    records = [original]
    rows = [summarize(original, data, sample, None)]
    recomposed_points = []
    step = Budget(train_step=args.step_budget, batch=args.batch_size, threads=args.threads)
    decompositions = [(f"{m}-step{args.step_budget:g}", METHODS[m](rank=step, exclude=["stem"])) for m in args.methods]
    decompositions += [(f"tucker-{r:g}", TuckerDecomposePass(rank=r, exclude=["stem"])) for r in args.rank]
    for name, decomposition in decompositions:
        sched = DecomposeSchedule(k, decomposition, recompose_at_end=True, example_inputs=sample)
        rec = run(name, args, data, sched, start=start)
        summaries = fxshift.context.budget_summaries(rec["model"])
        rec["planned_step_fraction"] = summaries[-1].get("measured_fraction") if summaries else None
        records.append(rec)
        rows.append(summarize(rec, data, sample, k))
        tick = time.perf_counter()
        model, _ = sched.on_train_end(rec["model"], rec["optimizer"], lr_scheduler=rec["scheduler"])
        fold = time.perf_counter() - tick
        fresh = make_model(args)
        fresh.load_state_dict(model.state_dict())  # the original architecture takes the weights
        folded = {"name": f"{name}+recompose", "model": fresh, "epoch_seconds": rec["epoch_seconds"],
                  "events": rec["events"], "losses": rec["losses"], "extra_seconds": fold}
        row = summarize(folded, data, sample, k)
        rows.append(row)
        recomposed_points.append((folded["name"], row["total_s"], evaluate(fresh, data["xcurve"], data["ycurve"])))
    if args.shift_mode != "none":
        shift = ShiftQuantizePass(mode=args.shift_mode, weight_bits=5, exclude=["stem"])
        sched = DecomposeSchedule(k, shift, example_inputs=sample,
                                  group_of=lambda name, p: "shift" if name.endswith((".shift", ".sign")) else None)
        rec = run(f"shift-{args.shift_mode}", args, data, sched, start=start)
        records.append(rec)
        rows.append(summarize(rec, data, sample, k))

    meta = {"command": "python experiments/train_accel.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "load_before": load_before, "load_after": " ".join(f"{v:.1f}" for v in os.getloadavg()),
            "test_size": len(data["yte"])}
    table = markdown(rows, args, meta)
    print()
    print(table)
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "train_accel.md").write_text(table)
        (args.out / "train_accel.json").write_text(json.dumps(
            {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "meta": meta,
             "rows": rows, "curves": {r["name"]: r["curve"] for r in records},
             "epoch_seconds": {r["name"]: r["epoch_seconds"] for r in records}}, indent=1))
        plot(records, recomposed_points, args.out / "train_accel.png")
        print(f"\nwrote {args.out / 'train_accel.md'} and {args.out / 'train_accel.png'}")
    return rows


if __name__ == "__main__":
    main()
