"""Deprecated: what this module held moved to the storage package :mod:`attnflow.store` (the writer to
``write`` and ``assembly``). ``attnflow.cache.NAME`` still gives each of its names, and those of
``attnflow.schema`` it gave since attnflow 0.1, with a DeprecationWarning, until 0.3."""
from .deprecated import CACHE_NAMES, moved

__all__ = sorted(CACHE_NAMES)


def __getattr__(name: str):
    return moved(__name__, name, CACHE_NAMES)
