"""What export_onnx says when torch.onnx.export fails: the exporter's own cause (the innermost
exception, without terminal colour codes) and the option that helps."""
from __future__ import annotations

from ..capture.export import strip_ansi

_SHAPES = ("symbolic", "dynamic", "guard", "constraint", "specializ", "sym_", "Dim(", "batch", "shape")


def _lines(exc: BaseException, limit: int) -> list[str]:
    text = strip_ansi(str(exc))
    return [line.strip() for line in text.splitlines() if line.strip()][:limit]


def root_causes(exc: BaseException) -> list[BaseException]:
    """The exception and its causes / contexts, outermost first."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def export_failure(exc: BaseException, dynamic_batch: bool) -> str:
    """The ExportError message for an exception raised by torch.onnx.export."""
    chain = root_causes(exc)
    inner = chain[-1]
    cause = " | ".join(_lines(inner, 8)) or type(inner).__name__
    text = " ".join(" ".join(_lines(e, 40)) for e in chain)
    if dynamic_batch and any(k in text for k in _SHAPES):
        remedy = ("the failure involves the symbolic batch dimension: pass dynamic_batch=False to export a file "
                  "for the example's batch size")
    elif dynamic_batch:
        remedy = ("if the model cannot take a symbolic batch, pass dynamic_batch=False; a model captured with "
                  "capture='fx' may export after fxshift.apply(..., capture='export')")
    else:
        remedy = "a model captured with capture='fx' may export after fxshift.apply(..., capture='export')"
    return (f"torch.onnx.export failed: {type(inner).__name__}: {cause}. Remedy: {remedy}.")
