"""A corpus of hostile inputs, generated here: every bad file is reported once with its reason and
recorded, no garbage row is written, every good file is processed, and nothing raises a traceback."""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from attnflow import open_cache
from attnflow.images import path_of_id

ARCH = "vit_tiny_patch16_224"


def png_with_declared_size(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels: a decompression bomb's calling card."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = 8 + 8  # signature, then length and type of the IHDR chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[12:ihdr + 13])))
    path.write_bytes(bytes(data))


def build_corpus(root: Path) -> tuple[set[str], set[str]]:
    good, bad = root / "good", root / "bad"
    good.mkdir(parents=True)
    bad.mkdir(parents=True)
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(photo).save(good / "photo.jpg")
    Image.fromarray(photo).save(good / "photo.png")
    Image.fromarray((rng.random((20, 30)) * 65535).astype(np.uint16)).save(good / "sixteen_bit.png")
    Image.new("CMYK", (30, 20), (10, 200, 30, 5)).save(good / "cmyk.jpg")
    frames = [Image.new("P", (16, 16), i) for i in (1, 7)]
    frames[0].save(good / "animated.gif", save_all=True, append_images=frames[1:])
    Image.new("RGB", (1, 1), (255, 0, 0)).save(good / "one_pixel.png")
    palette = Image.new("P", (12, 12))
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    palette.save(good / "palette_transparent.png", transparency=0)
    (good / "with space and ünïcødé").mkdir()
    Image.fromarray(photo).save(good / "with space and ünïcødé" / "naïve photo.png")
    Image.fromarray(photo).save(os.fsencode(good) + b"/bytes_\xff_name.png")  # not valid UTF-8
    (good / "loop").symlink_to(good, target_is_directory=True)  # a symlink loop inside the tree

    whole = (good / "photo.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    png = (good / "photo.png").read_bytes()
    (bad / "truncated.png").write_bytes(png[: len(png) // 2])
    (bad / "zero_bytes.png").write_bytes(b"")
    (bad / "text_renamed.png").write_text("this is not an image\n")
    png_with_declared_size(bad / "bomb.png", 100_000, 100_000)
    goods = {str(p) for p in (good).rglob("*") if p.is_file() and "loop" not in p.parts}
    bads = {str(p) for p in bad.iterdir()}
    return goods, bads


def test_hostile_images(tmp_path, run_cli):
    goods, bads = build_corpus(tmp_path / "corpus")
    out = tmp_path / "c.h5"
    result = run_cli("extract", ARCH, tmp_path / "corpus", "-o", out, "--random-init", "--img-size", 32, "--workers", 0, "-b", 3)
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr
    for path in bads:
        lines = [line for line in result.stderr.splitlines() if line.startswith(f"attnflow: skipped {path}:")]
        assert len(lines) == 1, (path, result.stderr)
        assert len(lines[0]) > len(f"attnflow: skipped {path}: ")  # a reason follows
    assert "DecompressionBomb" in result.stderr
    with open_cache(out) as cache:
        ids = set(cache.image_ids)
        assert len(ids) == len(cache) == len(goods)
        assert {s.decode() for s in cache["skipped"][()]} == bads
        assert all(r for r in cache["skipped_reason"][()])
        attn = cache["attn"][()].astype(np.float32)
        np.testing.assert_allclose(attn.sum(-1), 1.0, atol=2e-3)  # every stored row is a real map
    assert {i for i in ids if "ünïcødé" in i} == {str(tmp_path / "corpus/good/with space and ünïcødé/naïve photo.png")}
    # undecodable bytes kept visible as \udcNN escapes, and the id leads back to the very file
    odd = [i for i in ids if "bytes_" in i]
    assert odd == [str(tmp_path / "corpus/good/bytes_\\udcff_name.png")]
    assert os.path.samefile(path_of_id(odd[0]), os.fsencode(tmp_path / "corpus/good") + b"/bytes_\xff_name.png")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_is_skipped(tmp_path, run_cli):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (20, 20)).save(folder / "ok.png")
    Image.new("RGB", (20, 20)).save(folder / "locked.png")
    (folder / "locked.png").chmod(0)
    result = run_cli("extract", ARCH, folder, "-o", tmp_path / "c.h5", "--random-init", "--img-size", 32, "--workers", 0)
    assert result.exit_code == 0 and "PermissionError" in result.stderr


def test_hostile_checkpoints_and_caches(tmp_path, run_cli, image_dir):
    import torch

    from attnflow.extract import extract
    from attnflow.images import list_images
    from conftest import synthetic, write_metrics, tiny

    args = ["extract", ARCH, image_dir, "-o", tmp_path / "x.h5", "--img-size", 32, "--workers", 0]
    torch.save({"model": torch.nn.Linear(3, 4).state_dict()}, tmp_path / "linear.pth")
    data = (tmp_path / "linear.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    for checkpoint, needle in ((tmp_path / "cut.pth", "cannot read checkpoint"), (tmp_path / "linear.pth", "does not fit the model")):
        result = run_cli(*args, "--checkpoint", checkpoint)
        assert result.exit_code == 1 and needle in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1

    extract(tiny("plain"), list_images([str(image_dir)]), tmp_path / "cache.h5", workers=0)
    write_metrics(tmp_path / "metrics.h5", synthetic(np.random.default_rng(0)))
    raw = (tmp_path / "cache.h5").read_bytes()
    (tmp_path / "truncated.h5").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "future.h5").write_bytes(raw)
    with h5py.File(tmp_path / "future.h5", "r+") as f:
        f.attrs["schema"] = "attnflow.cache/9"
    cases = [
        (["metrics", tmp_path / "truncated.h5", "-o", tmp_path / "m1.h5"], "not a readable HDF5 file"),
        (["metrics", tmp_path / "future.h5", "-o", tmp_path / "m2.h5"], "this attnflow reads 'attnflow.cache/1'"),
        (["metrics", tmp_path / "metrics.h5", "-o", tmp_path / "m3.h5"], "is a metrics file, not an attention cache"),
        (["compare", tmp_path / "cache.h5"], "is an attention cache, not a metrics file"),
        (["plot", "maps", tmp_path / "metrics.h5", "--image", "0", "-o", tmp_path / "p.png"], "is a metrics file"),
        (["info", tmp_path / "truncated.h5"], "not a readable HDF5 file"),
    ]
    for command, needle in cases:
        result = run_cli(*command)
        assert result.exit_code == 1, (command, result.stderr)
        assert needle in result.stderr and "Traceback" not in result.stderr, (command, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, (command, result.stderr)
