"""A read that hangs in the kernel (a dead network mount) stops the run in one line naming the file, within
the read timeout, with every committed batch kept for --resume. The hang is real: a FUSE file whose reads
are never answered (tests/stallfs.py), in real processes with real DataLoader workers."""
from __future__ import annotations

import io
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from attnflow.images import ReadStalled, read_image_file
from conftest import read_all, write_images
from stallfs import StalledMount

ROOT = Path(__file__).resolve().parents[1]


def png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def stalled(tmp_path):
    try:
        mount = StalledMount(tmp_path / "mnt", "stalled.png", png_bytes(7))
    except OSError as e:
        pytest.skip(f"no FUSE here: {e}")
    yield mount
    mount.unmount()


def test_a_hung_read_raises_within_the_timeout_and_a_slow_one_is_never_cut(stalled, tmp_path):
    t0 = time.monotonic()
    with pytest.raises(ReadStalled, match="stalled.png received no data for 1 s"):
        read_image_file(stalled.path, timeout=1)
    assert 1 <= time.monotonic() - t0 < 10
    stalled.release()
    assert read_image_file(stalled.path, timeout=1) == stalled.content
    # a file of several chunks arrives whole and in order
    big = tmp_path / "big.bin"
    big.write_bytes(np.random.default_rng(0).bytes(3 * (1 << 20) + 17))
    assert read_image_file(big, timeout=5) == big.read_bytes() == read_image_file(big, timeout=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_extract_stops_in_one_line_and_resumes_to_the_same_cache(stalled, tmp_path, workers):
    images = write_images(tmp_path / "images", 3, size=(48, 48))
    inputs = [*images[:2], stalled.path, images[2]]
    torch.manual_seed(0)
    torch.save(timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0).state_dict(), tmp_path / "weights.pth")

    def extract(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "attnflow", "extract", "vit_tiny_patch16_224", *map(str, inputs), "-o", str(out),
                "--checkpoint", str(tmp_path / "weights.pth"), "--img-size", "32", "--family", "mim", "--batch-size", "1",
                "--workers", str(workers), "--read-timeout", "2", "-q", *extra]

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out.h5"
    proc = subprocess.Popen(extract(out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        error = lines.get(timeout=90)  # before the fix: no line, the run waits forever
        assert error.startswith("attnflow: error: reading ") and "Traceback" not in error, error
        assert str(stalled.path) in error and "--read-timeout" in error and "--resume" in error
        if workers:  # the worker the kernel holds is left behind: attnflow itself ends at once
            assert proc.wait(timeout=30) == 1
    finally:
        stalled.release()  # the held read returns, and with it whatever process issued it
        code = proc.wait(timeout=60)
    assert code == 1
    time.sleep(0.5)
    assert lines.empty(), list(lines.queue)  # one line in all
    partial = Path(f"{out}.partial")
    assert not out.exists() and partial.is_dir()
    assert len(list(partial.glob("seg-*.h5"))) == 2  # the two images before the stalled one are committed

    resumed = subprocess.run(extract(out, "--resume"), capture_output=True, text=True, env=env, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    reference = subprocess.run(extract(tmp_path / "reference.h5"), capture_output=True, text=True, env=env, timeout=120)
    assert reference.returncode == 0, reference.stderr
    got, want = read_all(out), read_all(tmp_path / "reference.h5")
    assert set(got) == set(want) and len(got["image_ids"]) == 4
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
