"""HDF5 dimension scales: every axis of an attnflow file named (the ``dims`` of :class:`attnflow.store.names.Expect`),
so that h5py and xarray show named dimensions."""
from __future__ import annotations

import h5py

from .names import CACHE_DATASETS, METRICS_DATASETS, METRICS_GROUP, PERTURB_DATASETS, Expect
from .validate import metric_expect

__all__ = ["attach_dimension_scales", "dimension_names"]


# netCDF-4's mark of a dimension scale that is only a dimension, without values of its own: xarray and netCDF
# readers then show the dimension by name and no coordinate variable for it.
_DIMENSION_ONLY = "This is a netCDF dimension but not a netCDF variable."


def _expectation(name: str) -> Expect | None:
    """What dataset ``name`` of either kind of attnflow file holds (None for a name attnflow does not write)."""
    if name.startswith(METRICS_GROUP + "/"):
        return metric_expect(name)
    return CACHE_DATASETS.get(name) or METRICS_DATASETS.get(name) or PERTURB_DATASETS.get(name)


def attach_dimension_scales(f: h5py.File) -> None:
    """Name the axes of every dataset of an assembled attnflow file with HDF5 dimension scales.

    Each dimension (``image``, ``layer``, ``head``, ``token``, ``query``, ``key``, ``row``, ``patch``,
    ``channel``, ``class``, ``skipped_input``; see :class:`Expect`'s ``dims``) becomes an empty dataset of
    that name at the root, marked as a netCDF dimension, attached to every axis it names and set as the axis'
    label. h5py users then read ``dataset.dims[i].label``, and ``xarray.open_dataset(path,
    engine="h5netcdf")`` shows named dimensions (``group="metrics"`` for the metrics). Attaching writes only
    attributes, so virtual datasets (distributed runs) get them too. Calling it again changes nothing.
    Raises ValueError where two datasets disagree on the size of a dimension (a bug in the writer).
    """
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) and not h5py.h5ds.is_scale(obj.id) else None)
    sizes: dict[str, int] = {}
    axes: list[tuple[h5py.Dataset, int, str]] = []
    for name in names:
        expect = _expectation(name)
        if expect is None:
            continue
        dataset = f[name]
        fixed = len(expect.shape) - (expect.shape[-1] == "...")
        for axis, dim in enumerate(expect.dims[:min(fixed, dataset.ndim)]):
            size = dataset.shape[axis]
            if sizes.setdefault(dim, size) != size:
                raise ValueError(f"{name}: axis {axis} ({dim}) has {size} entries, other datasets {sizes[dim]}")
            axes.append((dataset, axis, dim))
    for dim, size in sizes.items():
        if dim not in f:
            f.create_dataset(dim, shape=(size,), dtype=">f4").make_scale(f"{_DIMENSION_ONLY}{size:10d}")
        elif f[dim].shape != (size,) or not h5py.h5ds.is_scale(f[dim].id):
            raise ValueError(f"'{dim}' is in the way of the dimension scale of {size} entries")
    for dataset, axis, dim in axes:
        if not h5py.h5ds.is_attached(dataset.id, f[dim].id, axis):
            dataset.dims[axis].attach_scale(f[dim])
        dataset.dims[axis].label = dim


def dimension_names(dataset: h5py.Dataset) -> list[str]:
    """The dimension names of a dataset's axes ("" for an unnamed axis)."""
    return [dim.label for dim in dataset.dims]
