"""attnflow's HDF5 files: the attention cache and the metrics file, their schema, writer and reader.

Every name in an attnflow file is defined here and nowhere else. ``n`` images, ``L`` blocks, ``H`` heads,
``T`` tokens (``p`` prefix = cls + registers, ``P`` patches), ``D`` channels.

Both kinds share the root attributes ``schema``, ``attnflow_version``, ``created`` (ISO 8601, UTC), the
model (``model``, ``label``, ``family``, ``weights``, ``checkpoint``, ``checkpoint_sha256``), the token
layout (``num_layers``, ``num_heads``, ``num_tokens``, ``num_prefix_tokens``, ``has_cls``,
``num_registers``, ``grid_size`` [h, w], ``patch_size`` [h, w], ``img_size`` [h, w]), ``preprocessing``
(JSON of timm's resolved eval data config), ``amp``, and the bookkeeping ``n_images``, ``n_inputs``,
``n_inputs_done``, ``n_skipped``, ``inputs_sha256``, ``complete``; and the datasets ``image_ids`` (n,)
UTF-8 paths as given, ``labels`` (n,) int64 into ``class_names`` (K,) when extracted with labels,
``skipped`` (m,) and ``skipped_reason`` (m,) UTF-8.

Attention cache (``schema = attnflow.cache/1``), also with attrs ``store``, ``dtype``, ``compression``:
    ``magnitude`` (n, L, T) float32; ``attn`` (n, L, H, T, T) for ``store=full``; ``attn_rows``
    (n, L, H, p, T) for ``store=rows``; ``tokens`` (n, T, D) float32 with ``--save-tokens``; ``fg`` (n, P)
    float32 with ``--masks``.
Metrics file (``schema = attnflow.metrics/1``), also with attrs ``fusion``, ``discard_ratio``, ``source``:
    ``metrics/<name>`` (n, L, H), (n, L) or (n,) float32 as listed in :mod:`attnflow.metrics`;
    ``rollout/map`` (n, L, P) float32 when full maps were available; ``fg`` (n, P) with masks.

A file is written to ``<path>.partial`` and renamed to ``<path>`` only once complete, so a finished path
always holds a finished file. Rows are appended a batch at a time; ``n_images`` and ``n_inputs_done``
advance only after that batch's data has been flushed, which is what ``--resume`` continues from.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import h5py
import numpy as np

from .errors import AttnflowError
from .layout import TokenLayout

SCHEMA = "attnflow.cache/1"
METRICS_SCHEMA = "attnflow.metrics/1"
STORE_MODES = ("full", "rows", "none")
DTYPES = ("float16", "float32")
COMPRESSIONS = ("gzip", "lzf", "none")
PARTIAL_SUFFIX = ".partial"
METRICS_GROUP = "metrics"
ROLLOUT_MAP = "rollout/map"

# Attributes that must agree between an interrupted run and the run that resumes it.
RESUME_KEYS = (
    "model", "checkpoint_sha256", "weights", "store", "dtype", "img_size", "num_tokens", "preprocessing",
    "inputs_sha256", "n_inputs", "has_labels", "has_tokens", "has_masks", "fusion", "discard_ratio",
)
# Per-run bookkeeping a metrics file does not inherit from its cache.
_OWN_ATTRS = ("schema", "created", "complete", "n_images", "n_inputs_done", "n_skipped", "compression")

_TEXT = h5py.string_dtype("utf-8")


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + PARTIAL_SUFFIX)


def to_text(s: str) -> str:
    """Paths may carry undecodable bytes (surrogate escapes); HDF5 text must be valid UTF-8."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def inputs_digest(paths: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for p in paths:
        digest.update(to_text(p).encode("utf-8") + b"\0")
    return digest.hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


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


class RowDataset(NamedTuple):
    """A per-image dataset: the shape of one image's row, its dtype, its chunk shape and compression."""

    row_shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    compressed: bool = True


@dataclass
class CacheSpec:
    """Everything that fixes an attention cache's shapes and identity before the first batch is written."""

    layout: TokenLayout
    num_layers: int
    num_heads: int
    store: str = "full"
    dtype: str = "float16"
    compression: str = "gzip"
    token_dim: int | None = None  # set to store ``tokens``
    class_names: list[str] | None = None  # set to store ``labels``
    has_masks: bool = False  # set to store ``fg``
    attrs: dict[str, Any] = field(default_factory=dict)  # model identity, preprocessing, inputs

    def __post_init__(self) -> None:
        for value, allowed, what in ((self.store, STORE_MODES, "store mode"), (self.dtype, DTYPES, "dtype"), (self.compression, COMPRESSIONS, "compression")):
            if value not in allowed:
                raise AttnflowError(f"unknown {what} '{value}' (choose from {', '.join(allowed)})")
        if self.store == "rows" and self.layout.num_prefix_tokens == 0:
            raise AttnflowError("--store rows keeps the cls and register rows, and this model has neither; use full or none")

    def root_attrs(self) -> dict[str, Any]:
        from . import __version__

        return {
            "schema": SCHEMA,
            "attnflow_version": __version__,
            "created": _now(),
            **self.attrs,
            **layout_attrs(self.layout, self.num_layers, self.num_heads),
            "store": self.store,
            "dtype": self.dtype,
            "compression": self.compression,
            "has_labels": self.class_names is not None,
            "has_tokens": self.token_dim is not None,
            "has_masks": self.has_masks,
        }

    def row_datasets(self) -> dict[str, RowDataset]:
        L, H, T, p = self.num_layers, self.num_heads, self.layout.num_tokens, self.layout.num_prefix_tokens
        rows = {"magnitude": RowDataset((L, T), "float32", (64, L, T))}
        if self.store == "full":
            # One chunk per image and layer: reading an image or a layer never decompresses other images.
            rows["attn"] = RowDataset((L, H, T, T), self.dtype, (1, 1, H, T, T))
        elif self.store == "rows":
            rows["attn_rows"] = RowDataset((L, H, p, T), self.dtype, (1, L, H, p, T))
        if self.token_dim is not None:
            rows["tokens"] = RowDataset((T, self.token_dim), "float32", (1, T, self.token_dim))
        if self.has_masks:
            rows["fg"] = RowDataset((self.layout.num_patches,), "float32", (256, self.layout.num_patches))
        return rows

    def writer(self, path: str | Path, *, resume: bool = False, overwrite: bool = False) -> "RowFileWriter":
        return RowFileWriter(
            path, self.root_attrs(), self.row_datasets(), class_names=self.class_names,
            compression=self.compression, resume=resume, overwrite=overwrite,
        )


@dataclass
class MetricsSpec:
    """A metrics file's shapes and identity: the source's attributes plus the metric parameters."""

    source_attrs: dict[str, Any]  # root attrs of the cache (or of the cache being written alongside)
    metric_levels: dict[str, str]  # name -> "head" | "layer" | "image"
    has_rollout: bool
    fusion: str
    discard_ratio: float
    source: str  # the cache the metrics were computed from
    class_names: list[str] | None = None

    def root_attrs(self) -> dict[str, Any]:
        from . import __version__

        inherited = {k: v for k, v in self.source_attrs.items() if k not in _OWN_ATTRS}
        return {
            **inherited,
            "schema": METRICS_SCHEMA,
            "attnflow_version": __version__,
            "created": _now(),
            "fusion": self.fusion,
            "discard_ratio": float(self.discard_ratio),
            "source": self.source,
        }

    def row_datasets(self) -> dict[str, RowDataset]:
        L, H = int(self.source_attrs["num_layers"]), int(self.source_attrs["num_heads"])
        P = int(self.source_attrs["num_tokens"]) - int(self.source_attrs["num_prefix_tokens"])
        shapes = {"head": (L, H), "layer": (L,), "image": ()}
        rows = {
            f"{METRICS_GROUP}/{name}": RowDataset(shapes[level], "float32", (1024, *shapes[level]), False)
            for name, level in self.metric_levels.items()
        }
        if self.has_rollout:
            rows[ROLLOUT_MAP] = RowDataset((L, P), "float32", (64, L, P))
        if self.source_attrs.get("has_masks"):
            rows["fg"] = RowDataset((P,), "float32", (256, P))
        return rows

    def writer(self, path: str | Path, *, resume: bool = False, overwrite: bool = False) -> "RowFileWriter":
        return RowFileWriter(
            path, self.root_attrs(), self.row_datasets(), class_names=self.class_names,
            compression="gzip", resume=resume, overwrite=overwrite,
        )


GZIP_LEVEL = 1


def _compression_kwargs(name: str) -> dict[str, Any]:
    if name == "gzip":
        return {"compression": "gzip", "compression_opts": GZIP_LEVEL, "shuffle": True}
    if name == "lzf":
        return {"compression": "lzf", "shuffle": True}
    return {}


def _shuffle_and_deflate(block: np.ndarray) -> bytes:
    """What HDF5's shuffle then deflate filters make of one chunk (zlib releases the GIL while it works)."""
    raw = np.ascontiguousarray(block).view(np.uint8).reshape(-1, block.dtype.itemsize)
    return zlib.compress(raw.T.tobytes(), GZIP_LEVEL)


class _ParallelGzip:
    """Writes whole gzip+shuffle chunks compressed in a thread pool, through HDF5's direct chunk write.

    HDF5 compresses chunks one at a time in the writing thread; for attention maps that is the bottleneck
    of the whole extraction. The file is the same as h5py would write: any HDF5 reader decompresses it.
    """

    def __init__(self, threads: int | None = None):
        self._pool = ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1, thread_name_prefix="attnflow-gzip")

    def write(self, dataset: h5py.Dataset, start: int, data: np.ndarray) -> None:
        chunk = dataset.chunks
        if chunk[0] != 1 or any(c not in (1, d) for c, d in zip(chunk[1:], data.shape[1:])):
            raise ValueError(f"{dataset.name}: direct chunk writes need chunks of one row, got {chunk}")
        data = data.astype(dataset.dtype, copy=False)
        grid = [range(0, d, c) for c, d in zip(chunk, data.shape)]
        offsets = list(itertools.product(*grid))
        blocks = (data[tuple(slice(o, o + c) for o, c in zip(off, chunk))] for off in offsets)
        for off, payload in zip(offsets, self._pool.map(_shuffle_and_deflate, blocks)):
            dataset.id.write_direct_chunk((start + off[0], *off[1:]), payload)

    @staticmethod
    def readable(dataset: h5py.Dataset) -> bool:
        """Whether :meth:`read` can decode this dataset: one-row chunks through shuffle and gzip alone."""
        chunks = dataset.chunks
        return (
            chunks is not None and chunks[0] == 1 and dataset.compression == "gzip" and dataset.shuffle
            and not dataset.fletcher32 and dataset.scaleoffset is None
            and all(c in (1, d) for c, d in zip(chunks[1:], dataset.shape[1:]))
        )

    def read(self, dataset: h5py.Dataset, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a :meth:`readable` dataset, decompressed in the thread pool."""
        chunk, dtype = dataset.chunks, dataset.dtype
        out = np.empty((stop - start, *dataset.shape[1:]), dtype=dtype)
        grid = [range(start, stop)] + [range(0, d, c) for c, d in zip(chunk[1:], dataset.shape[1:])]
        offsets = list(itertools.product(*grid))
        payloads = [dataset.id.read_direct_chunk(off) for off in offsets]
        if any(mask for mask, _ in payloads):
            return dataset[start:stop]  # a chunk stored with a filter skipped: let HDF5 sort it out

        def decode(payload: bytes) -> np.ndarray:
            raw = np.frombuffer(zlib.decompress(payload), dtype=np.uint8)
            return raw.reshape(dtype.itemsize, -1).T.copy().view(dtype).reshape(chunk)

        for off, block in zip(offsets, self._pool.map(decode, (p for _, p in payloads))):
            index = (off[0] - start, *(slice(o, o + c) for o, c in zip(off[1:], chunk[1:])))
            out[index] = block[0]
        return out

    def close(self) -> None:
        self._pool.shutdown()


class RowFileWriter:
    """Append batches of per-image rows to ``<path>.partial``; :meth:`finish` promotes it to ``path``.

    Open with ``resume=True`` to continue an interrupted ``.partial`` (its identity attributes must match the
    new run's), ``overwrite=True`` to replace an existing file once the new one is complete.
    """

    def __init__(
        self,
        path: str | Path,
        attrs: dict[str, Any],
        rows: dict[str, RowDataset],
        *,
        class_names: list[str] | None = None,
        compression: str = "gzip",
        resume: bool = False,
        overwrite: bool = False,
    ):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self._attrs = attrs
        self._rows = rows
        self._class_names = class_names
        self._compression = compression
        self._gzip = _ParallelGzip() if compression == "gzip" else None
        if self.path.exists() and not (overwrite or resume):
            raise AttnflowError(f"{self.path} already exists; pass --overwrite to replace it")
        if self.partial.exists() and resume:
            self._file = self._open_for_resume()
            return
        if resume and self.path.exists():
            raise AttnflowError(f"{self.path} is already complete; nothing to resume")
        if self.partial.exists() and not overwrite:
            raise AttnflowError(
                f"an interrupted run left {self.partial}; pass --resume to continue it or --overwrite to start over"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self._create()

    # -- creation and resumption ------------------------------------------------------------------------
    def _create(self) -> h5py.File:
        try:
            f = h5py.File(self.partial, "w", libver=("v110", "latest"))
        except OSError as e:
            raise AttnflowError(f"cannot create {self.partial}: {e}") from None
        for key, value in self._attrs.items():
            f.attrs[key] = value
        f.attrs.update({"n_images": 0, "n_inputs_done": 0, "n_skipped": 0, "complete": False})
        compression = _compression_kwargs(self._compression)
        for name, spec in self._rows.items():
            f.create_dataset(
                name, shape=(0, *spec.row_shape), maxshape=(None, *spec.row_shape), dtype=spec.dtype,
                chunks=spec.chunks, **(compression if spec.compressed else {}),
            )
        f.create_dataset("image_ids", shape=(0,), maxshape=(None,), dtype=_TEXT, chunks=(1024,))
        if self._class_names is not None:
            f.create_dataset("labels", shape=(0,), maxshape=(None,), dtype="int64", chunks=(1024,))
            f.create_dataset("class_names", data=np.array([to_text(c) for c in self._class_names], dtype=object), dtype=_TEXT)
        for name in ("skipped", "skipped_reason"):
            f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=_TEXT, chunks=(256,))
        f.flush()
        return f

    def _open_for_resume(self) -> h5py.File:
        try:
            f = h5py.File(self.partial, "r+")
        except OSError as e:
            raise AttnflowError(f"cannot resume from {self.partial}: it is not a readable HDF5 file ({e})") from None
        if f.attrs.get("schema") != self._attrs["schema"]:
            f.close()
            raise AttnflowError(f"cannot resume from {self.partial}: it is not an {self._attrs['schema']} file")
        for key in RESUME_KEYS:
            old, new = _plain(f.attrs.get(key)), _plain(self._attrs.get(key))
            if old != new:
                f.close()
                raise AttnflowError(f"cannot resume {self.partial}: it was started with {key}={old}, this run has {new}")
        self._file = f
        # Rows past the last committed batch may have been written before an interruption: drop them.
        self.rewind(self.n_images, self.n_skipped, self.n_inputs_done)
        return f

    def rewind(self, n_images: int, n_skipped: int, n_inputs_done: int) -> None:
        """Cut the file back to an earlier commit (to realign two files written side by side)."""
        f = self._file
        if n_images > self.n_images or n_inputs_done > self.n_inputs_done:
            raise ValueError("cannot rewind forward")
        for name in (*self._rows, "image_ids", *(("labels",) if "labels" in f else ())):
            f[name].resize(n_images, axis=0)
        for name in ("skipped", "skipped_reason"):
            f[name].resize(n_skipped, axis=0)
        f.attrs.update({"n_images": n_images, "n_skipped": n_skipped, "n_inputs_done": n_inputs_done})
        f.flush()

    # -- appending ------------------------------------------------------------------------------------
    @property
    def n_images(self) -> int:
        return int(self._file.attrs["n_images"])

    @property
    def n_skipped(self) -> int:
        return int(self._file.attrs["n_skipped"])

    @property
    def n_inputs_done(self) -> int:
        return int(self._file.attrs["n_inputs_done"])

    def append(
        self,
        rows: dict[str, np.ndarray],
        image_ids: Sequence[str],
        n_inputs_done: int,
        labels: Sequence[int] | None = None,
        skipped: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Write one batch and commit it: data first, flushed, then the counters that make it count."""
        f, n, b = self._file, self.n_images, len(image_ids)
        if b:
            for name in self._rows:
                data = rows[name]
                if data.shape[0] != b:
                    raise ValueError(f"{name} has {data.shape[0]} rows for {b} images")
                f[name].resize(n + b, axis=0)
                if self._gzip is not None and self._rows[name].compressed and f[name].chunks[0] == 1:
                    self._gzip.write(f[name], n, data)
                else:
                    f[name][n:] = data
            f["image_ids"].resize(n + b, axis=0)
            f["image_ids"][n:] = np.array([to_text(s) for s in image_ids], dtype=object)
            if "labels" in f:
                if labels is None or len(labels) != b:
                    raise ValueError("this file stores labels; every batch needs them")
                f["labels"].resize(n + b, axis=0)
                f["labels"][n:] = np.asarray(labels, dtype=np.int64)
        m = self.n_skipped
        if skipped:
            for name, values in (("skipped", [s for s, _ in skipped]), ("skipped_reason", [r for _, r in skipped])):
                f[name].resize(m + len(skipped), axis=0)
                f[name][m:] = np.array([to_text(v) for v in values], dtype=object)
        f.flush()
        f.attrs.update({"n_images": n + b, "n_skipped": m + len(skipped), "n_inputs_done": n_inputs_done})
        f.flush()

    def finish(self) -> Path:
        """Mark the file complete and move it into place (replacing an old one only now)."""
        self._file.attrs["complete"] = True
        self.close()
        os.replace(self.partial, self.path)
        return self.path

    def close(self) -> None:
        """Close without promoting (after an error): the ``.partial`` stays for ``--resume``."""
        if self._gzip is not None:
            self._gzip.close()
        if self._file.id.valid:
            self._file.close()


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.bool_, np.integer, np.floating)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# -- reading ------------------------------------------------------------------------------------------


def open_hdf5(path: str | Path) -> h5py.File:
    """Open any attnflow HDF5 file read-only, with one clear line for a missing, truncated or foreign file."""
    path = Path(path)
    if not path.exists():
        if partial_path(path).exists():
            raise AttnflowError(f"{path} is not finished; {partial_path(path)} holds an interrupted run (continue it with --resume)")
        raise AttnflowError(f"no such file: {path}")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        reason = str(e).split("(")[0].strip().rstrip(".") or "unreadable"
        raise AttnflowError(f"{path} is not a readable HDF5 file ({reason}); is it truncated or not an attnflow file?") from None


def file_attrs(f: h5py.File) -> dict[str, Any]:
    return {k: _plain(v) for k, v in f.attrs.items()}


_KIND = {SCHEMA: "an attention cache", METRICS_SCHEMA: "a metrics file"}


class _AttnflowFile:
    """A finished attnflow file of one schema, read lazily; ``file[name]`` gives h5py datasets."""

    schema = ""
    hint = ""  # what to do when handed the other kind of file

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._gzip: _ParallelGzip | None = None
        self.file = open_hdf5(self.path)
        try:
            self.attrs = file_attrs(self.file)
            self._check_schema()
            self._check_rows()
            self.layout = layout_from_attrs(self.attrs)
        except Exception:
            self.file.close()
            raise

    def _check_schema(self) -> None:
        schema = self.attrs.get("schema")
        if schema is None:
            raise AttnflowError(f"{self.path} is not an attnflow file (no 'schema' attribute)")
        if schema != self.schema:
            if schema in _KIND:
                raise AttnflowError(f"{self.path} is {_KIND[schema]}, not {_KIND[self.schema]}{self.hint}")
            raise AttnflowError(f"{self.path} has schema '{schema}'; this attnflow reads '{self.schema}'")
        if not self.attrs.get("complete", False):
            raise AttnflowError(f"{self.path} is unfinished; continue it with --resume")

    def required(self) -> list[str]:
        return ["image_ids"]

    def _check_rows(self) -> None:
        n = int(self.attrs["n_images"])
        for name in self.required():
            if name not in self.file:
                raise AttnflowError(f"{self.path} lacks dataset '{name}'")
            if self.file[name].shape[0] != n:
                raise AttnflowError(f"{self.path}: dataset '{name}' has {self.file[name].shape[0]} rows, n_images is {n}")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._gzip is not None:
            self._gzip.close()
        self.file.close()

    def __getitem__(self, name: str) -> h5py.Dataset:
        if name not in self.file:
            raise AttnflowError(f"{self.path} has no dataset '{name}'")
        return self.file[name]

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of dataset ``name``; attnflow's own gzip chunks are decompressed in parallel
        (HDF5 would inflate them one after another in this thread)."""
        dataset = self[name]
        if not _ParallelGzip.readable(dataset):
            return dataset[start:stop]
        if self._gzip is None:
            self._gzip = _ParallelGzip()
        return self._gzip.read(dataset, start, stop)

    def __contains__(self, name: str) -> bool:
        return name in self.file

    def __len__(self) -> int:
        return int(self.attrs["n_images"])

    @property
    def image_ids(self) -> list[str]:
        return [s.decode("utf-8") if isinstance(s, bytes) else s for s in self.file["image_ids"][:]]

    @property
    def class_names(self) -> list[str] | None:
        if "class_names" not in self.file:
            return None
        return [s.decode("utf-8") if isinstance(s, bytes) else s for s in self.file["class_names"][:]]


class Cache(_AttnflowFile):
    """A finished attention cache (``attnflow extract``)."""

    schema = SCHEMA
    hint = " (run `attnflow metrics` on a cache, `attnflow compare` on metrics files)"

    def required(self) -> list[str]:
        store = self.attrs.get("store")
        if store not in STORE_MODES:
            raise AttnflowError(f"{self.path} has unknown store mode '{store}'")
        maps = {"full": ["attn"], "rows": ["attn_rows"], "none": []}[store]
        return ["image_ids", "magnitude", *maps, *(["fg"] if self.attrs.get("has_masks") else [])]

    @property
    def preprocessing(self) -> dict[str, Any]:
        return json.loads(self.attrs["preprocessing"])


class MetricsFile(_AttnflowFile):
    """A finished metrics file (``attnflow metrics`` or ``attnflow extract --metrics``)."""

    schema = METRICS_SCHEMA
    hint = " (compute one with `attnflow metrics CACHE -o METRICS.h5`)"

    @property
    def metric_names(self) -> list[str]:
        group = self.file.get(METRICS_GROUP)
        return sorted(group) if group is not None else []

    def metric(self, name: str) -> h5py.Dataset:
        key = f"{METRICS_GROUP}/{name}"
        if key not in self.file:
            raise AttnflowError(f"{self.path} has no metric '{name}' (it has {', '.join(self.metric_names)})")
        return self.file[key]


def open_cache(path: str | Path) -> Cache:
    """Open and validate an attention cache written by ``attnflow extract``."""
    return Cache(path)


def open_metrics(path: str | Path) -> MetricsFile:
    """Open and validate a metrics file written by ``attnflow metrics``."""
    return MetricsFile(path)


def describe(path: str | Path) -> dict[str, Any]:
    """Attributes and dataset shapes of any attnflow HDF5 file (for ``attnflow info``)."""
    with open_hdf5(path) as f:
        if "schema" not in f.attrs:
            raise AttnflowError(f"{path} is not an attnflow file (no 'schema' attribute)")
        datasets: dict[str, Any] = {}

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                datasets[name] = {"shape": list(obj.shape), "dtype": str(obj.dtype) if obj.dtype.kind != "O" else "utf-8"}

        f.visititems(visit)
        return {"path": str(path), "attrs": file_attrs(f), "datasets": datasets}
