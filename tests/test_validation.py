"""Every reader validates what it reads: real caches and metrics files, edited with h5py into one kind of
inconsistency each, give one line on stderr (exit 1, no traceback) naming the file and what is wrong; good
files of every layout and store mode still pass."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from attnflow import open_cache
from attnflow.store.read import open_metrics
from attnflow.distributed import assemble
from attnflow.extract import extract
from attnflow.images import list_images
from attnflow.measure import compute_metrics
from conftest import TINY_VITS, write_images, tiny

N = 8  # images; those of index < 4 have an object mask


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A float16 cache of the plain tiny ViT with tokens, labels and masks (for half the images), its metrics
    file, and the same images extracted as two shards of a distributed run, per file kind."""
    root = tmp_path_factory.mktemp("validation")
    paths = write_images(root / "images", N, size=(40, 40))
    (root / "masks").mkdir()
    for path in paths[:4]:
        mask = np.zeros((40, 40), dtype=np.uint8)
        mask[:, :20] = 1
        Image.fromarray(mask).save(root / "masks" / path.name)
    paths = list_images([str(root / "images")])
    options = dict(save_tokens=True, labels_from_dirs=True, class_names=["cat", "dog"], masks=root / "masks", workers=0,
                   batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # images without masks, said once
        extract(tiny("plain"), paths, root / "cache.h5", **options)
        compute_metrics(root / "cache.h5", root / "metrics.h5", device="cpu")
        shards, metric_shards = [], []
        for rank, block in enumerate((paths[:3], paths[3:])):
            shard = root / "dist.h5.shards" / f"rank-{rank:03d}-of-002.h5"
            metric_shard = root / "dist_m.h5.shards" / f"rank-{rank:03d}-of-002.h5"
            for folder in (shard.parent, metric_shard.parent):
                folder.mkdir(exist_ok=True)
            extract(tiny("plain"), block, shard, **options)
            compute_metrics(shard, metric_shard, device="cpu")
            shards.append(shard)
            metric_shards.append(metric_shard)
    texts = [str(p) for p in paths]
    assemble(root / "dist.h5", shards, all_paths=texts, overwrite=False)
    assemble(root / "dist_m.h5", metric_shards, all_paths=texts, overwrite=False)
    return root


def copy(base: Path, name: str, tmp_path: Path, edit=None) -> Path:
    """A copy of ``base/name`` in ``tmp_path``, edited in place with h5py by ``edit(file)``."""
    path = tmp_path / name
    shutil.copy(base / name, path)
    if edit is not None:
        with h5py.File(path, "r+") as f:
            edit(f)
    return path


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 1, (result.exit_code, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnflow: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def replace(f: h5py.File, name: str, data: np.ndarray) -> None:
    del f[name]
    f.create_dataset(name, data=data)


def set_attr(key, value):
    def edit(f):
        f.attrs[key] = value
    return edit


def set_values(name, index, value):
    def edit(f):
        f[name][index] = value
    return edit


def edit_row(name, image, change):
    """Rewrite one image's row of ``name`` through HDF5 (the chunk is compressed again as the file's)."""
    def edit(f):
        row = f[name][image]
        change(row)
        f[name][image] = row
    return edit


def scale_row(row):
    row[1, 0, 2] *= 1.3


def make_negative(row):
    row[1, 0, 2, 1] += row[1, 0, 2, 0] + 0.1
    row[1, 0, 2, 0] = -0.1


def put_nan(row):
    row[1, 0, 2, 3] = np.nan


def shape_change(name, shape_of):
    def edit(f):
        replace(f, name, np.zeros(shape_of(f[name].shape), dtype=f[name].dtype))
    return edit


def retype(name, dtype):
    def edit(f):
        replace(f, name, f[name][()].astype(dtype))
    return edit


# -- the cache: attributes, shapes, dtypes, values ----------------------------------------------------------

CACHE_CASES = {
    "missing attribute": (lambda f: f.attrs.__delitem__("n_images"), ["lacks attribute 'n_images'"]),
    "float num_layers": (set_attr("num_layers", 2.5), ["attribute 'num_layers' is 2.5, not a positive integer"]),
    "int has_cls": (set_attr("has_cls", 1), ["attribute 'has_cls' is 1, not true or false"]),
    "three grid sizes": (set_attr("grid_size", [2, 2, 1]), ["attribute 'grid_size'", "two positive integers"]),
    "zero patch size": (set_attr("patch_size", [0, 8]), ["attribute 'patch_size'", "two positive integers"]),
    "unknown store": (set_attr("store", "most"), ["attribute 'store' is 'most'"]),
    "num_tokens off the grid": (set_attr("num_tokens", 18), ["num_tokens is 18", "1 + 4 x 4 = 17"]),
    "cls without prefix": (lambda f: f.attrs.update({"num_prefix_tokens": 0, "num_tokens": 16, "num_registers": 0}),
                           ["has_cls is true but num_prefix_tokens is 0"]),
    "registers miscounted": (set_attr("num_registers", 2), ["num_registers is 2", "1 - 1 = 0"]),
    "img_size below the grid": (set_attr("img_size", [16, 32]), ["img_size 16x32 is smaller than", "32x32"]),
    "n_images off": (set_attr("n_images", N + 1), [f"dataset 'image_ids' has {N} rows, n_images is {N + 1}"]),
    "attn shape": (shape_change("attn", lambda s: (*s[:-1], s[-1] - 1)), ["dataset 'attn' has shape (8, 2, 3, 17, 16)", "(n, L, H, T, T)"]),
    "integer attn": (retype("attn", np.int64), ["dataset 'attn' holds int64, not floating-point values"]),
    "attn dtype not the attribute's": (retype("attn", np.float32), ["'attn' holds float32, but the attribute dtype says float16"]),
    "magnitude layers": (shape_change("magnitude", lambda s: (s[0], s[1] + 1, s[2])), ["dataset 'magnitude' has shape (8, 3, 17)"]),
    "tokens width": (shape_change("final_norm_weight", lambda s: (s[0] + 1,)), ["dataset 'final_norm_weight' has shape (49,)", "(D,) = (48,)"]),
    "fg patches": (shape_change("fg", lambda s: (s[0], s[1] - 1)), ["dataset 'fg' has shape (8, 15)", "(n, P) = (8, 16)"]),
    "float labels": (retype("labels", np.float64), ["dataset 'labels' holds float64, not integers"]),
    "label out of range": (set_values("labels", 2, 5), ["label 5 of image 2 is not an index into class_names (2 classes)"]),
    "no class names": (lambda f: f.__delitem__("class_names"), ["lacks dataset 'class_names'"]),
    "no magnitude": (lambda f: f.__delitem__("magnitude"), ["lacks dataset 'magnitude'"]),
    # values, checked batch by batch as they are read
    "attn rows off": (edit_row("attn", 3, scale_row),
                      ["attn of image 3 (", "img_006.png), layer 1, head 0, query 2: rows do not sum to 1 (max deviation 0.3"]),
    "negative attn": (edit_row("attn", 3, make_negative), ["attn of image 3 (", "layer 1, head 0, query 2: holds negative values"]),
    "NaN attn": (edit_row("attn", 6, put_nan), ["attn of image 6 (", "layer 1, head 0, query 2: holds NaN or infinite values"]),
    "infinite magnitude": (set_values("magnitude", (5, 0, 1), np.inf), ["magnitude of image 5 (", "layer 0, token 1: holds NaN or infinite"]),
    "fg beyond 1": (set_values("fg", (1, 3), 2.0), ["fg of image 1 (", "patch 3: holds 2, not an object fraction in [0, 1]"]),
}


@pytest.mark.parametrize("case", list(CACHE_CASES))
def test_inconsistent_cache_is_one_line_for_metrics(base, tmp_path, run_cli, case):
    edit, needles = CACHE_CASES[case]
    cache = copy(base, "cache.h5", tmp_path, edit)
    result = run_cli("metrics", cache, "-o", tmp_path / "m.h5", "--device", "cpu", "-q")
    assert_one_line_error(result, f"{cache}", *needles)
    assert not (tmp_path / "m.h5").exists()


def test_info_describes_a_broken_cache_and_says_what_is_wrong(base, tmp_path, run_cli):
    cache = copy(base, "cache.h5", tmp_path, set_attr("num_registers", 2))
    result = run_cli("info", cache)
    assert result.exit_code == 0 and "Traceback" not in result.stderr
    assert "num_registers" in result.stdout and "/attn" in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnflow: warning: ") and "num_registers is 2" in lines[0]
    clean = run_cli("info", base / "cache.h5")
    assert clean.exit_code == 0 and clean.stderr == ""


def test_probe_checks_tokens_and_attention(base, tmp_path, run_cli):
    args = ["--split", "0.5", "--pool", "cls", "--pool", "cls-attn", "--evaluator", "knn", "--bootstrap", "5"]
    good = run_cli("probe", base / "cache.h5", *args)
    assert good.exit_code == 0, good.stderr
    tokens = copy(base, "cache.h5", tmp_path, set_values("tokens", (2, 1, 5), np.nan))
    assert_one_line_error(run_cli("probe", tokens, *args), "tokens of image 2 (", "token 1, channel 5: holds NaN")
    (tmp_path / "a").mkdir()
    attn = copy(base, "cache.h5", tmp_path / "a", edit_row("attn", 4, lambda row: row[-1].__imul__(0.5)))
    assert_one_line_error(run_cli("probe", attn, *args), "attn of image 4 (", "layer 1, head 0, query", "rows do not sum to 1 (max deviation 0.5)")


def test_plot_maps_checks_the_maps_it_draws(base, tmp_path, run_cli):
    cache = copy(base, "cache.h5", tmp_path, edit_row("attn", 3, scale_row))
    fine = run_cli("plot", "maps", cache, "--image", "2", "-o", tmp_path / "fine.png")
    assert fine.exit_code == 0, fine.stderr  # only the image drawn is read
    result = run_cli("plot", "maps", cache, "--image", "3", "-o", tmp_path / "bad.png")
    assert_one_line_error(result, "attn of image 3 (", "rows do not sum to 1")
    assert not (tmp_path / "bad.png").exists()


# -- the metrics file -------------------------------------------------------------------------------------

METRICS_CASES = {
    "head metric of layer rank": (shape_change("metrics/cls_self", lambda s: s[:2]),
                                  ["dataset 'metrics/cls_self' has shape (8, 2), expected 3 axes (n, L, H)"]),
    "metric rows": (shape_change("metrics/magnitude_cls", lambda s: (s[0] - 1, s[1])), ["'metrics/magnitude_cls' has 7 rows, n_images is 8"]),
    "integer metric": (retype("metrics/attn_distance", np.int32), ["'metrics/attn_distance' holds int32, not floating-point"]),
    "rollout map patches": (shape_change("rollout/map", lambda s: (s[0], s[1], s[2] + 1)), ["'rollout/map' has shape (8, 2, 17)", "(n, L, P)"]),
    "heads miscounted": (set_attr("num_heads", 4), ["'metrics/attn_distance' has shape (8, 2, 3), expected (n, L, H) = (8, 2, 4)"]),
    "NaN where never": (set_values("metrics/cls_self", (2, 1, 0), np.nan),
                        ["metrics/cls_self of image 2 (", "layer 1, head 0: is NaN, which it can only be for a model without a cls token"]),
    "infinite metric": (set_values("metrics/attn_distance", (0, 0, 2), np.inf), ["metrics/attn_distance of image 0 (", "head 2: is infinite"]),
    "NaN entropy of a cls row on patches": (set_values("metrics/cls_entropy_norm", (5, 0, 1), np.nan),
                                            ["metrics/cls_entropy_norm of image 5 (", "where the cls row puts no attention on patches"]),
    "NaN fg mass of a masked image": (set_values("metrics/fg_frac", 1, np.nan),
                                      ["metrics/fg_frac of image 1 (", "is NaN, which it can only be for an image without an object mask"]),
}


@pytest.mark.parametrize("case", list(METRICS_CASES))
def test_inconsistent_metrics_file_is_one_line_for_compare(base, tmp_path, run_cli, case):
    edit, needles = METRICS_CASES[case]
    metrics = copy(base, "metrics.h5", tmp_path, edit)
    result = run_cli("compare", metrics, "--metric", "cls_self", "--metric", "cls_entropy_norm", "--metric", "attn_distance",
                     "--metric", "magnitude_cls", "--metric", "fg_frac", "--bootstrap", "10")
    assert_one_line_error(result, f"{metrics}", *needles)


def test_legitimate_nans_pass(base, tmp_path, run_cli):
    """NaN where the metric is undefined: a cls row with no patch mass, an image without a mask (the base)."""
    def edit(f):
        f["metrics/cls_to_patch"][5, 0, 1] = 0.0
        f["metrics/cls_entropy_norm"][5, 0, 1] = np.nan
    metrics = copy(base, "metrics.h5", tmp_path, edit)
    with open_metrics(metrics) as mf:
        assert np.isnan(mf.metric("fg_frac")[()][4:]).all()  # images without masks
    result = run_cli("compare", metrics, "--metric", "cls_entropy_norm", "--metric", "fg_frac", "--bootstrap", "10")
    assert result.exit_code == 0, result.stderr


def test_plot_curves_checks_metric_values(base, tmp_path, run_cli):
    metrics = copy(base, "metrics.h5", tmp_path, set_values("metrics/magnitude_cls", (3, 1), np.nan))
    result = run_cli("plot", "curves", metrics, "-o", tmp_path / "c.png", "--metric", "magnitude_cls")
    assert_one_line_error(result, "metrics/magnitude_cls of image 3 (", "layer 1: is NaN")


# -- distributed files moved without their shards ---------------------------------------------------------

def test_moved_without_shards(base, tmp_path, run_cli):
    with open_cache(base / "dist.h5") as cache, open_cache(base / "cache.h5") as single:
        assert cache["attn"].is_virtual
        np.testing.assert_array_equal(cache.read_rows("attn", 0, N), single.read_rows("attn", 0, N))
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("dist.h5", "dist_m.h5"):
        shutil.copy(base / name, moved / name)
    result = run_cli("metrics", moved / "dist.h5", "-o", tmp_path / "m.h5", "-q")
    assert_one_line_error(result, f"{moved / 'dist.h5'} reads its rows from dist.h5.shards/rank-000-of-002.h5, which is missing",
                          "keep the dist.h5.shards folder next to the file (or re-extract)")
    result = run_cli("compare", moved / "dist_m.h5", "--bootstrap", "10")
    assert_one_line_error(result, "dist_m.h5 reads its rows from dist_m.h5.shards/rank-000-of-002.h5, which is missing")
    info = run_cli("info", moved / "dist.h5")
    assert info.exit_code == 0 and "/attn" in info.stdout and "Traceback" not in info.stderr
    assert len(info.stderr.strip().splitlines()) == 1 and "which is missing" in info.stderr
    # with the folder, but one shard lost
    shutil.copytree(base / "dist.h5.shards", moved / "dist.h5.shards")
    (moved / "dist.h5.shards" / "rank-001-of-002.h5").unlink()
    result = run_cli("plot", "maps", moved / "dist.h5", "--image", "0", "-o", tmp_path / "p.png")
    assert_one_line_error(result, "reads its rows from dist.h5.shards/rank-001-of-002.h5, which is missing",
                          "keep rank-001-of-002.h5 next to the file")


def test_shard_without_the_dataset_or_rows(base, tmp_path, run_cli):
    for name in ("dist.h5", "dist.h5.shards"):
        (shutil.copytree if name.endswith("shards") else shutil.copy)(base / name, tmp_path / name)
    shard = tmp_path / "dist.h5.shards" / "rank-001-of-002.h5"
    with h5py.File(shard, "r+") as f:
        replace(f, "magnitude", f["magnitude"][:2])
    result = run_cli("metrics", tmp_path / "dist.h5", "-o", tmp_path / "m.h5", "-q")
    assert_one_line_error(result, f"reads magnitude rows of shape (5, 2, 17) from {shard}", "has shape (2, 2, 17)")
    with h5py.File(shard, "r+") as f:
        del f["magnitude"]
    result = run_cli("metrics", tmp_path / "dist.h5", "-o", tmp_path / "m.h5", "-q")
    assert_one_line_error(result, f"reads magnitude from {shard}, which has no dataset 'magnitude'")


# -- damaged compressed chunks ------------------------------------------------------------------------------

def flip_chunk(path: Path, name: str, index: int) -> None:
    """Overwrite bytes in the middle of chunk ``index`` of dataset ``name``, as a bad disk sector would."""
    with h5py.File(path, "r") as f:
        info = f[name].id.get_chunk_info(index)
    with open(path, "r+b") as raw:
        raw.seek(info.byte_offset + info.size // 2)
        block = raw.read(4)
        raw.seek(info.byte_offset + info.size // 2)
        raw.write(bytes(b ^ 0xFF for b in block))


def test_corrupt_chunks_are_one_line(base, tmp_path, run_cli):
    cache = copy(base, "cache.h5", tmp_path)
    flip_chunk(cache, "attn", 5)  # chunks are (image, layer): image 2, layer 1
    # metrics and plot read the maps through attnflow's parallel gzip reader; magnitude below through HDF5's own filter
    result = run_cli("metrics", cache, "-o", tmp_path / "m.h5", "-q")
    assert_one_line_error(result, f"{cache}: cannot read attn of image 2 (", "(reading rows 0:8)", "re-extract")
    result = run_cli("plot", "maps", cache, "--image", "2", "-o", tmp_path / "p.png")
    assert_one_line_error(result, f"{cache}: cannot read attn of image 2 (", "re-extract")
    (tmp_path / "b").mkdir()
    other = copy(base, "cache.h5", tmp_path / "b")
    flip_chunk(other, "magnitude", 0)  # one chunk of 64 images, inflated by HDF5
    result = run_cli("metrics", other, "-o", tmp_path / "b" / "m.h5", "-q")
    assert_one_line_error(result, f"{other}: cannot read magnitude of image 0 (", "re-extract")


# -- no false alarms --------------------------------------------------------------------------------------

def test_good_files_of_every_layout_and_store_pass(base, tmp_path, run_cli):
    paths = list_images([str(base / "images")])
    metrics = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind in TINY_VITS:
            extract(tiny(kind), paths, tmp_path / f"{kind}.h5", workers=0, batch_size=8)
        extract(tiny("plain"), paths, tmp_path / "rows.h5", store="rows", workers=0, batch_size=8)
        extract(tiny("plain"), paths, tmp_path / "f32.h5", dtype="float32", compression="lzf", workers=0, batch_size=8)
        extract(tiny("no_cls_gap"), paths, tmp_path / "none.h5", store="none", save_tokens=True, labels_from_dirs=True,
                metrics=tmp_path / "none_m.h5", workers=0, batch_size=8)
    for name in [*TINY_VITS, "rows", "f32"]:
        result = run_cli("metrics", tmp_path / f"{name}.h5", "-o", tmp_path / f"{name}_m.h5", "-q", "--device", "cpu")
        assert result.exit_code == 0, (name, result.stderr)
        assert "error" not in result.stderr
        metrics.append(tmp_path / f"{name}_m.h5")
    metrics += [tmp_path / "none_m.h5", base / "metrics.h5", base / "dist_m.h5"]
    result = run_cli("compare", *metrics, "--bootstrap", "10", "--format", "csv")
    assert result.exit_code == 0, result.stderr
    result = run_cli("probe", tmp_path / "none.h5", "--split", "0.5", "--pool", "mean", "--evaluator", "knn", "--bootstrap", "5")
    assert result.exit_code == 0, result.stderr
    caches = [tmp_path / f"{kind}.h5" for kind in TINY_VITS] + [tmp_path / "rows.h5", tmp_path / "none.h5", base / "dist.h5"]
    result = run_cli("plot", "maps", *caches, "--image", "1", "-o", tmp_path / "maps.png")
    assert result.exit_code == 0, result.stderr
    for path in [*caches, *metrics]:
        info = run_cli("info", path)
        assert info.exit_code == 0 and "warning" not in info.stderr, (path, info.stderr)
    with open_cache(tmp_path / "registers.h5") as cache:  # every read shape the readers use
        cache["attn"][:, -1], cache["attn"][2, 1, :, 0, :], cache["attn"][..., 3:], cache["attn"][[0, 2], 1]
        cache["magnitude"][1:3], np.asarray(cache["magnitude"])
        tensor = cache.read_rows("attn", 2, 5, device="cpu")
        np.testing.assert_array_equal(tensor.numpy(), cache["attn"][2:5].astype(np.float32))
    # store=rows maps are checked too
    rows = tmp_path / "rows.h5"
    with h5py.File(rows, "r+") as f:
        f["attn_rows"][1, 0, 2, 0, 4] = np.nan
    result = run_cli("metrics", rows, "-o", tmp_path / "rows_again.h5", "-q")
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]  # after the note on what store=rows leaves out
    assert last.startswith("attnflow: error: ") and result.stderr.count("error") == 1
    assert "attn_rows of image 1 (" in last and "layer 0, head 2, row 0: holds NaN or infinite values" in last


def test_a_folder_given_as_a_file_is_named_as_such(tmp_path, run_cli):
    (tmp_path / "folder").mkdir()
    for command in (["metrics", tmp_path / "folder", "-o", tmp_path / "m.h5"], ["compare", tmp_path / "folder"],
                    ["info", tmp_path / "folder"]):
        result = run_cli(*command)
        assert result.exit_code == 1 and "Traceback" not in result.stderr, (command, result.stderr)
        assert result.stderr.strip() == f"attnflow: error: {tmp_path / 'folder'} is a directory, not an attnflow file"
