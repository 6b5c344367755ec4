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

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import socket
import uuid
import warnings
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
    "compression", "amp",
)
# Per-run bookkeeping a metrics file does not inherit from its cache.
_OWN_ATTRS = ("schema", "created", "complete", "n_images", "n_inputs_done", "n_skipped", "compression")

_TEXT = h5py.string_dtype("utf-8")


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + PARTIAL_SUFFIX)


def to_text(s: str) -> str:
    """Paths may carry undecodable bytes (surrogate escapes); HDF5 text must be valid UTF-8."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def from_text(values: Any) -> list[str]:
    """HDF5 UTF-8 strings (bytes or str, as h5py hands them out) as a list of str."""
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


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

    def writer(self, path: str | Path, *, companion: str | Path | None = None, resume: bool = False,
               overwrite: bool = False) -> "RowFileWriter":
        static = {}
        attrs = self.root_attrs()
        if self.final_norm is not None:
            weight, bias, eps = self.final_norm
            static = {"final_norm_weight": np.asarray(weight, np.float32), "final_norm_bias": np.asarray(bias, np.float32)}
            attrs["final_norm_eps"] = float(eps)
        return RowFileWriter(
            path, attrs, self.row_datasets(), class_names=self.class_names, static=static,
            compression=self.compression, companion=companion, resume=resume, overwrite=overwrite,
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

    def writer(self, path: str | Path, *, companion: str | Path | None = None, resume: bool = False,
               overwrite: bool = False) -> "RowFileWriter":
        return RowFileWriter(
            path, self.root_attrs(), self.row_datasets(), class_names=self.class_names,
            compression="gzip", companion=companion, resume=resume, overwrite=overwrite,
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


class Segment(NamedTuple):
    """One committed batch of a run: ``seg-<index>.h5`` in the run folder."""

    path: Path
    index: int
    n_images: int
    n_skipped: int
    n_inputs_start: int | None  # inputs done before this batch (None in segments written by attnflow 0.1)
    n_inputs_done: int


class RunLock:
    """An exclusive lock on ``<run folder>/lock``, held by the one process that writes the run.

    A POSIX record lock (``lockf``), not ``flock``: it belongs to the process, so forked DataLoader workers
    do not inherit it and the kernel drops it the moment its holder dies, however it dies; a killed run
    never blocks the next one. The file holds the holder's pid and host, for the message that refuses a
    second writer.
    """

    NAME = "lock"

    def __init__(self, folder: Path):
        self.folder = folder
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        fd = os.open(self.folder / self.NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):  # a file system without locks (some network mounts)
                warnings.warn(f"cannot lock {self.folder} ({e.strerror}): nothing stops a second run on the same output")
                self._fd = fd
                return
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
            os.close(fd)
            who = f" (pid {holder[0]} on {holder[1]})" if len(holder) == 2 else ""
            raise AttnflowError(
                f"another attnflow process{who} is writing {self.folder}; wait for it to finish or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class RowFileWriter:
    """Append batches of per-image rows; :meth:`finish` assembles them into one file at ``path``.

    Crash safety: HDF5 files are not journalled, and a process killed while HDF5 updates a file's metadata
    can leave it unreadable. So nothing is ever appended to a file in place. The run lives in the folder
    ``<path>.partial/``: ``manifest.json`` (the file's identity, written once, atomically), ``lock`` (see
    :class:`RunLock`: one writer at a time) and one small HDF5 file per committed batch, ``seg-NNNNNNNN.h5``,
    numbered from 0 and recording the input range it covers, written as ``*.tmp``, flushed to disk and then
    renamed, so a segment either exists complete or not at all. ``--resume`` checks that the segments form
    one unbroken chain and continues after the last (a leftover ``*.tmp`` is the batch that was cut off and
    is discarded). :meth:`assemble` copies the segments into ``<path>.tmp`` (compressed chunks byte for
    byte, without recompressing) and renames it to ``path``; :meth:`cleanup` then removes the folder, so a
    file written side by side with a companion keeps its folder (and is resumable) until both are in place.
    Open with ``resume=True`` to continue (the identity attributes must match), ``overwrite=True`` to
    replace an existing file once the new one is complete.
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
        companion: str | Path | None = None,
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
        self._companion = None if companion is None else str(Path(companion).resolve())
        self._segments: list[Segment] = []
        self._lock = RunLock(self.partial)
        self._gzip: _ParallelGzip | None = None
        self.complete_attrs: dict[str, Any] | None = None  # set when resuming a run that had already finished
        if self.path.is_dir():
            raise AttnflowError(f"{self.path} is a directory; the output must be a file path")
        if not self.path.parent.is_dir():
            raise AttnflowError(f"no such folder for {self.path}: {self.path.parent}")
        if self.path.exists() and not (overwrite or resume):
            raise AttnflowError(f"{self.path} already exists; pass --overwrite to replace it")
        if self.partial.exists() and not self.partial.is_dir():
            raise AttnflowError(f"{self.partial} is in the way (attnflow keeps an unfinished run there); remove it")
        if self.partial.exists():
            with file_system_errors(self.partial, resumable=False):
                self._lock.acquire()  # refuses while another process writes this run, before anything is touched
            if resume:
                self._resume()
            elif not overwrite:
                self._lock.release()
                raise AttnflowError(
                    f"an interrupted run left {self.partial}; pass --resume to continue it or --overwrite to start over"
                )
            else:
                self._start()
        elif resume and self.path.exists():
            self._check_complete()
        else:
            self._start()
        if compression == "gzip" and self.complete_attrs is None:
            self._gzip = _ParallelGzip()

    # -- the run folder -------------------------------------------------------------------------------
    def _start(self) -> None:
        with file_system_errors(self.partial, resumable=False):
            self.partial.mkdir(exist_ok=True)
            self._lock.acquire()
            for old in self.partial.iterdir():  # --overwrite of an interrupted run: everything but the lock
                if old.name != RunLock.NAME:
                    shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
            manifest = {"attrs": self._attrs, "class_names": self._class_names, "companion": self._companion}
            write_atomically(self.partial / self.MANIFEST, json.dumps(manifest, indent=1).encode())

    def _check_complete(self) -> None:
        """``--resume`` of a run that already finished: nothing to do, if it is the same run."""
        try:
            with h5py.File(self.path, "r") as f:
                attrs = file_attrs(f)
                class_names = from_text(f["class_names"][()]) if "class_names" in f else None
        except (OSError, KeyError) as e:
            raise AttnflowError(f"{self.path} exists but is unreadable ({e}); pass --overwrite to replace it") from None
        differing = [key for key in RESUME_KEYS if attrs.get(key) != self._attrs.get(key)]
        if class_names != self._class_names:
            differing.append("class_names")
        if attrs.get("schema") != self._attrs["schema"] or not attrs.get("complete") or differing:
            what = f"{differing[0]}={attrs.get(differing[0])}, this run has {self._attrs.get(differing[0])}" if differing else "another kind of run"
            raise AttnflowError(f"{self.path} is complete but was made with {what}; pass --overwrite to replace it")
        self.complete_attrs = attrs

    def _refuse(self, why: str) -> None:
        self._lock.release()
        raise AttnflowError(f"cannot resume from {self.partial}: {why}")

    def _resume(self) -> None:
        if not (self.partial / self.MANIFEST).exists():
            if self.path.exists():  # a finished run, killed while it removed its folder
                self._check_complete()
                self.cleanup()
                return
            if not list(self.partial.glob("seg-*.h5")):  # killed before it wrote its manifest: nothing committed
                self._start()
                return
        try:
            manifest = json.loads((self.partial / self.MANIFEST).read_text())
        except (OSError, ValueError) as e:
            self._refuse(f"its manifest is unreadable ({e})")
        if not isinstance(manifest, dict) or not isinstance(manifest.get("attrs"), dict):
            self._refuse(f"{self.MANIFEST} is not an attnflow manifest")
        old_attrs = manifest["attrs"]
        if old_attrs.get("schema") != self._attrs["schema"]:
            self._refuse(f"it is not an {self._attrs['schema']} run")
        for key in RESUME_KEYS:
            old, new = old_attrs.get(key), self._attrs.get(key)
            if old != new:
                self._refuse(f"it was started with {key}={old}, this run has {new}")
        if manifest.get("class_names") != self._class_names:
            self._refuse("it was started with other class names")
        companion = manifest.get("companion")
        if companion and companion != self._companion and partial_path(Path(companion)).exists():
            self._refuse(
                f"it was written together with {companion} (--metrics), which is unfinished too; resume with "
                f"the same --metrics, or remove {partial_path(Path(companion))} to drop those metrics"
            )
        # Labels, family and paths are this run's word; the identity checked above is the first run's.
        self._attrs["created"] = old_attrs.get("created", self._attrs.get("created"))
        with file_system_errors(self.partial, resumable=True):
            for leftover in self.partial.glob("*.tmp"):
                leftover.unlink()  # a batch cut off before its commit
            found = sorted(self.partial.glob("seg-*.h5"))
        for expected, segment in enumerate(found):
            index = _segment_index(segment)
            if index != expected:
                missing = f"seg-{expected:08d}.h5"
                self._refuse(f"segment {missing} is missing, so the run's rows would have a gap; start over with --overwrite")
            record = self._read_segment(segment, index)
            previous = self._segments[-1].n_inputs_done if self._segments else 0
            if (record.n_inputs_start is not None and record.n_inputs_start != previous) or record.n_inputs_done <= previous:
                self._refuse(
                    f"segment {segment.name} covers inputs up to {record.n_inputs_done} after a segment that ended "
                    f"at {previous}: the segments do not form one run; start over with --overwrite"
                )
            self._segments.append(record)
        if self.n_inputs_done > int(self._attrs.get("n_inputs", self.n_inputs_done)):
            self._refuse(f"its segments cover {self.n_inputs_done} inputs of {self._attrs['n_inputs']}")

    def _read_segment(self, segment: Path, index: int) -> Segment:
        try:
            with h5py.File(segment, "r") as f:
                b, k = int(f["image_ids"].shape[0]), int(f["skipped"].shape[0])
                for name, spec in self._rows.items() if b else ():
                    if f[name].shape != (b, *spec.row_shape):
                        self._refuse(f"segment {segment.name}: {name} has shape {f[name].shape}, not {(b, *spec.row_shape)}")
                start = f.attrs.get("n_inputs_start")
                return Segment(segment, index, b, k, None if start is None else int(start), int(f.attrs["n_inputs_done"]))
        except (OSError, KeyError) as e:
            self._refuse(f"segment {segment.name} is unreadable ({e}); start over with --overwrite")

    def rewind(self, n_images: int, n_skipped: int, n_inputs_done: int) -> None:
        """Drop the segments after the commit that reached ``n_inputs_done`` (to realign two files written
        side by side)."""
        with file_system_errors(self.partial, resumable=True):
            while self._segments and self._segments[-1].n_inputs_done > n_inputs_done:
                self._segments.pop().path.unlink()
        if (self.n_images, self.n_skipped, self.n_inputs_done) != (n_images, n_skipped, n_inputs_done):
            raise AttnflowError(f"cannot realign {self.partial} with its companion file: their batches differ")

    # -- appending ------------------------------------------------------------------------------------
    @property
    def n_images(self) -> int:
        return sum(s.n_images for s in self._segments)

    @property
    def n_skipped(self) -> int:
        return sum(s.n_skipped for s in self._segments)

    @property
    def n_inputs_done(self) -> int:
        return self._segments[-1].n_inputs_done if self._segments else 0

    def append(
        self,
        rows: dict[str, np.ndarray],
        image_ids: Sequence[str],
        n_inputs_done: int,
        labels: Sequence[int] | None = None,
        skipped: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Write one batch as a segment and commit it by renaming it into place."""
        index = self._segments[-1].index + 1 if self._segments else 0
        final = self.partial / f"seg-{index:08d}.h5"
        tmp = final.with_name(final.name + ".tmp")
        with in_memory_hdf5() as f:
            self._write_rows(f, rows, image_ids, labels, skipped)
            f.attrs["n_inputs_start"] = self.n_inputs_done
            f.attrs["n_inputs_done"] = n_inputs_done
        with file_system_errors(tmp, resumable=True, remove=tmp):
            write_atomically(final, f.image)
            _fsync(self.partial)
        self._segments.append(Segment(final, index, len(image_ids), len(skipped), self.n_inputs_done, n_inputs_done))

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

    def assemble(self) -> Path:
        """Copy the segments into ``path`` (replacing an old file only now); the run folder stays."""
        n, m = self.n_images, self.n_skipped
        tmp = self.path.with_name(self.path.name + ".tmp")
        with in_memory_hdf5(libver=("v110", "latest")) as skeleton:
            for key, value in self._attrs.items():
                skeleton.attrs[key] = value
            skeleton.attrs.update({"n_images": n, "n_skipped": m, "n_inputs_done": self.n_inputs_done, "complete": True})
            self._create_datasets(skeleton, n, m)
            for name, data in self._static.items():
                skeleton.create_dataset(name, data=data)
        with file_system_errors(tmp, resumable=True, remove=tmp):
            _write_reserved(tmp, skeleton.image, self._assembled_size_bound())
            with h5py.File(tmp, "r+") as out:
                row, skip = 0, 0
                for segment in self._segments:
                    b, k = segment.n_images, segment.n_skipped
                    with h5py.File(segment.path, "r") as seg:
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
        return self.path

    def _assembled_size_bound(self) -> int:
        """Bytes that certainly hold the assembled file: the segments (they store the same compressed
        chunks, plus per-file overhead), datasets that stay uncompressed rounded up to whole chunks, slack."""
        n = self.n_images
        uncompressed = sum(
            math.ceil(n / spec.chunks[0]) * spec.chunks[0] * math.prod(spec.row_shape) * np.dtype(spec.dtype).itemsize
            for spec in self._rows.values() if not (spec.compressed and self._compression != "none")
        )
        strings = 16 * 1024 * (math.ceil(n / 1024) + 2 * math.ceil(self.n_skipped / 256) + 1)
        segments = sum(segment.path.stat().st_size for segment in self._segments)
        return int(1.25 * (segments + uncompressed + strings)) + (4 << 20)

    def cleanup(self) -> None:
        """Remove the run folder of an assembled file, then give up the run (and its lock)."""
        with contextlib.suppress(FileNotFoundError):
            (self.partial / self.MANIFEST).unlink()  # first: a folder without it is a finished run's remains
        shutil.rmtree(self.partial, ignore_errors=True)
        self.close()
        self._lock.release()

    def finish(self) -> Path:
        """Assemble the segments into ``path`` and remove the run folder."""
        path = self.assemble()
        self.cleanup()
        return path

    def close(self) -> None:
        """Stop writing (after an error, the committed segments stay for ``--resume``)."""
        if self._gzip is not None:
            self._gzip.close()
            self._gzip = None
        self._lock.release()


def _segment_index(segment: Path) -> int | None:
    digits = segment.name[len("seg-"):-len(".h5")]
    return int(digits) if digits.isdigit() else None


def _os_errno(error: Exception) -> int | None:
    """The errno of a failed write, also where h5py only names it in its message (``errno = 28``)."""
    if getattr(error, "errno", None) is not None:
        return error.errno
    found = re.search(r"errno = (\d+)", str(error))
    return int(found.group(1)) if found else None


@contextlib.contextmanager
def file_system_errors(path: Path, *, resumable: bool, remove: Path | None = None):
    """Turn a file system's refusal (full disk, quota, read-only, permissions) while writing ``path`` into
    one line that says what to do, after removing the half-written ``remove``."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not isinstance(e, OSError) and _os_errno(e) is None:
            raise  # a RuntimeError is a file system's only when HDF5 names the errno (it does so on close)
        if remove is not None:
            with contextlib.suppress(OSError):
                remove.unlink()
        code = _os_errno(e)
        reason = os.strerror(code).lower() if code else str(e).split("(")[0].strip().rstrip(".") or "i/o error"
        advice = {
            errno.ENOSPC: "free space", errno.EDQUOT: "free space within your quota",
            errno.EFBIG: "raise the file size limit (ulimit -f) or write elsewhere",
        }.get(code, "check that the location is writable")
        if resumable:
            advice += ", then rerun with --resume"
        raise AttnflowError(f"{reason} writing {path}; {advice}") from None


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


class in_memory_hdf5(contextlib.AbstractContextManager):
    """Build an HDF5 file in memory; once the block ends, ``.image`` holds its bytes.

    attnflow never lets HDF5 itself write to a disk that may fill up: a failed write inside HDF5 crashes
    the process (h5py issue 914) instead of raising. Bytes built here reach the disk through plain file
    I/O, whose failures are ordinary errors; the one large file HDF5 writes in place, the assembled
    output, gets its space reserved first (:func:`_write_reserved`).
    """

    def __init__(self, **kwargs: Any):
        self._file = h5py.File(f"attnflow-{uuid.uuid4().hex}.h5", "w", driver="core", backing_store=False, **kwargs)
        self.attrs = self._file.attrs
        self.image = b""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __getitem__(self, name: str) -> Any:
        return self._file[name]

    def __contains__(self, name: str) -> bool:
        return name in self._file

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self._file.flush()
            self.image = self._file.id.get_file_image()
        self._file.close()


def _write_reserved(path: Path, image: bytes, size: int) -> None:
    """Write a small HDF5 file ``image`` to ``path`` with ``size`` bytes of disk space allocated behind it,
    so that HDF5 can grow it in place without a write failing (HDF5 trims the unused end when it closes the
    file). A full disk or a file size limit fails here, as an ordinary error."""
    with open(path, "wb") as f:
        f.write(image)
        f.flush()
        try:
            os.posix_fallocate(f.fileno(), 0, max(size, len(image)))
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise  # a file system that cannot reserve space goes on unguarded


def write_atomically(path: Path, data: bytes) -> None:
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


def _read_attrs(path: Path, f: h5py.File) -> dict[str, Any]:
    """:func:`file_attrs`, with one line naming an attribute HDF5 cannot read."""
    attrs = {}
    for key in f.attrs:
        try:
            attrs[key] = _plain(f.attrs[key])
        except (OSError, TypeError, ValueError) as e:
            raise AttnflowError(f"{path}: attribute '{key}' is unreadable ({e})") from None
    return attrs


# -- what a finished file holds -------------------------------------------------------------------------
# Readers check a file against these tables when they open it (attributes, dataset shapes and dtypes, the
# sources of virtual datasets), and check the values of the per-image datasets as they read them, so that
# no number is computed from input nobody checked.


class Expect(NamedTuple):
    """What one dataset must look like.

    ``shape`` is spelled in the symbols of the module docstring: n, L, H, T, p and P come from the root
    attributes, D, K and m from the first dataset (or ``n_skipped``) that fixes them, and ``...`` allows any
    further axes. ``kind`` is ``float``, ``int`` or ``text``. ``values`` is what every read is checked for:
    ``attention`` (rows of a post-softmax map), ``finite``, ``fraction`` (in [0, 1], or NaN for an image
    without a mask), ``metric`` (finite, NaN only where the metric is undefined, see ``METRIC_NAN``).
    ``axes`` names the leading axes in messages.
    """

    shape: tuple[str, ...]
    kind: str
    values: str = ""
    axes: tuple[str, ...] = ()


_FILE_DATASETS = {
    "image_ids": Expect(("n",), "text"),
    "labels": Expect(("n",), "int"),
    "class_names": Expect(("K",), "text"),
    "skipped": Expect(("m",), "text"),
    "skipped_reason": Expect(("m",), "text"),
    "fg": Expect(("n", "P"), "float", "fraction", ("image", "patch")),
}
CACHE_DATASETS = {
    **_FILE_DATASETS,
    "magnitude": Expect(("n", "L", "T"), "float", "finite", ("image", "layer", "token")),
    "attn": Expect(("n", "L", "H", "T", "T"), "float", "attention", ("image", "layer", "head", "query")),
    "attn_rows": Expect(("n", "L", "H", "p", "T"), "float", "attention", ("image", "layer", "head", "row")),
    "tokens": Expect(("n", "T", "D"), "float", "finite", ("image", "token", "channel")),
    "final_norm_weight": Expect(("D",), "float", "finite", ("channel",)),
    "final_norm_bias": Expect(("D",), "float", "finite", ("channel",)),
}
METRICS_DATASETS = {
    **_FILE_DATASETS,
    ROLLOUT_MAP: Expect(("n", "L", "P"), "float", "", ("image", "layer", "patch")),
}
# ``metrics/<name>`` by the level of the metric (:data:`attnflow.metrics.HEAD_METRICS`, ``LAYER_METRICS``,
# ``IMAGE_METRICS``); a name this attnflow does not know only needs a row per image.
METRIC_DATASETS = {
    "head": Expect(("n", "L", "H"), "float", "metric", ("image", "layer", "head")),
    "layer": Expect(("n", "L"), "float", "metric", ("image", "layer")),
    "image": Expect(("n",), "float", "metric", ("image",)),
    None: Expect(("n", "..."), "float", "metric", ("image", "layer", "head")),
}
# Where a metric may legitimately be NaN: ``no_cls`` (always, for a model without a cls token), ``cls_mass``
# (where the cls row puts no attention on patches, so its distribution over patches is undefined: checked
# against ``cls_to_patch`` when the file has it), ``no_mask`` (images without an object mask: their ``fg``
# row is NaN), ``one_patch`` (normalised entropies of a 1-patch grid), ``undefined`` (a distribution over
# patches that can be undefined, with nothing in the file to check it against). Other NaNs are errors.
METRIC_NAN = {
    "cls_self": ("no_cls",), "cls_to_patch": ("no_cls",), "cls_to_registers": ("no_cls",), "patch_to_cls": ("no_cls",),
    "patch_self": (), "cls_entropy": ("no_cls", "cls_mass"), "cls_entropy_norm": ("no_cls", "cls_mass", "one_patch"),
    "patch_entropy": ("undefined",), "patch_entropy_norm": ("undefined",), "cls_top10_mass": ("no_cls", "cls_mass"),
    "cls_eff_frac": ("no_cls", "cls_mass"), "cls_gini": ("no_cls", "cls_mass"), "attn_distance": ("undefined",),
    "cls_fg_mass": ("no_cls", "cls_mass", "no_mask"), "magnitude_cls": ("no_cls",), "magnitude_patch": (),
    "rollout_entropy_norm": ("undefined",), "rollout_top10_mass": ("undefined",), "rollout_fg_mass": ("undefined",),
    "fg_frac": ("no_mask",),
}
_NAN_REASONS = {
    "no_cls": "for a model without a cls token", "cls_mass": "where the cls row puts no attention on patches",
    "no_mask": "for an image without an object mask", "one_patch": "with a single patch",
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# What a root attribute's value must be: a description for messages, and the test.
_ATTR_KINDS = {
    "count": ("a non-negative integer", lambda v: _is_int(v) and v >= 0),
    "positive": ("a positive integer", lambda v: _is_int(v) and v > 0),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "size": ("two positive integers", lambda v: isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v)),
    "text": ("text", lambda v: isinstance(v, str)),
    "number": ("a finite number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))),
    "store": (f"one of {', '.join(STORE_MODES)}", lambda v: isinstance(v, str) and v in STORE_MODES),
    "dtype": (f"one of {', '.join(DTYPES)}", lambda v: isinstance(v, str) and v in DTYPES),
}
FILE_ATTRS = {
    "label": "text", "family": "text", "n_images": "count", "num_layers": "positive", "num_heads": "positive",
    "num_tokens": "positive", "num_prefix_tokens": "count", "has_cls": "bool", "num_registers": "count",
    "grid_size": "size", "patch_size": "size", "img_size": "size",
}
CACHE_ATTRS = {**FILE_ATTRS, "store": "store", "dtype": "dtype", "preprocessing": "text"}
METRICS_ATTRS = {**FILE_ATTRS, "fusion": "text", "discard_ratio": "number"}
# Checked where present.
OPTIONAL_ATTRS = {"n_skipped": "count", "has_labels": "bool", "has_tokens": "bool", "has_masks": "bool", "final_norm_eps": "number"}
PREPROCESSING_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def _check_attrs(path: Path, attrs: dict[str, Any], kinds: dict[str, str]) -> None:
    for key, kind in {**kinds, **OPTIONAL_ATTRS}.items():
        if key not in attrs:
            if key in kinds:
                raise AttnflowError(f"{path} lacks attribute '{key}'")
            continue
        what, ok = _ATTR_KINDS[kind]
        if not ok(attrs[key]):
            raise AttnflowError(f"{path}: attribute '{key}' is {attrs[key]!r}, not {what}")
    T, p, cls, registers = attrs["num_tokens"], attrs["num_prefix_tokens"], int(attrs["has_cls"]), attrs["num_registers"]
    (gh, gw), (ph, pw), (ih, iw) = attrs["grid_size"], attrs["patch_size"], attrs["img_size"]
    for consistent, message in (
        (T == p + gh * gw, f"num_tokens is {T}, but num_prefix_tokens + grid_size[0] x grid_size[1] is {p} + {gh} x {gw} = {p + gh * gw}"),
        (p >= cls, "has_cls is true but num_prefix_tokens is 0 (the cls token is a prefix token)"),
        (registers == p - cls, f"num_registers is {registers}, but num_prefix_tokens - has_cls is {p} - {cls} = {p - cls}"),
        # the writer records the patch grid's extent (grid x patch); a wider input (pixels left over) is tolerated
        (gh * ph <= ih and gw * pw <= iw, f"img_size {ih}x{iw} is smaller than grid_size x patch_size = {gh * ph}x{gw * pw}"),
    ):
        if not consistent:
            raise AttnflowError(f"{path}: inconsistent layout attributes: {message}")
    if "preprocessing" in kinds:
        _preprocessing(path, attrs)
    if "final_norm_eps" in attrs and not attrs["final_norm_eps"] > 0:
        raise AttnflowError(f"{path}: attribute 'final_norm_eps' is {attrs['final_norm_eps']!r}, not a positive number")


def _preprocessing(path: Path, attrs: dict[str, Any]) -> dict[str, Any]:
    try:
        pre = json.loads(attrs["preprocessing"])
    except ValueError:
        pre = None
    if not isinstance(pre, dict) or any(k not in pre for k in PREPROCESSING_KEYS):
        raise AttnflowError(f"{path}: attribute 'preprocessing' is not the JSON of a data config with {', '.join(PREPROCESSING_KEYS)}")
    return pre


def _symbols(attrs: dict[str, Any]) -> dict[str, int]:
    T, p = attrs["num_tokens"], attrs["num_prefix_tokens"]
    symbols = {"n": attrs["n_images"], "L": attrs["num_layers"], "H": attrs["num_heads"], "T": T, "p": p, "P": T - p}
    if "n_skipped" in attrs:
        symbols["m"] = attrs["n_skipped"]
    return symbols


_KIND_TEST = {"float": ("floating-point values", "f"), "int": ("integers", "iu"), "text": ("text", "OSU")}


def _check_dataset(path: Path, name: str, obj: Any, expect: Expect, symbols: dict[str, int]) -> None:
    """``obj`` has ``expect``'s kind and shape; binds the symbols it is the first to fix."""
    if not isinstance(obj, h5py.Dataset):
        raise AttnflowError(f"{path}: '{name}' is a group, not a dataset")
    what, kinds = _KIND_TEST[expect.kind]
    if obj.dtype.kind not in kinds:
        raise AttnflowError(f"{path}: dataset '{name}' holds {obj.dtype}, not {what}")
    shape, want = obj.shape, expect.shape
    free = want[-1] == "..."
    fixed = want[:-1] if free else want
    if len(shape) < len(fixed) or (not free and len(shape) != len(fixed)):
        raise AttnflowError(f"{path}: dataset '{name}' has shape {shape}, expected {len(fixed)} axes ({', '.join(want)})")
    for size, symbol in zip(shape, fixed):
        if symbol not in symbols:
            symbols[symbol] = size
        elif symbols[symbol] != size:
            if symbol == "n":
                raise AttnflowError(f"{path}: dataset '{name}' has {size} rows, n_images is {symbols['n']}")
            expected = tuple(symbols.get(s, "?") for s in fixed)
            spelled = f"({', '.join(fixed)}{',' if len(fixed) == 1 else ''})"
            raise AttnflowError(f"{path}: dataset '{name}' has shape {shape}, expected {spelled} = {expected}")


def _metric_expect(name: str) -> Expect:
    from .metrics import HEAD_METRICS, IMAGE_METRICS, LAYER_METRICS

    metric = name[len(METRICS_GROUP) + 1:]
    level = "head" if metric in HEAD_METRICS else "layer" if metric in LAYER_METRICS else "image" if metric in IMAGE_METRICS else None
    return METRIC_DATASETS[level]


def _check_virtual_sources(path: Path, f: h5py.File) -> None:
    """Every virtual dataset's rows come from a source that is there, holds the dataset, and is long enough.

    HDF5 reads a missing source as fill values (zeros) without a word; a distributed run's file points into
    ``<file>.shards/`` by paths relative to the file's folder, where HDF5 looks for them first.
    """
    virtual: list[str] = []
    f.visititems(lambda name, obj: virtual.append(name) if isinstance(obj, h5py.Dataset) and obj.is_virtual else None)
    opened: dict[str, h5py.File] = {}
    try:
        for name in virtual:
            dataset = f[name]
            covered, followed = np.zeros(dataset.shape[0] if dataset.ndim else 1, dtype=bool), True
            for source in dataset.virtual_sources():
                if source.file_name == ".":
                    where, holder = path, f
                else:
                    where = Path(source.file_name) if os.path.isabs(source.file_name) else path.parent / source.file_name
                    holder = opened.get(source.file_name)
                    if holder is None:
                        holder = opened[source.file_name] = _open_source(path, name, source.file_name, where)
                src = holder.get(source.dset_name)
                if not isinstance(src, h5py.Dataset):
                    raise AttnflowError(f"{path} reads {name} from {where}, which has no dataset '{source.dset_name}': re-extract")
                need = _extent(source.src_space, source.vspace)
                if need is not None and (src.ndim != len(need) or any(have < want for have, want in zip(src.shape, need))):
                    raise AttnflowError(
                        f"{path} reads {name} rows of shape {need} from {where}, whose '{source.dset_name}' has shape "
                        f"{src.shape}: the shard is not the one this file was assembled from; re-extract"
                    )
                if src.dtype != dataset.dtype:
                    raise AttnflowError(f"{path} reads {name} ({dataset.dtype}) from {where}, whose '{source.dset_name}' is {src.dtype}: re-extract")
                rows = _rows_mapped(source.vspace, dataset.shape)
                if rows is None:
                    followed = False  # a mapping more intricate than whole rows: leave coverage to HDF5
                else:
                    covered[rows[0]:rows[1]] = True
            if followed and dataset.ndim and not covered.all():
                gap = int(np.flatnonzero(~covered)[0])
                raise AttnflowError(f"{path}: no source holds row {gap} of {name}, which would read as zeros; re-extract")
    finally:
        for holder in opened.values():
            holder.close()


def _open_source(path: Path, name: str, file_name: str, where: Path) -> h5py.File:
    if not where.is_file():
        folder = Path(file_name).parts[0] if len(Path(file_name).parts) > 1 else None
        keep = f"the {folder} folder" if folder and not (path.parent / folder).is_dir() else where.name
        raise AttnflowError(
            f"{path} reads its rows from {file_name}, which is missing (looked in {where.parent}): keep {keep} next to "
            "the file (or re-extract)"
        )
    try:
        return h5py.File(where, "r")
    except OSError as e:
        reason = str(e).split("(")[0].strip().rstrip(".") or "unreadable"
        raise AttnflowError(f"{path} reads {name} from {where}, which is not a readable HDF5 file ({reason}): re-extract") from None


def _extent(space: h5py.h5s.SpaceID, vspace: h5py.h5s.SpaceID) -> tuple[int, ...] | None:
    """The smallest shape a source dataset needs for this mapping of ``space`` (of the source) onto ``vspace``
    (of the virtual dataset); None when nothing is selected or the mapping is more intricate than a block."""
    kind = space.get_select_type()
    if kind == h5py.h5s.SEL_NONE:
        return None
    if kind != h5py.h5s.SEL_ALL:
        _, end = space.get_select_bounds()
        return tuple(e + 1 for e in end)
    # the whole source, whatever its extent, fills the block selected in the virtual dataset
    if vspace.get_select_type() != h5py.h5s.SEL_HYPERSLABS:
        return None
    start, end = vspace.get_select_bounds()
    block = tuple(e - s + 1 for s, e in zip(start, end))
    return block if vspace.get_select_npoints() == int(np.prod(block)) else None


def _rows_mapped(space: h5py.h5s.SpaceID, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """The rows [start, stop) of a virtual dataset one mapping fills (None when it does not fill whole rows)."""
    kind = space.get_select_type()
    if kind == h5py.h5s.SEL_ALL:
        return 0, shape[0] if shape else 1
    if kind == h5py.h5s.SEL_NONE or not shape:
        return None
    start, end = space.get_select_bounds()
    if space.get_select_npoints() != int(np.prod([e - s + 1 for s, e in zip(start, end)])):
        return None  # not one solid block
    if any(s != 0 or e != d - 1 for s, e, d in zip(start[1:], end[1:], shape[1:])):
        return None
    return start[0], end[0] + 1


def validate(path: Path, f: h5py.File, attrs: dict[str, Any], kind: type["_AttnflowFile"]) -> None:
    """Raise an :class:`AttnflowError` naming the first thing in ``f`` that is not a finished file of ``kind``
    should hold: root attributes (types, and the layout's consistency), datasets (presence, dtype, shape),
    the sources of virtual datasets, and labels within the class names."""
    try:
        _validate(path, f, attrs, kind)
    except OSError as e:  # HDF5 cannot read a part of the file's structure
        raise AttnflowError(f"{path} is damaged: HDF5 cannot read it ({e}); re-extract it") from None


def _validate(path: Path, f: h5py.File, attrs: dict[str, Any], kind: type["_AttnflowFile"]) -> None:
    _check_attrs(path, attrs, kind.attributes)
    symbols = _symbols(attrs)
    for name in kind.required_datasets(attrs):
        if name not in f:
            raise AttnflowError(f"{path} lacks dataset '{name}'")
    for name, expect in kind.datasets.items():
        if name in f:
            _check_dataset(path, name, f[name], expect, symbols)
    if kind.datasets is METRICS_DATASETS and METRICS_GROUP in f:
        group = f[METRICS_GROUP]
        if not isinstance(group, h5py.Group):
            raise AttnflowError(f"{path}: '{METRICS_GROUP}' is a dataset, not the group of metrics")
        for name in group:
            key = f"{METRICS_GROUP}/{name}"
            _check_dataset(path, key, group[name], _metric_expect(key), symbols)
    _check_virtual_sources(path, f)
    if kind is Cache and attrs["store"] != "none":
        maps = "attn" if attrs["store"] == "full" else "attn_rows"
        if str(f[maps].dtype) != attrs["dtype"]:
            raise AttnflowError(f"{path}: dataset '{maps}' holds {f[maps].dtype}, but the attribute dtype says {attrs['dtype']}")
    if "labels" in f:
        if "class_names" not in f:
            raise AttnflowError(f"{path} has labels but no dataset 'class_names' to name them")
        try:
            labels = f["labels"][()]
        except OSError as e:
            raise AttnflowError(f"{path}: cannot read labels ({e}); the file is damaged, re-extract it") from None
        bad = np.flatnonzero((labels < 0) | (labels >= symbols["K"]))
        if len(bad):
            i = int(bad[0])
            raise AttnflowError(
                f"{path}: label {labels[i]} of image {i} is not an index into class_names ({symbols['K']} classes)"
            )


_KIND = {SCHEMA: "an attention cache", METRICS_SCHEMA: "a metrics file"}


class _AttnflowFile:
    """A finished attnflow file of one schema, read lazily and validated.

    Opening checks the file against the tables above; ``file[name]`` gives a :class:`CheckedDataset` whose
    reads check their values (and turn a damaged chunk into one line), as does :meth:`read_rows`.
    """

    schema = ""
    hint = ""  # what to do when handed the other kind of file
    attributes: dict[str, str] = FILE_ATTRS
    datasets: dict[str, Expect] = _FILE_DATASETS

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._gzip: _ParallelGzip | None = None
        self.file = open_hdf5(self.path)
        try:
            self.attrs = _read_attrs(self.path, self.file)
            self._check_schema()
            validate(self.path, self.file, self.attrs, type(self))
            self.layout = layout_from_attrs(self.attrs)
        except BaseException:
            self.file.close()
            raise

    def _check_schema(self) -> None:
        schema = self.attrs.get("schema")
        if schema is None:
            raise AttnflowError(f"{self.path} is not an attnflow file (no 'schema' attribute)")
        if schema != self.schema:
            if isinstance(schema, str) and schema in _KIND:
                raise AttnflowError(f"{self.path} is {_KIND[schema]}, not {_KIND[self.schema]}{self.hint}")
            raise AttnflowError(f"{self.path} has schema '{schema}'; this attnflow reads '{self.schema}'")
        if not self.attrs.get("complete", False):
            raise AttnflowError(f"{self.path} is unfinished; continue it with --resume")

    @classmethod
    def required_datasets(cls, attrs: dict[str, Any]) -> list[str]:
        """The datasets a file with these attributes must hold."""
        return ["image_ids", "skipped", "skipped_reason", *(["labels", "class_names"] if attrs.get("has_labels") else []),
                *(["fg"] if attrs.get("has_masks") else [])]

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._gzip is not None:
            self._gzip.close()
        self.file.close()

    def __getitem__(self, name: str) -> "CheckedDataset":
        if name not in self.file:
            raise AttnflowError(f"{self.path} has no dataset '{name}'")
        dataset = self.file[name]
        if not isinstance(dataset, h5py.Dataset):
            raise AttnflowError(f"{self.path}: '{name}' is a group, not a dataset")
        return CheckedDataset(self, name, dataset)

    def read_rows(self, name: str, start: int, stop: int, *, device: Any = None) -> Any:
        """Rows ``start:stop`` of dataset ``name``, their values checked; attnflow's own gzip chunks are
        decompressed in parallel (HDF5 would inflate them one after another in this thread).

        With ``device`` (a torch device), a float32 tensor there, checked there (on a GPU the check is free).
        """
        dataset = self[name].dataset
        stop = max(start, min(stop, dataset.shape[0]))
        if _ParallelGzip.readable(dataset):
            if self._gzip is None:
                self._gzip = _ParallelGzip()
            read = lambda: self._gzip.read(dataset, start, stop)  # noqa: E731
        else:
            read = lambda: dataset[start:stop]  # noqa: E731
        data = self._fetch(name, dataset, read, np.arange(start, stop))
        if device is not None:
            import torch

            data = torch.from_numpy(data).to(device)
            data = data.float() if data.is_floating_point() else data
        self._check_values(name, data, [np.arange(start, stop), *(np.arange(d) for d in dataset.shape[1:])])
        return data

    def _read(self, name: str, dataset: h5py.Dataset, key: Any) -> np.ndarray:
        """``dataset[key]``, checked (what a :class:`CheckedDataset` read does)."""
        selection = _selection(key, dataset.shape)
        rows = None if selection is None else np.atleast_1d(selection[0]) if dataset.ndim else None
        data = self._fetch(name, dataset, lambda: dataset[key], rows)
        self._check_values(name, data, selection)
        return data

    def _fetch(self, name: str, dataset: h5py.Dataset, read: Any, rows: np.ndarray | None) -> np.ndarray:
        """``read()``, with a damaged chunk (HDF5's or attnflow's own gzip reader's complaint) as one line
        naming the file, the dataset and the first image that cannot be read."""
        try:
            return read()
        except (OSError, zlib.error) as e:
            reason = str(e) or type(e).__name__
        except ValueError as e:  # a chunk that inflates to the wrong size
            if "reshape" not in str(e):
                raise
            reason = str(e)
        span = "" if rows is None or not len(rows) else f" (reading rows {rows.min()}:{rows.max() + 1})"
        for i in rows if rows is not None else ():
            try:
                dataset[int(i)]
            except (OSError, ValueError):
                raise AttnflowError(
                    f"{self.path}: cannot read {name} of image {int(i)} ({self._image_id(int(i))}){span}: {reason}; "
                    "the file is damaged, re-extract it"
                ) from None
        raise AttnflowError(f"{self.path}: cannot read {name}{span}: {reason}; the file is damaged, re-extract it")

    def _image_id(self, index: int) -> str:
        try:
            value = self.file["image_ids"][index]
        except (OSError, ValueError, IndexError, KeyError):
            return "image id unreadable"
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    def _expect(self, name: str) -> Expect | None:
        if name.startswith(METRICS_GROUP + "/") and isinstance(self, MetricsFile):
            return _metric_expect(name)
        return self.datasets.get(name)

    def _check_values(self, name: str, data: Any, selection: list | None) -> None:
        """Raise if values read from ``name`` at ``selection`` (see :func:`_selection`) are not what the file
        promises: the message names the file, the dataset and the image (layer, head ...) of the first bad one."""
        expect = self._expect(name)
        if expect is None or not expect.values or not getattr(data, "size", 1) or (hasattr(data, "numel") and not data.numel()):
            return
        if expect.values == "attention":
            problem = self._attention_problem(name, data, selection)
        elif expect.values == "finite":
            problem = _nonfinite(data)
        elif expect.values == "fraction":
            problem = _not_fraction(data)
        else:
            problem = self._metric_problem(name, np.asarray(data), selection)
        if problem is not None:
            what, position = problem
            raise AttnflowError(f"{self.path}: {name}{self._where(expect, selection, position)}: {what}")

    def _attention_problem(self, name: str, data: Any, selection: list | None) -> tuple[str, tuple[int, ...]] | None:
        import torch

        from .capture import ROW_SUM_TOLERANCE, attention_problem

        T = int(self.attrs["num_tokens"])
        last = None if selection is None else selection[-1]
        if isinstance(last, np.ndarray) and len(last) == T and np.array_equal(np.sort(last), np.arange(T)):
            stored = np.dtype(self.file[name].dtype)
            # capture's tolerance, plus rounding each value to the stored dtype (half an ulp relative each, so at
            # most eps / 2 over a row summing to 1; eps for margin) and float32 summation
            tolerance = ROW_SUM_TOLERANCE + float(np.finfo(stored).eps) + T * 2.0 ** -24
            return attention_problem(torch.from_numpy(data) if isinstance(data, np.ndarray) else data, tolerance)
        # part of each row: every value still lies in [0, 1]
        values = data.cpu().numpy() if hasattr(data, "cpu") else np.asarray(data)
        problem = _nonfinite(values)
        if problem is None and values.size and values.min() < 0:
            problem = (f"holds negative values (min {values.min():.3g})", tuple(int(i) for i in np.unravel_index(values.argmin(), values.shape)))
        return problem

    def _metric_problem(self, name: str, values: np.ndarray, selection: list | None) -> tuple[str, tuple[int, ...]] | None:
        """Finite values; NaN only where :data:`METRIC_NAN` says the metric can be undefined."""
        reasons = METRIC_NAN.get(name[len(METRICS_GROUP) + 1:], ("undefined",))
        infinite = np.isinf(values)
        if infinite.any():
            return "is infinite", _first(infinite)
        nan = np.isnan(values)
        if "no_cls" in reasons and not self.attrs["has_cls"]:
            if not nan.all():
                return "holds a number, but the model has no cls token (has_cls is false), so it must be NaN", _first(~nan)
            return None
        if not nan.any() or "undefined" in reasons or ("one_patch" in reasons and self.layout.num_patches == 1):
            return None
        allowed = np.zeros(values.shape, dtype=bool)
        if "cls_mass" in reasons:
            mass = self.file.get(f"{METRICS_GROUP}/cls_to_patch")
            if mass is None or selection is None or mass.shape != self.file[name].shape:
                return None  # nothing to check it against
            allowed |= _take(mass[()], selection) == 0
        if "no_mask" in reasons:
            if "fg" not in self.file or selection is None:
                return None
            no_mask = np.isnan(self.file["fg"][()]).any(axis=-1)[selection[0]]
            allowed |= np.reshape(no_mask, np.shape(no_mask) + (1,) * (values.ndim - np.ndim(no_mask)))
        bad = nan & ~allowed
        if not bad.any():
            return None
        when = [_NAN_REASONS[r] for r in reasons if r in _NAN_REASONS]
        return f"is NaN, which it can only be {' or '.join(when)}" if when else "is NaN, which it never is", _first(bad)

    def _where(self, expect: Expect, selection: list | None, position: tuple[int, ...] | None) -> str:
        """`` of image 3 (path), layer 1, head 0``: where in the dataset ``position`` (in the read values) lies."""
        if selection is None or position is None:
            return ""
        parts, j = [], 0
        for label, sel in zip(expect.axes, selection):
            if isinstance(sel, (int, np.integer)):
                index = int(sel)
            elif j < len(position):
                index, j = int(sel[position[j]]), j + 1
            else:
                break
            parts.append(f"image {index} ({self._image_id(index)})" if label == "image" else f"{label} {index}")
        return " of " + ", ".join(parts) if parts else ""

    def __contains__(self, name: str) -> bool:
        return name in self.file

    def __len__(self) -> int:
        return int(self.attrs["n_images"])

    @property
    def image_ids(self) -> list[str]:
        return [s.decode("utf-8") if isinstance(s, bytes) else s for s in self["image_ids"][:]]

    @property
    def class_names(self) -> list[str] | None:
        if "class_names" not in self.file:
            return None
        return [s.decode("utf-8") if isinstance(s, bytes) else s for s in self["class_names"][:]]


class CheckedDataset:
    """A dataset of an open attnflow file whose reads (``dataset[...]``) are checked: values as its
    :class:`Expect` says, a damaged chunk as one line. Everything else (``shape``, ``dtype``, ``attrs``, ...)
    is the h5py dataset's, which ``.dataset`` holds."""

    def __init__(self, owner: _AttnflowFile, name: str, dataset: h5py.Dataset):
        self.owner, self.name, self.dataset = owner, name, dataset

    def __getitem__(self, key: Any) -> np.ndarray:
        return self.owner._read(self.name, self.dataset, key)

    def __getattr__(self, attr: str) -> Any:
        if attr in ("owner", "name", "dataset"):
            raise AttributeError(attr)
        return getattr(self.dataset, attr)

    def __len__(self) -> int:
        return len(self.dataset)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = self[()]
        return data if dtype is None else data.astype(dtype)

    def __repr__(self) -> str:
        return f"<checked {self.dataset!r} of {self.owner.path}>"


def _selection(key: Any, shape: tuple[int, ...]) -> list | None:
    """Per axis of a dataset of ``shape``, what ``dataset[key]`` reads: an int (the axis is dropped from the
    result) or the array of indices kept; None for keys h5py takes that this does not follow (masks, fields)."""
    key = key if isinstance(key, tuple) else (key,)
    ellipses = [i for i, k in enumerate(key) if k is Ellipsis]
    if len(ellipses) > 1:
        return None
    if ellipses:
        i = ellipses[0]
        key = key[:i] + (slice(None),) * (len(shape) - len(key) + 1) + key[i + 1:]
    if len(key) > len(shape):
        return None
    out: list = []
    for k, size in zip(key + (slice(None),) * (len(shape) - len(key)), shape):
        if isinstance(k, (int, np.integer)) and not isinstance(k, (bool, np.bool_)):
            out.append(int(k) % size if size else int(k))
        elif isinstance(k, slice):
            out.append(np.arange(*k.indices(size)))
        elif isinstance(k, (list, np.ndarray)) and np.ndim(k) == 1 and np.asarray(k).dtype.kind in "iu":
            out.append(np.asarray(k) % size)
        else:
            return None
    return out


def _take(values: np.ndarray, selection: list) -> np.ndarray:
    """``values[key]`` for the key :func:`_selection` described."""
    for axis in reversed(range(len(selection))):
        values = np.take(values, selection[axis], axis=axis)
    return values


def _first(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape)) if mask.ndim else ()


def _nonfinite(data: Any) -> tuple[str, tuple[int, ...]] | None:
    if hasattr(data, "cpu"):  # a torch tensor: one float64 sum says whether all is finite
        import torch

        if bool(torch.isfinite(data.sum(dtype=torch.float64))):
            return None
        data = data.cpu().numpy()
    finite = np.isfinite(data)
    if finite.all():
        return None
    return "holds NaN or infinite values", _first(~finite)


def _not_fraction(data: Any) -> tuple[str, tuple[int, ...]] | None:
    """Object fractions: in [0, 1] (bilinear resampling of a 0/1 mask), or NaN for an image without a mask."""
    values = data.cpu().numpy() if hasattr(data, "cpu") else np.asarray(data)
    if np.isinf(values).any():
        return "holds infinite values", _first(np.isinf(values))
    outside = (values < -1e-4) | (values > 1 + 1e-4)  # NaN compares false
    if outside.any():
        return f"holds {values[_first(outside)]:.3g}, not an object fraction in [0, 1]", _first(outside)
    return None


class Cache(_AttnflowFile):
    """A finished attention cache (``attnflow extract``)."""

    schema = SCHEMA
    hint = " (run `attnflow metrics` on a cache, `attnflow compare` on metrics files)"
    attributes = CACHE_ATTRS
    datasets = CACHE_DATASETS

    @classmethod
    def required_datasets(cls, attrs: dict[str, Any]) -> list[str]:
        maps = {"full": ["attn"], "rows": ["attn_rows"], "none": []}[attrs["store"]]
        return [*super().required_datasets(attrs), "magnitude", *maps, *(["tokens"] if attrs.get("has_tokens") else [])]

    @property
    def preprocessing(self) -> dict[str, Any]:
        return _preprocessing(self.path, self.attrs)


class MetricsFile(_AttnflowFile):
    """A finished metrics file (``attnflow metrics`` or ``attnflow extract --metrics``)."""

    schema = METRICS_SCHEMA
    hint = " (compute one with `attnflow metrics CACHE -o METRICS.h5`)"
    attributes = METRICS_ATTRS
    datasets = METRICS_DATASETS

    @property
    def metric_names(self) -> list[str]:
        group = self.file.get(METRICS_GROUP)
        return sorted(group) if group is not None else []

    def metric(self, name: str) -> CheckedDataset:
        """``metrics/<name>``; its reads are checked (finite, NaN only where the metric can be undefined)."""
        key = f"{METRICS_GROUP}/{name}"
        if key not in self.file:
            raise AttnflowError(f"{self.path} has no metric '{name}' (it has {', '.join(self.metric_names)})")
        return self[key]


def open_cache(path: str | Path) -> Cache:
    """Open and validate an attention cache written by ``attnflow extract``."""
    return Cache(path)


def open_metrics(path: str | Path) -> MetricsFile:
    """Open and validate a metrics file written by ``attnflow metrics``."""
    return MetricsFile(path)


def describe(path: str | Path) -> dict[str, Any]:
    """Attributes and dataset shapes of any attnflow HDF5 file (for ``attnflow info``), also of a broken one:
    what validation finds wrong is said as a warning and listed under ``problems``."""
    import warnings

    path = Path(path)
    with open_hdf5(path) as f:
        if "schema" not in f.attrs:
            raise AttnflowError(f"{path} is not an attnflow file (no 'schema' attribute)")
        datasets: dict[str, Any] = {}

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                datasets[name] = {"shape": list(obj.shape), "dtype": str(obj.dtype) if obj.dtype.kind != "O" else "utf-8"}

        problems = []
        try:
            f.visititems(visit)
        except OSError as e:
            problems.append(f"{path} is damaged: HDF5 cannot list all of it ({e})")
        attrs: dict[str, Any] = {}
        for key in f.attrs:
            try:
                attrs[key] = _plain(f.attrs[key])
            except (OSError, TypeError, ValueError):
                attrs[key] = "<unreadable>"
        kind = {SCHEMA: Cache, METRICS_SCHEMA: MetricsFile}.get(attrs["schema"]) if isinstance(attrs["schema"], str) else None
        if kind is not None:
            try:
                validate(path, f, _read_attrs(path, f), kind)
            except AttnflowError as e:
                problems.append(str(e))
        for problem in problems:
            warnings.warn(problem, stacklevel=2)
        return {"path": str(path), "attrs": attrs, "datasets": datasets, "problems": problems}
