"""A run owns its output: concurrent runs, missing segments, kills between the two files' assembly, full
disks and resumed runs with changed options, each reproduced with real processes and real files."""
from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch

from attnflow import AttnflowError
from attnflow.extract import extract
from attnflow.images import list_images
from attnflow.output import make_run_folder
from conftest import Interrupt, mount_tmpfs, read_all, tiny, write_images

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}





@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """24 images, a checkpoint of a small ViT at 64 px, and the uninterrupted cache + metrics it gives."""
    base = tmp_path_factory.mktemp("reliability")
    write_images(base / "images", 24, size=(48, 48))
    torch.manual_seed(0)
    torch.save(timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=0).state_dict(), base / "w.pth")
    done = attnflow(*args(base, base / "reference.h5"))
    assert done.returncode == 0, done.stderr
    return base


def args(base: Path, out: Path, *extra: str, metrics: bool = True) -> list[str]:
    return [
        "extract", "vit_tiny_patch16_224", str(base / "images"), "-o", str(out), "--checkpoint", str(base / "w.pth"),
        "--img-size", "64", "--batch-size", "1", "--workers", "0", "-q", "--family", "mim",
        *(["--metrics", str(metrics_of(out))] if metrics else []), *extra,
    ]


def metrics_of(out: Path) -> Path:
    return out.with_name(out.stem + "_m.h5")


def partial(path: Path) -> Path:
    return Path(str(path) + ".partial")


def attnflow(*argv: str, limit_bytes: int | None = None) -> subprocess.CompletedProcess:
    """``python -m attnflow ARGV`` in its own process, optionally with every file it writes capped in size."""

    def cap_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an over-long write fails with EFBIG instead of killing

    return subprocess.run(
        [sys.executable, "-m", "attnflow", *argv], capture_output=True, text=True, env=ENV, timeout=300,
        preexec_fn=cap_file_size if limit_bytes else None,
    )


def assert_same(got: Path, want: Path) -> None:
    a, b = read_all(got), read_all(want)
    assert set(a) == set(b)
    for name in b:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def assert_one_line_error(result, *needles: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnflow: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def start_and_stop_after_first_segment(argv: list[str], out: Path) -> subprocess.Popen:
    """A real run, frozen with SIGSTOP once it has committed a batch: it holds its output but makes no progress."""
    proc = subprocess.Popen([sys.executable, "-m", "attnflow", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 120
    while not list(partial(out).glob("seg-*.h5")):
        assert proc.poll() is None and time.monotonic() < deadline, "the first run ended before it could be stopped"
        time.sleep(0.005)
    proc.send_signal(signal.SIGSTOP)
    return proc


def test_a_second_run_on_the_same_output_is_refused_while_the_first_writes(base, tmp_path):
    out = tmp_path / "c.h5"
    first = start_and_stop_after_first_segment(args(base, out), out)
    try:
        other_images = tmp_path / "other"
        write_images(other_images, 5, size=(48, 48), seed=1)
        for extra in (["--overwrite"], ["--resume"]):  # another run over other images, and a second resume
            argv = args(base, out, *extra)
            argv[2] = str(other_images) if extra == ["--overwrite"] else argv[2]
            second = attnflow(*argv)
            assert_one_line_error(second, f"another attnflow process (pid {first.pid} on", "is writing", str(partial(out)))
        assert partial(out).is_dir() and list(partial(out).glob("seg-*.h5"))  # --overwrite deleted nothing
    finally:
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert_same(out, base / "reference.h5")  # every row is the first run's
    assert_same(metrics_of(out), metrics_of(base / "reference.h5"))


def test_the_lock_dies_with_its_holder(base, tmp_path):
    out = tmp_path / "c.h5"
    first = start_and_stop_after_first_segment(args(base, out), out)
    first.send_signal(signal.SIGKILL)
    first.wait()
    resumed = attnflow(*args(base, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert_same(out, base / "reference.h5")


def interrupted(base: Path, out: Path, after: int, **options) -> list:
    """An in-process run stopped after ``after`` committed batches; returns the image paths."""
    paths = list_images([str(base / "images")])
    seen = []

    def stop(done, total):
        seen.append(done)
        if len(seen) == after:
            raise Interrupt

    with pytest.raises(Interrupt):
        extract(tiny("plain"), paths, out, workers=0, batch_size=2, on_progress=stop, **options)
    return paths


def test_a_missing_segment_is_refused_not_papered_over(base, tmp_path):
    out = tmp_path / "c.h5"
    paths = interrupted(base, out, 4)
    (partial(out) / "seg-00000001.h5").unlink()  # "it was unreadable, so I deleted it"
    with pytest.raises(AttnflowError, match=r"segment seg-00000001.h5 is missing.*--overwrite"):
        extract(tiny("plain"), paths, out, workers=0, batch_size=2, resume=True)
    assert not out.exists() and len(list(partial(out).glob("seg-*.h5"))) == 3  # nothing changed


def test_segments_that_do_not_chain_are_refused(base, tmp_path):
    out = tmp_path / "c.h5"
    paths = interrupted(base, out, 3)
    with h5py.File(partial(out) / "seg-00000002.h5", "r+") as f:
        f.attrs["n_inputs_start"] = 2  # as if it came from another run with other batches
    with pytest.raises(AttnflowError, match="do not form one run"):
        extract(tiny("plain"), paths, out, workers=0, batch_size=2, resume=True)


def test_resumed_runs_never_reuse_a_segment_name(base, tmp_path):
    out = tmp_path / "c.h5"
    paths = interrupted(base, out, 2)
    seen = []

    def stop_again(done, total):
        seen.append(done)
        if len(seen) == 3:
            raise Interrupt

    with pytest.raises(Interrupt):  # resumed with another batch size, and interrupted again
        extract(tiny("plain"), paths, out, workers=0, batch_size=3, resume=True, on_progress=stop_again)
    segments = sorted(p.name for p in partial(out).glob("seg-*.h5"))
    assert segments == [f"seg-{i:08d}.h5" for i in range(5)]
    chain = []
    for name in segments:
        with h5py.File(partial(out) / name, "r") as f:
            chain.append((int(f.attrs["n_inputs_start"]), int(f.attrs["n_inputs_done"])))
    assert chain == [(0, 2), (2, 4), (4, 7), (7, 10), (10, 13)]
    extract(tiny("plain"), paths, out, workers=0, batch_size=5, resume=True)
    extract(tiny("plain"), paths, tmp_path / "whole.h5", workers=0, batch_size=4)
    assert_same(out, tmp_path / "whole.h5")


def test_a_failure_between_the_two_assemblies_leaves_both_resumable(base, tmp_path):
    """The cache is in place, its metrics are not: the state a kill between the two renames leaves."""
    out = tmp_path / "c.h5"
    run = start_and_stop_after_first_segment(args(base, out), out)
    (metrics_of(out) / "in-the-way").mkdir(parents=True)  # a folder the metrics file cannot be renamed onto
    run.send_signal(signal.SIGCONT)
    _, err = run.communicate(timeout=300)
    assert_one_line_error(subprocess.CompletedProcess(run.args, run.returncode, "", err), "c_m.h5 is a directory",
                          "then rerun with --resume")
    assert out.exists() and partial(out).is_dir() and partial(metrics_of(out)).is_dir()
    assert not list(tmp_path.glob("*.tmp"))  # the temporary metrics file is gone
    shutil.rmtree(metrics_of(out))
    resumed = attnflow(*args(base, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert_same(out, base / "reference.h5")
    assert_same(metrics_of(out), metrics_of(base / "reference.h5"))
    assert not partial(out).exists() and not partial(metrics_of(out)).exists()
    before = out.stat().st_mtime_ns
    again = attnflow(*args(base, out, "--resume"))  # resuming a finished run changes nothing
    assert again.returncode == 0 and again.stderr == "", again.stderr
    assert out.stat().st_mtime_ns == before


def test_a_full_disk_is_one_line_and_resumable(base, tmp_path):
    """Every file write capped (RLIMIT_FSIZE): first below one segment, then below the assembled file."""
    out = tmp_path / "c.h5"
    assembled = os.path.getsize(base / "reference.h5")
    tiny_cap = attnflow(*args(base, out), limit_bytes=4096)
    assert_one_line_error(tiny_cap, "file too large writing", ".partial/seg-00000000.h5.", "rerun with --resume")
    assert not list(partial(out).glob("*.tmp"))  # the half-written segment is gone
    # room for every segment but not for the assembled cache: the run fails part-way through its assembly,
    # with the segments already moved into the file deleted and the others kept
    at_assembly = attnflow(*args(base, out, "--resume"), limit_bytes=assembled // 2)
    assert_one_line_error(at_assembly, "file too large writing", "c.h5.partial/assembly.h5", "rerun with --resume")
    assert not list(tmp_path.glob("*.tmp")) and not out.exists()
    assert os.path.getsize(partial(out) / "assembly.h5") <= assembled // 2
    resumed = attnflow(*args(base, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert_same(out, base / "reference.h5")
    assert_same(metrics_of(out), metrics_of(base / "reference.h5"))


def test_metrics_on_a_full_disk_is_one_line_and_resumable(base, tmp_path):
    cache = tmp_path / "c.h5"
    shutil.copy(base / "reference.h5", cache)
    command = ["metrics", str(cache), "-q", "-b", "4", "-o"]
    assert attnflow(*command, str(tmp_path / "whole.h5")).returncode == 0
    failed = attnflow(*command, str(tmp_path / "m.h5"), limit_bytes=4096)
    assert_one_line_error(failed, "file too large writing", "m.h5.partial")
    resumed = attnflow(*command, str(tmp_path / "m.h5"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    want, got = read_all(tmp_path / "whole.h5"), read_all(tmp_path / "m.h5")
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_a_real_full_disk(base, tmp_path):
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, 160 * 1024):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        out = disk / "c.h5"
        full = attnflow(*args(base, out))
        assert_one_line_error(full, "no space left on device writing", str(disk), "free space, then rerun with --resume")
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        resumed = attnflow(*args(base, out, "--resume"))
        assert resumed.returncode == 0, resumed.stderr
        assert_same(out, base / "reference.h5")
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_resume_applies_labels_and_refuses_other_storage(base, tmp_path):
    out = tmp_path / "c.h5"
    paths = interrupted(base, out, 2, compression="gzip")
    with pytest.raises(AttnflowError, match="started with compression=gzip, this run has lzf"):
        extract(tiny("plain"), paths, out, workers=0, batch_size=2, resume=True, compression="lzf")
    relabelled = tiny("plain")
    relabelled.label, relabelled.family = "renamed", "jea"
    extract(relabelled, paths, out, workers=0, batch_size=2, resume=True)
    with h5py.File(out) as f:
        assert (f.attrs["label"], f.attrs["family"]) == ("renamed", "jea")  # the attributes say what this run said


def test_dropping_metrics_on_resume_is_refused_and_names_them(base, tmp_path):
    out = tmp_path / "c.h5"
    paths = interrupted(base, out, 2, metrics=tmp_path / "m.h5")
    with pytest.raises(AttnflowError, match=r"written together with .*m.h5 \(--metrics\).*same --metrics"):
        extract(tiny("plain"), paths, out, workers=0, batch_size=2, resume=True)
    extract(tiny("plain"), paths, out, workers=0, batch_size=2, resume=True, metrics=tmp_path / "m.h5")
    assert out.exists() and (tmp_path / "m.h5").exists()


def test_resume_of_a_finished_run_checks_that_it_is_the_same_run(base, tmp_path):
    out = tmp_path / "c.h5"
    paths = list_images([str(base / "images")])
    extract(tiny("plain"), paths, out, workers=0, batch_size=8)
    before = out.stat().st_mtime_ns
    shutil.copy(out, tmp_path / "before.h5")
    again = extract(tiny("plain"), paths, out, workers=0, batch_size=8, resume=True)
    assert again.already_complete and again.n_images == 24 and out.stat().st_mtime_ns == before
    with pytest.raises(AttnflowError, match="is complete but was made with inputs_sha256="):
        extract(tiny("plain"), paths[:-1], out, workers=0, resume=True)
    with pytest.warns(UserWarning, match=r"c.h5 is complete but .*m.h5 is not: computing both"):
        added = extract(tiny("plain"), paths, out, workers=0, batch_size=8, resume=True, metrics=tmp_path / "m.h5")
    assert added.n_new == 24 and (tmp_path / "m.h5").exists()
    assert_same(out, tmp_path / "before.h5")  # recomputed beside its metrics, to the same rows


def test_output_that_is_a_folder_is_refused_before_any_work(base, tmp_path, run_cli):
    (tmp_path / "out").mkdir()
    result = run_cli(*args(base, tmp_path / "out", "--overwrite", metrics=False))
    assert result.exit_code == 1 and "is a directory" in result.stderr and "Traceback" not in result.stderr
    assert not partial(tmp_path / "out").exists()


@pytest.mark.parametrize("manifest", ["[1, 2]", '"text"', '{"attrs": 3}', "{not json"])
def test_a_mangled_manifest_is_one_line(base, tmp_path, run_cli, manifest):
    out = tmp_path / "c.h5"
    interrupted(base, out, 1)
    (partial(out) / "manifest.json").write_text(manifest)
    result = run_cli("extract", "vit_tiny_patch16_224", base / "images", "-o", out, "--random-init", "--img-size", 32,
                     "--workers", 0, "--resume")
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert "cannot resume from" in result.stderr and "manifest" in result.stderr


@pytest.mark.parametrize("store,compression,batch", [("full", "gzip", 1), ("full", "none", 7), ("rows", "lzf", 3), ("none", "gzip", 5)])
def test_assembly_moves_the_segments_without_a_second_copy(tmp_path, store, compression, batch):
    """Every row lands where it belongs whatever the chunks (64-, 256- and 1024-row chunks cut across batches),
    and the assembled file is no larger than its segments: no chunk is written twice."""
    from attnflow.store.write import CacheSpec
    from attnflow.layout import TokenLayout

    layout = TokenLayout(has_cls=True, num_prefix_tokens=2, grid_size=(4, 4), patch_size=(8, 8))
    L, H, T, n = 3, 2, layout.num_tokens, 150
    spec = CacheSpec(layout=layout, num_layers=L, num_heads=H, store=store, dtype="float16", compression=compression,
                     token_dim=24, class_names=["a", "b"], has_masks=True, attrs={"n_inputs": n})
    writer = spec.writer(tmp_path / "c.h5")
    rng = np.random.default_rng(0)
    attn = rng.random((n, L, H, T, T)).astype(np.float16)  # incompressible noise
    rows = {"magnitude": rng.random((n, L, T), dtype=np.float32), "tokens": rng.random((n, T, 24), dtype=np.float32),
            "fg": rng.random((n, layout.num_patches), dtype=np.float32), "token_norm": rng.random((n, L, T), dtype=np.float32)}
    if store == "full":
        rows["attn"] = attn
    elif store == "rows":
        rows["attn_rows"] = attn[:, :, :, :2]
    ids = [f"img_{i:04d}_{'x' * 200}.png" for i in range(n)]
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        writer.append({k: v[start:stop] for k, v in rows.items()}, image_ids=ids[start:stop], n_inputs_done=stop,
                      labels=[i % 2 for i in range(start, stop)], skipped=[(f"bad_{start}.png", "truncated " * 20)])
    segments = sum(s.path.stat().st_size for s in writer._segments)
    path = writer.finish()
    assert os.path.getsize(path) <= segments
    with h5py.File(path, "r") as f:
        for name, want in rows.items():
            np.testing.assert_array_equal(f[name][()], want, err_msg=name)
        assert [s.decode() for s in f["image_ids"][()]] == ids
        assert f["labels"][()].tolist() == [i % 2 for i in range(n)]
        assert [s.decode() for s in f["skipped"][()]] == [f"bad_{start}.png" for start in range(0, n, batch)]


def test_a_kill_while_a_finished_run_removes_its_folder(base, tmp_path):
    """Whatever part of the folder is left after the manifest went, the finished file stands and resumes."""
    out = tmp_path / "c.h5"
    paths = list_images([str(base / "images")])
    extract(tiny("plain"), paths, out, workers=0, batch_size=8)
    leftover = partial(out)
    make_run_folder(leftover, out, "killed-run")
    (leftover / "seg-00000001.h5").write_bytes(b"what rmtree had not reached yet")
    again = extract(tiny("plain"), paths, out, workers=0, batch_size=8, resume=True)
    assert again.already_complete and not leftover.exists()
    # killed after creating its folder, before its manifest: nothing was committed, so it starts afresh
    fresh = tmp_path / "d.h5"
    make_run_folder(partial(fresh), fresh, "killed-run")
    (partial(fresh) / "lock").write_text("")
    extract(tiny("plain"), paths, fresh, workers=0, batch_size=8, resume=True)
    assert_same(fresh, out)


def test_an_output_in_a_missing_folder_is_refused_and_nothing_is_created(base, tmp_path, run_cli):
    out = tmp_path / "nowhere" / "deeper" / "c.h5"
    result = run_cli(*args(base, out, metrics=False))
    assert result.exit_code == 1 and f"no such folder for {out}" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("signum,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "stopped (SIGTERM)")])
def test_ctrl_c_and_sigterm_are_one_line_and_resumable(base, tmp_path, signum, code, word):
    out = tmp_path / "c.h5"
    run = start_and_stop_after_first_segment(args(base, out), out)
    run.send_signal(signum)
    run.send_signal(signal.SIGCONT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == code, err
    assert err.strip() == f"attnflow: {word}; an interrupted extract or metrics run continues with --resume"
    resumed = attnflow(*args(base, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert_same(out, base / "reference.h5")
    assert_same(metrics_of(out), metrics_of(base / "reference.h5"))
