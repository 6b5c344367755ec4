"""Old import paths of names that moved: each still gives its name, with a DeprecationWarning naming the new
path, until 0.3 removes it."""
from __future__ import annotations

import importlib
import warnings
from typing import Any

__all__ = ["SCHEMA_NAMES", "CACHE_NAMES", "moved"]

# The public names of attnflow.schema (0.1 and 0.2) and the module of the storage package that holds each now.
SCHEMA_NAMES = {
    **dict.fromkeys((
        "SCHEMA", "METRICS_SCHEMA", "PERTURB_SCHEMA", "StoreMode", "DType", "Compression", "PARTIAL_SUFFIX",
        "IMAGE_IDS", "IMAGE_SHA256", "LABELS", "CLASS_NAMES", "SKIPPED", "SKIPPED_REASON", "FG", "ATTN", "ATTN_ROWS",
        "MAGNITUDE", "TOKEN_NORM", "TOKENS", "LAYER_TOKENS", "FINAL_NORM_WEIGHT", "FINAL_NORM_BIAS", "FINAL_NORM_EPS",
        "METRICS_GROUP", "ROLLOUT_MAP", "FLOW_MAP", "PERTURB_SIMILARITY", "PERTURB_CORRECT", "PERTURB_CLEAN_CORRECT",
        "PERTURB_RELEVANCE", "MAPS_DATASET", "STATIC_DATASETS", "SKIP_DATASETS", "metric_dataset", "partial_path",
        "from_text", "layout_attrs", "layout_from_attrs", "stored_token_layers", "tokens_dataset", "Expect",
        "CACHE_DATASETS", "METRICS_DATASETS", "PERTURB_DATASETS", "METRIC_DATASETS", "Attr", "ROOT_ATTRS",
        "FILE_ATTRS", "CACHE_ATTRS", "METRICS_ATTRS", "PERTURB_ATTRS", "OPTIONAL_ATTRS", "PREPROCESSING_KEYS",
    ), "attnflow.store.names"),
    **dict.fromkeys(("open_hdf5", "hdf5_reason", "file_attrs", "validate", "written_by"), "attnflow.store.validate"),
    "attach_dimension_scales": "attnflow.store.scales",
    **dict.fromkeys(("Rows", "CheckedDataset", "Cache", "MetricsFile", "PerturbFile", "open_cache", "open_metrics",
                     "open_perturbation", "describe"), "attnflow.store.read"),
}

# The public names of attnflow.cache (0.2), and those of attnflow.schema that it gave since 0.1.
CACHE_NAMES = {
    **dict.fromkeys(("RESUME_KEYS", "to_text", "inputs_digest", "masks_digest", "RowDataset", "CacheSpec", "MetricsSpec",
                     "GZIP_LEVEL", "RunLock", "RowFileWriter"), "attnflow.store.write"),
    **dict.fromkeys(("Segment", "in_memory_hdf5", "ASSEMBLY", "ASSEMBLY_STATE", "STEP_BYTES"), "attnflow.store.assembly"),
    **SCHEMA_NAMES,
}


def moved(old: str, name: str, homes: dict[str, str]) -> Any:
    """``name`` of the old module ``old``, from the module ``homes[name]`` that holds it now, with a
    DeprecationWarning that names the new path (and ``attnflow.NAME`` where the package exports it); an
    AttributeError for a name ``old`` never had. For a module's ``__getattr__``."""
    if name not in homes:
        raise AttributeError(f"module '{old}' has no attribute '{name}'")
    home = homes[name]
    also = f" (or attnflow.{name})" if name in importlib.import_module("attnflow").__all__ else ""
    warnings.warn(f"{old}.{name} moved to {home}.{name}{also}; the old path is removed in 0.3",
                  DeprecationWarning, stacklevel=3)
    return getattr(importlib.import_module(home), name)
