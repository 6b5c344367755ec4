"""Before a large extract: the cache's size is estimated from the model and the options (and equals what an
uncompressed cache takes), and a model's unusually large default resolution is pointed out."""
from __future__ import annotations

import pytest

from attnflow.extract import LONG_EXTRACT_SECONDS, cache_bytes_per_image, extract, size_notes, time_note
from attnflow.images import list_images
from attnflow.models import LoadedModel
from attnflow.options import ExtractOptions
from conftest import make_tiny, write_images


def tiny64() -> LoadedModel:
    model = make_tiny("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=2, embed_dim=48, num_heads=3)
    return LoadedModel(model=model, name="tiny64", checkpoint="", checkpoint_sha256="", weights="random",
                       family="unknown", label="tiny64")


@pytest.mark.parametrize("store, save_tokens, dtype", [("full", False, "float16"), ("full", True, "float32"),
                                                      ("rows", True, "float16")])
def test_estimate_is_the_uncompressed_size(tmp_path, store, save_tokens, dtype):
    paths = write_images(tmp_path / "images", 24, size=(64, 64))
    options = ExtractOptions().replace(store=store, save_tokens=save_tokens, dtype=dtype, compression="none", workers=0)
    loaded = tiny64()
    result = extract(loaded, list_images([str(tmp_path / "images")]), tmp_path / "c.h5", options)
    estimate = cache_bytes_per_image(loaded, options) * len(paths)
    size = result.path.stat().st_size
    # the datasets themselves; HDF5's metadata, the image paths and the attributes add a little on top
    assert estimate <= size <= 1.1 * estimate + 64_000, (estimate, size)


def test_notes_before_a_large_extract():
    loaded = tiny64()
    options = ExtractOptions()
    per_image = cache_bytes_per_image(loaded, options)
    assert size_notes(loaded, options, 10, img_size_given=False) == []  # 64 px, small: nothing to say
    many = (1 << 30) // per_image + 1
    [note] = size_notes(loaded, options, many, img_size_given=False)
    assert note.startswith("the cache will take about 1.1 GB before compression") and f"x {many:,}" in note


def test_cli_points_out_a_large_default_resolution(run_cli, tmp_path):
    write_images(tmp_path / "images", 1)
    result = run_cli("extract", "vit_small_patch14_dinov2", tmp_path / "images", "--random-init", "--store", "none",
                     "-o", tmp_path / "c.h5", "--workers", "0")
    assert result.exit_code == 0, result.stderr
    assert "builds at 518 px by default (1,370 tokens" in result.stderr and "--img-size 224 gives 257 tokens" in result.stderr
    small = run_cli("extract", "vit_small_patch14_dinov2", tmp_path / "images", "--random-init", "--store", "none",
                    "--img-size", "56", "-o", tmp_path / "d.h5", "--workers", "0")
    assert small.exit_code == 0 and "builds at" not in small.stderr


def test_time_estimate_after_the_first_batch():
    assert time_note(32, 1000, 3.2) == "the first 32 images took 0.1 s each (start-up included); the other 968 will take about 1 min 37 s"
    assert time_note(32, 50_032, 32.0) == ("the first 32 images took 1 s each (start-up included); the other 50,000 will "
                                           "take about 13 h 53 min")
    assert time_note(32, 100, 1.0) is None  # the rest is quick: nothing to say
    assert time_note(32, 32, 100.0) is None  # nothing left
    assert time_note(10, 10 + int(LONG_EXTRACT_SECONDS) + 1, 10.0) is not None
