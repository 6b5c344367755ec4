"""The attention cache: its HDF5 schema, the incremental writer and the checked reader.

Every name in an attnflow cache is defined here and nowhere else. Layout of a cache with ``n`` images,
``L`` blocks, ``H`` heads, ``T`` tokens (``p`` prefix = cls + registers), ``D`` channels:

root attributes
    ``schema`` (``attnflow.cache/1``), ``attnflow_version``, ``created`` (ISO 8601, UTC), the model
    (``model``, ``label``, ``family``, ``weights``, ``checkpoint``, ``checkpoint_sha256``), the token layout
    (``num_layers``, ``num_heads``, ``num_tokens``, ``num_prefix_tokens``, ``has_cls``, ``num_registers``,
    ``grid_size`` [h, w], ``patch_size`` [h, w], ``img_size`` [h, w]), the storage (``store``, ``dtype``,
    ``compression``), ``preprocessing`` (JSON of timm's resolved eval data config), ``amp``, and the
    bookkeeping ``n_images``, ``n_inputs``, ``n_inputs_done``, ``inputs_sha256``, ``complete``.
datasets
    ``image_ids`` (n,) UTF-8 paths as given; ``labels`` (n,) int64 into ``class_names`` (K,) when extracted
    with labels; ``skipped`` (m,) and ``skipped_reason`` (m,) UTF-8; ``magnitude`` (n, L, T) float32;
    ``attn`` (n, L, H, T, T) for ``store=full``; ``attn_rows`` (n, L, H, p, T) for ``store=rows``;
    ``tokens`` (n, T, D) float32 with ``--save-tokens``.

A cache is written to ``<path>.partial`` and renamed to ``<path>`` only once complete, so a finished path
always holds a finished cache. Rows are appended a batch at a time; ``n_images`` and ``n_inputs_done``
advance only after that batch's data has been flushed, which is what ``--resume`` continues from.
"""
from __future__ import annotations

import datetime as _dt
import itertools
import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from .errors import AttnflowError
from .layout import TokenLayout

SCHEMA = "attnflow.cache/1"
METRICS_SCHEMA_PREFIX = "attnflow.metrics/"
STORE_MODES = ("full", "rows", "none")
DTYPES = ("float16", "float32")
COMPRESSIONS = ("gzip", "lzf", "none")
PARTIAL_SUFFIX = ".partial"

# Attributes that must agree between an interrupted run and the run that resumes it.
RESUME_KEYS = (
    "model", "checkpoint_sha256", "weights", "store", "dtype", "img_size", "num_tokens",
    "preprocessing", "inputs_sha256", "n_inputs", "has_labels", "has_tokens",
)

_TEXT = h5py.string_dtype("utf-8")


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + PARTIAL_SUFFIX)


def to_text(s: str) -> str:
    """Paths may carry undecodable bytes (surrogate escapes); HDF5 text must be valid UTF-8."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def inputs_digest(paths: Sequence[str]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for p in paths:
        digest.update(to_text(p).encode("utf-8") + b"\0")
    return digest.hexdigest()


@dataclass
class CacheSpec:
    """Everything that fixes a cache's shapes and identity before the first batch is written."""

    layout: TokenLayout
    num_layers: int
    num_heads: int
    store: str = "full"
    dtype: str = "float16"
    compression: str = "gzip"
    token_dim: int | None = None  # set to store ``tokens``
    class_names: list[str] | None = None  # set to store ``labels``
    attrs: dict[str, Any] = field(default_factory=dict)  # model identity, preprocessing, inputs

    def __post_init__(self) -> None:
        if self.store not in STORE_MODES:
            raise AttnflowError(f"unknown store mode '{self.store}' (choose from {', '.join(STORE_MODES)})")
        if self.dtype not in DTYPES:
            raise AttnflowError(f"unknown dtype '{self.dtype}' (choose from {', '.join(DTYPES)})")
        if self.compression not in COMPRESSIONS:
            raise AttnflowError(f"unknown compression '{self.compression}' (choose from {', '.join(COMPRESSIONS)})")
        if self.store == "rows" and self.layout.num_prefix_tokens == 0:
            raise AttnflowError("--store rows keeps the cls and register rows, and this model has neither; use full or none")

    def root_attrs(self) -> dict[str, Any]:
        from . import __version__

        lay = self.layout
        return {
            "schema": SCHEMA,
            "attnflow_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **self.attrs,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_tokens": lay.num_tokens,
            "num_prefix_tokens": lay.num_prefix_tokens,
            "has_cls": lay.has_cls,
            "num_registers": lay.num_registers,
            "grid_size": list(lay.grid_size),
            "patch_size": list(lay.patch_size),
            "img_size": list(lay.img_size),
            "store": self.store,
            "dtype": self.dtype,
            "compression": self.compression,
            "has_labels": self.class_names is not None,
            "has_tokens": self.token_dim is not None,
            "n_images": 0,
            "n_inputs_done": 0,
            "complete": False,
        }

    def row_datasets(self) -> dict[str, tuple[tuple[int, ...], str, tuple[int, ...], bool]]:
        """Per-image datasets: name -> (shape of one row, dtype, chunk shape, compressed)."""
        L, H, T, p = self.num_layers, self.num_heads, self.layout.num_tokens, self.layout.num_prefix_tokens
        rows: dict[str, tuple[tuple[int, ...], str, tuple[int, ...], bool]] = {
            "magnitude": ((L, T), "float32", (64, L, T), True),
        }
        if self.store == "full":
            # One chunk per image and layer: reading an image or a layer never decompresses other images.
            rows["attn"] = ((L, H, T, T), self.dtype, (1, 1, H, T, T), True)
        elif self.store == "rows":
            rows["attn_rows"] = ((L, H, p, T), self.dtype, (1, L, H, p, T), True)
        if self.token_dim is not None:
            rows["tokens"] = ((T, self.token_dim), "float32", (1, T, self.token_dim), True)
        return rows


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

    def close(self) -> None:
        self._pool.shutdown()


class CacheWriter:
    """Append batches of captured rows to ``<path>.partial``; :meth:`finish` promotes it to ``path``.

    Open with ``resume=True`` to continue an interrupted ``.partial`` (its identity attributes must match the
    new run's), ``overwrite=True`` to replace an existing cache once the new one is complete.
    """

    def __init__(self, path: str | Path, spec: CacheSpec, *, resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.spec = spec
        self._rows = spec.row_datasets()
        self._gzip = _ParallelGzip() if spec.compression == "gzip" else None
        if self.path.exists() and not (overwrite or resume):
            raise AttnflowError(f"{self.path} already exists; pass --overwrite to replace it")
        if self.partial.exists() and resume:
            self._file = self._open_for_resume()
            return
        if resume and self.path.exists():
            raise AttnflowError(f"{self.path} is already complete; nothing to resume")
        if self.partial.exists() and not overwrite:
            raise AttnflowError(
                f"an interrupted extraction {self.partial} exists; pass --resume to continue it or --overwrite to start over"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self._create()

    # -- creation and resumption ------------------------------------------------------------------------
    def _create(self) -> h5py.File:
        try:
            f = h5py.File(self.partial, "w", libver=("v110", "latest"))
        except OSError as e:
            raise AttnflowError(f"cannot create {self.partial}: {e}") from None
        for key, value in self.spec.root_attrs().items():
            f.attrs[key] = value
        compression = _compression_kwargs(self.spec.compression)
        for name, (row_shape, dtype, chunks, compressed) in self._rows.items():
            f.create_dataset(
                name, shape=(0, *row_shape), maxshape=(None, *row_shape), dtype=dtype, chunks=chunks,
                **(compression if compressed else {}),
            )
        f.create_dataset("image_ids", shape=(0,), maxshape=(None,), dtype=_TEXT, chunks=(1024,))
        if self.spec.class_names is not None:
            f.create_dataset("labels", shape=(0,), maxshape=(None,), dtype="int64", chunks=(1024,))
            f.create_dataset("class_names", data=np.array([to_text(c) for c in self.spec.class_names], dtype=object), dtype=_TEXT)
        for name in ("skipped", "skipped_reason"):
            f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=_TEXT, chunks=(256,))
        f.flush()
        return f

    def _open_for_resume(self) -> h5py.File:
        try:
            f = h5py.File(self.partial, "r+")
        except OSError as e:
            raise AttnflowError(f"cannot resume from {self.partial}: it is not a readable HDF5 file ({e})") from None
        wanted = self.spec.root_attrs()
        if f.attrs.get("schema") != SCHEMA:
            f.close()
            raise AttnflowError(f"cannot resume from {self.partial}: it is not an {SCHEMA} file")
        for key in RESUME_KEYS:
            old, new = _plain(f.attrs.get(key)), _plain(wanted.get(key))
            if old != new:
                f.close()
                raise AttnflowError(f"cannot resume {self.partial}: it was started with {key}={old}, this run has {new}")
        # Rows past the last committed batch may have been written before an interruption: drop them.
        n = int(f.attrs["n_images"])
        for name in (*self._rows, "image_ids", *(("labels",) if "labels" in f else ())):
            f[name].resize(n, axis=0)
        m = int(f.attrs.get("n_skipped", 0))
        for name in ("skipped", "skipped_reason"):
            f[name].resize(m, axis=0)
        return f

    # -- appending ------------------------------------------------------------------------------------
    @property
    def n_images(self) -> int:
        return int(self._file.attrs["n_images"])

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
                if self._gzip is not None and f[name].chunks[0] == 1:
                    self._gzip.write(f[name], n, data)
                else:
                    f[name][n:] = data
            f["image_ids"].resize(n + b, axis=0)
            f["image_ids"][n:] = np.array([to_text(s) for s in image_ids], dtype=object)
            if "labels" in f:
                if labels is None or len(labels) != b:
                    raise ValueError("this cache stores labels; every batch needs them")
                f["labels"].resize(n + b, axis=0)
                f["labels"][n:] = np.asarray(labels, dtype=np.int64)
        m = int(f.attrs.get("n_skipped", 0))
        if skipped:
            for name, values in (("skipped", [s for s, _ in skipped]), ("skipped_reason", [r for _, r in skipped])):
                f[name].resize(m + len(skipped), axis=0)
                f[name][m:] = np.array([to_text(v) for v in values], dtype=object)
        f.flush()
        f.attrs["n_images"] = n + b
        f.attrs["n_skipped"] = m + len(skipped)
        f.attrs["n_inputs_done"] = n_inputs_done
        f.flush()

    def finish(self) -> Path:
        """Mark the cache complete and move it into place (replacing an old cache only now)."""
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


class Cache:
    """A finished attention cache, read lazily.

    ``attrs`` holds the root attributes as plain Python values; ``layout`` the token layout; datasets are
    reached through ``cache[name]`` (h5py datasets, sliced on demand) or the helpers below.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = open_hdf5(self.path)
        try:
            self.attrs = file_attrs(self.file)
            self._check()
        except Exception:
            self.file.close()
            raise
        a = self.attrs
        self.layout = TokenLayout(
            has_cls=bool(a["has_cls"]),
            num_prefix_tokens=int(a["num_prefix_tokens"]),
            grid_size=tuple(a["grid_size"]),
            patch_size=tuple(a["patch_size"]),
        )

    def _check(self) -> None:
        schema = self.attrs.get("schema")
        if schema is None:
            raise AttnflowError(f"{self.path} is not an attnflow cache (no 'schema' attribute)")
        if isinstance(schema, str) and schema.startswith(METRICS_SCHEMA_PREFIX):
            raise AttnflowError(f"{self.path} is an attnflow metrics file, not an attention cache")
        if schema != SCHEMA:
            raise AttnflowError(f"{self.path} has schema '{schema}'; this attnflow reads '{SCHEMA}'")
        if not self.attrs.get("complete", False):
            raise AttnflowError(f"{self.path} is an unfinished extraction; continue it with --resume")
        n = int(self.attrs["n_images"])
        store = self.attrs["store"]
        required = ["image_ids", "magnitude"] + {"full": ["attn"], "rows": ["attn_rows"], "none": []}[store]
        for name in required:
            if name not in self.file:
                raise AttnflowError(f"{self.path} lacks dataset '{name}' required by store={store}")
            if self.file[name].shape[0] != n:
                raise AttnflowError(f"{self.path}: dataset '{name}' has {self.file[name].shape[0]} rows, n_images is {n}")

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()

    def __getitem__(self, name: str) -> h5py.Dataset:
        if name not in self.file:
            raise AttnflowError(f"{self.path} has no dataset '{name}'")
        return self.file[name]

    def __contains__(self, name: str) -> bool:
        return name in self.file

    def __len__(self) -> int:
        return int(self.attrs["n_images"])

    @property
    def image_ids(self) -> list[str]:
        return [s.decode("utf-8") if isinstance(s, bytes) else s for s in self.file["image_ids"][:]]

    @property
    def preprocessing(self) -> dict[str, Any]:
        return json.loads(self.attrs["preprocessing"])


def open_cache(path: str | Path) -> Cache:
    """Open and validate an attention cache written by ``attnflow extract``."""
    return Cache(path)


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
