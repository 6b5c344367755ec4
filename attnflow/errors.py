"""The exception types that mean "the user's input is wrong", not "attnflow is broken".

The CLI turns them into a one-line message on stderr and exit code 1 (2 for an :class:`OptionError`);
anything else is a bug and keeps its traceback.
"""

import re
import warnings
from typing import Callable

__all__ = ["AttnflowError", "OptionError", "AttnflowNote", "first_line"]


class AttnflowError(Exception):
    """A data, model or file problem the user can fix; its message is one self-contained line."""


class OptionError(AttnflowError):
    """An option value that can never work, whatever the input: a usage error, named by its parameter.

    ``parameter`` is the Python name (``batch_size``); ``message`` names other parameters as ``{name}``
    (``{overwrite}``, ``{decode}=cpu``). ``str()`` reads in Python's names; :meth:`render` in any other
    naming, as the CLI does with its flags (``--batch-size: must be at least 1``)."""

    def __init__(self, parameter: str, message: str):
        self.parameter, self.template = parameter, message
        super().__init__(self.render(lambda name: name))

    @property
    def flag(self) -> str:
        """Deprecated (0.1's attribute; removed in 0.3): the flag as the CLI spells it; use :attr:`parameter`."""
        warnings.warn("OptionError.flag is deprecated and goes in 0.3: use OptionError.parameter (the Python name)",
                      DeprecationWarning, stacklevel=2)
        return "--" + self.parameter.replace("_", "-")

    def render(self, name_of: Callable[[str], str], assigns: str = "=") -> str:
        """The message with every parameter named by ``name_of(parameter)``, and a value given to it
        (``{decode}=cpu``) joined by ``assigns`` (the CLI's ``--decode cpu``)."""
        def name(m: re.Match) -> str:
            return name_of(m.group(1)) + (assigns if m.group(2) else "")

        return f"{name_of(self.parameter)}: " + _PARAMETER.sub(name, self.template)


_PARAMETER = re.compile(r"\{([a-z][a-z0-9_]*)\}(=)?")


class AttnflowNote(UserWarning):
    """Something a user should know about a result that is still right: left-out rows, NaN metrics, a
    recomputed file. The CLI prints it as ``attnflow: note: ...``."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of a library's exception message (cut at ``limit``), for a one-line error."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
