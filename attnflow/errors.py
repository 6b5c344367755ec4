"""The exception types that mean "the user's input is wrong", not "attnflow is broken".

The CLI turns them into a one-line message on stderr and exit code 1 (2 for an :class:`OptionError`);
anything else is a bug and keeps its traceback.
"""

__all__ = ["AttnflowError", "OptionError", "AttnflowNote", "first_line"]


class AttnflowError(Exception):
    """A data, model or file problem the user can fix; its message is one self-contained line."""


class OptionError(AttnflowError):
    """An option value that can never work, whatever the input: a usage error, named by its flag."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag


class AttnflowNote(UserWarning):
    """Something a user should know about a result that is still right: left-out rows, NaN metrics, a
    recomputed file. The CLI prints it as ``attnflow: note: ...``."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of a library's exception message (cut at ``limit``), for a one-line error."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
