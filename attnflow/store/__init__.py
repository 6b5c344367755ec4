"""attnflow's HDF5 files: their names and schema (:mod:`.names`)."""

__all__ = []
