"""Notes: what a user should know about a result that is still right (left-out rows, NaN metrics, a design
that cannot reach a verdict). One mechanism for all of them:

- code says :func:`note` wherever it learns something worth saying;
- a function that returns a result gathers the notes said while it was made with :func:`collect` and puts
  them into the result (``Comparison.notes``, ``Report.notes``, ...), so a notebook reads them there;
- a note said with no collector listening (a long extraction, loading a model) is an
  :class:`~attnflow.errors.AttnflowNote` warning, shown as it happens; the CLI prints it as
  ``attnflow: note: ...``.

Collectors nest: a note goes to the innermost one open in this context, and the function that opened it
decides what its caller hears (a report passes its comparison's notes on with :func:`note`).
"""
from __future__ import annotations

import contextlib
import contextvars
import warnings
from typing import Iterator

from .errors import AttnflowNote

__all__ = ["note", "collect"]

_COLLECTORS: contextvars.ContextVar[tuple[list[str], ...]] = contextvars.ContextVar("attnflow_notes", default=())


def note(text: str) -> None:
    """Say ``text`` to the innermost open collector, or, with none open, warn with it as an :class:`AttnflowNote`."""
    collectors = _COLLECTORS.get()
    if not collectors:
        warnings.warn(AttnflowNote(text), stacklevel=3)
    elif text not in collectors[-1]:
        collectors[-1].append(text)


@contextlib.contextmanager
def collect() -> Iterator[list[str]]:
    """The notes said inside the block, in order, each once (and not shown as warnings)."""
    notes: list[str] = []
    token = _COLLECTORS.set((*_COLLECTORS.get(), notes))
    try:
        yield notes
    finally:
        _COLLECTORS.reset(token)
