"""Writing attnflow's HDF5 files: the specs that fix a file's shapes and identity, and the crash-safe writer.

A run writes into the folder ``<path>.partial/``, one atomically committed segment file per batch, and
``<path>`` appears only once complete (see :class:`RowFileWriter`; the segments are moved into it by
:mod:`attnflow.store.assembly`), so a finished path always holds a finished file and a killed run loses at
most the batch in flight.
"""
from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import hashlib
import itertools
import json
import os
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

from ..choices import choice_values
from ..errors import AttnflowError
from ..images import image_id
from ..layout import TokenLayout
from ..metrics import ArtifactRule
from ..output import (
    RUN_MARKER, atomic_output, check_output_path, check_run_folder, file_system_errors, fsync as _fsync, make_run_folder,
    remove_run_folder,
)
from ..version import __version__
from .assembly import ASSEMBLY, ASSEMBLY_STATE, Assembly, Segment, in_memory_hdf5
from .names import (
    ATTN, ATTN_ROWS, CLASS_NAMES, FG, FINAL_NORM_BIAS, FINAL_NORM_EPS, FINAL_NORM_WEIGHT, IMAGE_IDS, IMAGE_SHA256,
    LABELS, MAGNITUDE, METRICS_SCHEMA, ROLLOUT_MAP, FLOW_MAP, ROOT_ATTRS, SCHEMA, SKIP_DATASETS, SKIPPED,
    SKIPPED_REASON, TEXT, TOKEN_NORM, TOKENS, Compression, DType, StoreMode, from_text, layout_attrs, metric_dataset,
    partial_path, tokens_dataset,
)
from .scales import attach_dimension_scales
from .validate import file_attrs, plain

__all__ = [
    "RESUME_KEYS", "to_text", "inputs_digest", "masks_digest", "utc_now", "RowDataset", "CacheSpec", "MetricsSpec",
    "GZIP_LEVEL", "RunLock", "RowFileWriter",
]

# Attributes that must agree between an interrupted run and the run that resumes it.
RESUME_KEYS = tuple(name for name, attr in ROOT_ATTRS.items() if attr.identity)
# Per-run bookkeeping a metrics file does not inherit from its cache.
_OWN_ATTRS = ("schema", "created", "complete", "n_images", "n_inputs_done", "n_skipped", "compression")


def to_text(s: str) -> str:
    """Paths may carry undecodable bytes (surrogate escapes); HDF5 text must be valid UTF-8: every text is
    written as an image id is (:func:`attnflow.images.image_id`, reversed by :func:`attnflow.images.path_of_id`)."""
    return image_id(s)


def _text_safe(value):
    """An attribute value HDF5 can store: text (and lists of text) through :func:`to_text` (a working folder or a
    checkpoint path whose name is not UTF-8), anything else as it is."""
    if isinstance(value, str):
        return to_text(value)
    if isinstance(value, list):
        return [_text_safe(v) for v in value]
    return value


def inputs_digest(paths: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for p in paths:
        digest.update(to_text(p).encode("utf-8") + b"\0")
    return digest.hexdigest()


def masks_digest(images: Sequence[Path], masks: Sequence[Path | None]) -> str:
    """SHA-256 over each image's matched mask, its name and its bytes (a resumed run must see the same masks)."""
    from ..checkpoint import file_sha256

    digest = hashlib.sha256()
    for image, mask in zip(images, masks):
        if mask is None:
            continue
        try:
            content = file_sha256(mask)
        except OSError as e:
            raise AttnflowError(f"cannot read mask {mask}: {e.strerror or e}") from None
        digest.update(f"{to_text(str(image))}\0{to_text(mask.name)}\0{content}\n".encode("utf-8"))
    return digest.hexdigest()


def utc_now() -> str:
    """Now, in UTC, ISO 8601 to the second: the root attribute ``created``."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


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
    store: str = StoreMode.full.value
    dtype: str = DType.float16.value
    compression: str = Compression.gzip.value
    token_dim: int | None = None  # set to store ``tokens``
    token_layers: tuple[int, ...] | None = None  # 0-based increasing blocks whose tokens to store; None: the last
    tokens_dtype: str = DType.float32.value  # of the stored tokens
    class_names: list[str] | None = None  # set to store ``labels``
    has_masks: bool = False  # set to store ``fg``
    final_norm: tuple[np.ndarray, np.ndarray, float] | None = None  # LayerNorm (weight, bias, eps), with tokens
    attrs: dict[str, Any] = field(default_factory=dict)  # model identity, preprocessing, inputs
    image_digests: bool = False  # set to store ``image_sha256``

    def __post_init__(self) -> None:
        for value, allowed, what in ((self.store, StoreMode, "store mode"), (self.dtype, DType, "dtype"), (self.compression, Compression, "compression"),
                                     (self.tokens_dtype, DType, "tokens dtype")):
            if value not in choice_values(allowed):
                raise AttnflowError(f"unknown {what} '{value}' (choose from {', '.join(allowed)})")
        if self.store == StoreMode.rows and self.layout.num_prefix_tokens == 0:
            raise AttnflowError("--store rows keeps the cls and register rows, and this model has neither; use full or none")
        layers = self.stored_token_layers
        if not layers or list(layers) != sorted(set(layers)) or not 0 <= layers[0] <= layers[-1] < self.num_layers:
            raise AttnflowError(f"token layers {list(layers)} are not increasing 0-based blocks of the model's {self.num_layers}")

    def root_attrs(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "attnflow_version": __version__,
            "created": utc_now(),
            **self.attrs,
            **layout_attrs(self.layout, self.num_layers, self.num_heads),
            "store": self.store,
            "dtype": self.dtype,
            "compression": self.compression,
            "has_labels": self.class_names is not None,
            "has_tokens": self.token_dim is not None,
            "has_masks": self.has_masks,
            # only when not the default (the last block, float32): absent in every cache before the options
            **({"token_layers": list(self.stored_token_layers)} if self.stored_token_layers != (self.num_layers - 1,) else {}),
            **({"tokens_dtype": self.tokens_dtype} if self.tokens_dtype != DType.float32 else {}),
        }

    @property
    def stored_token_layers(self) -> tuple[int, ...]:
        """The 0-based blocks whose tokens the cache stores (when ``token_dim`` is set)."""
        return tuple(self.token_layers) if self.token_layers is not None else (self.num_layers - 1,)

    @property
    def tokens_dataset(self) -> str:
        """``tokens`` (n, T, D) for one stored block, ``layer_tokens`` (n, S, T, D) for several."""
        return tokens_dataset(len(self.stored_token_layers))

    def row_datasets(self) -> dict[str, RowDataset]:
        L, H, T, p = self.num_layers, self.num_heads, self.layout.num_tokens, self.layout.num_prefix_tokens
        # token_norm too under store=none: a few KB per image, and the artifact metrics need it
        rows = {MAGNITUDE: RowDataset((L, T), "float32", (64, L, T)), TOKEN_NORM: RowDataset((L, T), "float32", (64, L, T))}
        if self.store == StoreMode.full:
            # One chunk per image and layer: reading an image or a layer never decompresses other images.
            rows[ATTN] = RowDataset((L, H, T, T), self.dtype, (1, 1, H, T, T))
        elif self.store == StoreMode.rows:
            rows[ATTN_ROWS] = RowDataset((L, H, p, T), self.dtype, (1, L, H, p, T))
        if self.token_dim is not None:
            D, S = self.token_dim, len(self.stored_token_layers)
            # one chunk per image and block: probing one block never decompresses the others
            rows[self.tokens_dataset] = (RowDataset((T, D), self.tokens_dtype, (1, T, D)) if self.tokens_dataset == TOKENS
                                         else RowDataset((S, T, D), self.tokens_dtype, (1, 1, T, D)))
        if self.has_masks:
            rows[FG] = RowDataset((self.layout.num_patches,), "float32", (256, self.layout.num_patches))
        return rows

    def writer(self, path: str | Path, *, companion: str | Path | None = None, resume: bool = False,
               overwrite: bool = False, reads: Sequence[str | Path] = ()) -> "RowFileWriter":
        static = {}
        attrs = self.root_attrs()
        if self.final_norm is not None:
            weight, bias, eps = self.final_norm
            static = {FINAL_NORM_WEIGHT: np.asarray(weight, np.float32), FINAL_NORM_BIAS: np.asarray(bias, np.float32)}
            attrs[FINAL_NORM_EPS] = float(eps)
        return RowFileWriter(
            path, attrs, self.row_datasets(), class_names=self.class_names, static=static,
            compression=self.compression, companion=companion, resume=resume, overwrite=overwrite, reads=reads,
            image_digests=self.image_digests,
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
    artifact_rule: ArtifactRule = field(default_factory=ArtifactRule)  # recorded as artifact_factor or artifact_norm
    flow_layers: tuple[int, ...] = ()  # 0-based blocks of flow/map (--flow), recorded as flow_layers; () none
    image_digests: bool = False  # set to store ``image_sha256``, as the cache does

    def root_attrs(self) -> dict[str, Any]:
        inherited = {k: v for k, v in self.source_attrs.items() if k not in _OWN_ATTRS}
        return {
            **inherited,
            "schema": METRICS_SCHEMA,
            "attnflow_version": __version__,
            "created": utc_now(),
            "fusion": self.fusion,
            "discard_ratio": float(self.discard_ratio),
            **self.artifact_rule.attrs,
            **({"flow_layers": list(self.flow_layers)} if self.flow_layers else {}),
            "source": self.source,
        }

    def row_datasets(self) -> dict[str, RowDataset]:
        L, H = int(self.source_attrs["num_layers"]), int(self.source_attrs["num_heads"])
        P = int(self.source_attrs["num_tokens"]) - int(self.source_attrs["num_prefix_tokens"])
        shapes = {"head": (L, H), "layer": (L,), "image": ()}
        rows = {
            metric_dataset(name): RowDataset(shapes[level], "float32", (1024, *shapes[level]), False)
            for name, level in self.metric_levels.items()
        }
        if self.has_rollout:
            rows[ROLLOUT_MAP] = RowDataset((L, P), "float32", (64, L, P))
        if self.flow_layers:
            F = len(self.flow_layers)
            rows[FLOW_MAP] = RowDataset((F, P), "float32", (64, F, P))
        if self.source_attrs.get("has_masks"):
            rows[FG] = RowDataset((P,), "float32", (256, P))
        return rows

    def writer(self, path: str | Path, *, companion: str | Path | None = None, resume: bool = False,
               overwrite: bool = False, reads: Sequence[str | Path] = ()) -> "RowFileWriter":
        return RowFileWriter(
            path, self.root_attrs(), self.row_datasets(), class_names=self.class_names,
            compression="gzip", companion=companion, resume=resume, overwrite=overwrite, reads=reads,
            image_digests=self.image_digests,
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

    def close(self) -> None:
        self._pool.shutdown()


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
    ``<path>.partial/``: the marker that proves attnflow made the folder (:func:`attnflow.output.make_run_folder`;
    a folder without it, or a link, is never written into nor deleted), ``manifest.json`` (the file's identity
    and a random run id, written once, atomically), ``lock`` (see :class:`RunLock`: one writer at a time) and
    one small HDF5 file per committed batch, ``seg-NNNNNNNN.h5``, numbered from 0, recording the input range
    it covers and the run id, committed by :func:`attnflow.output.atomic_output`, so a segment either exists
    complete or not at all. ``--resume`` checks that the segments form one unbroken chain of this run and
    continues after the last (a leftover ``*.tmp`` is the batch that was cut off and is discarded).
    :meth:`assemble` moves the segments into ``assembly.h5`` in the folder (compressed chunks byte for byte,
    without recompressing; see :class:`Assembly`) and renames it to ``path``; :meth:`cleanup` then removes the folder, so a
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
        reads: Sequence[str | Path] = (),
        image_digests: bool = False,
    ):
        self.path = Path(path)
        self._reads = reads
        self._digests = image_digests
        self._static = static or {}
        self.partial = partial_path(self.path)
        self._attrs = {k: _text_safe(plain(v)) for k, v in attrs.items()}
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
        check_output_path(self.path, reads=reads)
        self._run_id = uuid.uuid4().hex
        if _is_empty_folder(self.partial):
            self.partial.rmdir()  # a run killed between making its folder and marking it: nothing of anyone's
        if os.path.lexists(self.partial):
            check_run_folder(self.partial)  # before the lock file is created in it: never write into a stranger's folder
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
        if compression == Compression.gzip and self.complete_attrs is None:
            self._gzip = _ParallelGzip()

    # -- the run folder -------------------------------------------------------------------------------
    def _start(self) -> None:
        with file_system_errors(self.partial, resumable=False):
            if not os.path.lexists(self.partial):
                make_run_folder(self.partial, self.path, self._run_id)
            self._lock.acquire()
            for old in self.partial.iterdir():  # --overwrite of an interrupted run (checked to be attnflow's)
                if old.name not in (RunLock.NAME, RUN_MARKER):
                    shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
            manifest = {"attrs": self._attrs, "class_names": self._class_names, "companion": self._companion,
                        "run_id": self._run_id}
            with atomic_output(self.partial / self.MANIFEST) as tmp:
                tmp.write_bytes(json.dumps(manifest, indent=1).encode())

    def _check_complete(self) -> None:
        """``--resume`` of a run that already finished: nothing to do, if it is the same run."""
        try:
            with h5py.File(self.path, "r") as f:
                attrs = file_attrs(f)
                class_names = from_text(f[CLASS_NAMES][()]) if CLASS_NAMES in f else None
        except (OSError, KeyError) as e:
            raise AttnflowError(f"{self.path} exists but is unreadable ({e}); pass --overwrite to replace it") from None
        differing = [key for key in RESUME_KEYS if attrs.get(key) != self._attrs.get(key)]
        if class_names != self._class_names:
            differing.append("class_names")
        if attrs.get("schema") != self._attrs["schema"] or not attrs.get("complete") or differing:
            what = _difference(differing[0], attrs.get(differing[0]), self._attrs.get(differing[0])) if differing else "another kind of run"
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
                self._refuse(f"it was started with {_difference(key, old, new)}")
        if manifest.get("class_names") != self._class_names:
            self._refuse("it was started with other class names")
        if not isinstance(manifest.get("run_id"), str):
            self._refuse(f"{self.MANIFEST} names no run (written by an older attnflow); start over with --overwrite")
        self._run_id = manifest["run_id"]
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
            if (self.partial / ASSEMBLY_STATE).exists():
                self._resume_assembly()
                return
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

    def _resume_assembly(self) -> None:
        """A run killed while it assembled: the segments already in the assembled file are gone, the state
        records them."""
        try:
            run_id, next_segment, records = Assembly.read_records(self.partial / ASSEMBLY_STATE)
            segments = [Segment(self.partial / f"seg-{int(r[0]):08d}.h5", int(r[0]), int(r[1]), int(r[2]),
                                None if r[3] is None else int(r[3]), int(r[4])) for r in records]
        except (OSError, KeyError, ValueError, TypeError, IndexError) as e:
            self._refuse(f"{ASSEMBLY_STATE} is unreadable ({e}); start over with --overwrite")
        if run_id != self._run_id:
            self._refuse(f"{ASSEMBLY_STATE} belongs to another run; start over with --overwrite")
        if not (self.partial / ASSEMBLY).exists():
            if next_segment == len(segments) and self.path.exists():  # assembled and renamed: finished
                self._check_complete()
                self.cleanup()
                return
            self._refuse(f"its partly assembled {ASSEMBLY} is missing; start over with --overwrite")
        for segment in segments[next_segment:]:
            if not segment.path.exists():
                self._refuse(f"segment {segment.path.name} is missing, so the run's rows would have a gap; start over with --overwrite")
            if self._read_segment(segment.path, segment.index) != segment:
                self._refuse(f"segment {segment.path.name} is not the one {ASSEMBLY_STATE} records; start over with --overwrite")
        self._segments = segments

    def _read_segment(self, segment: Path, index: int) -> Segment:
        try:
            with h5py.File(segment, "r") as f:
                b, k = int(f[IMAGE_IDS].shape[0]), int(f[SKIPPED].shape[0])
                for name, spec in self._rows.items() if b else ():
                    if f[name].shape != (b, *spec.row_shape):
                        self._refuse(f"segment {segment.name}: {name} has shape {f[name].shape}, not {(b, *spec.row_shape)}")
                if f.attrs.get("run_id") != self._run_id:
                    self._refuse(f"segment {segment.name} belongs to another run, not the one this folder holds; "
                                 "start over with --overwrite")
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
        image_digests: Sequence[str] | None = None,
    ) -> None:
        """Write one batch as a segment and commit it by renaming it into place."""
        index = self._segments[-1].index + 1 if self._segments else 0
        final = self.partial / f"seg-{index:08d}.h5"
        with in_memory_hdf5() as f:
            self._write_rows(f, rows, image_ids, labels, skipped, image_digests)
            f.attrs["n_inputs_start"] = self.n_inputs_done
            f.attrs["n_inputs_done"] = n_inputs_done
            f.attrs["run_id"] = self._run_id
        with atomic_output(final, resumable=True) as tmp:
            tmp.write_bytes(f.image)
        self._segments.append(Segment(final, index, len(image_ids), len(skipped), self.n_inputs_done, n_inputs_done))

    def _create_datasets(self, f: h5py.File, n: int, m: int) -> None:
        compression = _compression_kwargs(self._compression)
        for name, spec in self._rows.items():
            chunks = (max(1, min(spec.chunks[0], n)), *spec.chunks[1:])
            f.create_dataset(
                name, shape=(n, *spec.row_shape), maxshape=(None, *spec.row_shape), dtype=spec.dtype,
                chunks=chunks, **(compression if spec.compressed else {}),
            )
        f.create_dataset(IMAGE_IDS, shape=(n,), maxshape=(None,), dtype=TEXT, chunks=(1024,))
        if self._digests:
            f.create_dataset(IMAGE_SHA256, shape=(n,), maxshape=(None,), dtype=TEXT, chunks=(1024,))
        if self._class_names is not None:
            f.create_dataset(LABELS, shape=(n,), maxshape=(None,), dtype="int64", chunks=(1024,))
            f.create_dataset(CLASS_NAMES, data=np.array([to_text(c) for c in self._class_names], dtype=object), dtype=TEXT)
        for name in SKIP_DATASETS:
            f.create_dataset(name, shape=(m,), maxshape=(None,), dtype=TEXT, chunks=(256,))

    def _write_rows(self, f, rows, image_ids, labels, skipped, image_digests) -> None:
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
            f[IMAGE_IDS][:] = np.array([to_text(s) for s in image_ids], dtype=object)
        if self._digests:
            if image_digests is None or len(image_digests) != b:
                raise ValueError("this file stores image digests; every batch needs them")
            if b:
                f[IMAGE_SHA256][:] = np.array(list(image_digests), dtype=object)
        if LABELS in f:
            if labels is None or len(labels) != b:
                raise ValueError("this file stores labels; every batch needs them")
            if b:
                f[LABELS][:] = np.asarray(labels, dtype=np.int64)
        if skipped:
            f[SKIPPED][:] = np.array([to_text(s) for s, _ in skipped], dtype=object)
            f[SKIPPED_REASON][:] = np.array([to_text(r) for _, r in skipped], dtype=object)

    def assemble(self) -> Path:
        """Move the segments into ``path`` (replacing an old file only now), one step at a time; the run folder
        stays (see :class:`Assembly`: at most one step's worth of disk beyond the segments, kill-safe)."""
        assembly = Assembly(self)
        with file_system_errors(assembly.file, resumable=True):
            state = assembly.open()
            while state.next < len(self._segments):
                state = assembly.step(state)
        try:
            check_output_path(self.path, reads=self._reads)
        except AttnflowError as e:
            raise AttnflowError(f"{e}, then rerun with --resume") from None
        with file_system_errors(self.path, resumable=True):
            _fsync(assembly.file)
            os.replace(assembly.file, self.path)
            _fsync(self.path.parent)
        return self.path

    def _skeleton(self) -> bytes:
        """The assembled file before any row: every attribute, every dataset at its full size, no chunk yet."""
        n, m = self.n_images, self.n_skipped
        with in_memory_hdf5(libver=("v110", "latest")) as skeleton:
            for key, value in self._attrs.items():
                skeleton.attrs[key] = value
            skeleton.attrs.update({"n_images": n, "n_skipped": m, "n_inputs_done": self.n_inputs_done, "complete": True})
            self._create_datasets(skeleton, n, m)
            for name, data in self._static.items():
                skeleton.create_dataset(name, data=data)
            attach_dimension_scales(skeleton)
        return skeleton.image

    def cleanup(self) -> None:
        """Remove the run folder of an assembled file, then give up the run (and its lock)."""
        # the manifest first: a folder without it is a finished run's remains
        remove_run_folder(self.partial, first=[self.MANIFEST])
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


def _difference(key: str, old: Any, new: Any) -> str:
    """How a run's identity differs: ``key=old, this run has new``; for two JSON objects (``preprocessing``), only
    the fields that differ, so that the one line stays readable."""
    try:
        before, after = json.loads(old), json.loads(new)
    except (TypeError, ValueError):
        before = after = None
    if not (isinstance(before, dict) and isinstance(after, dict)):
        return f"{key}={old}, this run has {new}"
    fields = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))

    def shown(values: dict) -> str:
        return ", ".join(f"{k}={json.dumps(values[k]) if k in values else '(unset)'}" for k in fields)

    return f"{key} {shown(before)}, this run has {shown(after)}"


def _is_empty_folder(path: Path) -> bool:
    try:
        return not os.path.islink(path) and path.is_dir() and next(path.iterdir(), None) is None
    except OSError:
        return False


def _segment_index(segment: Path) -> int | None:
    digits = segment.name[len("seg-"):-len(".h5")]
    return int(digits) if digits.isdigit() else None
