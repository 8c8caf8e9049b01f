"""Write docs/coverage.md: every model of tests/coverage_checks.py × every pass, from the same checks
tests/test_coverage.py runs.

    python scripts/coverage.py                 # the timm + transformers list
    python scripts/coverage.py --torchvision   # and every torchvision classification model
    python scripts/coverage.py --torchvision resnet18 mobilenet_v3_small   # and these
    python scripts/coverage.py --only BertModel resnet50
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import coverage_checks as cc  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--torchvision", nargs="*", default=None, metavar="NAME",
                        help="also torchvision classification models: these names (resnet18 ...), or every one")
    parser.add_argument("--only", nargs="*", help="model names to run")
    parser.add_argument("--out", default=str(ROOT / "docs" / "coverage.md"))
    args = parser.parse_args()
    specs = list(cc.SPECS)
    if args.torchvision is not None:
        specs += [s for s in cc.torchvision_specs()
                  if not args.torchvision or s.name.split(".", 1)[1] in args.torchvision]
    if args.only:
        specs = [s for s in specs if s.name in args.only]
    results = []
    for spec in specs:
        result = cc.run_model(spec)
        print(f"{spec.name}: {'ok' if result.ok() else 'FAILED'} in {result.seconds:.0f} s"
              + (f" ({result.error})" if result.error else ""), flush=True)
        results.append(result)
        command = " ".join(["python scripts/coverage.py"] + sys.argv[1:])
        Path(args.out).write_text(cc.markdown(results, command))
    return 0 if all(r.ok() for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
