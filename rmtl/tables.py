"""Plain-text tables for the terminal: label columns left-aligned, figures right-aligned."""

from __future__ import annotations

from typing import Sequence


def text_table(rows: Sequence[Sequence[str]], *, label_columns: int = 1, rule: str | None = None) -> str:
    """``rows[0]`` is the header. ``rule``: None, "line" (one dashed line under the header)
    or "columns" (a dashed segment under each column)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < label_columns else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    if rule == "line":
        lines.insert(1, "-" * len(lines[0]))
    elif rule == "columns":
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
