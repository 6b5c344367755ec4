"""attnflow: how information flows through the attention of Vision Transformers.

The package reads as the pipeline it implements (README "Architecture" lists every module):

- :mod:`attnflow.models` builds a timm ViT and loads weights (:func:`build_model`), asking
  :mod:`attnflow.architectures` what its blocks are;
- :mod:`attnflow.capture` captures per-block attention and magnitudes (:class:`AttentionCapture`);
- :mod:`attnflow.images` finds, decodes and preprocesses images;
- :mod:`attnflow.extract` runs images through the model into a cache (:func:`attnflow.extract.extract`),
  written by :mod:`attnflow.cache` and read back, checked, through :mod:`attnflow.schema` (:func:`open_cache`);
- :mod:`attnflow.metrics` declares and computes the metrics, :mod:`attnflow.measure` writes metrics files,
  :mod:`attnflow.compare` compares models, :mod:`attnflow.plot` and :mod:`attnflow.render` show them;
- :mod:`attnflow.cli` is the ``attnflow`` command, a thin layer over the above.
"""

from .version import __version__

# Exported names, loaded on first use (PEP 562): `import attnflow` and `attnflow --version` do not wait
# seconds for torch and timm, which only the commands that compute need.
_EXPORTS = {
    "AttentionCapture": "capture",
    "AttnflowError": "errors",
    "TokenLayout": "layout",
    "build_model": "models",
    "load_model": "models",
    "open_cache": "cache",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # once: later lookups skip this function
        return value
    raise AttributeError(f"module 'attnflow' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
