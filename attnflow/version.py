"""attnflow's version, in a module of its own so that any module can record it without importing the package."""

__all__ = ["__version__"]

__version__ = "0.2.0"
