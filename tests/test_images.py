"""Finding, decoding and preprocessing images with real files and real PIL decoding."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from attnflow import AttnflowError
from attnflow.images import ImageDataset, decode_image, list_images, resolve_preprocessing


def test_list_images_orders_and_expands(tmp_path):
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / "a").mkdir()
    for rel in ("b/deep/z.JPG", "b/x.png", "a/y.webp", "a/notes.txt"):
        (tmp_path / rel).write_bytes(b"")
    single = tmp_path / "a" / "notes.txt"  # named explicitly: taken whatever its extension
    found = list_images([str(tmp_path), str(single)])
    rel = [p.relative_to(tmp_path).as_posix() for p in found]
    assert rel == ["a/y.webp", "b/deep/z.JPG", "b/x.png", "a/notes.txt"]


def test_list_images_reads_stdin_and_rejects_missing_arguments(tmp_path):
    listed = list_images(["-"], stdin=io.StringIO("one.png\n\n  two.jpg \n"))
    assert listed == [Path("one.png"), Path("two.jpg")]
    with pytest.raises(AttnflowError, match="no such file or directory: .*nowhere"):
        list_images([str(tmp_path / "nowhere")])


def test_symlink_loop_in_a_directory_terminates(tmp_path):
    (tmp_path / "d").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "x.png")
    (tmp_path / "d" / "loop").symlink_to(tmp_path / "d", target_is_directory=True)
    assert [p.name for p in list_images([str(tmp_path)])] == ["x.png"]


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(decode_image(path, 3))
    assert rgb.shape == (1, 4, 3)
    assert rgb[0, :, 0].tolist() == [0, 100, 128, 255]


def test_palette_with_transparency_and_rgba_and_cmyk(tmp_path):
    pal = Image.new("P", (4, 4))
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((0, 0), 1)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    out = decode_image(tmp_path / "pal.png", 3)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (0, 255, 0) and out.getpixel((1, 1)) == (255, 0, 0)
    Image.new("CMYK", (5, 3), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    cmyk = decode_image(tmp_path / "cmyk.jpg", 3)
    assert cmyk.mode == "RGB" and cmyk.size == (5, 3)
    assert decode_image(tmp_path / "cmyk.jpg", 1).mode == "L"


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (30, 10), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert decode_image(tmp_path / "rotated.jpg", 3).size == (10, 30)


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("L", (6, 6), v) for v in (10, 200)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert decode_image(tmp_path / "anim.gif", 1).getpixel((0, 0)) == 10


def test_preprocessing_follows_the_model_resolution_and_overrides():
    model = timm.create_model("vit_tiny_patch16_224", img_size=48, num_classes=0)
    pre = resolve_preprocessing(model)
    assert pre.input_size == (3, 48, 48) and pre.crop_pct == model.pretrained_cfg["crop_pct"]
    pre = resolve_preprocessing(model, crop_pct=1.0, interpolation="bilinear")
    assert (pre.crop_pct, pre.interpolation) == (1.0, "bilinear")
    with pytest.raises(AttnflowError, match="crop-pct"):
        resolve_preprocessing(model, crop_pct=1.5)


def test_preprocessing_matches_timms_own_eval_transform(tmp_path):
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model("vit_tiny_patch16_224", img_size=48, num_classes=0)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    pre = resolve_preprocessing(model)
    raw = ImageDataset([tmp_path / "x.png"], pre)[0][1]
    assert raw.dtype == torch.uint8
    ours = pre.normalize(raw[None])[0]
    config = resolve_data_config({"input_size": (3, 48, 48)}, model=model)
    theirs = create_transform(**config, is_training=False)(Image.open(tmp_path / "x.png").convert("RGB"))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_greyscale_model_gets_one_channel_statistics(tmp_path):
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, in_chans=1, num_classes=0)
    pre = resolve_preprocessing(model)
    assert pre.input_size == (1, 32, 32) and len(pre.mean) == 1 and len(pre.std) == 1
    Image.new("RGB", (40, 40), (90, 90, 90)).save(tmp_path / "g.png")
    index, pixels, fg, error, _ = ImageDataset([tmp_path / "g.png"], pre)[0]
    assert error is None and pixels.shape == (1, 32, 32)


def test_bad_files_become_reasons(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    Image.new("RGB", (50, 50)).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0)
    names = ["empty.png", "text.png", "cut.jpg", "ok.jpg", "missing.png"]
    dataset = ImageDataset([tmp_path / n for n in names], resolve_preprocessing(model))
    errors = {n: dataset[i][3] for i, n in enumerate(names)}
    assert errors["ok.jpg"] is None
    assert "UnidentifiedImageError" in errors["empty.png"] and "UnidentifiedImageError" in errors["text.png"]
    assert errors["cut.jpg"] and errors["missing.png"].startswith("FileNotFoundError")
