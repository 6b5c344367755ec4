"""Outputs never clobber inputs or follow links, attnflow deletes only the run folders it made, a resumed run
is the same run in everything that shapes the stored data, and every file is committed whole."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch
from PIL import Image

from attnflow import AttnflowError
from attnflow.extract import extract
from attnflow.images import list_images
from attnflow.output import RUN_MARKER, atomic_output
from conftest import one_line_error, write_images, tiny

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Images with labels and masks, a cache with tokens, its metrics file, and a small checkpoint."""
    root = tmp_path_factory.mktemp("outputs")
    paths = write_images(root / "images", 8, size=(32, 32))
    (root / "masks").mkdir()
    for p in paths:
        Image.fromarray(np.pad(np.full((16, 16), 255, np.uint8), 8)).save(root / "masks" / f"{p.stem}.png")
    extract(tiny("plain"), paths, root / "c.h5", metrics=root / "m.h5", save_tokens=True, labels_from_dirs=True, workers=0)
    torch.manual_seed(0)
    torch.save({"teacher": timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48,
                                             num_heads=3, num_classes=0).state_dict()}, root / "w.pth")
    return root


def snapshot(path: Path) -> bytes:
    return path.read_bytes()


# -- an output is never an input ---------------------------------------------------------------------------


def test_compare_probe_and_plot_refuse_to_write_over_their_inputs(work, tmp_path, run_cli):
    metrics = tmp_path / "m.h5"
    shutil.copy(work / "m.h5", metrics)
    before = snapshot(metrics)
    one_line_error(run_cli("compare", metrics, "-o", metrics), str(metrics), "is one of this command's inputs")
    linked = tmp_path / "link.csv"
    linked.symlink_to(metrics)  # the same file under another name
    one_line_error(run_cli("compare", metrics, "-o", linked), "is one of this command's inputs", f"it is {metrics}")
    os.link(metrics, tmp_path / "hard.csv")
    one_line_error(run_cli("compare", metrics, "-o", tmp_path / "hard.csv"), "is one of this command's inputs")
    assert snapshot(metrics) == before

    cache = tmp_path / "c.h5"
    shutil.copy(work / "c.h5", cache)
    before = snapshot(cache)
    one_line_error(run_cli("probe", cache, "--split", "0.5", "--pool", "cls", "--evaluator", "knn", "-o", cache),
                   "is one of this command's inputs")
    one_line_error(run_cli("metrics", cache, "-o", cache, "--overwrite", "-q"))
    assert snapshot(cache) == before


def test_plot_maps_refuses_to_write_over_the_image_it_draws(work, tmp_path, run_cli):
    pytest.importorskip("matplotlib")
    images = tmp_path / "images"
    shutil.copytree(work / "images", images)
    paths = list_images([str(images)])
    photo = images / "cat" / "photo.png"
    shutil.copy(paths[0], photo)
    cache = tmp_path / "c.h5"
    extract(tiny("plain"), [photo], cache, workers=0)
    before = snapshot(photo)
    one_line_error(run_cli("plot", "maps", cache, "--image", "photo", "-o", photo), str(photo), "is one of this command's inputs")
    assert snapshot(photo) == before


def test_extract_with_overwrite_refuses_an_output_that_is_one_of_its_images(work, tmp_path, run_cli):
    images = tmp_path / "images"
    shutil.copytree(work / "images", images)
    victim = list_images([str(images)])[0]
    before = snapshot(victim)
    result = run_cli("extract", "vit_tiny_patch16_224", images, "-o", victim, "--overwrite", "--random-init",
                     "--img-size", 32, "--workers", 0, "-q")
    one_line_error(result, str(victim), "is one of this command's inputs")
    assert snapshot(victim) == before and not Path(str(victim) + ".partial").exists()


# -- links and folders that are not attnflow's ------------------------------------------------------------


def test_a_planted_temporary_link_is_never_followed(work, tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    out = tmp_path / "c.h5"
    Path(str(out) + ".tmp").symlink_to(target)
    extract(tiny("plain"), list_images([str(work / "images")]), out, workers=0)
    assert target.read_text() == "keep me"
    assert out.is_file() and not out.is_symlink() and h5py.is_hdf5(out)


def test_an_output_that_is_a_link_is_replaced_not_written_through(work, tmp_path, run_cli):
    target = tmp_path / "elsewhere.csv"
    target.write_text("keep me")
    out = tmp_path / "table.csv"
    out.symlink_to(target)
    assert run_cli("compare", work / "m.h5", "-o", out, "-f", "csv").exit_code == 0
    assert target.read_text() == "keep me" and not out.is_symlink()


@pytest.mark.parametrize("flag", ["--overwrite", "--resume"])
def test_a_linked_run_folder_is_left_alone(work, tmp_path, run_cli, flag):
    """OUT.partial a link to a user's folder: nothing in that folder is deleted or created."""
    users = tmp_path / "thesis"
    users.mkdir()
    (users / "chapter.tex").write_text("years of work")
    out = tmp_path / "c.h5"
    Path(str(out) + ".partial").symlink_to(users)
    result = run_cli("extract", "vit_tiny_patch16_224", work / "images", "-o", out, flag, "--random-init",
                     "--img-size", 32, "--workers", 0, "-q")
    one_line_error(result, ".partial is in the way", "a link")
    assert sorted(p.name for p in users.iterdir()) == ["chapter.tex"]


def test_a_run_folder_without_the_marker_is_left_alone(work, tmp_path):
    out = tmp_path / "c.h5"
    folder = Path(str(out) + ".partial")
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    paths = list_images([str(work / "images")])
    for flags in ({"overwrite": True}, {"resume": True}):
        with pytest.raises(AttnflowError, match="without attnflow's marker"):
            extract(tiny("plain"), paths, out, workers=0, **flags)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_a_finished_run_removes_its_folder_marker_last(work, tmp_path):
    out = tmp_path / "c.h5"
    paths = list_images([str(work / "images")])

    def stop(done, total):
        assert (Path(str(out) + ".partial") / RUN_MARKER).is_file()  # made with the folder
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(tiny("plain"), paths, out, workers=0, batch_size=4, on_progress=stop)
    extract(tiny("plain"), paths, out, workers=0, batch_size=4, resume=True)
    assert out.is_file() and not Path(str(out) + ".partial").exists()


# -- resume identity ----------------------------------------------------------------------------------------


def interrupted(paths, out, after=1, **options):
    seen = []

    def stop(done, total):
        seen.append(done)
        if len(seen) == after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(tiny("plain"), paths, out, workers=0, batch_size=2, on_progress=stop, **options)


def test_resume_with_other_masks_is_refused(work, tmp_path):
    paths = list_images([str(work / "images")])
    other = tmp_path / "masks"
    shutil.copytree(work / "masks", other)
    out = tmp_path / "c.h5"
    interrupted(paths, out, masks=work / "masks")
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(other / f"{paths[5].stem}.png")  # one mask redrawn
    with pytest.raises(AttnflowError, match="started with masks_sha256="):
        extract(tiny("plain"), paths, out, workers=0, batch_size=2, resume=True, masks=other)
    extract(tiny("plain"), paths, out, workers=0, batch_size=2, resume=True, masks=work / "masks")
    with h5py.File(out) as f:
        assert f.attrs["masks_sha256"] and f["fg"].shape == (8, 16)


def test_resume_with_another_checkpoint_key_is_refused(work, tmp_path):
    from attnflow.models import build_model

    weights = {}
    for seed, key in enumerate(("teacher", "student")):
        torch.manual_seed(seed)
        weights[key] = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0).state_dict()
    torch.save(weights, tmp_path / "dino.pth")
    paths = list_images([str(work / "images")])
    out = tmp_path / "c.h5"

    def model(key):
        return build_model("vit_tiny_patch16_224", tmp_path / "dino.pth", img_size=32, checkpoint_key=key)

    seen = []
    with pytest.raises(KeyboardInterrupt):
        extract(model("student"), paths, out, workers=0, batch_size=2,
                on_progress=lambda done, total: seen.append(done) or (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(AttnflowError, match="started with checkpoint_key=student, this run has teacher"):
        extract(model("teacher"), paths, out, workers=0, batch_size=2, resume=True)
    extract(model("student"), paths, out, workers=0, batch_size=2, resume=True)
    with h5py.File(out) as f:
        assert f.attrs["checkpoint_key"] == "student"


def test_a_segment_of_another_run_is_refused(work, tmp_path):
    paths = list_images([str(work / "images")])
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    interrupted(paths, one, after=2)
    interrupted(paths, two, after=1)
    # the same inputs, model and options: only the run differs
    shutil.copy(Path(str(one) + ".partial") / "seg-00000001.h5", Path(str(two) + ".partial") / "seg-00000001.h5")
    with pytest.raises(AttnflowError, match="segment seg-00000001.h5 belongs to another run"):
        extract(tiny("plain"), paths, two, workers=0, batch_size=2, resume=True)


# -- every file committed whole ------------------------------------------------------------------------------


def test_atomic_output_keeps_the_old_file_when_the_writer_fails(tmp_path):
    out = tmp_path / "o.txt"
    out.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output(out) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["o.txt"]


def test_save_heads_that_cannot_be_written_leave_no_truncated_head(work, tmp_path):
    """A file size limit cuts the head file off part-way: the head is not left behind half-written."""
    import resource

    heads = tmp_path / "heads"
    heads.mkdir()

    def cap_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    result = subprocess.run(
        [sys.executable, "-m", "attnflow", "probe", str(work / "c.h5"), "--split", "0.5", "--pool", "abmilp",
         "--evaluator", "linear", "--epochs", "2", "--bootstrap", "10", "--save-heads", str(heads)],
        env=ENV, capture_output=True, text=True, preexec_fn=cap_file_size, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "file too large writing" in result.stderr and "heads" in result.stderr
    assert list(heads.iterdir()) == []
