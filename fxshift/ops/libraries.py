"""Where fxshift's native libraries (libfxshift, libfxshift_cuda, libfxshift_ort) are looked for.

In order:
  1. ``$FXSHIFT_NATIVE_DIR``,
  2. ``<fxshift package>/_native`` (wheels),
  3. ``<platlib>/fxshift/_native`` (scikit-build-core editable installs),
  4. ``<repo>/build/**/`` (a development build, newest first; sanitizer builds are skipped, they
     need LD_PRELOAD).
"""
from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

__all__ = ["library_filename", "candidates", "find_library"]


def library_filename(stem: str) -> str:
    """The platform's file name of library `stem` ("fxshift" → libfxshift.so)."""
    if sys.platform == "darwin":
        return f"lib{stem}.dylib"
    if sys.platform == "win32":
        return f"{stem}.dll"
    return f"lib{stem}.so"


def candidates(stem: str) -> list[Path]:
    """Every path library `stem` may be at, in the order they are tried."""
    name = library_filename(stem)
    pkg = Path(__file__).resolve().parent.parent
    out: list[Path] = []
    env = os.environ.get("FXSHIFT_NATIVE_DIR")
    if env:
        out.append(Path(env) / name)
    out.append(pkg / "_native" / name)
    try:
        out.append(Path(sysconfig.get_paths()["platlib"]) / "fxshift" / "_native" / name)
    except KeyError:  # pragma: no cover - exotic interpreters
        pass
    build = pkg.parent / "build"
    if build.is_dir():
        found = [p for p in build.glob(f"**/{name}")
                 if not any("sanitize" in part or "asan" in part for part in p.relative_to(build).parts)]
        out.extend(sorted(found, key=lambda p: p.stat().st_mtime, reverse=True))
    return out


def find_library(stem: str) -> tuple[Path | None, list[str]]:
    """(the first existing candidate of `stem` or None, the paths looked at before it)."""
    tried = []
    for path in candidates(stem):
        if path.is_file():
            return path, tried
        tried.append(str(path))
    return None, tried
