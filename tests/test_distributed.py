"""torchrun with two gloo processes on the CPU: the assembled cache equals a single-process run."""
from __future__ import annotations

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

from conftest import write_images, read_all

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    write_images(base / "images", 11, size=(40, 40), classes=("a", "b", "c"))
    (base / "images" / "b" / "broken.png").write_bytes(b"not a png")
    torch.manual_seed(0)
    torch.save(timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0).state_dict(), base / "w.pth")
    return base


def args(base: Path, out: Path, *extra: str) -> list[str]:
    return ["extract", "vit_tiny_patch16_224", str(base / "images"), "-o", str(out), "--checkpoint", str(base / "w.pth"),
            "--img-size", "32", "--batch-size", "2", "--workers", "0", "--labels-from-dirs", "--save-tokens",
            "--metrics", str(out.with_name(out.stem + "_m.h5")), "-q", "--threads", "1", *extra]  # bits depend on threads


def torchrun(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "attnflow", *command],
        capture_output=True, text=True, env=env, timeout=600,
    )


def assert_same_files(got: Path, want: Path) -> None:
    a, b = read_all(got), read_all(want)
    assert set(a) == set(b)
    for name in b:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_two_ranks_equal_one_process(data, run_cli, one_thread):
    single = data / "single.h5"
    assert run_cli(*args(data, single)).exit_code == 0
    out = data / "dist.h5"
    result = torchrun(args(data, out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_files(out, single)
    assert_same_files(data / "dist_m.h5", data / "single_m.h5")
    with h5py.File(out) as f, h5py.File(single) as g:
        assert f["attn"].is_virtual and len(f["attn"].virtual_sources()) == 2
        assert list(f.attrs["shards"]) == ["dist.h5.shards/rank-000-of-002.h5", "dist.h5.shards/rank-001-of-002.h5"]
        for key in ("n_images", "n_inputs", "n_skipped", "inputs_sha256", "model", "num_tokens"):
            assert f.attrs[key] == g.attrs[key], key
    # readers see one cache, wherever the pair is moved
    moved = data / "moved"
    moved.mkdir()
    for name in ("dist.h5", "dist.h5.shards"):
        (data / name).rename(moved / name)
    from attnflow import open_cache

    with open_cache(moved / "dist.h5") as cache:
        np.testing.assert_array_equal(cache.read_rows("attn", 2, 7), read_all(single)["attn"][2:7])


def test_resume_is_per_shard(data):
    out = data / "again.h5"
    assert torchrun(args(data, out)).returncode == 0
    before = read_all(out)
    out.unlink()
    (data / "again_m.h5").unlink()
    (data / "again.h5.shards" / "rank-001-of-002.h5").unlink()  # as if rank 1 had been preempted
    rank0 = (data / "again.h5.shards" / "rank-000-of-002.h5").stat().st_mtime_ns
    result = torchrun(args(data, out, "--resume"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (data / "again.h5.shards" / "rank-000-of-002.h5").stat().st_mtime_ns == rank0  # not redone
    after = read_all(out)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_resume_refuses_a_finished_shard_of_another_input_list(data, tmp_path):
    shutil.copytree(data / "images", tmp_path / "images")
    (tmp_path / "w.pth").symlink_to(data / "w.pth")
    out = tmp_path / "grown.h5"
    assert torchrun(args(tmp_path, out)).returncode == 0
    out.unlink()
    shutil.copy(tmp_path / "images" / "a" / "img_000.png", tmp_path / "images" / "c" / "zz_added.png")
    result = torchrun(args(tmp_path, out, "--resume"))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("attnflow: error:")]
    assert errors and all("rank-001-of-002.h5 is complete but was made with inputs_sha256=" in e for e in errors), result.stderr[-3000:]
    assert "Traceback" not in "\n".join(line for line in result.stderr.splitlines() if "attnflow" in line)
    assert not out.exists()  # nothing assembled from the stale shard


def test_fewer_images_than_processes_is_one_line(data, tmp_path):
    (tmp_path / "images" / "a").mkdir(parents=True)
    shutil.copy(data / "images" / "a" / "img_000.png", tmp_path / "images" / "a")
    (tmp_path / "w.pth").symlink_to(data / "w.pth")
    result = torchrun(args(tmp_path, tmp_path / "one.h5"))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("attnflow: error:")]
    assert errors and all(e == "attnflow: error: 1 images for 2 processes: launch at most 1" for e in errors), result.stderr[-3000:]


SCRIPT = """
import sys
from pathlib import Path

from attnflow import build_model
from attnflow.distributed import extract_sharded
from attnflow.images import list_images

base, out = Path(sys.argv[1]), Path(sys.argv[2])
loaded = build_model("vit_tiny_patch16_224", base / "w.pth", img_size=32)
extract_sharded(loaded, list_images([str(base / "images")]), out, metrics=out.with_name(out.stem + "_m.h5"),
                batch_size=2, workers=0, labels_from_dirs=True, save_tokens=True)
"""


def test_distributed_extraction_from_python_equals_the_command(data, tmp_path, run_cli, one_thread):
    """A script calling attnflow.distributed.extract_sharded under torchrun writes what one process does."""
    reference = data / "single.h5"
    if not reference.exists():  # another test's, when it ran first in this process
        assert run_cli(*args(data, reference)).exit_code == 0
    (tmp_path / "script.py").write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(tmp_path / "script.py"), str(data), str(tmp_path / "api.h5")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got, want = read_all(tmp_path / "api.h5"), read_all(reference)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_nproc_runs_the_processes_itself(data, run_cli, one_thread):
    """--nproc 2 without torchrun: the same cache as one process; an error every process meets is one line."""
    single = data / "single.h5"
    if not single.exists():
        assert run_cli(*args(data, single)).exit_code == 0
    out = data / "nproc.h5"
    result = run_cli(*args(data, out, "--nproc", "2"))
    assert result.exit_code == 0, result.stderr
    assert result.stderr.count("attnflow: note: the family of w.pth is unknown") == 1  # both processes say it: once
    assert_same_files(out, single)
    assert_same_files(data / "nproc_m.h5", data / "single_m.h5")
    again = run_cli(*args(data, out, "--nproc", "2"))
    assert again.exit_code == 1 and "Traceback" not in again.stderr and "ChildFailedError" not in again.stderr
    assert again.stderr.strip().splitlines() == [f"attnflow: error: {out} already exists; pass --overwrite to replace it"]
