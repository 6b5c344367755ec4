"""Deprecated: what this module held moved to the storage package :mod:`attnflow.store` (``names``,
``validate``, ``scales``, ``read``). ``attnflow.schema.NAME`` still gives each of its names, with a
DeprecationWarning, until 0.3."""
from .deprecated import SCHEMA_NAMES, moved

__all__ = sorted(SCHEMA_NAMES)


def __getattr__(name: str):
    return moved(__name__, name, SCHEMA_NAMES)
