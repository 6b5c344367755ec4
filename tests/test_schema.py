"""The storage package's typed readers, its dimension scales, its promise to read attnflow 0.1's files, and
the description of the format in its docstring.

Values read through the readers are compared with the same datasets read by plain h5py (what the file holds)
and with float64 recomputations; dimension names with the schema written out by hand here.
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from attnflow import AttnflowError, open_cache
from attnflow.store.scales import attach_dimension_scales
from attnflow.store.read import describe, open_metrics
from attnflow.distributed import assemble
from attnflow.extract import extract
from attnflow.images import list_images
from attnflow.measure import compute_metrics
from attnflow.store.names import ROOT_ATTRS
from conftest import write_images, tiny

FIXTURES = Path(__file__).parent / "fixtures"
N = 6  # images; those of index < 3 have an object mask
P_REGISTERS = 5  # cls + 4 registers of the tiny "registers" ViT

# Every dataset's dimensions, spelled out independently of the schema module.
DIMS = {
    "attn": ("image", "layer", "head", "query", "key"),
    "attn_rows": ("image", "layer", "head", "row", "key"),
    "magnitude": ("image", "layer", "token"),
    "token_norm": ("image", "layer", "token"),
    "tokens": ("image", "token", "channel"),
    "final_norm_weight": ("channel",),
    "final_norm_bias": ("channel",),
    "fg": ("image", "patch"),
    "image_ids": ("image",),
    "image_sha256": ("image",),
    "labels": ("image",),
    "class_names": ("class",),
    "skipped": ("skipped_input",),
    "skipped_reason": ("skipped_input",),
    "rollout/map": ("image", "layer", "patch"),
}
LEVEL_DIMS = {3: ("image", "layer", "head"), 2: ("image", "layer"), 1: ("image",)}


def raw(path: Path, name: str) -> np.ndarray:
    """A dataset as stored, read by plain h5py."""
    with h5py.File(path, "r") as f:
        return f[name][()]


def layer_norm64(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight.astype(np.float64) + bias.astype(np.float64)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Caches of the tiny register ViT (cls + 4 registers) in every store mode, its metrics, one of a model
    without prefix tokens, and a distributed run's file assembled over two shards."""
    root = tmp_path_factory.mktemp("schema")
    write_images(root / "images", N, size=(36, 30))
    (root / "masks").mkdir()
    paths = list_images([str(root / "images")])
    for path in paths[:3]:
        mask = np.zeros((36, 30), dtype=np.uint8)
        mask[:, :15] = 1
        Image.fromarray(mask).save(root / "masks" / path.name)
    options = dict(save_tokens=True, labels_from_dirs=True, class_names=["cat", "dog"], masks=root / "masks", workers=0,
                   batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # images without masks; what store=rows leaves out
        extract(tiny("registers"), paths, root / "full.h5", **options)
        extract(tiny("registers"), paths, root / "rows.h5", store="rows", **options)
        extract(tiny("registers"), paths, root / "none.h5", store="none", workers=0, batch_size=4)
        extract(tiny("no_cls_gap"), paths, root / "no_prefix.h5", workers=0, batch_size=4)
        compute_metrics(root / "full.h5", root / "metrics.h5", device="cpu")
        shards = []
        for rank, block in enumerate((paths[:2], paths[2:])):
            shard = root / "dist.h5.shards" / f"rank-{rank:03d}-of-002.h5"
            shard.parent.mkdir(exist_ok=True)
            extract(tiny("registers"), block, shard, **options)
            shards.append(shard)
    assemble(root / "dist.h5", shards, all_paths=[str(p) for p in paths], overwrite=False)
    return root


# -- typed readers ------------------------------------------------------------------------------------------

def test_typed_readers_return_the_stored_values(files):
    full, rows = files / "full.h5", files / "rows.h5"
    attn = raw(full, "attn").astype(np.float32)  # float16 as stored
    with open_cache(full) as cache:
        got = cache.attention()
        assert got.dtype == np.float32 and got.shape == (N, 2, 3, 9, 9)
        np.testing.assert_array_equal(got, attn)
        np.testing.assert_array_equal(cache.attention(1, 4, layer=-1), attn[1:4, 1])
        np.testing.assert_array_equal(cache.prefix_rows(), attn[:, :, :, :P_REGISTERS])
        np.testing.assert_array_equal(cache.prefix_rows(2, 5, layer=0), attn[2:5, 0, :, :P_REGISTERS])
        np.testing.assert_array_equal(cache.magnitude(3, 6), raw(full, "magnitude")[3:6])
        np.testing.assert_array_equal(cache.tokens(normalised=False), raw(full, "tokens"))
        want = layer_norm64(raw(full, "tokens"), raw(full, "final_norm_weight"), raw(full, "final_norm_bias"), 1e-6)
        np.testing.assert_allclose(cache.tokens(), want, rtol=1e-5, atol=1e-5)
        assert cache.tokens().dtype == np.float32
        names = ["cat", "dog"]
        assert cache.class_names == names
        assert [names[i] for i in cache.labels()] == [Path(p).parent.name for p in cache.image_ids]
        assert cache.labels(2, 4).dtype == np.int64
        fg = cache.fg()
        np.testing.assert_array_equal(fg, raw(full, "fg"))
        assert ((fg[:3] >= 0) & (fg[:3] <= 1)).all() and np.isnan(fg[3:]).all()  # images 3.. have no mask
        assert cache.skipped == []
        # on a device: float32 tensors with the same values
        tensor = cache.attention(0, 3, device="cpu")
        assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32
        np.testing.assert_array_equal(tensor.numpy(), attn[:3])
        np.testing.assert_array_equal(cache.prefix_rows(0, 3, layer=1, device="cpu").numpy(), attn[:3, 1, :, :P_REGISTERS])
        np.testing.assert_allclose(cache.tokens(0, 2, device="cpu").numpy(), want[:2], rtol=1e-5, atol=1e-5)
    with open_cache(rows) as cache:  # store=rows: the same prefix rows, without the rest
        np.testing.assert_array_equal(cache.prefix_rows(), attn[:, :, :, :P_REGISTERS])
        np.testing.assert_array_equal(cache.prefix_rows(1, 2, layer=1), attn[1:2, 1, :, :P_REGISTERS])
        with pytest.raises(AttnflowError, match="no full attention maps \\(store=rows\\); extract with --store full"):
            cache.attention()


def test_readers_say_what_a_file_lacks(files):
    with open_cache(files / "none.h5") as cache:
        with pytest.raises(AttnflowError, match="store=none"):
            cache.prefix_rows()
        for read, flag in ((cache.tokens, "--save-tokens"), (cache.labels, "--labels-from-dirs"), (cache.fg, "--masks")):
            with pytest.raises(AttnflowError, match=flag):
                read()
        np.testing.assert_array_equal(cache.magnitude(), raw(files / "full.h5", "magnitude"))
    with open_cache(files / "no_prefix.h5") as cache:
        with pytest.raises(AttnflowError, match="neither a cls token nor registers"):
            cache.prefix_rows()
    with open_cache(files / "full.h5") as cache:
        for bad in ((4, 2), (-1, 2), (N + 1, N + 2)):
            with pytest.raises(IndexError, match="not a range"):
                cache.magnitude(*bad)
        assert len(cache.magnitude(4, N + 10)) == N - 4  # as a slice: a stop past the end is the end
        with pytest.raises(IndexError, match="layer 2 is out of range"):
            cache.attention(layer=2)


def test_typed_reads_check_their_values(files, tmp_path):
    cache_path = tmp_path / "c.h5"
    shutil.copy(files / "full.h5", cache_path)
    with h5py.File(cache_path, "r+") as f:
        row = f["attn"][4]
        row[1, 2, 0, 3] = np.nan  # the cls row of head 2 in layer 1
        f["attn"][4] = row
        f["tokens"][1, 2, 7] = np.inf
    with open_cache(cache_path) as cache:
        np.testing.assert_array_equal(cache.attention(0, 4), raw(files / "full.h5", "attn")[:4].astype(np.float32))
        for read in (lambda: cache.attention(), lambda: cache.prefix_rows(3, 6, layer=1), lambda: cache.attention(4, 5, device="cpu")):
            with pytest.raises(AttnflowError, match=r"attn of image 4 \(.*\), layer 1, head 2, query 0: holds NaN"):
                read()
        with pytest.raises(AttnflowError, match=r"tokens of image 1 \(.*\), token 2, channel 7: holds NaN or infinite"):
            cache.tokens()
    metrics_path = tmp_path / "m.h5"
    shutil.copy(files / "metrics.h5", metrics_path)
    with h5py.File(metrics_path, "r+") as f:
        f["metrics/cls_self"][3, 1, 0] = np.nan
    with open_metrics(metrics_path) as metrics:
        with pytest.raises(AttnflowError, match=r"metrics/cls_self of image 3 \(.*\), layer 1, head 0: is NaN"):
            metrics.values("cls_self")
        with pytest.raises(AttnflowError, match="has no metric 'nope'"):
            metrics.values("nope")


def test_metrics_values_and_rollout_maps(files):
    path = files / "metrics.h5"
    with open_metrics(path) as metrics, h5py.File(path, "r") as f:
        assert metrics.metric_names == sorted(f["metrics"])
        for name in metrics.metric_names:
            got = metrics.values(name)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, f[f"metrics/{name}"][()], err_msg=name)
        np.testing.assert_array_equal(metrics.values("cls_self", 2, 4), f["metrics/cls_self"][2:4])
        maps = metrics.rollout_maps()
        np.testing.assert_array_equal(maps, f["rollout/map"][()])
        np.testing.assert_allclose(maps.sum(-1), 1, atol=1e-5)
        np.testing.assert_array_equal(metrics.labels(), f["labels"][()])
        assert np.isnan(metrics.fg()[3:]).all()


# -- attnflow 0.1's files ---------------------------------------------------------------------------------

def test_a_file_refused_for_its_format_names_the_attnflow_that_wrote_it(tmp_path):
    from attnflow import __version__

    written_by = f"(written by attnflow 0.1.0; this is attnflow {__version__})"
    future = shutil.copy(FIXTURES / "v0_1_cache.h5", tmp_path / "future.h5")
    with h5py.File(future, "r+") as f:
        f.attrs["schema"] = "attnflow.cache/9"
    with pytest.raises(AttnflowError, match=r"this attnflow reads 'attnflow\.cache/1' \(written by attnflow 0\.1\.0; "):
        open_cache(future)
    edited = shutil.copy(FIXTURES / "v0_1_metrics.h5", tmp_path / "edited.h5")
    with h5py.File(edited, "r+") as f:
        del f.attrs["label"]
    with pytest.raises(AttnflowError) as refused:
        open_metrics(edited)
    assert str(refused.value) == f"{edited} lacks attribute 'label' {written_by}"


def test_files_of_attnflow_0_1_still_open_and_read_the_same():
    """Fixtures written by attnflow 0.1 itself (tests/fixtures/make_v0_1_fixtures.py): no dimension scales."""
    cache_path, metrics_path = FIXTURES / "v0_1_cache.h5", FIXTURES / "v0_1_metrics.h5"
    for path in (cache_path, metrics_path):
        assert path.stat().st_size < 100_000
    with h5py.File(cache_path, "r") as f:
        assert f.attrs["attnflow_version"] == "0.1.0" and not any(h5py.h5ds.is_scale(f[k].id) for k in f)
        stored = {name: f[name][()] for name in ("attn", "magnitude", "tokens", "final_norm_weight", "final_norm_bias", "fg", "labels")}
        eps = float(f.attrs["final_norm_eps"])
    with open_cache(cache_path) as cache:
        assert len(cache) == 6 and cache.store == "full" and cache.layout.num_prefix_tokens == P_REGISTERS
        np.testing.assert_array_equal(cache.attention(), stored["attn"].astype(np.float32))
        np.testing.assert_array_equal(cache.prefix_rows(layer=-1), stored["attn"][:, -1, :, :P_REGISTERS].astype(np.float32))
        np.testing.assert_array_equal(cache.magnitude(), stored["magnitude"])
        np.testing.assert_array_equal(cache.tokens(normalised=False), stored["tokens"])
        want = layer_norm64(stored["tokens"], stored["final_norm_weight"], stored["final_norm_bias"], eps)
        np.testing.assert_allclose(cache.tokens(), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(cache.labels(), stored["labels"])
        np.testing.assert_array_equal(cache.fg(), stored["fg"])
        assert cache.image_ids[0] == "images/cat/img_000.png" and cache.class_names == ["cat", "dog"]
    with open_metrics(metrics_path) as metrics, h5py.File(metrics_path, "r") as f:
        assert len(metrics.metric_names) == 20
        for name in metrics.metric_names:
            np.testing.assert_array_equal(metrics.values(name), f[f"metrics/{name}"][()], err_msg=name)
        np.testing.assert_array_equal(metrics.rollout_maps(), f["rollout/map"][()])
    info = describe(cache_path)
    assert info["problems"] == [] and info["dimensions"] == {} and "dims" not in info["datasets"]["attn"]
    xr = pytest.importorskip("xarray")
    with xr.open_dataset(metrics_path, engine="h5netcdf", phony_dims="sort", group="metrics") as ds:
        np.testing.assert_array_equal(ds["cls_self"].values, raw(metrics_path, "metrics/cls_self"))


# -- dimension scales --------------------------------------------------------------------------------------

def assert_named_dims(path: Path, sizes: dict[str, int]) -> None:
    """Every dataset's axes carry the dimension scales DIMS (and the metrics' levels) name, of these sizes."""
    with h5py.File(path, "r") as f:
        scales = {name for name in f if isinstance(f[name], h5py.Dataset) and h5py.h5ds.is_scale(f[name].id)}
        seen = set()

        def check(name: str, obj) -> None:
            if not isinstance(obj, h5py.Dataset) or name in scales:
                return
            want = LEVEL_DIMS[obj.ndim] if name.startswith("metrics/") else DIMS[name]
            assert tuple(d.label for d in obj.dims) == want, name
            for axis, dim in enumerate(want):
                assert len(obj.dims[axis]) == 1 and obj.dims[axis][0].name == f"/{dim}", (name, axis)
                assert obj.shape[axis] == sizes[dim] == f[dim].shape[0], (name, dim)
            seen.update(want)

        f.visititems(check)
        assert scales == seen


def test_dimension_scales_name_every_axis(files):
    sizes = {"image": N, "layer": 2, "head": 3, "token": 9, "query": 9, "key": 9, "row": P_REGISTERS, "patch": 4,
             "channel": 48, "class": 2, "skipped_input": 0}
    for name in ("full.h5", "rows.h5", "metrics.h5", "dist.h5"):
        assert_named_dims(files / name, sizes)
    with h5py.File(files / "dist.h5", "r") as f:
        assert f["attn"].is_virtual and f["magnitude"].is_virtual  # the scales sit on virtual datasets too
    with open_cache(files / "dist.h5") as cache, open_cache(files / "full.h5") as single:
        np.testing.assert_array_equal(cache.attention(), single.attention())
    info = describe(files / "full.h5")
    assert info["datasets"]["attn"]["dims"] == list(DIMS["attn"]) and "image" not in info["datasets"]
    assert info["dimensions"] == {k: v for k, v in sizes.items() if k != "row"}


def test_attach_dimension_scales_is_idempotent_and_refuses_disagreeing_sizes(tmp_path):
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("magnitude", data=np.zeros((4, 2, 5), np.float32))
        f.create_dataset("image_ids", data=np.array(["a", "b", "c", "d"], dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("unknown", data=np.zeros(3))
        attach_dimension_scales(f)
        attach_dimension_scales(f)
        assert [len(d) for d in f["magnitude"].dims] == [1, 1, 1] and f["image"].shape == (4,)
        assert len(f["image"].attrs["REFERENCE_LIST"]) == 2  # magnitude and image_ids, once each
        assert [d.label for d in f["unknown"].dims] == [""]
        f.create_dataset("labels", data=np.zeros(5, np.int64))
        with pytest.raises(ValueError, match="labels: axis 0 \\(image\\) has 5 entries, other datasets 4"):
            attach_dimension_scales(f)


def test_xarray_sees_named_dimensions(files):
    xr = pytest.importorskip("xarray")
    pytest.importorskip("h5netcdf")
    path = files / "metrics.h5"
    with xr.open_dataset(path, engine="h5netcdf", phony_dims="sort", group="metrics") as ds:
        assert ds["cls_self"].dims == ("image", "layer", "head")
        assert ds["magnitude_cls"].dims == ("image", "layer")
        assert ds["fg_frac"].dims == ("image",)
        assert dict(ds.sizes) == {"image": N, "layer": 2, "head": 3}
        np.testing.assert_array_equal(ds["cls_self"].values, raw(path, "metrics/cls_self"))
        mean = ds["cls_entropy_norm"].mean("head").values
        np.testing.assert_allclose(mean, raw(path, "metrics/cls_entropy_norm").astype(np.float64).mean(-1), rtol=1e-6)
    with xr.open_dataset(path, engine="h5netcdf", group="rollout") as ds:
        assert ds["map"].dims == ("image", "layer", "patch")
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        assert ds["image_ids"].dims == ("image",) and ds["fg"].dims == ("image", "patch")
        assert ds.attrs["schema"] == "attnflow.metrics/1"
    with xr.open_dataset(files / "dist.h5", engine="h5netcdf") as ds:  # virtual datasets over the shards
        assert ds["attn"].dims == DIMS["attn"]
        np.testing.assert_array_equal(ds["attn"].values, raw(files / "full.h5", "attn"))


# -- root attributes ---------------------------------------------------------------------------------------

def test_every_written_attribute_is_declared_once(files):
    for name, kind in (("full.h5", "cache"), ("none.h5", "cache"), ("metrics.h5", "metrics"), ("dist.h5", "cache")):
        with h5py.File(files / name, "r") as f:
            written = set(f.attrs)
        assert written <= set(ROOT_ATTRS), (name, written - set(ROOT_ATTRS))
        required = {key for key, attr in ROOT_ATTRS.items() if kind in attr.required}
        assert required <= written, (name, required - written)
    assert all(attr.meaning for attr in ROOT_ATTRS.values())


def test_the_store_package_documents_the_whole_format():
    """attnflow.store's docstring, the one description of the format, names every dataset, dimension and root
    attribute attnflow writes, and every file of a run folder."""
    import attnflow.store
    from attnflow.output import RUN_MARKER
    from attnflow.store import names
    from attnflow.store.assembly import ASSEMBLY, ASSEMBLY_STATE
    from attnflow.store.write import RowFileWriter, RunLock

    doc = " ".join(attnflow.store.__doc__.split())
    tables = [names.CACHE_DATASETS, names.METRICS_DATASETS, names.PERTURB_DATASETS]
    datasets = {name for table in tables for name in table} | {names.metric_dataset("<name>")}
    dims = {dim for table in [*tables, names.METRIC_DATASETS] for expect in table.values() for dim in expect.dims}
    run_folder = {RUN_MARKER, RowFileWriter.MANIFEST, RunLock.NAME, "seg-NNNNNNNN.h5", ASSEMBLY, ASSEMBLY_STATE}
    for kind, expected in (("dataset", datasets), ("dimension", dims), ("root attribute", set(names.ROOT_ATTRS)),
                           ("run folder file", run_folder)):
        missing = sorted(name for name in expected if f"``{name}``" not in doc)
        assert not missing, f"attnflow.store's docstring does not name the {kind}s {missing}"
    for schema in (names.SCHEMA, names.METRICS_SCHEMA, names.PERTURB_SCHEMA):
        assert f"``schema = {schema}``" in doc
    assert f"``<path>{names.PARTIAL_SUFFIX}/``" in doc
