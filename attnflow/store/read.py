"""The readers of attnflow's files: :func:`open_cache`, :func:`open_metrics`, :func:`open_perturbation` give a
file checked when it opens (:func:`attnflow.store.validate.validate`) whose every read is checked too;
:func:`describe` lists any attnflow file, also a broken one."""
from __future__ import annotations

import itertools
import os
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Union

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from ..capture import ROW_SUM_TOLERANCE, MagnitudeUpdate, attention_problem
from ..errors import AttnflowError
from ..metrics import REGISTRY
from ..registry import NAN_REASONS, RANGE_TOLERANCE
from .names import (
    ATTN, ATTN_ROWS, CACHE_ATTRS, CACHE_DATASETS, CLASS_NAMES, FG, FILE_ATTRS, FILE_DATASETS, FINAL_NORM_BIAS,
    FINAL_NORM_EPS, FINAL_NORM_WEIGHT, FLOW_MAP, IMAGE_IDS, IMAGE_SHA256, LABELS, LAYER_TOKENS, MAGNITUDE,
    MAPS_DATASET, METRICS_ATTRS, METRICS_DATASETS, METRICS_GROUP, METRICS_SCHEMA, PERTURB_ATTRS,
    PERTURB_CLEAN_CORRECT, PERTURB_CORRECT, PERTURB_DATASETS, PERTURB_RELEVANCE, PERTURB_SCHEMA, PERTURB_SIMILARITY,
    ROLLOUT_MAP, SCHEMA, SKIP_DATASETS, SKIPPED, SKIPPED_REASON, TOKEN_NORM, TOKENS, Compression, Expect, StoreMode,
    from_text, layout_from_attrs, metric_dataset, stored_token_layers, tokens_dataset,
)
from .scales import dimension_names
from .validate import metric_expect, open_hdf5, plain, read_attrs, read_preprocessing, validate, written_by

__all__ = [
    "Rows", "CheckedDataset", "Cache", "MetricsFile", "PerturbFile", "open_cache", "open_metrics", "open_perturbation",
    "describe",
]

# What the typed readers return: a numpy array, or with ``device=`` a torch tensor on that device.
Rows = Union[np.ndarray, torch.Tensor]


class _ParallelGunzip:
    """Reads rows of datasets whose chunks are one row each, through shuffle and gzip alone (what attnflow's
    writer stores), decompressing the chunks in a thread pool: HDF5 would inflate them one after another."""

    def __init__(self, threads: int | None = None):
        self._pool = ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1, thread_name_prefix="attnflow-gunzip")

    @staticmethod
    def readable(dataset: h5py.Dataset) -> bool:
        """Whether :meth:`read` can decode this dataset: one-row chunks through shuffle and gzip alone."""
        chunks = dataset.chunks
        return (
            chunks is not None and chunks[0] == 1 and dataset.compression == Compression.gzip and dataset.shuffle
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


def _nan_reasons(name: str) -> tuple[str, ...]:
    """Why ``metrics/<name>`` may hold NaN (:data:`attnflow.registry.NAN_REASONS`); a metric this attnflow
    does not know may be undefined anywhere."""
    metric = REGISTRY.get(name[len(METRICS_GROUP) + 1:])
    return metric.nan_when if metric is not None else ("undefined",)


_KIND = {SCHEMA: "an attention cache", METRICS_SCHEMA: "a metrics file", PERTURB_SCHEMA: "a perturbation file"}


class _AttnflowFile:
    """A finished attnflow file of one schema, read lazily and validated.

    Opening checks the file against the tables of :mod:`attnflow.store.names`. The typed readers
    (:meth:`labels`, :meth:`fg`, and those of :class:`Cache` and :class:`MetricsFile`) say what they return and
    check every value they read; underneath them, ``file[name]`` gives the raw :class:`CheckedDataset` (its
    reads checked the same way, a damaged chunk turned into one line), and :meth:`read_rows` reads rows of any
    dataset.
    """

    schema = ""
    hint = ""  # what to do when handed the other kind of file
    attributes: dict[str, str] = FILE_ATTRS
    datasets: dict[str, Expect] = FILE_DATASETS

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._gzip: _ParallelGunzip | None = None
        self.file = open_hdf5(self.path)
        try:
            self.attrs = read_attrs(self.path, self.file)
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
            raise AttnflowError(f"{self.path} has schema '{schema}'; this attnflow reads '{self.schema}'{written_by(self.attrs)}")
        if not self.attrs.get("complete", False):
            raise AttnflowError(f"{self.path} is unfinished; continue it with --resume")

    @classmethod
    def required_datasets(cls, attrs: dict[str, Any]) -> list[str]:
        """The datasets a file with these attributes must hold."""
        return [IMAGE_IDS, *SKIP_DATASETS, *([LABELS, CLASS_NAMES] if attrs.get("has_labels") else []),
                *([FG] if attrs.get("has_masks") else [])]

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
        if _ParallelGunzip.readable(dataset):
            if self._gzip is None:
                self._gzip = _ParallelGunzip()
            read = lambda: self._gzip.read(dataset, start, stop)  # noqa: E731
        else:
            read = lambda: dataset[start:stop]  # noqa: E731
        data = self._fetch(name, dataset, read, np.arange(start, stop))
        if device is not None:
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
            value = self.file[IMAGE_IDS][index]
        except (OSError, ValueError, IndexError, KeyError):
            return "image id unreadable"
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    def _expect(self, name: str) -> Expect | None:
        if name.startswith(METRICS_GROUP + "/") and isinstance(self, MetricsFile):
            return metric_expect(name)
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
        elif expect.values == "norm":
            problem = _not_norm(data)
        elif expect.values == "fraction":
            problem = _not_fraction(data)
        else:
            problem = self._metric_problem(name, np.asarray(data), selection)
        if problem is not None:
            what, position = problem
            raise AttnflowError(f"{self.path}: {name}{self._where(expect, selection, position)}: {what}")

    def _attention_problem(self, name: str, data: Any, selection: list | None) -> tuple[str, tuple[int, ...]] | None:
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
        """Finite values; NaN only where the metric's declaration says it can be undefined."""
        reasons = _nan_reasons(name)
        infinite = np.isinf(values)
        if infinite.any():
            return "is infinite", _first(infinite)
        metric = REGISTRY.get(name[len(METRICS_GROUP) + 1:])
        if metric is not None:
            low, high = metric.value_range
            outside = (values < low - RANGE_TOLERANCE) | (values > high + RANGE_TOLERANCE)  # NaN compares false
            if outside.any():
                where = _first(outside)
                return (f"holds {values[where]:.4g}, outside the range [{low:g}, {high:g}] of its unit ({metric.unit}); "
                        "the file was not written by attnflow metrics, or was altered since"), where
        nan = np.isnan(values)
        if "no_cls" in reasons and not self.attrs["has_cls"]:
            if not nan.all():
                return "holds a number, but the model has no cls token (has_cls is false), so it must be NaN", _first(~nan)
            return None
        if not nan.any() or "undefined" in reasons or ("one_patch" in reasons and self.layout.num_patches == 1):
            return None
        allowed = np.zeros(values.shape, dtype=bool)
        if "cls_mass" in reasons:
            mass = self.file.get(metric_dataset("cls_to_patch"))
            if mass is None or selection is None or mass.shape != self.file[name].shape:
                return None  # nothing to check it against
            allowed |= _take(mass[()], selection) == 0
        if "no_artifact" in reasons:
            count = self.file.get(metric_dataset("artifact_frac"))
            if count is None or selection is None or count.shape != self.file[name].shape:
                return None  # nothing to check it against
            allowed |= _take(count[()], selection) == 0
        if "no_mask" in reasons:
            if FG not in self.file or selection is None:
                return None
            no_mask = np.isnan(self.file[FG][()]).any(axis=-1)[selection[0]]
            allowed |= np.reshape(no_mask, np.shape(no_mask) + (1,) * (values.ndim - np.ndim(no_mask)))
        bad = nan & ~allowed
        if not bad.any():
            return None
        when = [NAN_REASONS[r] for r in reasons]
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

    # -- typed reads: every value checked as it is read ------------------------------------------------

    @property
    def image_ids(self) -> list[str]:
        """The n images' paths, as given to ``attnflow extract``."""
        return from_text(self[IMAGE_IDS][()])

    @property
    def image_digests(self) -> list[str] | None:
        """The SHA-256 of each of the n image files as read at extraction, or None for a file written before
        attnflow stored them."""
        return from_text(self[IMAGE_SHA256][()]) if IMAGE_SHA256 in self.file else None

    @property
    def class_names(self) -> list[str] | None:
        """The K class names ``labels`` index, or None for a file without labels."""
        return from_text(self[CLASS_NAMES][()]) if CLASS_NAMES in self.file else None

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """The m inputs that could not be decoded, as (path, reason)."""
        return list(zip(from_text(self[SKIPPED][()]), from_text(self[SKIPPED_REASON][()])))

    def labels(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Class indices into :attr:`class_names` of images ``start:stop``: (n,) int64."""
        self._need(LABELS, "labels", "--labels-from-dirs")
        start, stop = self._range(start, stop)
        return self[LABELS][start:stop].astype(np.int64, copy=False)

    def fg(self, start: int = 0, stop: int | None = None, *, device: Any = None) -> Rows:
        """Object fraction per patch of images ``start:stop``: (n, P) float32 in [0, 1], NaN rows for images
        without a mask."""
        self._need(FG, "object masks (fg)", "--masks")
        return self._rows(FG, start, stop, device)

    def _need(self, name: str, what: str, how: str) -> None:
        if name not in self.file:
            raise AttnflowError(f"{self.path} has no {what}; extract with {how}")

    def _range(self, start: int, stop: int | None) -> tuple[int, int]:
        """Images ``start:stop`` as in a slice (a stop past the end is the end); a start before 0 or after stop
        is an error, not an empty or wrapped-around read."""
        n = len(self)
        stop = n if stop is None else min(stop, n)
        if not 0 <= start <= stop:
            raise IndexError(f"images {start}:{stop} are not a range of the {n} images of {self.path}")
        return start, stop

    def _layer(self, layer: int) -> int:
        L = int(self.attrs["num_layers"])
        if not -L <= layer < L:
            raise IndexError(f"layer {layer} is out of range for {self.path} ({L} layers)")
        return layer % L

    def _rows(self, name: str, start: int, stop: int | None, device: Any, *index: Any) -> Rows:
        """Images ``start:stop`` of dataset ``name``, further indexed by ``index`` (per axis after the image),
        checked, as float32: a numpy array, or with ``device`` a torch tensor there."""
        start, stop = self._range(start, stop)
        if index:
            return _as_float32(self[name][(slice(start, stop), *index)], device)
        data = self.read_rows(name, start, stop, device=device)  # attnflow's gzip chunks inflated in parallel
        return data if device is not None else data.astype(np.float32, copy=False)


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


def _as_float32(data: np.ndarray, device: Any) -> Rows:
    """Checked values as float32: numpy, or a torch tensor on ``device``."""
    if device is None:
        return data.astype(np.float32, copy=False)

    return torch.from_numpy(np.ascontiguousarray(data)).to(device).float()


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

        if bool(torch.isfinite(data.sum(dtype=torch.float64))):
            return None
        data = data.cpu().numpy()
    finite = np.isfinite(data)
    if finite.all():
        return None
    return "holds NaN or infinite values", _first(~finite)


def _not_norm(data: Any) -> tuple[str, tuple[int, ...]] | None:
    """Norms: finite and not negative."""
    problem = _nonfinite(data)
    if problem is not None:
        return problem
    values = data.cpu().numpy() if hasattr(data, "cpu") else np.asarray(data)
    if values.min() < 0:
        return f"holds {values.min():.3g}, not a norm (>= 0)", _first(values < 0)
    return None


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
        maps = [MAPS_DATASET[attrs["store"]]] if attrs["store"] in MAPS_DATASET else []
        tokens = [tokens_dataset(len(stored_token_layers(attrs)))] if attrs.get("has_tokens") else []
        return [*super().required_datasets(attrs), MAGNITUDE, *maps, *tokens]

    @property
    def preprocessing(self) -> dict[str, Any]:
        """timm's resolved eval data config the images were preprocessed with."""
        return read_preprocessing(self.path, self.attrs)

    @property
    def store(self) -> str:
        """Which attention maps the cache keeps: ``full``, ``rows`` (the prefix rows) or ``none``."""
        return self.attrs["store"]

    @property
    def has_final_norm(self) -> bool:
        """Whether the model's final LayerNorm is recorded, so that :meth:`tokens` can apply it."""
        return FINAL_NORM_WEIGHT in self.file and FINAL_NORM_BIAS in self.file and FINAL_NORM_EPS in self.attrs

    def attention(self, start: int = 0, stop: int | None = None, layer: int | None = None, *, device: Any = None) -> Rows:
        """Post-softmax attention of images ``start:stop``, rows summing to 1: (n, L, H, T, T) float32, or
        (n, H, T, T) of one ``layer`` (negative counts from the last). Needs ``store=full``."""
        self._need(ATTN, f"full attention maps (store={self.store})", "--store full")
        return self._of_layers(ATTN, start, stop, layer, device)

    def prefix_rows(self, start: int = 0, stop: int | None = None, layer: int | None = None, *, device: Any = None) -> Rows:
        """The attention rows of the p prefix queries (cls, then registers) of images ``start:stop``:
        (n, L, H, p, T) float32, or (n, H, p, T) of one ``layer``; from ``store=full`` or ``store=rows``."""
        if self.store == StoreMode.rows:
            return self._of_layers(ATTN_ROWS, start, stop, layer, device)
        self._need(ATTN, f"attention maps (store={self.store})", "--store rows or full")
        p = self.layout.num_prefix_tokens
        if p == 0:
            raise AttnflowError(f"{self.path}: the model has neither a cls token nor registers, so there are no prefix rows")
        # A chunk holds every query's row of a layer: all are read anyway, so all are checked, then cut.
        rows = self._of_layers(ATTN, start, stop, layer, device)[..., :p, :]
        return rows.contiguous() if device is not None else np.ascontiguousarray(rows)  # not a view of all rows

    def _of_layers(self, name: str, start: int, stop: int | None, layer: int | None, device: Any) -> Rows:
        """Images ``start:stop`` of a dataset with a layer axis after the image axis: every layer, or one."""
        if layer is None:
            return self._rows(name, start, stop, device)
        return self._rows(name, start, stop, device, self._layer(layer))

    def magnitude(self, start: int = 0, stop: int | None = None, *, device: Any = None) -> Rows:
        """Per block and token, the norm of the block's residual update over the norm of its input, of images
        ``start:stop``: (n, L, T) float32."""
        return self._rows(MAGNITUDE, start, stop, device)

    @property
    def magnitude_update(self) -> str:
        """Where :meth:`magnitude`'s update was taken: ``after-layer-scale`` (also every cache without the
        attribute) or ``before-layer-scale``."""
        return self.attrs.get("magnitude_update", MagnitudeUpdate.after_layer_scale.value)

    @property
    def has_token_norm(self) -> bool:
        """Whether the cache holds ``token_norm`` (caches written by attnflow 0.1 do not)."""
        return TOKEN_NORM in self.file

    def token_norm(self, start: int = 0, stop: int | None = None, *, device: Any = None) -> Rows:
        """The L2 norm of every token of every block's output (the residual stream after the block, before the
        model's final norm) of images ``start:stop``: (n, L, T) float32, finite and >= 0."""
        self._need(TOKEN_NORM, "block output token norms (it was written by attnflow 0.1)", "this attnflow")
        return self._rows(TOKEN_NORM, start, stop, device)

    @property
    def has_tokens(self) -> bool:
        """Whether the cache stores output tokens (``--save-tokens``), of one block or several."""
        return TOKENS in self.file or LAYER_TOKENS in self.file

    @property
    def token_layers(self) -> tuple[int, ...]:
        """The 0-based blocks, increasing, whose output tokens the cache stores (the last block by default)."""
        return stored_token_layers(self.attrs)

    def token_layer(self, layer: int | None = None) -> int:
        """The 0-based block ``layer`` names (negative counts from the last block; None: the deepest stored),
        which must be one whose tokens the cache stores: one line naming the stored ones otherwise."""
        stored, L = self.token_layers, int(self.attrs["num_layers"])
        if layer is None:
            return stored[-1]
        if -L <= layer < L and layer % L in stored:
            return layer % L
        raise AttnflowError(f"{self.path} stores the tokens of block{'s' if len(stored) > 1 else ''} "
                            f"{', '.join(map(str, stored))} (0-based, of {L}), not of layer {layer}; "
                            "extract with --token-layers to store others")

    def tokens(self, start: int = 0, stop: int | None = None, *, layer: int | None = None, normalised: bool = True,
               device: Any = None) -> Rows:
        """The output tokens of block ``layer`` (see :meth:`token_layer`; default the deepest stored, the last
        block unless extracted with ``--token-layers``) of images ``start:stop``: (n, T, D) float32 (also when
        stored as float16); ``normalised`` with the model's final LayerNorm applied, as users of the model read
        them (the cls token is ``[:, 0]``); for an intermediate block too, as timm's
        ``forward_intermediates(norm=True)`` and DINOv2's ``get_intermediate_layers(norm=True)`` do.
        Needs ``--save-tokens``."""

        name = tokens_dataset(len(self.token_layers))
        self._need(name, "tokens", "--save-tokens")
        block = self.token_layer(layer)
        if normalised and not self.has_final_norm:
            raise AttnflowError(f"{self.path} records no final LayerNorm to apply; read tokens(normalised=False)")
        if name == TOKENS:
            data = self._rows(TOKENS, start, stop, device)
        else:
            data = self._rows(LAYER_TOKENS, start, stop, device, self.token_layers.index(block))
        if not normalised:
            return data
        tokens = torch.from_numpy(data) if device is None else data
        weight, bias = (torch.from_numpy(self[name][()]).float().to(tokens.device) for name in (FINAL_NORM_WEIGHT, FINAL_NORM_BIAS))
        normed = F.layer_norm(tokens, tokens.shape[-1:], weight, bias, float(self.attrs[FINAL_NORM_EPS]))
        return normed if device is not None else normed.numpy()


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
        key = metric_dataset(name)
        if key not in self.file:
            raise AttnflowError(f"{self.path} has no metric '{name}' (it has {', '.join(self.metric_names)})")
        return self[key]

    def values(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Metric ``name`` of images ``start:stop``, float32: (n, L, H) for a head metric, (n, L) for a layer
        metric, (n,) for an image metric; NaN only where the metric is undefined."""
        return self._rows(self.metric(name).name, start, stop, None)

    def rollout_maps(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Attention rollout's readout over patches after each block of images ``start:stop``: (n, L, P)
        float32, each row summing to 1. Metrics files computed from full maps have them."""
        self._need(ROLLOUT_MAP, "rollout maps", "--store full (or compute the metrics while extracting)")
        return self._rows(ROLLOUT_MAP, start, stop, None)

    def flow_maps(self, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, tuple[int, ...]]:
        """Attention flow of images ``start:stop``: ``(maps, layers)``, maps (n, F, P) float32 with each row
        summing to 1, read out after the F 0-based blocks ``layers``. Metrics files computed with ``--flow``
        have them."""
        self._need(FLOW_MAP, "attention flow maps", "--store full, then `attnflow metrics CACHE -o METRICS --flow`")
        layers = tuple(self.attrs.get("flow_layers", ()))
        L, F = int(self.attrs["num_layers"]), self.file[FLOW_MAP].shape[1]
        if len(layers) != F or any(layer >= L for layer in layers):
            raise AttnflowError(f"{self.path}: attribute 'flow_layers' is {list(layers)}, but {FLOW_MAP} holds {F} "
                                f"layers of {L} blocks")
        return self._rows(FLOW_MAP, start, stop, None), layers


class PerturbFile(_AttnflowFile):
    """A finished perturbation file (``attnflow perturb``): per image, relevance map, order and fraction, the
    cosine similarity of the perturbed representation to the clean one (and, with a probe, whether its
    prediction is still right)."""

    schema = PERTURB_SCHEMA
    hint = " (write one with `attnflow perturb MODEL IMAGES -o OUT.h5`)"
    attributes = PERTURB_ATTRS
    datasets = PERTURB_DATASETS

    def __init__(self, path: str | Path):
        super().__init__(path)
        try:
            self._check_axes()
        except BaseException:
            self.file.close()
            raise

    @classmethod
    def required_datasets(cls, attrs: dict[str, Any]) -> list[str]:
        extra = [PERTURB_CORRECT, PERTURB_CLEAN_CORRECT] if attrs.get("probe_head") else []
        return [*super().required_datasets(attrs), PERTURB_SIMILARITY, PERTURB_RELEVANCE, *extra]

    def _check_axes(self) -> None:
        """The axes of the per-image datasets agree with the attributes that name them."""
        if sorted(self.attrs["orders"]) != ["negative", "positive"]:
            raise AttnflowError(f"{self.path}: attribute 'orders' is {list(self.attrs['orders'])}, not the orders "
                                "positive and negative, once each")
        R, O, F = (len(self.attrs[key]) for key in ("relevance", "orders", "fractions"))
        for name in (PERTURB_SIMILARITY, PERTURB_CORRECT):
            if name in self.file and self.file[name].shape[1:] != (R, O, F):
                raise AttnflowError(f"{self.path}: dataset '{name}' has shape {self.file[name].shape}, but the attributes "
                                    f"name {R} relevance maps, {O} orders and {F} fractions")
        if self.file[PERTURB_RELEVANCE].shape[1] != R:
            raise AttnflowError(f"{self.path}: dataset '{PERTURB_RELEVANCE}' holds {self.file[PERTURB_RELEVANCE].shape[1]} "
                                f"maps, the attribute 'relevance' names {R}")

    @property
    def relevance(self) -> list[str]:
        return list(self.attrs["relevance"])

    @property
    def orders(self) -> list[str]:
        return list(self.attrs["orders"])

    @property
    def fractions(self) -> list[float]:
        return [float(f) for f in self.attrs["fractions"]]

    @property
    def has_accuracy(self) -> bool:
        return PERTURB_CORRECT in self.file

    def similarity(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """(n, R, O, F) float32 cosine similarity of each perturbed representation to the clean one."""
        return self._rows(PERTURB_SIMILARITY, start, stop, None)

    def correct(self, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(correct, clean)``: (n, R, O, F) and (n,) booleans, whether the probe's prediction is right on the
        perturbed and on the clean image (files written with ``--probe``)."""
        self._need(PERTURB_CORRECT, "probe predictions", "attnflow perturb --probe DIR --labels-from-dirs")
        start, stop = self._range(start, stop)
        return self[PERTURB_CORRECT][start:stop] != 0, self[PERTURB_CLEAN_CORRECT][start:stop] != 0

    def relevance_maps(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """(n, R, P) float32 relevance of every patch, each map summing to 1."""
        return self._rows(PERTURB_RELEVANCE, start, stop, None)




def open_cache(path: str | Path) -> Cache:
    """Open and validate an attention cache written by ``attnflow extract``."""
    return Cache(path)


def open_metrics(path: str | Path) -> MetricsFile:
    """Open and validate a metrics file written by ``attnflow metrics``."""
    return MetricsFile(path)


def open_perturbation(path: str | Path) -> PerturbFile:
    """Open and validate a perturbation file written by ``attnflow perturb``."""
    return PerturbFile(path)


def describe(path: str | Path) -> dict[str, Any]:
    """Attributes, dataset shapes (and dimension names) and dimensions of any attnflow HDF5 file (for
    ``attnflow info``), also of a broken one: what validation finds wrong is said as a warning and listed
    under ``problems``."""

    path = Path(path)
    with open_hdf5(path) as f:
        if "schema" not in f.attrs:
            raise AttnflowError(f"{path} is not an attnflow file (no 'schema' attribute)")
        datasets: dict[str, Any] = {}
        dimensions: dict[str, int] = {}  # dimension scales (files of attnflow 0.1 have none)

        def visit(name: str, obj: Any) -> None:
            if not isinstance(obj, h5py.Dataset):
                return
            if h5py.h5ds.is_scale(obj.id):
                dimensions[name] = int(obj.shape[0]) if obj.ndim else 0
                return
            datasets[name] = {"shape": list(obj.shape), "dtype": str(obj.dtype) if obj.dtype.kind != "O" else "utf-8"}
            named = dimension_names(obj)
            if any(named):
                datasets[name]["dims"] = named

        problems = []
        try:
            f.visititems(visit)
        except OSError as e:
            problems.append(f"{path} is damaged: HDF5 cannot list all of it ({e})")
        attrs: dict[str, Any] = {}
        for key in f.attrs:
            try:
                attrs[key] = plain(f.attrs[key])
            except (OSError, TypeError, ValueError):
                attrs[key] = "<unreadable>"
        kind = {SCHEMA: Cache, METRICS_SCHEMA: MetricsFile, PERTURB_SCHEMA: PerturbFile}.get(attrs["schema"]) if isinstance(attrs["schema"], str) else None
        if kind is not None:
            try:
                validate(path, f, read_attrs(path, f), kind)
            except AttnflowError as e:
                problems.append(str(e))
        for problem in problems:
            warnings.warn(problem, stacklevel=2)
        return {"path": str(path), "attrs": attrs, "datasets": datasets, "dimensions": dimensions, "problems": problems}
