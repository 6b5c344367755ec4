"""A table on a narrow terminal wraps long column names and cells instead of cutting them."""
from __future__ import annotations

import io
import re

from attnflow.render import Format, emit


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def columns_of(text: str) -> list[str]:
    """The column names of a rich table as drawn: each header line split at the column rules, the pieces of
    every column joined over the header's lines."""
    lines = text.splitlines()
    header = lines[lines.index(next(l for l in lines if l.startswith("┏"))) + 1:lines.index(next(l for l in lines if l.startswith("┡")))]
    pieces = [line.split("┃")[1:-1] for line in header]
    return ["".join(p[i].strip() for p in pieces) for i in range(len(pieces[0]))]


def test_narrow_terminal_keeps_every_name_whole(monkeypatch):
    monkeypatch.setenv("COLUMNS", "70")
    columns = ["layer", "cls_entropy_norm", "cls_top10_mass", "magnitude_cls", "magnitude_patch", "rollout_entropy_norm",
               "attn_distance"]
    out = Terminal()
    emit([{"layer": 0, **{c: 0.123456 for c in columns[1:]}}], columns, Format.table, title="t", out=out)
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.getvalue())  # colour codes: not characters on screen
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 70
    assert columns_of(text) == columns
