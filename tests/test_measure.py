"""Metrics files: from a cache, streamed during extraction, with object masks, through the CLI."""
from __future__ import annotations

import csv
import io
import json
import math

import h5py
import numpy as np
import pytest

from attnflow import AttnflowError, open_cache
from attnflow.errors import OptionError
from attnflow.store.names import METRICS_SCHEMA
from attnflow.store.read import open_metrics
from attnflow.extract import extract
from attnflow.images import list_images
from attnflow.measure import compute_metrics, layer_summary
from attnflow.metrics import available_metrics
from conftest import Interrupt, read_all, tiny, write_mask_case
from test_metrics import reference_metrics


def test_metrics_file_equals_the_loop_reference_on_the_cached_maps(tmp_path, image_dir):
    loaded = tiny("registers")
    extract(loaded, list_images([str(image_dir)]), tmp_path / "c.h5", dtype="float32", labels_from_dirs=True, workers=0)
    compute_metrics(tmp_path / "c.h5", tmp_path / "m.h5", batch_size=3, fusion="max", discard_ratio=0.2)
    with open_cache(tmp_path / "c.h5") as cache, open_metrics(tmp_path / "m.h5") as metrics:
        A = cache["attn"][()].astype(np.float64)
        ref, ref_maps = reference_metrics(A, cache.layout, fusion="max", discard=0.2)
        assert set(metrics.metric_names) == set(available_metrics(cache.layout, full_maps=True, has_fg=False, has_token_norm=True))
        for name in metrics.metric_names:
            got = metrics.metric(name)[()]
            assert got.dtype == np.float32
            if name in ref:
                np.testing.assert_allclose(got, ref[name], rtol=1e-4, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(metrics["rollout/map"][()], ref_maps, rtol=1e-4, atol=1e-6)
        magnitude = cache["magnitude"][()]
        np.testing.assert_allclose(metrics.metric("magnitude_cls")[()], magnitude[:, :, 0], rtol=1e-6)
        np.testing.assert_allclose(metrics.metric("magnitude_patch")[()], magnitude[:, :, 5:].mean(-1), rtol=1e-5)
        assert metrics.image_ids == cache.image_ids
        np.testing.assert_array_equal(metrics["labels"][()], cache["labels"][()])
        a = metrics.attrs
        assert a["schema"] == METRICS_SCHEMA and a["fusion"] == "max" and a["discard_ratio"] == pytest.approx(0.2)
        assert a["model"] == cache.attrs["model"] and a["num_registers"] == 4 and a["n_images"] == 10
        assert a["source"] == str((tmp_path / "c.h5").resolve())


def test_streaming_metrics_equal_the_two_step_path(tmp_path, image_dir):
    loaded = tiny("plain")
    paths = list_images([str(image_dir)])
    # attention flow too: both paths write a batch's rows through one function
    extract(loaded, paths, tmp_path / "c.h5", dtype="float32", metrics=tmp_path / "streamed.h5", batch_size=4, workers=0,
            flow=True, flow_layers=(0, -1))
    compute_metrics(tmp_path / "c.h5", tmp_path / "two_step.h5", batch_size=3, flow=True, flow_layers=(0, -1))
    streamed, two_step = read_all(tmp_path / "streamed.h5"), read_all(tmp_path / "two_step.h5")
    assert set(streamed) == set(two_step)
    assert {"metrics/cls_entropy_norm", "rollout/map", "flow/map"} <= set(two_step)
    with h5py.File(tmp_path / "streamed.h5") as s, h5py.File(tmp_path / "two_step.h5") as t:
        assert list(s.attrs["flow_layers"]) == list(t.attrs["flow_layers"]) == [0, 1]
    with pytest.raises(OptionError, match="^flow: .*add metrics"):
        extract(loaded, paths, tmp_path / "flow_only.h5", flow=True, workers=0)
    for name, want in two_step.items():
        if want.dtype.kind == "f":
            np.testing.assert_allclose(streamed[name], want, rtol=1e-5, atol=1e-7, err_msg=name)
        else:
            np.testing.assert_array_equal(streamed[name], want, err_msg=name)
    # with --store none the streamed metrics are the same: they never depended on what the cache keeps
    extract(loaded, paths, tmp_path / "none.h5", store="none", metrics=tmp_path / "streamed_none.h5", workers=0)
    with h5py.File(tmp_path / "streamed_none.h5") as s, h5py.File(tmp_path / "streamed.h5") as t:
        np.testing.assert_array_equal(s["metrics/cls_gini"][()], t["metrics/cls_gini"][()])





def test_masks_give_patch_fractions_and_fg_mass(tmp_path):
    images, masks = write_mask_case(tmp_path)
    loaded = tiny("plain")  # 32 px, patch 8: a 4x4 grid
    extract(loaded, list_images([str(images)]), tmp_path / "c.h5", masks=masks, crop_pct=1.0, dtype="float32",
            metrics=tmp_path / "m.h5", workers=0)
    left = np.tile([1.0, 1.0, 0.0, 0.0], 4)
    top = np.repeat([1.0, 1.0, 0.0, 0.0], 4)
    with open_cache(tmp_path / "c.h5") as cache, open_metrics(tmp_path / "m.h5") as metrics:
        np.testing.assert_allclose(cache["fg"][()], np.stack([left, top]), atol=1e-6)
        np.testing.assert_allclose(metrics["fg"][()], cache["fg"][()])
        np.testing.assert_allclose(metrics.metric("fg_frac")[()], [0.5, 0.5], atol=1e-6)
        cls_rows = cache["attn"][:, :, :, 0, 1:].astype(np.float64)
        q = cls_rows / cls_rows.sum(-1, keepdims=True)
        want = (q * np.stack([left, top])[:, None, None, :]).sum(-1)
        np.testing.assert_allclose(metrics.metric("cls_fg_mass")[()], want, rtol=1e-5)
        maps = metrics["rollout/map"][()]
        np.testing.assert_allclose(metrics.metric("rollout_fg_mass")[()], (maps * np.stack([left, top])[:, None]).sum(-1), rtol=1e-5)


def test_images_without_masks_get_nan_and_a_warning(tmp_path):
    images, masks = write_mask_case(tmp_path)
    (masks / "nested" / "b.png").unlink()
    with pytest.warns(UserWarning, match="no mask .* for 1 of 2 images"):
        extract(tiny("plain"), list_images([str(images)]), tmp_path / "c.h5", masks=masks, workers=0)
    with open_cache(tmp_path / "c.h5") as cache:
        fg = cache["fg"][()]
        assert not np.isnan(fg[0]).any() and np.isnan(fg[1]).all()
    (masks / "nested" / "a.png").unlink()
    with pytest.raises(AttnflowError, match="no mask in"):
        extract(tiny("plain"), list_images([str(images)]), tmp_path / "d.h5", masks=masks, workers=0)


def test_rows_cache_gives_cls_metrics_and_none_cache_is_refused(tmp_path, image_dir):
    loaded = tiny("registers")
    paths = list_images([str(image_dir)])
    extract(loaded, paths, tmp_path / "full.h5", dtype="float32", workers=0)
    extract(loaded, paths, tmp_path / "rows.h5", store="rows", dtype="float32", workers=0)
    compute_metrics(tmp_path / "full.h5", tmp_path / "m_full.h5")
    with pytest.warns(UserWarning, match="store=rows"):
        compute_metrics(tmp_path / "rows.h5", tmp_path / "m_rows.h5")
    with open_metrics(tmp_path / "m_rows.h5") as rows, open_metrics(tmp_path / "m_full.h5") as full:
        assert "cls_entropy_norm" in rows.metric_names and "patch_entropy" not in rows.metric_names
        assert "rollout/map" not in rows
        for name in rows.metric_names:
            np.testing.assert_array_equal(rows.metric(name)[()], full.metric(name)[()], err_msg=name)
    extract(loaded, paths, tmp_path / "none.h5", store="none", workers=0)
    with pytest.raises(AttnflowError, match="stores no attention maps"):
        compute_metrics(tmp_path / "none.h5", tmp_path / "m_none.h5")


def test_no_cls_model_has_nan_cls_metrics(tmp_path, image_dir):
    extract(tiny("registers_no_cls"), list_images([str(image_dir)]), tmp_path / "c.h5", workers=0)
    with pytest.warns(UserWarning, match="no cls token"):
        compute_metrics(tmp_path / "c.h5", tmp_path / "m.h5")
    with open_metrics(tmp_path / "m.h5") as metrics:
        for name in metrics.metric_names:
            values = metrics.metric(name)[()]
            if name.startswith("cls_") or name in ("patch_to_cls", "magnitude_cls"):
                assert np.isnan(values).all(), name
            else:
                assert not np.isnan(values).any(), name
        rows, columns = layer_summary(metrics)
        assert math.isnan(rows[0]["cls_self"]) and not math.isnan(rows[0]["rollout_entropy_norm"])


def test_metrics_cli_tables(tmp_path, image_dir, run_cli):
    extract(tiny("no_cls_gap"), list_images([str(image_dir)]), tmp_path / "c.h5", workers=0)
    result = run_cli("metrics", tmp_path / "c.h5", "-o", tmp_path / "m.h5", "--format", "csv")
    assert result.exit_code == 0, result.stderr
    table = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(table) == 2 and table[0]["layer"] == "0" and table[0]["cls_self"] == "nan"
    with open_metrics(tmp_path / "m.h5") as metrics:
        want = metrics.metric("attn_distance")[()][:, 1].astype(np.float64).mean()
    assert float(table[1]["attn_distance"]) == pytest.approx(want, rel=1e-6)
    assert "no cls token" in result.stderr and result.stderr.count("no cls token") == 1
    as_json = run_cli("metrics", tmp_path / "c.h5", "-o", tmp_path / "m.h5", "--format", "json", "--overwrite")  # -q: no table
    rows = json.loads(as_json.stdout)
    assert rows[0]["cls_self"] is None and isinstance(rows[0]["patch_entropy_norm"], float)
    wrong = run_cli("metrics", tmp_path / "m.h5", "-o", tmp_path / "x.h5")
    assert wrong.exit_code == 1 and "is a metrics file, not an attention cache" in wrong.stderr
    exists = run_cli("metrics", tmp_path / "c.h5", "-o", tmp_path / "m.h5")
    assert exists.exit_code == 1 and "--overwrite" in exists.stderr


def test_interrupted_streaming_run_resumes_both_files(tmp_path, image_dir):
    loaded = tiny("plain")
    paths = list_images([str(image_dir)])
    options = dict(batch_size=3, workers=0, dtype="float32")
    extract(loaded, paths, tmp_path / "whole.h5", metrics=tmp_path / "whole_m.h5", **options)

    def stop(done, total):
        if done >= 6:
            raise Interrupt

    with pytest.raises(Interrupt):
        extract(loaded, paths, tmp_path / "c.h5", metrics=tmp_path / "m.h5", on_progress=stop, **options)
    # the metrics file is a batch behind the cache, as if interrupted between the two commits
    metric_segments = sorted((tmp_path / "m.h5.partial").glob("seg-*.h5"))
    assert len(metric_segments) == 2
    metric_segments[-1].unlink()
    extract(loaded, paths, tmp_path / "c.h5", metrics=tmp_path / "m.h5", resume=True, **options)
    for done, whole in (("c.h5", "whole.h5"), ("m.h5", "whole_m.h5")):
        got, want = read_all(tmp_path / done), read_all(tmp_path / whole)
        assert set(got) == set(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{done}:{name}")
