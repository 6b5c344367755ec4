"""A file whose name is not UTF-8 (Linux names are bytes) is found again from the id a cache stores for it."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attnflow import open_cache
from attnflow.images import image_id, path_of_id

ARCH = "test_vit"
BYTE_NAME = b"img_\xff.png"  # 0xff never occurs in UTF-8
LITERAL_NAME = "lit_\\udcfe.png"  # valid UTF-8 that happens to read like an escape


@pytest.fixture
def odd_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in (BYTE_NAME, os.fsencode(LITERAL_NAME), b"plain.png"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(os.fsencode(folder) + b"/" + name, format="PNG")
    return folder


def test_ids_are_utf8_text_that_maps_back_to_the_bytes():
    name = os.fsdecode(b"/data/caf\xe9/img_\xff.png")  # Latin-1 folder and file names
    stored = image_id(name)
    assert stored == "/data/caf\\udce9/img_\\udcff.png" and stored.encode("utf-8")  # UTF-8 text, as HDF5 needs
    assert os.fsencode(path_of_id(stored)) == b"/data/caf\xe9/img_\xff.png"
    assert image_id("/data/naïve photo.png") == "/data/naïve photo.png"  # valid UTF-8 is kept as it is
    assert path_of_id("rel/a.png", "/run/dir") == Path("/run/dir/rel/a.png")
    assert path_of_id("rel/\\udcff.png", "/run/caf\\udce9") == Path(os.fsdecode(b"/run/caf\xe9/rel/\xff.png"))


def test_a_non_utf8_name_is_found_again_from_its_id(tmp_path, odd_folder, run_cli):
    cache = tmp_path / "c.h5"
    result = run_cli("extract", ARCH, odd_folder, "-o", cache, "--random-init", "--img-size", 32, "--workers", 0, "--store", "full", "--quiet")
    assert result.exit_code == 0, result.stderr
    with open_cache(cache) as c:
        ids = c.image_ids
    byte_file = os.fsdecode(os.fsencode(odd_folder) + b"/" + BYTE_NAME)
    stored = image_id(byte_file)
    assert stored in ids and stored.endswith("img_\\udcff.png")
    assert str(odd_folder / LITERAL_NAME) in ids  # a UTF-8 name is stored byte for byte, whatever it reads like
    assert os.path.samefile(path_of_id(stored), byte_file)
    assert os.path.samefile(path_of_id(str(odd_folder / LITERAL_NAME)), odd_folder / LITERAL_NAME)

    # plot maps finds it by the stored id, by the path as a shell passes it, and by its file name; and draws the
    # very file: the cache's content digest of it is checked before drawing
    for n, image in enumerate((stored, byte_file, os.fsdecode(BYTE_NAME), LITERAL_NAME)):
        out = tmp_path / f"maps{n}.png"
        result = run_cli("plot", "maps", cache, "--image", image, "-o", out)
        assert result.exit_code == 0, (image, result.stderr)
        assert out.stat().st_size > 0


def test_relative_ids_from_a_non_utf8_working_folder(tmp_path, odd_folder, run_cli, monkeypatch):
    # the folder the extraction runs in is stored too (working_dir); a name HDF5 could not hold was a traceback
    run_dir = os.fsdecode(os.fsencode(tmp_path) + b"/run_\xfe")
    os.mkdir(run_dir)
    os.rename(odd_folder, os.path.join(run_dir, "imgs"))
    monkeypatch.chdir(run_dir)
    result = run_cli("extract", ARCH, "imgs", "-o", tmp_path / "c.h5", "--random-init", "--img-size", 32, "--workers", 0, "--store", "full", "--quiet")
    assert result.exit_code == 0, result.stderr
    with open_cache(tmp_path / "c.h5") as c:
        assert c.attrs["working_dir"] == image_id(run_dir) and image_id("imgs/" + os.fsdecode(BYTE_NAME)) in c.image_ids
    monkeypatch.chdir(tmp_path)  # elsewhere: the relative id is found under the stored working folder
    result = run_cli("plot", "maps", tmp_path / "c.h5", "--image", os.fsdecode(BYTE_NAME), "-o", tmp_path / "m.png")
    assert result.exit_code == 0, result.stderr
