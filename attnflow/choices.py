"""String-valued choices as enums: each option with a fixed set of values declares it once, as a
:class:`StrEnum` in the module that owns the concept (:class:`attnflow.store.names.StoreMode`,
:class:`attnflow.metrics.Fusion`, :class:`attnflow.probe.Pool`, ...), and the CLI offers exactly its values.

Members compare equal to their strings, so values read back from files need no conversion; options keep
the plain string (``StoreMode("full").value``), which is what files record.
"""
from __future__ import annotations

import enum

__all__ = ["StrEnum", "choice_values"]

if hasattr(enum, "StrEnum"):
    StrEnum = enum.StrEnum
else:  # Python 3.10

    class StrEnum(str, enum.Enum):  # type: ignore[no-redef]
        """A str whose ``str()`` and format are its value, as Python 3.11's ``enum.StrEnum``."""

        __str__ = str.__str__
        __format__ = str.__format__


def choice_values(choices: type[StrEnum]) -> tuple[str, ...]:
    """The values of ``choices``, in declaration order, as plain strings."""
    return tuple(member.value for member in choices)
