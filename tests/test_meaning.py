"""Inputs that would give a result with the wrong meaning are refused, and odd inputs end in one line, not a
traceback or a hang: leaked probe images, foreign masks, edited or copied metrics files, external links,
FIFOs, extreme aspect ratios, broken checkpoints and saved heads, non-ASCII labels."""
from __future__ import annotations

import csv
import io
import os
import shutil
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
from conftest import one_line_error, write_images, tiny

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("meaning")
    paths = write_images(root / "images", 8, size=(32, 32))
    opts = dict(save_tokens=True, labels_from_dirs=True, workers=0)
    extract(tiny("plain"), paths[::2], root / "train.h5", **opts)  # two cats and two dogs each
    extract(tiny("plain"), paths[1::2], root / "test.h5", metrics=root / "m.h5", **opts)
    return root


PROBE = ("--pool", "cls", "--evaluator", "knn", "--bootstrap", "10", "-f", "csv")


def test_probe_refuses_test_images_that_were_trained_on(work, tmp_path, run_cli):
    copy = tmp_path / "copy.h5"
    shutil.copy(work / "train.h5", copy)
    for test in (work / "train.h5", copy):
        one_line_error(run_cli("probe", "--train", work / "train.h5", "--test", test, *PROBE),
                       "holds 4 of the training images", "--allow-overlap")
    allowed = run_cli("probe", "--train", work / "train.h5", "--test", copy, *PROBE, "--allow-overlap")
    assert allowed.exit_code == 0, allowed.stderr
    assert [row["n_overlap"] for row in csv.DictReader(io.StringIO(allowed.stdout))] == ["4"]
    apart = run_cli("probe", "--train", work / "train.h5", "--test", work / "test.h5", *PROBE)
    assert apart.exit_code == 0, apart.stderr


def test_a_mask_of_another_aspect_ratio_is_not_stretched(work, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    paths = list_images([str(work / "images")])
    for i, p in enumerate(paths):
        size = (32, 32) if i else (64, 16)  # the first image's mask is 4:1 for a square image
        Image.fromarray(np.full(size[::-1], 255, np.uint8)).save(masks / f"{p.stem}.png")
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(masks / f"{paths[1].stem}.png")  # same ratio, larger: fine
    skipped = []
    result = extract(tiny("plain"), paths, tmp_path / "c.h5", masks=masks, workers=0,
                     on_skip=lambda path, reason: skipped.append((path, reason)))
    assert result.n_images == 7 and len(skipped) == 1
    assert skipped[0][0] == str(paths[0]) and "another aspect ratio than the image's 32 x 32" in skipped[0][1]


def test_metric_values_outside_their_range_are_refused(work, tmp_path, run_cli):
    edited = tmp_path / "edited.h5"
    shutil.copy(work / "m.h5", edited)
    with h5py.File(edited, "r+") as f:
        f["metrics/cls_entropy_norm"][0, 0, 0] = 7.5
    one_line_error(run_cli("compare", edited, "--bootstrap", 10), "metrics/cls_entropy_norm", "holds 7.5",
                   "outside the range [0, 1]")
    shutil.copy(work / "m.h5", edited)
    with h5py.File(edited, "r+") as f:
        f["metrics/cls_to_patch"][1, 0, 2] = -3
    one_line_error(run_cli("compare", edited, "--metric", "cls_to_patch", "--bootstrap", 10), "holds -3", "[0, 1]")


def test_a_byte_identical_copy_is_not_a_second_model(work, tmp_path, run_cli):
    copy = tmp_path / "copy.h5"
    shutil.copy(work / "m.h5", copy)
    one_line_error(run_cli("compare", "--mim", work / "m.h5", "--jea", copy, "--bootstrap", 10), "byte-identical copies")


def test_an_extraction_where_every_image_fails_writes_nothing_and_fails(tmp_path, run_cli):
    (tmp_path / "bad").mkdir()
    for i in range(3):
        (tmp_path / "bad" / f"{i}.png").write_bytes(b"not a png")
    out = tmp_path / "c.h5"
    result = run_cli("extract", "vit_tiny_patch16_224", tmp_path / "bad", "-o", out, "--random-init", "--img-size", 32,
                     "--workers", 0, "-q")
    assert result.exit_code == 1 and "none of the 3 inputs could be decoded" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() and not Path(str(out) + ".partial").exists()


def test_external_links_and_foreign_virtual_sources_are_refused(work, tmp_path, run_cli):
    other = tmp_path / "other.h5"
    shutil.copy(work / "m.h5", other)
    linked = tmp_path / "linked.h5"
    shutil.copy(work / "m.h5", linked)
    with h5py.File(linked, "r+") as f:
        del f["metrics/cls_entropy_norm"]
        f["metrics/cls_entropy_norm"] = h5py.ExternalLink(str(other), "/metrics/cls_entropy_norm")
    one_line_error(run_cli("compare", linked, "--bootstrap", 10), "external link", str(other))

    virtual = tmp_path / "virtual.h5"
    shutil.copy(work / "m.h5", virtual)
    with h5py.File(virtual, "r+") as f:
        shape, dtype = f["metrics/cls_entropy_norm"].shape, f["metrics/cls_entropy_norm"].dtype
        del f["metrics/cls_entropy_norm"]
        layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
        layout[:] = h5py.VirtualSource(str(other), "metrics/cls_entropy_norm", shape=shape)
        f.create_virtual_dataset("metrics/cls_entropy_norm", layout)
    one_line_error(run_cli("compare", virtual, "--bootstrap", 10), "outside a shard folder next to it")


def test_a_fifo_among_the_images_is_skipped_without_waiting(work, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(work / "images" / "cat", images)
    fifo = images / "stuck.png"
    os.mkfifo(fifo)
    listing = "\n".join([*map(str, sorted(images.glob("img_*.png"))), str(fifo)]) + "\n"
    run = subprocess.run([sys.executable, "-m", "attnflow", "extract", "vit_tiny_patch16_224", "-", "-o",
                          str(tmp_path / "c.h5"), "--random-init", "--img-size", "32", "--workers", "1", "-q"],
                         input=listing, env=ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"skipped {fifo}: ValueError: a FIFO, not an image file" in run.stderr.replace("\n", "")
    with h5py.File(tmp_path / "c.h5") as f:
        assert f.attrs["n_images"] == 4 and f.attrs["n_skipped"] == 1


def test_an_extreme_aspect_ratio_is_skipped_naming_the_limit(tmp_path):
    thin = tmp_path / "thin.png"
    Image.new("L", (1_000_000, 1)).save(thin)
    assert thin.stat().st_size < 5000
    write_images(tmp_path, 2, size=(32, 32))
    skipped = []
    paths = [thin, *sorted(tmp_path.glob("*/*.png"))]
    result = extract(tiny("plain"), paths, tmp_path / "c.h5", workers=0, on_skip=lambda p, r: skipped.append(r))
    assert result.n_images == 2
    assert len(skipped) == 1 and "1000000 x 1 pixels would be resized to" in skipped[0]
    assert "above the limit of 33,554,432 resized pixels" in skipped[0]


def test_nan_weights_in_a_checkpoint_are_named_at_load(tmp_path, image_dir, run_cli):
    torch.manual_seed(0)
    state = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0).state_dict()
    state["blocks.1.attn.qkv.weight"][3, 5] = float("nan")
    torch.save(state, tmp_path / "w.pth")
    result = run_cli("extract", "vit_tiny_patch16_224", image_dir, "-o", tmp_path / "c.h5", "--checkpoint",
                     tmp_path / "w.pth", "--img-size", 32, "--workers", 0, "-q")
    one_line_error(result, "NaN or infinite values in blocks.1.attn.qkv.weight")


def test_a_non_ascii_label_on_an_ascii_stdout(work, tmp_path):
    run = subprocess.run([sys.executable, "-m", "attnflow", "compare", str(work / "m.h5"), "--label", "modèle-ß",
                          "--bootstrap", "10", "-f", "csv"], env={**ENV, "PYTHONIOENCODING": "ascii"},
                         capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr.decode()
    assert b"mod\\xe8le-\\xdf" in run.stdout


def test_saved_heads_with_missing_keys_or_other_shapes_are_one_line(work, tmp_path, run_cli):
    from attnflow.probe import load_head

    heads = tmp_path / "heads"
    heads.mkdir()
    made = run_cli("probe", work / "train.h5", "--split", "0.5", "--pool", "abmilp", "--evaluator", "linear",
                   "--epochs", 2, "--bootstrap", 10, "--save-heads", heads)
    assert made.exit_code == 0, made.stderr
    (head,) = heads.glob("*.pt")
    saved = torch.load(head)
    del saved["config"]["grid_size"]
    torch.save(saved, tmp_path / "no_key.pt")
    with pytest.raises(AttnflowError, match="lacks 'grid_size'"):
        load_head(tmp_path / "no_key.pt")
    saved = torch.load(head)
    saved["state"] = {k: torch.zeros(3, 3) for k in saved["state"]}
    torch.save(saved, tmp_path / "shapes.pt")
    with pytest.raises(AttnflowError, match="does not fit its own config") as e:
        load_head(tmp_path / "shapes.pt")
    assert "\n" not in str(e.value)
    result = run_cli("plot", "maps", work / "train.h5", "--image", 0, "--heads-dir", tmp_path, "-o", tmp_path / "f.png")
    one_line_error(result, "probe head")


def test_plot_maps_matches_images_by_id_and_refuses_an_ambiguous_number(work, tmp_path, run_cli):
    pytest.importorskip("matplotlib")
    paths = list_images([str(work / "images")])
    extract(tiny("plain"), paths[:3], tmp_path / "a.h5", workers=0)
    extract(tiny("plain"), paths[:3][::-1], tmp_path / "b.h5", workers=0)  # the same images, the other way round
    from attnflow.plot import plot_maps

    _, rows, _ = plot_maps([tmp_path / "a.h5", tmp_path / "b.h5"], 0, tmp_path / "f.png")
    assert rows[0].image_id == rows[1].image_id == str(paths[0])  # b.h5 holds it at index 2
    np.testing.assert_array_equal(rows[0].image, rows[1].image)
    extract(tiny("plain"), paths[3:5], tmp_path / "c.h5", workers=0)
    one_line_error(run_cli("plot", "maps", tmp_path / "a.h5", tmp_path / "c.h5", "--image", 0, "-o", tmp_path / "g.png"),
                   "does not hold image", "different images")
    two = tmp_path / "2.png"
    shutil.copy(paths[4], two)
    extract(tiny("plain"), [*paths[:3], two], tmp_path / "d.h5", workers=0)
    one_line_error(run_cli("plot", "maps", tmp_path / "d.h5", "--image", 2, "-o", tmp_path / "h.png"),
                   "--image 2 is both an index", "2.png")


def test_a_replaced_image_is_not_drawn_under_the_old_maps(work, tmp_path, run_cli):
    pytest.importorskip("matplotlib")
    images = tmp_path / "images"
    shutil.copytree(work / "images", images)
    paths = list_images([str(images)])
    extract(tiny("plain"), paths, tmp_path / "c.h5", workers=0)
    assert run_cli("plot", "maps", tmp_path / "c.h5", "--image", 0, "-o", tmp_path / "f.png").exit_code == 0
    shutil.copy(paths[1], paths[0])  # another picture under the same name
    one_line_error(run_cli("plot", "maps", tmp_path / "c.h5", "--image", 0, "-o", tmp_path / "g.png"),
                   f"image {paths[0]} has changed since", "restore it or extract again")


def test_probe_finds_training_images_copied_under_other_names(work, tmp_path, run_cli):
    copies = tmp_path / "copies"
    shutil.copytree(work / "images", copies)
    for p in sorted(copies.glob("*/*.png")):
        p.rename(p.with_name("copy_" + p.name))
    paths = list_images([str(copies)])
    extract(tiny("plain"), paths[::2], tmp_path / "test.h5", save_tokens=True, labels_from_dirs=True, workers=0)
    one_line_error(run_cli("probe", "--train", work / "train.h5", "--test", tmp_path / "test.h5", *PROBE),
                   "holds 4 of the training images", "copy_img_000.png")


def _start_and_wait_for_a_segment(argv: list[str], out: Path, **popen) -> subprocess.Popen:
    import time

    proc = subprocess.Popen([sys.executable, "-m", "attnflow", *map(str, argv)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **popen)
    deadline = time.monotonic() + 120
    while not list(Path(str(out) + ".partial").glob("seg-*.h5")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.005)
    return proc


def _workers_of(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in children.read_text().split()] if children.exists() else []


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("many")
    write_images(root / "images", 40, size=(32, 32))
    return root / "images"


def test_a_killed_decoding_worker_is_one_line_and_resumable(many_images, tmp_path):
    import signal

    out = tmp_path / "c.h5"
    argv = ["extract", "vit_tiny_patch16_224", many_images, "-o", out, "--random-init", "--img-size", 32, "--workers", 1,
            "-b", 1, "-q"]
    proc = _start_and_wait_for_a_segment(argv, out)
    proc.send_signal(signal.SIGSTOP)
    workers = _workers_of(proc.pid)
    assert workers, "the run has no worker process to kill"
    for worker in workers:
        os.kill(worker, signal.SIGKILL)  # as the kernel's out-of-memory killer would
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "a decoding worker process died" in lines[0] and "--resume" in lines[0], err
    resumed = subprocess.run([sys.executable, "-m", "attnflow", *map(str, argv), "--resume"], env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    with h5py.File(out) as f:
        assert f.attrs["n_images"] == 40


class _SlowItems(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1000

    def __getitem__(self, index: int) -> int:
        import time

        time.sleep(0.2)
        return index


def test_a_worker_death_noticed_outside_the_loader_is_one_line_too():
    """The DataLoader's SIGCHLD handler raises a killed worker's death wherever the main thread is: in the
    run's forward pass as often as in the loader (CI caught its traceback once). Here it fires during the
    loop body's own work, a sleep, and must read as the loader's one line."""
    import signal
    import time

    from attnflow.decode import worker_deaths_reported

    before = set(_workers_of(os.getpid()))
    batches = iter(torch.utils.data.DataLoader(_SlowItems(), batch_size=1, num_workers=1))
    try:
        next(batches)
        workers = set(_workers_of(os.getpid())) - before  # the loader's worker, no other child of this process
        assert workers, "the loader has no worker process to kill"
        with pytest.raises(AttnflowError, match=r"^a decoding worker process died \(RuntimeError: DataLoader worker "
                                                r"\(pid \d+\) is killed by signal: Killed"):
            with worker_deaths_reported():
                for worker in workers:
                    os.kill(worker, signal.SIGKILL)
                for _ in range(600):  # the loop body; the handler raises inside it
                    time.sleep(0.05)
        with pytest.raises(RuntimeError, match="^unrelated"), worker_deaths_reported():
            raise RuntimeError("unrelated: not a worker's death")  # other errors pass through unchanged
    finally:
        del batches


def test_ctrl_c_on_a_terminal_is_one_line_with_workers(many_images, tmp_path):
    """Ctrl-C reaches the whole foreground process group: the workers too."""
    import signal

    out = tmp_path / "c.h5"
    argv = ["extract", "vit_tiny_patch16_224", many_images, "-o", out, "--random-init", "--img-size", 32, "--workers", 2,
            "-b", 1, "-q"]
    proc = _start_and_wait_for_a_segment(argv, out, start_new_session=True)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip() == "attnflow: interrupted; an interrupted extract or metrics run continues with --resume", err


_HANDOVER_TO_A_DEPARTED_PARENT = """
import multiprocessing as mp, os, sys, time
from multiprocessing import connection, resource_sharer

def worker(queue, as_attnflow_does):
    if as_attnflow_does:
        from attnflow.decode import _leave_interrupts_to_the_parent
        _leave_interrupts_to_the_parent(0)
    read_end, _ = os.pipe()
    queue.put(resource_sharer.DupFd(read_end)._id)  # how a worker hands a batch's shared memory to the parent
    time.sleep(2)

if __name__ == "__main__":
    queue = mp.get_context("fork").Queue()
    process = mp.get_context("fork").Process(target=worker, args=(queue, sys.argv[1] == "attnflow"))
    process.start()
    address, _ = queue.get()
    connection.Client(address, authkey=mp.current_process().authkey).close()  # the parent leaves mid-handover
    process.join()
"""


@pytest.mark.parametrize("worker", ["attnflow", "plain"])
def test_a_worker_handing_a_batch_to_a_parent_that_left_prints_nothing(worker, tmp_path):
    """The flake behind a second line under Ctrl-C's one line: a worker's resource-sharer thread reported the
    connection the exiting parent dropped with a traceback. attnflow's workers stay quiet (the plain worker
    shows the test sees the traceback when it is there)."""
    script = tmp_path / "handover.py"
    script.write_text(_HANDOVER_TO_A_DEPARTED_PARENT)
    done = subprocess.run([sys.executable, script, worker], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    if worker == "attnflow":
        assert done.stderr == ""
    else:
        assert "resource_sharer.py" in done.stderr and "EOFError" in done.stderr
