"""Write records to stdout as a terminal table, markdown, csv, tsv or json.

Data goes to stdout and nothing else does; when stdout is not a terminal the table format is plain
aligned text without colour codes or box characters, so it pipes into ``column``, ``grep`` or pandas.
"""
from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol, Sequence, TextIO

__all__ = ["MACHINE_DIGITS", "json_value", "Format", "format_cell", "emit", "Result", "Table"]


MACHINE_DIGITS = 9  # enough to round-trip a float32


def json_value(value: Any) -> Any:
    """NaN is not JSON: ``jq`` and strict parsers reject it, so it becomes null."""
    return None if isinstance(value, float) and math.isnan(value) else value


class Format(str, Enum):
    table = "table"
    markdown = "markdown"
    csv = "csv"
    tsv = "tsv"
    json = "json"


def format_cell(value: Any, digits: int = 4) -> str:
    """Text for one cell: ``digits`` significant digits for people, more for files and pipes."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}g}"
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value) if all(isinstance(v, int) for v in value) else json.dumps(value)
    return str(value)


def emit(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    fmt: Format | str = Format.table,
    *,
    title: str | None = None,
    out: TextIO | None = None,
) -> None:
    """Write ``rows`` (dicts keyed by ``columns``) in ``fmt``."""
    out = out or sys.stdout
    fmt = Format(fmt)
    if fmt is Format.json:
        json.dump([{c: json_value(r.get(c)) for c in columns} for r in rows], out, indent=2, default=str)
        out.write("\n")
    elif fmt in (Format.csv, Format.tsv):
        writer = csv.writer(out, delimiter="," if fmt is Format.csv else "\t", lineterminator="\n")
        writer.writerow(columns)
        for r in rows:
            writer.writerow([format_cell(r.get(c, ""), MACHINE_DIGITS) for c in columns])
    elif fmt is Format.markdown:
        if title:
            out.write(f"**{title}**\n\n")
        out.write("| " + " | ".join(columns) + " |\n")
        out.write("|" + "|".join("---" for _ in columns) + "|\n")
        for r in rows:
            out.write("| " + " | ".join(format_cell(r.get(c, "")).replace("|", "\\|") for c in columns) + " |\n")
    elif out.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for c in columns:
            # fold, not ellipsis: on a narrow terminal a long name wraps onto more lines instead of being cut, so
            # magnitude_cls and magnitude_patch never both read "magnit…"
            table.add_column(c, overflow="fold")
        for r in rows:
            table.add_row(*(format_cell(r.get(c, "")) for c in columns), )
        Console(file=out).print(table)
    else:
        cells = [list(columns)] + [[format_cell(r.get(c, "")) for c in columns] for r in rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
        if title:
            out.write(f"# {title}\n")
        for row in cells:
            out.write("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() + "\n")


class Result(Protocol):
    """Anything a command prints: it writes itself in any :class:`Format`."""

    def write(self, fmt: Format | str, out: TextIO) -> None: ...


@dataclass
class Table:
    """Records under named columns, with a title: the metrics summary, probe results, ``info``, ``models``."""

    rows: Sequence[dict[str, Any]]
    columns: Sequence[str]
    title: str | None = None

    def write(self, fmt: Format | str, out: TextIO) -> None:
        emit(self.rows, self.columns, fmt, title=self.title, out=out)
