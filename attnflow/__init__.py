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

from .cache import open_cache
from .capture import AttentionCapture
from .errors import AttnflowError
from .layout import TokenLayout
from .models import build_model, load_model
from .version import __version__

__all__ = [
    "AttentionCapture",
    "AttnflowError",
    "TokenLayout",
    "__version__",
    "build_model",
    "load_model",
    "open_cache",
]
