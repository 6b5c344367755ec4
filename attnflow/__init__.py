"""attnflow: how information flows through the attention of Vision Transformers.

The package reads as the pipeline it implements (README "Architecture" lists every module), and its public
API is the names below, importable from ``attnflow`` itself:

- models: :func:`build_model` (a timm ViT with its weights, name, family and adapter), :func:`load_model`;
- capture: :class:`AttentionCapture` (per-block maps and magnitudes), :class:`TokenLayout`;
- the pipeline: :func:`extract` (images -> cache, optionally metrics), :func:`compute_metrics`
  (cache -> metrics file), :func:`compare` (metrics or perturbation files -> tables and a group summary),
  :func:`probe` (caches with tokens -> k-NN, linear and attentive probes), :func:`perturb` (perturbation
  curves), :func:`build_report` (one offline HTML page);
- files: :func:`open_cache`, :func:`open_metrics`, :func:`open_perturbation` (validated when opened);
- :class:`AttnflowError`, what every user error raises, and :class:`AttnflowNote`, the warning category of
  what a result wants said.

The CLI (:mod:`attnflow.cli`) is a thin layer over these.
"""

import importlib
import sys
import types

from .version import __version__

# name -> (module, attribute): loaded on first use (PEP 562), so that `import attnflow` and
# `attnflow --version` do not wait seconds for torch and timm, which only the commands that compute need.
_EXPORTS = {
    "AttentionCapture": ("capture", "AttentionCapture"),
    "AttnflowError": ("errors", "AttnflowError"),
    "AttnflowNote": ("errors", "AttnflowNote"),
    "TokenLayout": ("layout", "TokenLayout"),
    "build_model": ("models", "build_model"),
    "build_report": ("report", "build_report"),
    "compare": ("compare", "compare_files"),
    "compute_metrics": ("measure", "compute_metrics"),
    "extract": ("extract", "extract"),
    "load_model": ("models", "load_model"),
    "open_cache": ("store.read", "open_cache"),
    "open_metrics": ("store.read", "open_metrics"),
    "open_perturbation": ("store.read", "open_perturbation"),
    "perturb": ("perturb", "perturb"),
    "probe": ("probe", "probe_caches"),
}

__all__ = sorted([*_EXPORTS, "__version__"])


def _load(name: str):
    module, attribute = _EXPORTS[name]
    return getattr(importlib.import_module(f".{module}", __name__), attribute)


class _Package(types.ModuleType):
    """``attnflow`` itself. Four exported functions share their name with the module that defines them
    (``attnflow.extract`` the function, in ``attnflow/extract.py``): importing such a module sets the
    package's attribute to the module, so each of these names is a property that always gives the function
    (``from attnflow.extract import extract`` still works: it reads the module from ``sys.modules``)."""


def _function(name: str) -> property:
    return property(lambda self: _load(name), lambda self, value: None, doc=f"attnflow.{name}, the function")


for _name in ("compare", "extract", "perturb", "probe"):
    setattr(_Package, _name, _function(_name))
sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _EXPORTS:
        value = _load(name)
        globals()[name] = value  # once: later lookups skip this function
        return value
    raise AttributeError(f"module 'attnflow' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
