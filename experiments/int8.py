"""Compressed models at int8 speed in stock onnxruntime (issue 21).

Part 1, Fashion-MNIST: the CNN (fxshift.models.small_cnn) and the small ResNet of experiments/shift_calibration.py,
trained in float with that experiment's recipe (12000 images, 3 epochs, AdamW one-cycle; cached with --cache, the
same file format), then without retraining: float, int8 only, 4-bit shift + int8, Tucker(0.5) + int8 and
Tucker(0.5) + 4-bit shift + int8, every int8 file written by ``fxshift.export_onnx(..., quantize="int8")``
(onnxruntime's quantize_static, QDQ, per-channel s8 weights, u8 activations; the shift layers' int8 weights are
their codes). One set of unlabelled training images the models did not train on (512 by default) calibrates both
the shift conversion and the activation ranges. Reported: test accuracy in onnxruntime, top-1 agreement with the
float model, the torch reference (fxshift.onnx.QDQReference) agreement with onnxruntime, file size, batch-1
latency in onnxruntime (each file in its own process, 2 threads).

Part 2, torchvision resnet18 (random init, 224×224, batch 1, 2 threads): the float export, onnxruntime's own
quantize_static of it, Tucker(0.5) + int8, 4-bit shift + int8 and Tucker(0.5) + 4-bit shift + int8.

    python experiments/int8.py --cache .data/int8_cache     # writes experiments/results/int8.{md,json}
    python experiments/int8.py --part resnet18               # part 2 only (int8_resnet18.json)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import fxshift
from fxshift import ShiftQuantizePass, TuckerDecomposePass
from fxshift.data import fashion_mnist
from fxshift.models import small_cnn
from fxshift.onnx import QDQReference, export_int8
from fxshift.onnx.int8 import ort_int8
from fxshift.measure.process import onnx_medians
from fxshift.train.loops import train_epochs

sys.path.insert(0, str(Path(__file__).parent))
from shift_calibration import SmallResNet  # noqa: E402  (the experiments' ResNet)

VARIANTS = ("float", "int8", "shift4+int8", "tucker+int8", "tucker+shift4+int8")


def _session(path: Path, threads: int = 2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _ort_predictions(path: Path, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    sess = _session(path)
    name = sess.get_inputs()[0].name
    return torch.cat([torch.from_numpy(sess.run(None, {name: x[i:i + batch].numpy()})[0]).argmax(1)
                      for i in range(0, len(x), batch)])


@torch.no_grad()
def _torch_predictions(model, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])


def _trained(name: str, train, cache: Path | None, epochs: int, n_train: int):
    torch.manual_seed(0)
    model = small_cnn() if name == "cnn" else SmallResNet()
    file = None if cache is None else cache / f"{name}_{n_train}_{epochs}.pt"
    if file is not None and file.exists():
        model.load_state_dict(torch.load(file)["state"])
        return model.eval(), "cached"
    t = time.time()
    train_epochs(model, DataLoader(train, batch_size=128, shuffle=True), epochs, 3e-3, name)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state": model.state_dict(), "seconds": time.time() - t}, file)
    return model.eval(), f"trained {time.time() - t:.0f} s"


def _compress(model, variant: str, example, cal, iterations: int):
    passes = []
    if variant.startswith("tucker"):
        passes.append(TuckerDecomposePass(rank=0.5))
    if "shift4" in variant:
        passes.append(ShiftQuantizePass(weight_bits=4, calibration=cal, iterations=iterations, progress=False))
    return fxshift.apply(passes, model, example) if passes else model


def fashion_part(args, folder: Path) -> list[dict]:
    train = fashion_mnist(True, limit=args.train)
    x_test, y_test = fashion_mnist(False, limit=args.test).tensors
    pool = fashion_mnist(True).tensors[0][args.train:args.train + args.calibration]
    cal = list(pool.split(64))
    rows = []
    for name in args.models:
        model, how = _trained(name, train, Path(args.cache) if args.cache else None, args.epochs, args.train)
        example = x_test[:1]
        files, preds = {}, {}
        for variant in VARIANTS:
            t = time.time()
            gm = _compress(model, variant, example, cal, args.iterations)
            path = folder / f"{name}_{variant}.onnx"
            info = {}
            if variant == "float":
                fxshift.export_onnx(gm, example, path)
            else:
                result = export_int8(gm, example, path, cal)
                info = {"exact": len(result.exact_layers), "layers": len(result.layers),
                        "float_layers": result.float_layers}
                ref = QDQReference(__import__("onnx").load(str(path)))
            seconds = time.time() - t
            files[variant] = path
            preds[variant] = _ort_predictions(path, x_test)
            row = {"model": name, "variant": variant, "float_training": how, "seconds": seconds,
                   "accuracy": 100.0 * float((preds[variant] == y_test).float().mean()),
                   "agreement": 100.0 * float((preds[variant] == preds["float"]).float().mean()),
                   "bytes": path.stat().st_size, **info}
            if variant != "float":
                ref_pred = _torch_predictions(ref, x_test)
                row["reference_accuracy"] = 100.0 * float((ref_pred == y_test).float().mean())
                row["reference_vs_ort"] = 100.0 * float((ref_pred == preds[variant]).float().mean())
            rows.append(row)
            print(json.dumps(row), flush=True)
        medians, load = onnx_medians({v: (p, None) for v, p in files.items()}, (1, 1, 28, 28), rounds=args.rounds,
                                     iters=20, min_time=0.3, threads=args.threads)
        for row in rows:
            if row["model"] == name:
                row["ms"] = 1e3 * medians[row["variant"]]
                row["speed_vs_float"] = medians["float"] / medians[row["variant"]]
                row["size_vs_float"] = row["bytes"] / files["float"].stat().st_size
                row["load"] = list(load)
    return rows


def resnet18_part(args, folder: Path) -> list[dict]:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    cal = list(torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(1)).split(8))
    files, exact = {}, {}
    files["float"] = fxshift.export_onnx(model, x, folder / "r18_float.onnx")
    files["ort int8"] = ort_int8(files["float"], folder / "r18_ort_int8.onnx", cal)
    for variant in ("tucker+int8", "shift4+int8", "tucker+shift4+int8"):
        passes = ([TuckerDecomposePass(rank=0.5)] if variant.startswith("tucker") else []) + \
                 ([ShiftQuantizePass(weight_bits=4)] if "shift4" in variant else [])
        gm = fxshift.apply(passes, model, x)
        result = export_int8(gm, x, folder / f"r18_{variant}.onnx", cal)
        files[variant], exact[variant] = result.path, f"{len(result.exact_layers)}/{len(result.layers)}"
        del gm
    medians, load = onnx_medians({k: (p, None) for k, p in files.items()}, (1, 3, 224, 224), rounds=args.rounds,
                                 iters=10, min_time=0.5, threads=args.threads)
    rows = []
    for k, p in files.items():
        rows.append({"model": "resnet18", "variant": k, "ms": 1e3 * medians[k],
                     "speed_vs_float": medians["float"] / medians[k],
                     "speed_vs_ort_int8": medians["ort int8"] / medians[k], "bytes": p.stat().st_size,
                     "size_vs_float": p.stat().st_size / files["float"].stat().st_size,
                     "exact": exact.get(k, "-"), "load": list(load)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        model = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        return model + (" (AVX-512 VNNI)" if "avx512_vnni" in text else " (AVX2)" if "avx2" in text else "")
    except (OSError, StopIteration):
        return "unknown CPU"


def write_markdown(out: Path) -> None:
    fm = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else None
    r18 = out.with_name(out.name + "_resnet18.json")
    r18 = json.loads(r18.read_text()) if r18.exists() else None
    lines = ["# Compressed models at int8 speed in stock onnxruntime (issue 21)", ""]
    if fm:
        m = fm["meta"]
        lines += [f"Fashion-MNIST, no retraining after the float training ({m['args']['train']} images, "
                  f"{m['args']['epochs']} epochs); {m['args']['calibration']} unlabelled training images the models "
                  f"did not train on calibrate the shift conversion and the activation ranges; test "
                  f"{m['args']['test']} images; accuracy and agreement in onnxruntime; latency at batch 1, "
                  f"{m['args']['threads']} threads, each file in its own process (median of {m['args']['rounds']} "
                  f"rounds); {m['cpu']}, shared machine (load average in the table). \"ref = ORT\": top-1 agreement "
                  "of the torch reference (QDQReference) with onnxruntime; \"exact\": shift layers whose int8 "
                  "weights are their codes / all Conv-Gemm layers.", "",
                  "| model | variant | accuracy % | Δ vs float | agreement % | ref = ORT % | exact | KB | size vs float "
                  "| ms | speed vs float | load |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        floats = {r["model"]: r["accuracy"] for r in fm["rows"] if r["variant"] == "float"}
        for r in fm["rows"]:
            lines.append(f"| {r['model']} | {r['variant']} | {r['accuracy']:.2f} | "
                         f"{r['accuracy'] - floats[r['model']]:+.2f} | {r['agreement']:.2f} | "
                         f"{r.get('reference_vs_ort', 100.0):.2f} | "
                         f"{str(r['exact']) + '/' + str(r['layers']) if 'exact' in r else '-'} | "
                         f"{r['bytes'] / 1e3:.0f} | {r['size_vs_float']:.3f} | {r['ms']:.3f} | "
                         f"{r['speed_vs_float']:.2f}x | {r['load'][0]:.2f} |")
        lines += ["", f"Reproduce: `{m['command']}`", ""]
    if r18:
        m = r18["meta"]
        lines += [f"torchvision resnet18 (random init), 224×224, batch 1, {m['threads']} threads, each file in its own "
                  f"process, median of {m['rounds']} alternating rounds; {m['cpu']}, shared machine. \"ort int8\" is "
                  "onnxruntime's own quantize_static of the float export; the others are written by "
                  "`export_onnx(..., quantize=\"int8\")`; \"exact\": shift layers exact in int8 / Conv-Gemm layers.",
                  "", "| file | ms | speed vs float | speed vs ort int8 | MB | size vs float | exact | load |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in r18["rows"]:
            lines.append(f"| {r['variant']} | {r['ms']:.2f} | {r['speed_vs_float']:.2f}x | "
                         f"{r['speed_vs_ort_int8']:.2f}x | {r['bytes'] / 1e6:.2f} | {r['size_vs_float']:.3f} | "
                         f"{r['exact']} | {r['load'][0]:.2f} |")
        lines += ["", f"Reproduce: `{m['command']}`"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["all", "fashion", "resnet18"], default="all")
    ap.add_argument("--train", type=int, default=12000)
    ap.add_argument("--test", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--calibration", type=int, default=512, help="unlabelled calibration images")
    ap.add_argument("--iterations", type=int, default=100, help="AdaRound steps per layer (shift calibration)")
    ap.add_argument("--models", nargs="+", default=["cnn", "resnet"])
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime threads for the latency")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cache", default=None, help="folder of trained float models (experiments/shift_calibration.py "
                                                   "format), reused when present")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "int8"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"args": vars(args), "cpu": _cpu(), "command": "python experiments/int8.py " + " ".join(sys.argv[1:]),
            "threads": args.threads, "rounds": args.rounds, "load_before": list(os.getloadavg())}
    with tempfile.TemporaryDirectory(prefix="fxshift-int8-exp-") as tmp:
        if args.part in ("all", "fashion"):
            rows = fashion_part(args, Path(tmp))
            meta["load_after"] = list(os.getloadavg())
            out.with_suffix(".json").write_text(json.dumps({"rows": rows, "meta": meta}, indent=1))
        if args.part in ("all", "resnet18"):
            rows = resnet18_part(args, Path(tmp))
            meta["load_after"] = list(os.getloadavg())
            out.with_name(out.name + "_resnet18.json").write_text(json.dumps({"rows": rows, "meta": meta}, indent=1))
    write_markdown(out)


if __name__ == "__main__":
    main()
