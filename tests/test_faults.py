"""Faults: an extraction killed with SIGKILL at several moments resumes to exactly the uninterrupted cache."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from conftest import write_images, read_all

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    images = base / "images"
    write_images(images, 24, size=(48, 48))
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", img_size=64, num_classes=0)
    torch.save(model.state_dict(), base / "weights.pth")
    return base


def extract_args(base: Path, out: Path, *extra: str) -> list[str]:
    return [
        "extract", "vit_small_patch16_224", str(base / "images"), "-o", str(out),
        "--checkpoint", str(base / "weights.pth"), "--img-size", "64", "--batch-size", "1", "--workers", "0",
        "--metrics", str(out.with_name(out.stem + "_metrics.h5")), "--labels-from-dirs", "--save-tokens", "-q", *extra,
    ]


def test_sigkill_at_several_moments_then_resume(setup, run_cli, one_thread):
    base = setup
    reference = base / "reference.h5"
    done = run_cli(*extract_args(base, reference))
    assert done.exit_code == 0, done.stderr
    want = read_all(reference)
    want_metrics = read_all(base / "reference_metrics.h5")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # kill after k committed batches plus a little: lands in the forward pass, the segment write or its fsync
    for trial, (k, delay) in enumerate([(1, 0.0), (5, 0.004), (11, 0.017)]):
        out = base / f"killed{trial}.h5"
        partial = Path(str(out) + ".partial")
        proc = subprocess.Popen([sys.executable, "-m", "attnflow", *extract_args(base, out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        while proc.poll() is None and len(list(partial.glob("seg-*.h5"))) < k:
            time.sleep(0.002)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"trial {trial}: the run ended before it could be killed"
        assert not out.exists() and partial.is_dir()
        resumed = run_cli(*extract_args(base, out, "--resume"))
        assert resumed.exit_code == 0, resumed.stderr
        got = read_all(out)
        assert set(got) == set(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"trial {trial}: {name}")
        got_metrics = read_all(out.with_name(out.stem + "_metrics.h5"))
        for name in want_metrics:
            np.testing.assert_array_equal(got_metrics[name], want_metrics[name], err_msg=f"trial {trial}: metrics {name}")
        assert not partial.exists()
