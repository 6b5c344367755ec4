"""Opening and checking attnflow files: a file is checked against the tables of :mod:`attnflow.store.names`
when it opens (root attributes, dataset kinds and shapes, links, the sources of virtual datasets, labels), so
that no number is computed from input nobody checked."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..capture import MagnitudeUpdate
from ..choices import choice_values
from ..errors import AttnflowError
from ..metrics import REGISTRY
from ..version import __version__
from .names import (
    CACHE_DATASETS, CLASS_NAMES, FINAL_NORM_EPS, LABELS, LAYER_TOKENS, MAPS_DATASET, METRIC_DATASETS,
    METRICS_DATASETS, METRICS_GROUP, OPTIONAL_ATTRS, PREPROCESSING_KEYS, TOKENS, DType, Expect, StoreMode,
    metric_dataset, partial_path, stored_token_layers, tokens_dataset,
)

__all__ = [
    "plain", "open_hdf5", "hdf5_reason", "file_attrs", "read_attrs", "read_preprocessing", "metric_expect",
    "validate", "written_by",
]


def plain(value: Any) -> Any:
    """An attribute value as h5py hands it out (numpy arrays and scalars) as plain Python: lists, bool, int,
    float, str."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.bool_, np.integer, np.floating)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def open_hdf5(path: str | Path) -> h5py.File:
    """Open any attnflow HDF5 file read-only, with one clear line for a missing, truncated or foreign file."""
    path = Path(path)
    if not path.exists():
        if partial_path(path).exists():
            raise AttnflowError(f"{path} is not finished; {partial_path(path)} holds an interrupted run (continue it with --resume)")
        raise AttnflowError(f"no such file: {path}")
    if path.is_dir():
        raise AttnflowError(f"{path} is a directory, not an attnflow file")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise AttnflowError(f"{path} is not a readable HDF5 file ({hdf5_reason(e, 'unreadable')}); is it truncated or not an attnflow file?") from None


def hdf5_reason(error: Exception, default: str) -> str:
    """HDF5's message without the library's parenthesised detail: ``unable to open file``."""
    return str(error).split("(")[0].strip().rstrip(".") or default


def file_attrs(f: h5py.File) -> dict[str, Any]:
    return {k: plain(v) for k, v in f.attrs.items()}


def read_attrs(path: Path, f: h5py.File) -> dict[str, Any]:
    """:func:`file_attrs`, with one line naming an attribute HDF5 cannot read."""
    attrs = {}
    for key in f.attrs:
        try:
            attrs[key] = plain(f.attrs[key])
        except (OSError, TypeError, ValueError) as e:
            raise AttnflowError(f"{path}: attribute '{key}' is unreadable ({e})") from None
    return attrs


# -- what a finished file holds: the checks ------------------------------------------------------------


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
    "store": (f"one of {', '.join(StoreMode)}", lambda v: isinstance(v, str) and v in choice_values(StoreMode)),
    "dtype": (f"one of {', '.join(DType)}", lambda v: isinstance(v, str) and v in choice_values(DType)),
    "magnitude_update": (f"one of {', '.join(MagnitudeUpdate)}", lambda v: isinstance(v, str) and v in choice_values(MagnitudeUpdate)),
    "texts": ("a list of text", lambda v: isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v)),
    "fractions": ("increasing numbers in (0, 1)", lambda v: isinstance(v, list) and bool(v)
                  and all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < 1 for x in v)
                  and all(a < b for a, b in zip(v, v[1:]))),
    "layers": ("increasing non-negative integers", lambda v: isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v)
               and all(a < b for a, b in zip(v, v[1:]))),
}


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
        read_preprocessing(path, attrs)
    if FINAL_NORM_EPS in attrs and not attrs[FINAL_NORM_EPS] > 0:
        raise AttnflowError(f"{path}: attribute '{FINAL_NORM_EPS}' is {attrs[FINAL_NORM_EPS]!r}, not a positive number")


def read_preprocessing(path: Path, attrs: dict[str, Any]) -> dict[str, Any]:
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


def metric_expect(name: str) -> Expect:
    """What dataset ``metrics/<name>`` holds, by the level of the metric (:data:`METRIC_DATASETS`)."""
    metric = REGISTRY.get(name[len(METRICS_GROUP) + 1:])
    return METRIC_DATASETS[metric.level if metric is not None else None]


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
                    if not _in_shard_folder(path, source.file_name):
                        raise AttnflowError(
                            f"{path} reads {name} from {source.file_name}, outside a shard folder next to it "
                            "(<file>.shards/, as attnflow writes): refused, it would give another file's numbers")
                    where = path.parent / source.file_name
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


def _in_shard_folder(path: Path, file_name: str) -> bool:
    """Whether a virtual source ``file_name`` is a file of a ``*.shards/`` folder beside ``path`` (relative,
    without ``..``, and still inside that folder once links are resolved)."""
    parts = Path(file_name).parts
    if os.path.isabs(file_name) or len(parts) != 2 or not parts[0].endswith(".shards") or ".." in parts:
        return False
    folder = os.path.realpath(path.parent / parts[0])
    return os.path.realpath(path.parent / file_name).startswith(folder + os.sep)


def _check_links(path: Path, group: h5py.Group) -> None:
    """No external link anywhere in the file: HDF5 follows one into another file without a word."""
    for key in group:
        link = group.get(key, getlink=True)
        if isinstance(link, h5py.ExternalLink):
            raise AttnflowError(f"{path}: '{group.name.rstrip('/')}/{key}' is an external link to {link.filename}; "
                                "attnflow files hold their own data: refused")
        if isinstance(link, h5py.HardLink) and isinstance(group.get(key), h5py.Group):
            _check_links(path, group[key])


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
        raise AttnflowError(f"{path} reads {name} from {where}, which is not a readable HDF5 file "
                            f"({hdf5_reason(e, 'unreadable')}): re-extract") from None


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


def validate(path: Path, f: h5py.File, attrs: dict[str, Any], kind: type) -> None:
    """Raise an :class:`AttnflowError` naming the first thing in ``f`` that is not a finished file of ``kind``
    should hold: root attributes (types, and the layout's consistency), datasets (presence, dtype, shape),
    the sources of virtual datasets, and labels within the class names. ``kind`` is a reader class of
    :mod:`attnflow.store.read` (its ``attributes``, ``datasets`` and ``required_datasets``)."""
    try:
        _validate(path, f, attrs, kind)
    except OSError as e:  # HDF5 cannot read a part of the file's structure
        raise AttnflowError(f"{path} is damaged: HDF5 cannot read it ({e}); re-extract it{written_by(attrs)}") from None
    except AttnflowError as e:
        raise type(e)(f"{e}{written_by(attrs)}") from None


def written_by(attrs: dict[str, Any]) -> str:
    """The end of an error that refuses a file for its format: which attnflow wrote it (the root attribute
    ``attnflow_version``) and which reads it; empty when the file does not say."""
    version = attrs.get("attnflow_version")
    if isinstance(version, bytes):
        version = version.decode(errors="replace")
    if not isinstance(version, str) or not version:
        return ""
    return f" (written by attnflow {version}; this is attnflow {__version__})"


def _validate(path: Path, f: h5py.File, attrs: dict[str, Any], kind: type) -> None:
    _check_links(path, f)
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
            key = metric_dataset(name)
            _check_dataset(path, key, group[name], metric_expect(key), symbols)
    _check_virtual_sources(path, f)
    if kind.datasets is CACHE_DATASETS and (TOKENS in f or LAYER_TOKENS in f):
        _check_tokens(path, f, attrs)
    if kind.datasets is CACHE_DATASETS and attrs["store"] in MAPS_DATASET:
        maps = MAPS_DATASET[attrs["store"]]
        if str(f[maps].dtype) != attrs["dtype"]:
            raise AttnflowError(f"{path}: dataset '{maps}' holds {f[maps].dtype}, but the attribute dtype says {attrs['dtype']}")
    if LABELS in f:
        if CLASS_NAMES not in f:
            raise AttnflowError(f"{path} has labels but no dataset '{CLASS_NAMES}' to name them")
        try:
            labels = f[LABELS][()]
        except OSError as e:
            raise AttnflowError(f"{path}: cannot read labels ({e}); the file is damaged, re-extract it") from None
        bad = np.flatnonzero((labels < 0) | (labels >= symbols["K"]))
        if len(bad):
            i = int(bad[0])
            raise AttnflowError(
                f"{path}: label {labels[i]} of image {i} is not an index into class_names ({symbols['K']} classes)"
            )


def _check_tokens(path: Path, f: h5py.File, attrs: dict[str, Any]) -> None:
    """The stored tokens agree with the attributes that describe them: ``token_layers`` (blocks of the
    model, as many as stored, in the dataset :func:`tokens_dataset` names) and ``tokens_dtype``."""
    layers, L = stored_token_layers(attrs), int(attrs["num_layers"])
    if not layers or layers[-1] >= L:
        raise AttnflowError(f"{path}: attribute 'token_layers' is {list(layers)}, not blocks of the model's {L}")
    name = tokens_dataset(len(layers))
    other = LAYER_TOKENS if name == TOKENS else TOKENS
    if other in f:
        raise AttnflowError(f"{path} holds '{other}', but the tokens of {len(layers)} block(s) ({list(layers)}) belong in '{name}'")
    if name == LAYER_TOKENS and f[name].shape[1] != len(layers):
        raise AttnflowError(f"{path}: '{name}' holds {f[name].shape[1]} blocks, attribute 'token_layers' lists {len(layers)}")
    want = attrs.get("tokens_dtype", "float32")
    if str(f[name].dtype) != want:
        raise AttnflowError(f"{path}: dataset '{name}' holds {f[name].dtype}, but the tokens dtype is {want}")

