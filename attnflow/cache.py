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
    (n, L, H, p, T) for ``store=rows``; ``tokens`` (n, T, D) float32 with ``--save-tokens``, with the model's
    final LayerNorm as ``final_norm_weight`` (D,), ``final_norm_bias`` (D,) and attr ``final_norm_eps``;
    ``fg`` (n, P) float32 with ``--masks``.
Metrics file (``schema = attnflow.metrics/1``), also with attrs ``fusion``, ``discard_ratio``, ``source``:
    ``metrics/<name>`` (n, L, H), (n, L) or (n,) float32 as listed in :mod:`attnflow.metrics`;
    ``rollout/map`` (n, L, P) float32 when full maps were available; ``fg`` (n, P) with masks.

A run writes into the folder ``<path>.partial/``, one atomically committed segment file per batch, and
``<path>`` appears only once complete (see :class:`RowFileWriter`), so a finished path always holds a
finished file and a killed run loses at most the batch in flight.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
import json
import os
import shutil
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
# Per-file (not per-image) datasets: the class names and the final LayerNorm that turns stored tokens into
# the features users read (``--save-tokens``).
STATIC_DATASETS = ("class_names", "final_norm_weight", "final_norm_bias")
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
    final_norm: tuple[np.ndarray, np.ndarray, float] | None = None  # LayerNorm (weight, bias, eps), with tokens
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
        static = {}
        attrs = self.root_attrs()
        if self.final_norm is not None:
            weight, bias, eps = self.final_norm
            static = {"final_norm_weight": np.asarray(weight, np.float32), "final_norm_bias": np.asarray(bias, np.float32)}
            attrs["final_norm_eps"] = float(eps)
        return RowFileWriter(
            path, attrs, self.row_datasets(), class_names=self.class_names, static=static,
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
    """Append batches of per-image rows; :meth:`finish` assembles them into one file at ``path``.

    Crash safety: HDF5 files are not journalled, and a process killed while HDF5 updates a file's metadata
    can leave it unreadable. So nothing is ever appended to a file in place. The run lives in the folder
    ``<path>.partial/``: ``manifest.json`` (the file's identity, written once, atomically) and one small
    HDF5 file per committed batch, ``seg-NNNNNNNN.h5``, written as ``*.tmp``, flushed to disk and then
    renamed, so a segment either exists complete or not at all. ``--resume`` continues after the last
    segment (a leftover ``*.tmp`` is the batch that was cut off and is discarded). :meth:`finish` copies the
    segments into ``<path>.tmp`` (compressed chunks byte for byte, without recompressing), renames it to
    ``path`` and removes the folder. Open with ``resume=True`` to continue (the identity attributes must
    match), ``overwrite=True`` to replace an existing file once the new one is complete.
    """

    MANIFEST = "manifest.json"

    def __init__(
        self,
        path: str | Path,
        attrs: dict[str, Any],
        rows: dict[str, RowDataset],
        *,
        class_names: list[str] | None = None,
        static: dict[str, np.ndarray] | None = None,
        compression: str = "gzip",
        resume: bool = False,
        overwrite: bool = False,
    ):
        self.path = Path(path)
        self._static = static or {}
        self.partial = partial_path(self.path)
        self._attrs = {k: _plain(v) for k, v in attrs.items()}
        self._rows = rows
        self._class_names = class_names
        self._compression = compression
        self._gzip = _ParallelGzip() if compression == "gzip" else None
        self._segments: list[tuple[Path, int, int, int]] = []  # (file, images, skipped, n_inputs_done)
        if self.path.exists() and not (overwrite or resume):
            raise AttnflowError(f"{self.path} already exists; pass --overwrite to replace it")
        if self.partial.exists() and resume:
            self._resume()
            return
        if resume and self.path.exists():
            raise AttnflowError(f"{self.path} is already complete; nothing to resume")
        if self.partial.exists() and not overwrite:
            raise AttnflowError(
                f"an interrupted run left {self.partial}; pass --resume to continue it or --overwrite to start over"
            )
        self._start()

    # -- the run folder -------------------------------------------------------------------------------
    def _start(self) -> None:
        try:
            if self.partial.exists():
                shutil.rmtree(self.partial)
            self.partial.mkdir(parents=True)
            manifest = {"attrs": self._attrs, "class_names": self._class_names}
            _write_atomically(self.partial / self.MANIFEST, json.dumps(manifest, indent=1).encode())
        except OSError as e:
            raise AttnflowError(f"cannot create {self.partial}: {e}") from None

    def _resume(self) -> None:
        try:
            manifest = json.loads((self.partial / self.MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise AttnflowError(f"cannot resume from {self.partial}: its manifest is unreadable ({e})") from None
        old_attrs = manifest.get("attrs", {})
        if old_attrs.get("schema") != self._attrs["schema"]:
            raise AttnflowError(f"cannot resume from {self.partial}: it is not an {self._attrs['schema']} run")
        for key in RESUME_KEYS:
            old, new = old_attrs.get(key), self._attrs.get(key)
            if old != new:
                raise AttnflowError(f"cannot resume {self.partial}: it was started with {key}={old}, this run has {new}")
        self._attrs = old_attrs  # keep the first run's creation time
        for leftover in self.partial.glob("*.tmp"):
            leftover.unlink()  # a batch cut off before its commit
        for segment in sorted(self.partial.glob("seg-*.h5")):
            try:
                with h5py.File(segment, "r") as f:
                    self._segments.append(
                        (segment, int(f["image_ids"].shape[0]), int(f["skipped"].shape[0]), int(f.attrs["n_inputs_done"]))
                    )
            except (OSError, KeyError) as e:
                raise AttnflowError(f"cannot resume from {self.partial}: segment {segment.name} is unreadable ({e})") from None

    def rewind(self, n_images: int, n_skipped: int, n_inputs_done: int) -> None:
        """Drop the segments after the commit that reached ``n_inputs_done`` (to realign two files written
        side by side)."""
        while self._segments and self._segments[-1][3] > n_inputs_done:
            self._segments.pop()[0].unlink()
        if (self.n_images, self.n_skipped, self.n_inputs_done) != (n_images, n_skipped, n_inputs_done):
            raise AttnflowError(f"cannot realign {self.partial} with its companion file: their batches differ")

    # -- appending ------------------------------------------------------------------------------------
    @property
    def n_images(self) -> int:
        return sum(s[1] for s in self._segments)

    @property
    def n_skipped(self) -> int:
        return sum(s[2] for s in self._segments)

    @property
    def n_inputs_done(self) -> int:
        return self._segments[-1][3] if self._segments else 0

    def append(
        self,
        rows: dict[str, np.ndarray],
        image_ids: Sequence[str],
        n_inputs_done: int,
        labels: Sequence[int] | None = None,
        skipped: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Write one batch as a segment and commit it by renaming it into place."""
        b = len(image_ids)
        final = self.partial / f"seg-{len(self._segments):08d}.h5"
        tmp = final.with_name(final.name + ".tmp")
        with h5py.File(tmp, "w") as f:
            self._write_rows(f, rows, image_ids, labels, skipped)
            f.attrs["n_inputs_done"] = n_inputs_done
        _fsync(tmp)
        os.replace(tmp, final)
        _fsync(self.partial)
        self._segments.append((final, b, len(skipped), n_inputs_done))

    def _create_datasets(self, f: h5py.File, n: int, m: int) -> None:
        compression = _compression_kwargs(self._compression)
        for name, spec in self._rows.items():
            chunks = (max(1, min(spec.chunks[0], n)), *spec.chunks[1:])
            f.create_dataset(
                name, shape=(n, *spec.row_shape), maxshape=(None, *spec.row_shape), dtype=spec.dtype,
                chunks=chunks, **(compression if spec.compressed else {}),
            )
        f.create_dataset("image_ids", shape=(n,), maxshape=(None,), dtype=_TEXT, chunks=(1024,))
        if self._class_names is not None:
            f.create_dataset("labels", shape=(n,), maxshape=(None,), dtype="int64", chunks=(1024,))
            f.create_dataset("class_names", data=np.array([to_text(c) for c in self._class_names], dtype=object), dtype=_TEXT)
        for name in ("skipped", "skipped_reason"):
            f.create_dataset(name, shape=(m,), maxshape=(None,), dtype=_TEXT, chunks=(256,))

    def _write_rows(self, f, rows, image_ids, labels, skipped) -> None:
        b = len(image_ids)
        self._create_datasets(f, b, len(skipped))
        for name in self._rows if b else ():  # a batch of only undecodable files has no rows
            data = rows[name]
            if data.shape[0] != b:
                raise ValueError(f"{name} has {data.shape[0]} rows for {b} images")
            if self._gzip is not None and self._rows[name].compressed and f[name].chunks[0] == 1:
                self._gzip.write(f[name], 0, data)
            else:
                f[name][:] = data
        if b:
            f["image_ids"][:] = np.array([to_text(s) for s in image_ids], dtype=object)
        if "labels" in f:
            if labels is None or len(labels) != b:
                raise ValueError("this file stores labels; every batch needs them")
            if b:
                f["labels"][:] = np.asarray(labels, dtype=np.int64)
        if skipped:
            f["skipped"][:] = np.array([to_text(s) for s, _ in skipped], dtype=object)
            f["skipped_reason"][:] = np.array([to_text(r) for _, r in skipped], dtype=object)

    def finish(self) -> Path:
        """Assemble the segments into ``path`` (replacing an old file only now) and remove the run folder."""
        n, m = self.n_images, self.n_skipped
        tmp = self.path.with_name(self.path.name + ".tmp")
        with h5py.File(tmp, "w", libver=("v110", "latest")) as out:
            for key, value in self._attrs.items():
                out.attrs[key] = value
            out.attrs.update({"n_images": n, "n_skipped": m, "n_inputs_done": self.n_inputs_done, "complete": True})
            self._create_datasets(out, n, m)
            for name, data in self._static.items():
                out.create_dataset(name, data=data)
            row, skip = 0, 0
            for segment, b, k, _ in self._segments:
                with h5py.File(segment, "r") as seg:
                    for name in [*self._rows, "image_ids", *(("labels",) if "labels" in out else ())]:
                        if b:
                            _copy_rows(seg[name], out[name], row)
                    for name in ("skipped", "skipped_reason"):
                        if k:
                            out[name][skip:skip + k] = seg[name][()]
                row, skip = row + b, skip + k
        _fsync(tmp)
        os.replace(tmp, self.path)
        _fsync(self.path.parent)
        self.close()
        shutil.rmtree(self.partial, ignore_errors=True)
        return self.path

    def close(self) -> None:
        """Stop writing (after an error, the committed segments stay for ``--resume``)."""
        if self._gzip is not None:
            self._gzip.close()


def _copy_rows(source: h5py.Dataset, target: h5py.Dataset, start: int) -> None:
    """Rows of a segment into the assembled file; one-row compressed chunks are copied as stored bytes."""
    n = source.shape[0]
    same_filters = source.compression == target.compression and source.shuffle == target.shuffle
    if source.chunks and target.chunks and source.chunks[0] == target.chunks[0] == 1 and source.chunks == target.chunks and same_filters and source.compression:
        grid = [range(n)] + [range(0, d, c) for c, d in zip(source.chunks[1:], source.shape[1:])]
        for offset in itertools.product(*grid):
            mask, payload = source.id.read_direct_chunk(offset)
            target.id.write_direct_chunk((start + offset[0], *offset[1:]), payload, filter_mask=mask)
    else:
        target[start:start + n] = source[()]


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's data to disk, so that a rename after it never exposes a torn file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
