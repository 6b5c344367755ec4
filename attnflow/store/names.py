"""Every name in an attnflow file: the schemas, the dataset and root attribute names, and the tables of what
each dataset and attribute holds (the format itself: :mod:`attnflow.store`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import h5py

from ..choices import StrEnum
from ..layout import TokenLayout

__all__ = [
    "SCHEMA", "METRICS_SCHEMA", "PERTURB_SCHEMA", "StoreMode", "DType", "Compression", "PARTIAL_SUFFIX", "TEXT",
    "IMAGE_IDS", "IMAGE_SHA256", "LABELS", "CLASS_NAMES", "SKIPPED", "SKIPPED_REASON", "FG", "ATTN", "ATTN_ROWS",
    "MAGNITUDE", "TOKEN_NORM", "TOKENS", "LAYER_TOKENS", "FINAL_NORM_WEIGHT", "FINAL_NORM_BIAS", "FINAL_NORM_EPS",
    "METRICS_GROUP", "ROLLOUT_MAP", "FLOW_MAP", "PERTURB_SIMILARITY", "PERTURB_CORRECT", "PERTURB_CLEAN_CORRECT",
    "PERTURB_RELEVANCE", "MAPS_DATASET", "STATIC_DATASETS", "SKIP_DATASETS", "metric_dataset", "partial_path",
    "from_text", "layout_attrs", "layout_from_attrs", "stored_token_layers", "tokens_dataset", "Expect",
    "FILE_DATASETS", "CACHE_DATASETS", "METRICS_DATASETS", "PERTURB_DATASETS", "METRIC_DATASETS", "Attr",
    "ROOT_ATTRS", "FILE_ATTRS", "CACHE_ATTRS", "METRICS_ATTRS", "PERTURB_ATTRS", "OPTIONAL_ATTRS",
    "PREPROCESSING_KEYS",
]

# -- names: every dataset, dimension and attribute name of an attnflow file -----------------------------

SCHEMA = "attnflow.cache/1"
METRICS_SCHEMA = "attnflow.metrics/1"
PERTURB_SCHEMA = "attnflow.perturb/1"


class StoreMode(StrEnum):
    """What a cache keeps of the attention maps (``--store``): every map, the cls/register query rows, none."""

    full = "full"
    rows = "rows"
    none = "none"


class DType(StrEnum):
    """The storage type of maps and tokens (``--dtype``, ``--tokens-dtype``)."""

    float16 = "float16"
    float32 = "float32"


class Compression(StrEnum):
    """The HDF5 compression of maps and tokens (``--compression``)."""

    gzip = "gzip"
    lzf = "lzf"
    none = "none"

PARTIAL_SUFFIX = ".partial"
# The HDF5 type of every text dataset: UTF-8 strings.
TEXT = h5py.string_dtype("utf-8")

# Datasets of both kinds of file.
IMAGE_IDS = "image_ids"
IMAGE_SHA256 = "image_sha256"  # (n,): each image file's content digest, in files written since it was added
LABELS = "labels"
CLASS_NAMES = "class_names"
SKIPPED = "skipped"
SKIPPED_REASON = "skipped_reason"
FG = "fg"
# Datasets of an attention cache.
ATTN = "attn"
ATTN_ROWS = "attn_rows"
MAGNITUDE = "magnitude"
TOKEN_NORM = "token_norm"
TOKENS = "tokens"  # (n, T, D): one block's tokens (the last block's unless the attribute token_layers says)
LAYER_TOKENS = "layer_tokens"  # (n, S, T, D): the tokens of the S blocks of the attribute token_layers
FINAL_NORM_WEIGHT = "final_norm_weight"
FINAL_NORM_BIAS = "final_norm_bias"
FINAL_NORM_EPS = "final_norm_eps"  # a root attribute
# Datasets of a metrics file.
METRICS_GROUP = "metrics"
ROLLOUT_MAP = "rollout/map"
FLOW_MAP = "flow/map"  # (n, F, P): attention flow read out after the blocks of the root attribute flow_layers
# Datasets of a perturbation file (``attnflow perturb``): R relevance maps, O orders, F fractions (the root
# attributes ``relevance``, ``orders`` and ``fractions`` name them, in the order of the axes).
PERTURB_SIMILARITY = "perturb/similarity"  # (n, R, O, F) cosine similarity to the clean representation
PERTURB_CORRECT = "perturb/correct"  # (n, R, O, F) int8: 1 where the probe's prediction is still right
PERTURB_CLEAN_CORRECT = "perturb/clean_correct"  # (n,) int8: 1 where the probe is right on the clean image
PERTURB_RELEVANCE = "perturb/relevance"  # (n, R, P) each relevance map over the patches, summing to 1

# The dataset of attention maps a store mode keeps.
MAPS_DATASET = {"full": ATTN, "rows": ATTN_ROWS}
# Per-file (not per-image) datasets: the class names and the final LayerNorm that turns stored tokens into
# the features users read (``--save-tokens``).
STATIC_DATASETS = (CLASS_NAMES, FINAL_NORM_WEIGHT, FINAL_NORM_BIAS)
SKIP_DATASETS = (SKIPPED, SKIPPED_REASON)


def metric_dataset(name: str) -> str:
    """The dataset of metric ``name`` in a metrics file."""
    return f"{METRICS_GROUP}/{name}"


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + PARTIAL_SUFFIX)


def from_text(values: Any) -> list[str]:
    """HDF5 UTF-8 strings (bytes or str, as h5py hands them out) as a list of str."""
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def layout_attrs(layout: TokenLayout, num_layers: int, num_heads: int) -> dict[str, Any]:
    return {
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_tokens": layout.num_tokens,
        "num_prefix_tokens": layout.num_prefix_tokens,
        "has_cls": layout.has_cls,
        "num_registers": layout.num_registers,
        "grid_size": list(layout.grid_size),
        "patch_size": list(layout.patch_size),
        "img_size": list(layout.img_size),
    }


def layout_from_attrs(attrs: dict[str, Any]) -> TokenLayout:
    return TokenLayout(
        has_cls=bool(attrs["has_cls"]),
        num_prefix_tokens=int(attrs["num_prefix_tokens"]),
        grid_size=tuple(attrs["grid_size"]),
        patch_size=tuple(attrs["patch_size"]),
    )


def stored_token_layers(attrs: dict[str, Any]) -> tuple[int, ...]:
    """The 0-based blocks, increasing, whose output tokens a cache with these attributes stores (when it stores
    tokens): its attribute ``token_layers``, or the last block (the default, and every cache before the
    attribute)."""
    return tuple(int(b) for b in attrs["token_layers"]) if "token_layers" in attrs else (int(attrs["num_layers"]) - 1,)


def tokens_dataset(num_blocks: int) -> str:
    """The dataset that holds the tokens of ``num_blocks`` stored blocks: ``tokens`` (n, T, D) for one (as every
    cache before ``--token-layers``), ``layer_tokens`` (n, S, T, D) for several."""
    return TOKENS if num_blocks == 1 else LAYER_TOKENS


# -- what a finished file holds -------------------------------------------------------------------------
# Readers check a file against these tables when they open it (attributes, dataset shapes and dtypes, the
# sources of virtual datasets), and check the values of the per-image datasets as they read them, so that
# no number is computed from input nobody checked.


class Expect(NamedTuple):
    """What one dataset must look like.

    ``shape`` is spelled in the symbols of :mod:`attnflow.store`'s docstring: n, L, H, T, p and P come from the
    root attributes, D, K and m from the first dataset (or ``n_skipped``) that fixes them, and ``...`` allows
    any further axes. ``kind`` is ``float``, ``int`` or ``text``. ``values`` is what every read is checked for:
    ``attention`` (rows of a post-softmax map), ``finite``, ``norm`` (finite and >= 0), ``fraction`` (in [0, 1], or NaN for an image
    without a mask), ``metric`` (finite, NaN only where the metric's declaration allows it).
    ``dims`` names every axis (the file's HDF5 dimension scales, see
    :func:`attnflow.store.scales.attach_dimension_scales`); messages name the first ``located`` of them (all
    by default): a bad value of a map is located by its row.
    """

    shape: tuple[str, ...]
    kind: str
    values: str = ""
    dims: tuple[str, ...] = ()
    located: int | None = None

    @property
    def axes(self) -> tuple[str, ...]:
        """The leading axes a message names when it locates a value."""
        return self.dims[:self.located]


FILE_DATASETS = {
    IMAGE_IDS: Expect(("n",), "text", dims=("image",)),
    IMAGE_SHA256: Expect(("n",), "text", dims=("image",)),
    LABELS: Expect(("n",), "int", dims=("image",)),
    CLASS_NAMES: Expect(("K",), "text", dims=("class",)),
    SKIPPED: Expect(("m",), "text", dims=("skipped_input",)),
    SKIPPED_REASON: Expect(("m",), "text", dims=("skipped_input",)),
    FG: Expect(("n", "P"), "float", "fraction", ("image", "patch")),
}
CACHE_DATASETS = {
    **FILE_DATASETS,
    MAGNITUDE: Expect(("n", "L", "T"), "float", "finite", ("image", "layer", "token")),
    TOKEN_NORM: Expect(("n", "L", "T"), "float", "norm", ("image", "layer", "token")),
    ATTN: Expect(("n", "L", "H", "T", "T"), "float", "attention", ("image", "layer", "head", "query", "key"), located=4),
    ATTN_ROWS: Expect(("n", "L", "H", "p", "T"), "float", "attention", ("image", "layer", "head", "row", "key"), located=4),
    TOKENS: Expect(("n", "T", "D"), "float", "finite", ("image", "token", "channel")),
    LAYER_TOKENS: Expect(("n", "S", "T", "D"), "float", "finite", ("image", "token_layer", "token", "channel")),
    FINAL_NORM_WEIGHT: Expect(("D",), "float", "finite", ("channel",)),
    FINAL_NORM_BIAS: Expect(("D",), "float", "finite", ("channel",)),
}
METRICS_DATASETS = {
    **FILE_DATASETS,
    ROLLOUT_MAP: Expect(("n", "L", "P"), "float", "", ("image", "layer", "patch")),
    FLOW_MAP: Expect(("n", "F", "P"), "float", "norm", ("image", "flow_layer", "patch")),
}
PERTURB_DATASETS = {
    **FILE_DATASETS,
    PERTURB_SIMILARITY: Expect(("n", "R", "O", "F"), "float", "finite", ("image", "relevance", "order", "fraction")),
    PERTURB_CORRECT: Expect(("n", "R", "O", "F"), "int", "", ("image", "relevance", "order", "fraction")),
    PERTURB_CLEAN_CORRECT: Expect(("n",), "int", "", ("image",)),
    PERTURB_RELEVANCE: Expect(("n", "R", "P"), "float", "norm", ("image", "relevance", "patch")),
}
# ``metrics/<name>`` by the level of the metric (:data:`attnflow.metrics.HEAD_METRICS`, ``LAYER_METRICS``,
# ``IMAGE_METRICS``); a name this attnflow does not know only needs a row per image.
METRIC_DATASETS = {
    "head": Expect(("n", "L", "H"), "float", "metric", ("image", "layer", "head")),
    "layer": Expect(("n", "L"), "float", "metric", ("image", "layer")),
    "image": Expect(("n",), "float", "metric", ("image",)),
    None: Expect(("n", "..."), "float", "metric", ("image", "layer", "head")),
}


class Attr(NamedTuple):
    """One root attribute: what its value must be (a kind :mod:`attnflow.store.validate` checks; "" is not
    checked), the kinds of file that must carry it (``cache``, ``metrics``; elsewhere it is checked where
    present), what it means, and whether it is part of a run's identity (an interrupted run and the run that
    resumes it must agree on it)."""

    kind: str
    required: tuple[str, ...]
    meaning: str
    identity: bool = False


_BOTH, _CACHE, _METRICS, _PERTURB = ("cache", "metrics"), ("cache",), ("metrics",), ("perturb",)
# Every root attribute of an attnflow file. A metrics file inherits its cache's, but for the run's own
# bookkeeping (``schema``, ``created``, ``complete``, the counts) and ``compression``.
ROOT_ATTRS: dict[str, Attr] = {
    "schema": Attr("", (), f"the kind of file: {SCHEMA} or {METRICS_SCHEMA}"),
    "attnflow_version": Attr("", (), "the attnflow that wrote it"),
    "created": Attr("", (), "when the run started, ISO 8601 in UTC"),
    "complete": Attr("", (), "true once every input is done"),
    # the model
    "model": Attr("", (), "the timm model name", identity=True),
    "label": Attr("text", _BOTH, "the model's name in tables and figures"),
    "family": Attr("text", _BOTH, "the model's family (see attnflow compare)"),
    "weights": Attr("", (), "pretrained, checkpoint or random", identity=True),
    "checkpoint": Attr("", (), "the checkpoint's absolute path, or empty"),
    "checkpoint_sha256": Attr("", (), "the checkpoint's SHA-256, or empty", identity=True),
    "checkpoint_key": Attr("", (), "the container inside the checkpoint the weights came from (teacher, model, ...); "
                           "absent: the checkpoint's top level, or no checkpoint", identity=True),
    "masks_sha256": Attr("", (), "SHA-256 over the mask files matched to the images (stems and contents), with --masks",
                         identity=True),
    # the token layout
    "num_layers": Attr("positive", _BOTH, "L, the blocks"),
    "num_heads": Attr("positive", _BOTH, "H, the heads per block"),
    "num_tokens": Attr("positive", _BOTH, "T, the tokens: prefix then patches", identity=True),
    "num_prefix_tokens": Attr("count", _BOTH, "p, cls plus registers"),
    "has_cls": Attr("bool", _BOTH, "whether token 0 is a cls token"),
    "num_registers": Attr("count", _BOTH, "the register tokens after cls"),
    "grid_size": Attr("size", _BOTH, "the patch grid [h, w]; P = h * w"),
    "patch_size": Attr("size", _BOTH, "a patch in input pixels [h, w]"),
    "img_size": Attr("size", _BOTH, "the input in pixels [h, w]", identity=True),
    # how the run saw its inputs
    "preprocessing": Attr("text", _CACHE, "JSON of timm's resolved eval data config", identity=True),
    "amp": Attr("", (), "whether the forward pass ran in bfloat16 autocast", identity=True),
    "working_dir": Attr("", (), "the folder relative image ids are relative to"),
    "store": Attr("store", _CACHE, "which maps the cache keeps: full, rows or none", identity=True),
    "dtype": Attr("dtype", _CACHE, "the dtype of the stored maps", identity=True),
    "compression": Attr("", (), "the cache's compression: gzip, lzf or none", identity=True),
    "has_labels": Attr("bool", (), "whether labels and class_names are stored", identity=True),
    "has_tokens": Attr("bool", (), "whether tokens are stored", identity=True),
    "token_layers": Attr("layers", (), "the 0-based blocks whose output tokens are stored (--token-layers); "
                         "absent: the last block (the default, and every file before it)", identity=True),
    "tokens_dtype": Attr("dtype", (), "the dtype of the stored tokens: float16 (--tokens-dtype); absent: float32", identity=True),
    "has_masks": Attr("bool", (), "whether fg (object masks) is stored", identity=True),
    "magnitude_update": Attr("magnitude_update", (), "where magnitude's numerator is taken: before-layer-scale; "
                             "absent: after-layer-scale (the default, and every file of attnflow 0.1)", identity=True),
    FINAL_NORM_EPS: Attr("number", (), "the eps of the final LayerNorm stored with tokens"),
    # bookkeeping
    "n_images": Attr("count", _BOTH, "n, the images stored"),
    # the digest before the count: a resume with another input list is refused naming the list
    "inputs_sha256": Attr("", (), "SHA-256 of the input paths, to resume the same list", identity=True),
    "n_inputs": Attr("", (), "the inputs given", identity=True),
    "n_inputs_done": Attr("", (), "the inputs done (stored or skipped)"),
    "n_skipped": Attr("count", (), "m, the inputs that could not be decoded"),
    "shards": Attr("", (), "a distributed run's shard files, relative to the file's folder"),
    # a metrics file's own
    "fusion": Attr("text", _METRICS, "how rollout fused heads: mean, max or min", identity=True),
    "discard_ratio": Attr("number", _METRICS, "the share of lowest rollout weights dropped", identity=True),
    "artifact_factor": Attr("number", (), "artifact rule: a patch whose norm exceeds this times the median patch norm", identity=True),
    "artifact_norm": Attr("number", (), "artifact rule (instead of artifact_factor): a patch whose norm exceeds this", identity=True),
    "source": Attr("", (), "the cache the metrics were computed from"),
    "flow_layers": Attr("layers", (), "the 0-based blocks after which flow/map reads attention flow out (--flow)", identity=True),
    # a perturbation file's own (attnflow perturb)
    "relevance": Attr("texts", _PERTURB, "the R relevance maps patches are removed by (axis 'relevance')", identity=True),
    "orders": Attr("texts", _PERTURB, "the O orders: positive (most relevant first), negative (least first)", identity=True),
    "fractions": Attr("fractions", _PERTURB, "the F fractions of the patches removed (axis 'fraction')", identity=True),
    "mode": Attr("text", _PERTURB, "drop (tokens taken out of the sequence) or pixels (set to the mean)", identity=True),
    "readout": Attr("text", _PERTURB, "the representation compared: cls or mean (of the patch tokens)", identity=True),
    "relevance_layer": Attr("count", _PERTURB, "the 0-based block the attention maps are read at (rollout, flow: up to it)", identity=True),
    "seed": Attr("count", _PERTURB, "the seed of the random relevance", identity=True),
    "relevance_heads": Attr("", (), "JSON: relevance name -> the probe head file it comes from"),
    "probe_head": Attr("", (), "the probe head whose predictions are scored (--probe), or empty", identity=True),
    "probe_head_sha256": Attr("", (), "that head file's SHA-256, or empty", identity=True),
}


def _attr_kinds(kind: str) -> dict[str, str]:
    """Attribute -> value kind of those a ``kind`` (cache or metrics) file must carry."""
    return {name: a.kind for name, a in ROOT_ATTRS.items() if kind in a.required}


FILE_ATTRS = {name: a.kind for name, a in ROOT_ATTRS.items() if a.required == _BOTH}
CACHE_ATTRS = _attr_kinds("cache")
METRICS_ATTRS = _attr_kinds("metrics")
PERTURB_ATTRS = {**FILE_ATTRS, **_attr_kinds("perturb")}
# Checked where present.
OPTIONAL_ATTRS = {name: a.kind for name, a in ROOT_ATTRS.items() if a.kind and not a.required}
PREPROCESSING_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
