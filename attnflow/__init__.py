"""attnflow: how information flows through the attention of Vision Transformers.

The package reads as the pipeline it implements:

- :mod:`attnflow.models` builds a timm ViT and loads weights (:func:`load_model`);
- :mod:`attnflow.capture` captures per-block attention and magnitudes (:class:`AttentionCapture`);
- :mod:`attnflow.images` finds, decodes and preprocesses images;
- :mod:`attnflow.cache` defines the HDF5 cache, its writer and reader (:func:`open_cache`);
- :mod:`attnflow.extract` runs images through the model into a cache (:func:`extract`);
- :mod:`attnflow.cli` is the ``attnflow`` command, a thin layer over the above.
"""

__version__ = "0.1.0"

from .cache import open_cache  # noqa: E402
from .capture import AttentionCapture  # noqa: E402
from .errors import AttnflowError  # noqa: E402
from .layout import TokenLayout  # noqa: E402
from .models import build_model, load_model  # noqa: E402

__all__ = [
    "AttentionCapture",
    "AttnflowError",
    "TokenLayout",
    "__version__",
    "build_model",
    "load_model",
    "open_cache",
]
