"""Assembly moves the segments into the finished file without a second copy: a kill at any moment of it
resumes to the same file, and a disk that holds the segments and one more segment is enough. Real
writers, real processes killed with SIGKILL, a real small file system."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from attnflow import AttnflowError
from conftest import mount_tmpfs

ROOT = Path(__file__).resolve().parents[1]
N, BATCH, T = 360, 40, 65  # 9 segments of about 1.3 MB (float16 noise does not compress)

# A run of the real writer over random rows; ``finish`` resumes it and assembles (in its own process).
SCRIPT = f"""
import sys
import numpy as np
from attnflow.store.write import CacheSpec
from attnflow.layout import TokenLayout

def spec():
    layout = TokenLayout(has_cls=True, num_prefix_tokens=1, grid_size=(8, 8), patch_size=(8, 8))
    return CacheSpec(layout=layout, num_layers=2, num_heads=2, attrs={{"n_inputs": {N}}})

def rows():
    rng = np.random.default_rng(0)
    return {{"attn": rng.random(({N}, 2, 2, {T}, {T}), dtype=np.float32).astype(np.float16),
             "magnitude": rng.random(({N}, 2, {T}), dtype=np.float32), "token_norm": rng.random(({N}, 2, {T}), dtype=np.float32)}}

def write(out):
    writer, data = spec().writer(out), rows()
    for start in range(0, {N}, {BATCH}):
        stop = start + {BATCH}
        writer.append({{k: v[start:stop] for k, v in data.items()}}, image_ids=[f"img_{{i}}.png" for i in range(start, stop)],
                      n_inputs_done=stop)
    writer.close()  # every batch committed, not assembled

def finish(out):
    spec().writer(out, resume=True).finish()

if __name__ == "__main__":
    {{"write": write, "finish": finish}}[sys.argv[1]](sys.argv[2])
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("assembly")
    (folder / "segment_run.py").write_text(SCRIPT)
    sys.path.insert(0, str(folder))
    import segment_run

    sys.path.remove(str(folder))
    segment_run.write(folder / "reference.h5")
    partial = folder / "reference.h5.partial"
    segments = sorted(partial.glob("seg-*.h5"))
    sizes = [s.stat().st_size for s in segments]
    shutil.copytree(partial, folder / "segments")  # a committed, unassembled run to copy from
    segment_run.finish(folder / "reference.h5")
    return folder, segment_run, sizes


def unassembled(folder: Path, out: Path) -> Path:
    shutil.copytree(folder / "segments", Path(str(out) + ".partial"))
    return Path(str(out) + ".partial")


def assert_same(got: Path, want: Path) -> None:
    with h5py.File(got, "r") as a, h5py.File(want, "r") as b:
        assert set(a) == set(b)
        for name in b:
            np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=name)
        assert dict(a.attrs).keys() == dict(b.attrs).keys()


def test_a_kill_at_any_moment_of_the_assembly_resumes_to_the_same_file(run, tmp_path):
    folder, segment_run, sizes = run
    out = tmp_path / "c.h5"
    partial = unassembled(folder, out)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for left in (len(sizes) - 1, len(sizes) // 2, 1):  # killed when that many segments are still waiting
        proc = subprocess.Popen([sys.executable, str(folder / "segment_run.py"), "finish", str(out)], env=env,
                                stderr=subprocess.PIPE)
        while proc.poll() is None and len(list(partial.glob("seg-*.h5"))) > left:
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, f"the assembly ended before it could be killed: {err.decode()}"
        assert not out.exists() and (partial / "assembly-state.h5").exists()
        # the folder never holds much more than the finished file: the segments are moved, not copied
        on_disk = sum(p.stat().st_size for p in partial.iterdir())
        assert on_disk <= sum(sizes) + 2 * max(sizes)
    segment_run.finish(out)
    assert_same(out, folder / "reference.h5")
    assert not partial.exists()


def test_a_disk_that_holds_the_segments_and_one_more_is_enough(run, tmp_path):
    """A disk with room for the segments but not one step more is refused naming the bytes; with room for one
    more segment (the old assembly needed 2.25 times the segments and 4 MB), the run finishes."""
    folder, segment_run, sizes = run
    disk = tmp_path / "disk"
    total = sum(p.stat().st_size for p in (folder / "segments").iterdir())
    if not mount_tmpfs(disk, total + 64 * 1024):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        out = disk / "c.h5"
        partial = unassembled(folder, out)
        with pytest.raises(AttnflowError, match=r"no space left on device writing .*assembly.h5: assembling .*c.h5 needs "
                                                r"[\d.]+ MB \([\d,]+ bytes\) free for this step and [\d.]+ MB \([\d,]+ bytes\) is free.*--resume"):
            segment_run.finish(out)
        assert not out.exists() and len(list(partial.glob("seg-*.h5"))) == len(sizes)  # nothing lost
        subprocess.run(["mount", "-o", f"remount,size={-(-(total + 3 * max(sizes) // 2) // 4096) * 4}k", str(disk)], check=True)
        segment_run.finish(out)
        assert_same(out, folder / "reference.h5")
        assert not partial.exists()
    finally:
        subprocess.run(["umount", "-l", str(disk)])
