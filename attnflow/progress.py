"""Progress of long steps, one way for every command: the library reports ``(step, done, total)`` through a
callback; the CLI draws it on stderr as a bar with elapsed time and ETA, silent under ``--quiet`` and when
stderr is not a terminal (a log file gets the summary line, not bar redraws)."""
from __future__ import annotations

from typing import Callable, Optional

__all__ = ["OnProgress", "progress_bar", "StepProgress"]

# What long library calls take as ``on_progress``: the step's description, units done and units in all
# (None: not known yet). A new description starts a new step.
OnProgress = Callable[[str, int, Optional[int]], None]


def progress_bar(console, *, quiet: bool, rate: bool = False):
    """A rich progress display on ``console`` (stderr): the step's description, bar, done/total, elapsed time
    and ETA, plus a ``rate`` field when asked; transient (it lives while work runs, what remains is the one
    summary line or error line)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    if rate:
        columns.append(TextColumn("{task.fields[rate]}"))
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    return Progress(*columns, console=console, disable=quiet or not console.is_terminal, transient=True)


class StepProgress:
    """An :data:`OnProgress` callback drawing one bar per step on ``progress``: a step's bar starts when its
    description first appears (so its ETA is its own) and finished steps leave the display."""

    def __init__(self, progress):
        self.progress = progress
        self.task = None
        self.step: str | None = None

    def __call__(self, step: str, done: int, total: int | None) -> None:
        if step != self.step:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task(step, total=total)
            self.step = step
        self.progress.update(self.task, completed=done, total=total)
