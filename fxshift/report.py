"""Per-layer records of what each pass did, printable as a table and convertible to dicts."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional


KEYS = ("layer", "pass", "action", "reason", "params_before", "params_after", "macs_before", "macs_after", "rank",
        "rel_error")


@dataclass
class ReportRow:
    """One layer looked at by one pass. `action` is e.g. "decomposed", "skipped", "recomposed"."""

    layer: str
    pass_name: str
    action: str
    reason: str = ""
    params_before: Optional[int] = None
    params_after: Optional[int] = None
    macs_before: Optional[int] = None
    macs_after: Optional[int] = None
    rank: Any = None
    rel_error: Optional[float] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["pass"] = row.pop("pass_name")
        extra = row.pop("extra")
        out = {k: row[k] for k in KEYS}
        out.update(extra)
        return out


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2e}" if value and abs(value) < 1e-2 else f"{value:.4f}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value / 1e6:.2f}M" if abs(value) >= 1_000_000 else f"{value / 1e3:.1f}k"
    if isinstance(value, (list, tuple)):
        return "×".join("-" if v is None else str(v) for v in value)
    return str(value)


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain-text table with a header line."""
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda items: "  ".join(s.ljust(w) for s, w in zip(items, widths)).rstrip()
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


class Report:
    """The records of every pass applied to a GraphModule so far, in order."""

    def __init__(self, rows: Optional[list[ReportRow]] = None, capture: Optional[str] = None):
        self.rows: list[ReportRow] = list(rows or [])
        self.capture = capture  # how the model was captured: "fx", "export", ...

    def add(self, row: ReportRow) -> None:
        self.rows.append(row)

    def to_dicts(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def totals(self, pass_name: Optional[str] = None) -> dict[str, int]:
        """Summed params/MACs before and after over the rows (of one pass if named) that have them."""
        out = {}
        for key in ("params_before", "params_after", "macs_before", "macs_after"):
            values = [getattr(r, key) for r in self.rows if pass_name in (None, r.pass_name)]
            out[key] = sum(v for v in values if v is not None)
        return out

    def __str__(self) -> str:
        foot = f"\n(captured with {self.capture})" if self.capture else ""
        if not self.rows:
            return "(no passes recorded)" + foot
        columns = list(KEYS)
        extra = sorted({k for r in self.rows for k in r.extra})
        return format_table(self.to_dicts(), columns + extra) + foot

    __repr__ = __str__
