"""attnflow plot: the numbers handed to matplotlib equal the metrics, and the files are real images."""
from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from attnflow import AttnflowError, open_cache
from attnflow.store.read import open_metrics
from attnflow.extract import extract
from attnflow.images import list_images
from attnflow.plot import DPI, MAP_SIZE, PANEL_SIZE, find_image, map_data, plot_curves, plot_maps
from conftest import synthetic, write_metrics, tiny, write_mask_case


def test_curves_data_and_file(tmp_path):
    rng = np.random.default_rng(0)
    a, b = synthetic(rng, L=4), synthetic(rng, L=8)
    files = [write_metrics(tmp_path / "mae.h5", a, family="mim", num_layers=4),
             write_metrics(tmp_path / "dino.h5", b, family="jea", num_layers=8)]
    path, curves, notes = plot_curves(files, tmp_path / "curves.png", metrics=["cls_entropy_norm", "magnitude_cls"], n_bootstrap=50)
    assert set(curves) == {"cls_entropy_norm", "magnitude_cls"}
    for curve in curves["cls_entropy_norm"]:
        values, L = (a, 4) if curve.label == "mae" else (b, 8)
        want = values["cls_entropy_norm"].astype(np.float32).astype(np.float64).mean(-1).mean(0)
        np.testing.assert_allclose(curve.mean, want, rtol=1e-9)
        np.testing.assert_allclose(curve.x, (np.arange(L) + 1) / L)  # depths differ: relative depth
        assert np.all(curve.low <= curve.mean) and np.all(curve.mean <= curve.high)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (round(PANEL_SIZE[0] * 2 * DPI), round((PANEL_SIZE[1] + 0.6) * DPI))
    svg, _, _ = plot_curves(files[:1], tmp_path / "one.svg", n_bootstrap=20)
    assert svg.read_text().lstrip().startswith("<?xml")
    with pytest.raises(AttnflowError, match="use .png, .svg, .pdf"):
        plot_curves(files, tmp_path / "curves.jpg")


def test_maps_show_the_cached_attention(tmp_path):
    images, masks = write_mask_case(tmp_path)
    loaded = tiny("plain")
    paths = list_images([str(images)])
    extract(loaded, paths, tmp_path / "c.h5", masks=masks, crop_pct=1.0, dtype="float32", metrics=tmp_path / "m.h5", workers=0)
    data = map_data(tmp_path / "c.h5", "a", layer=0, heads=True)
    with open_cache(tmp_path / "c.h5") as cache, open_metrics(tmp_path / "m.h5") as metrics:
        index = cache.image_ids.index(str(paths[0]))
        rows = cache["attn"][index, 0, :, 0, 1:].astype(np.float64)
        per_head = rows / rows.sum(-1, keepdims=True)
        np.testing.assert_allclose(data.heads.reshape(3, -1), per_head)
        np.testing.assert_allclose(data.attention.ravel(), per_head.mean(0))
        np.testing.assert_allclose(data.rollout.ravel(), metrics["rollout/map"][index, 0], rtol=1e-5)
        np.testing.assert_allclose(data.fg.ravel(), cache["fg"][index])
    assert data.image.shape == (32, 32, 3) and data.image.dtype == np.uint8 and data.readout == "cls"
    np.testing.assert_array_equal(data.image, np.asarray(Image.open(paths[0]).convert("RGB")))  # crop_pct 1, same size
    path, rows_drawn, notes = plot_maps([tmp_path / "c.h5", tmp_path / "c.h5"], "a.jpg", tmp_path / "maps.png", heads=True)
    with Image.open(path) as im:
        # six map-sized columns and two rows, plus the margins that keep labels and the colour bar inside
        # (their layout: test_paper_figures)
        assert MAP_SIZE * 6 * DPI < im.size[0] < (MAP_SIZE * 6 + 2) * DPI and MAP_SIZE * 2 * DPI < im.size[1] < (MAP_SIZE * 2 + 2) * DPI


def test_maps_for_layouts_without_cls_and_rows_caches(tmp_path, image_dir):
    paths = list_images([str(image_dir)])
    extract(tiny("registers_no_cls"), paths, tmp_path / "gap.h5", dtype="float32", workers=0)
    data = map_data(tmp_path / "gap.h5", 3, layer=-1)
    with open_cache(tmp_path / "gap.h5") as cache:
        A = cache["attn"][3, -1].astype(np.float64)  # (H, T, T)
        rows = A[:, 4:, 4:] / A[:, 4:, 4:].sum(-1, keepdims=True)
        np.testing.assert_allclose(data.attention.ravel(), rows.mean(1).mean(0))
    assert data.readout == "mean of patch rows" and data.rollout is not None
    extract(tiny("registers"), paths, tmp_path / "rows.h5", store="rows", workers=0)
    rows_data = map_data(tmp_path / "rows.h5", 0)
    assert rows_data.rollout is None and rows_data.attention is not None and "no rollout" in rows_data.notes[0]
    plot_maps([tmp_path / "gap.h5", tmp_path / "rows.h5"], 0, tmp_path / "mixed.pdf")
    assert (tmp_path / "mixed.pdf").read_bytes().startswith(b"%PDF")


def test_image_lookup():
    ids = ["data/cat/001.png", "data/dog/001.png", "data/cat/002.jpg"]
    assert find_image(ids, 2) == 2 and find_image(ids, "-1") == 2
    assert find_image(ids, "002.jpg") == 2 and find_image(ids, "002") == 2 and find_image(ids, "data/dog/001.png") == 1
    with pytest.raises(AttnflowError, match="matches 2 images"):
        find_image(ids, "001.png")
    with pytest.raises(AttnflowError, match="out of range"):
        find_image(ids, 3)
    with pytest.raises(AttnflowError, match="no image 'zebra'"):
        find_image(ids, "zebra")


def test_plot_cli_and_missing_matplotlib(tmp_path, image_dir, run_cli, monkeypatch):
    write_metrics(tmp_path / "m.h5", synthetic(np.random.default_rng(1)))
    result = run_cli("plot", "curves", tmp_path / "m.h5", "-o", tmp_path / "c.png", "--bootstrap", 20)
    assert result.exit_code == 0 and (tmp_path / "c.png").is_file() and result.stdout == ""
    extract(tiny("plain"), list_images([str(image_dir)]), tmp_path / "c.h5", workers=0)
    (image_dir / "cat" / "img_000.png").unlink()
    moved = run_cli("plot", "maps", tmp_path / "c.h5", "--image", "img_000", "-o", tmp_path / "x.png")
    assert moved.exit_code == 1 and "cannot read image" in moved.stderr and "img_000.png" in moved.stderr
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    missing = run_cli("plot", "curves", tmp_path / "m.h5", "-o", tmp_path / "d.png")
    assert missing.exit_code == 1 and "pip install 'attnflow[plot]'" in missing.stderr
