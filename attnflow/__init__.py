"""attnflow: how information flows through the attention of Vision Transformers.

The package reads as the pipeline it implements:

- :mod:`attnflow.models` builds a timm ViT and loads weights (:func:`load_model`);
- :mod:`attnflow.capture` captures per-block attention and magnitudes (:class:`AttentionCapture`);
- :mod:`attnflow.images` finds, decodes and preprocesses images;
- :mod:`attnflow.cache` defines the HDF5 cache, its writer and reader (:func:`open_cache`);
- :mod:`attnflow.extract` runs images through the model into a cache (:func:`extract`);
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
