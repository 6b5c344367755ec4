"""End to end: real images -> real timm models -> real HDF5 caches, through the API and the CLI."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from attnflow import AttnflowError, build_model, open_cache
from attnflow.store.names import SCHEMA
from attnflow.extract import extract
from attnflow.images import list_images
from conftest import Interrupt, direct_capture, read_all, tiny

ARCH = "vit_tiny_patch16_224"

CACHE_ATTRS = {
    "schema", "attnflow_version", "created", "model", "label", "family", "weights", "checkpoint",
    "checkpoint_sha256", "num_layers", "num_heads", "num_tokens", "num_prefix_tokens", "has_cls",
    "num_registers", "grid_size", "patch_size", "img_size", "store", "dtype", "compression", "preprocessing",
    "amp", "working_dir", "n_images", "n_inputs", "n_inputs_done", "n_skipped", "inputs_sha256", "complete",
    "has_labels", "has_tokens", "has_masks",
}





def test_cache_carries_exactly_the_schema(tmp_path, image_dir, run_cli):
    out = tmp_path / "c.h5"
    result = run_cli(
        "extract", ARCH, image_dir, "-o", out, "--random-init", "--img-size", 32, "--labels-from-dirs",
        "--save-tokens", "-b", 4, "--workers", 0, "--quiet",
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    with h5py.File(out, "r") as f:
        assert set(f.attrs) == CACHE_ATTRS | {"final_norm_eps"}  # --save-tokens records the final norm
        dimensions = {"image", "layer", "head", "query", "key", "token", "channel", "class", "skipped_input"}
        assert set(f) == {"attn", "magnitude", "token_norm", "image_ids", "image_sha256", "labels", "class_names", "skipped",
                          "skipped_reason", "tokens", "final_norm_weight", "final_norm_bias"} | dimensions  # and the scales that name the axes
        assert all(h5py.h5ds.is_scale(f[name].id) for name in dimensions)
        assert f["final_norm_weight"].shape == f["final_norm_bias"].shape == (192,) and f.attrs["final_norm_eps"] == 1e-6
        a = f.attrs
        assert a["schema"] == SCHEMA and a["complete"] and a["n_images"] == 10 and a["n_inputs"] == 10
        assert (a["num_layers"], a["num_heads"], a["num_tokens"], a["num_prefix_tokens"]) == (12, 3, 5, 1)
        assert list(a["grid_size"]) == [2, 2] and list(a["patch_size"]) == [16, 16] and list(a["img_size"]) == [32, 32]
        assert a["weights"] == "random" and a["store"] == "full" and a["dtype"] == "float16"
        assert json.loads(a["preprocessing"])["input_size"] == [3, 32, 32]
        assert f["attn"].shape == (10, 12, 3, 5, 5) and f["attn"].dtype == np.float16
        assert f["attn"].chunks == (1, 1, 3, 5, 5) and f["attn"].compression == "gzip"
        assert f["magnitude"].shape == (10, 12, 5) and f["tokens"].shape == (10, 5, 192)
        ids = [s.decode() for s in f["image_ids"][()]]
        assert ids == [str(p) for p in list_images([str(image_dir)])]
        assert [s.decode() for s in f["image_sha256"][()]] == [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in ids]
        names = [s.decode() for s in f["class_names"][()]]
        assert names == ["cat", "dog"]
        assert [names[i] for i in f["labels"][()]] == [Path(p).parent.name for p in ids]
    assert not Path(str(out) + ".partial").exists()


@pytest.mark.parametrize("kind", ["plain", "registers", "no_cls_gap", "registers_no_cls"])
def test_cached_rows_equal_a_direct_capture(tmp_path, image_dir, kind):
    loaded = tiny(kind)
    paths = list_images([str(image_dir)])
    extract(loaded, paths, tmp_path / "c.h5", dtype="float32", save_tokens=True, batch_size=3, workers=0)
    data = read_all(tmp_path / "c.h5")
    direct = direct_capture(loaded.model, paths)
    np.testing.assert_allclose(data["attn"], np.concatenate([c.attn.numpy() for c in direct]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(data["magnitude"], np.concatenate([c.magnitude.numpy() for c in direct]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(data["tokens"], np.concatenate([c.tokens.numpy() for c in direct]), rtol=1e-5, atol=1e-5)


def test_store_modes_and_float16(tmp_path, image_dir):
    loaded = tiny("registers")
    paths = list_images([str(image_dir)])
    for store in ("full", "rows", "none"):
        extract(loaded, paths, tmp_path / f"{store}.h5", store=store, batch_size=4, workers=0)
    full, rows, none = (read_all(tmp_path / f"{s}.h5") for s in ("full", "rows", "none"))
    assert full["attn"].dtype == np.float16 and full["attn"].shape == (10, 2, 3, 9, 9)
    assert rows["attn_rows"].shape == (10, 2, 3, 5, 9)
    assert np.array_equal(rows["attn_rows"], full["attn"][:, :, :, :5])
    assert "attn" not in none and "attn_rows" not in none
    np.testing.assert_array_equal(none["magnitude"], full["magnitude"])
    direct = np.concatenate([c.attn.numpy() for c in direct_capture(loaded.model, paths)])
    np.testing.assert_allclose(full["attn"].astype(np.float32), direct, rtol=1e-3, atol=1e-4)
    with pytest.raises(AttnflowError, match="neither"):
        extract(tiny("no_cls_gap"), paths, tmp_path / "x.h5", store="rows", workers=0)


def make_bad_files(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    Image.new("RGB", (60, 60), (1, 2, 3)).save(folder / "whole.jpg")
    data = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "whole.jpg").unlink()
    return sorted(str(folder / n) for n in ("zero.png", "text.png", "truncated.jpg"))


def test_corrupt_files_are_skipped_recorded_and_named_once(tmp_path, image_dir, run_cli):
    bad = make_bad_files(image_dir / "cat")
    out = tmp_path / "c.h5"
    result = run_cli("extract", ARCH, image_dir, "-o", out, "--random-init", "--img-size", 32, "-b", 4, "--workers", 0)
    assert result.exit_code == 0, result.stderr
    for path in bad:
        assert sum(line.startswith(f"attnflow: skipped {path}:") for line in result.stderr.splitlines()) == 1
    with open_cache(out) as cache:
        assert len(cache) == 10 and cache.attrs["n_skipped"] == 3
        assert sorted(s.decode() for s in cache["skipped"][()]) == bad
        assert all(r for r in cache["skipped_reason"][()])
        assert not set(cache.image_ids) & set(bad)
    assert "10 images, 3 skipped" in result.stderr


def test_strict_makes_the_first_bad_file_fatal(tmp_path, image_dir, run_cli):
    bad = make_bad_files(image_dir / "cat")
    result = run_cli("extract", ARCH, image_dir, "-o", tmp_path / "c.h5", "--random-init", "--img-size", 32, "--strict", "--workers", 0, "-q")
    assert result.exit_code == 1
    assert result.stderr.startswith("attnflow: error: cannot decode ") and any(p in result.stderr for p in bad)
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "c.h5").exists()


def test_paths_from_stdin_in_a_real_pipeline(tmp_path, image_dir):
    paths = list_images([str(image_dir)])[:4]
    out = tmp_path / "c.h5"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "attnflow", "extract", ARCH, "-", "-o", str(out), "--random-init", "--img-size", "32", "--workers", "1"],
        input="\n".join(map(str, paths)) + "\n", capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert "wrote" in proc.stderr
    with open_cache(out) as cache:
        assert cache.image_ids == [str(p) for p in paths]





def test_interrupted_extraction_resumes_to_the_same_cache(tmp_path, image_dir):
    make_bad_files(image_dir / "dog")
    paths = list_images([str(image_dir)])
    loaded = tiny("registers")
    options = dict(batch_size=3, workers=0, save_tokens=True, labels_from_dirs=True)
    extract(loaded, paths, tmp_path / "whole.h5", **options)

    batches = []

    def stop_after_two(done, total):
        batches.append(done)
        if len(batches) == 2:
            raise Interrupt

    out = tmp_path / "resumed.h5"
    with pytest.raises(Interrupt):
        extract(loaded, paths, out, on_progress=stop_after_two, **options)
    partial = Path(str(out) + ".partial")
    assert partial.is_dir() and not out.exists()
    segments = sorted(partial.glob("seg-*.h5"))
    assert len(segments) == 2  # both queued batches were committed before the error surfaced
    with h5py.File(segments[-1], "r") as f:
        assert f.attrs["n_inputs_done"] == 6
    with pytest.raises(AttnflowError, match="--resume"):
        open_cache(out)
    with pytest.raises(AttnflowError, match="interrupted run left"):
        extract(loaded, paths, out, **options)
    with pytest.raises(AttnflowError, match="started with store=full"):
        extract(loaded, paths, out, resume=True, **{**options, "store": "rows"})
    with pytest.raises(AttnflowError, match="inputs_sha256"):
        extract(loaded, paths[:-1], out, resume=True, **options)

    result = extract(loaded, paths, out, resume=True, **options)
    assert (result.n_images, result.n_skipped, result.n_new) == (10, 3, 4)  # the first 6 inputs were images
    whole, resumed = read_all(tmp_path / "whole.h5"), read_all(out)
    assert set(whole) == set(resumed)
    for name in whole:
        np.testing.assert_array_equal(resumed[name], whole[name], err_msg=name)


def test_a_batch_cut_off_mid_write_is_discarded_on_resume(tmp_path, image_dir):
    """A segment that was being written when the process died never counts, however much of it exists."""
    paths = list_images([str(image_dir)])
    loaded = tiny("plain")
    extract(loaded, paths, tmp_path / "whole.h5", batch_size=4, workers=0)

    def stop(done, total):
        raise Interrupt

    out = tmp_path / "c.h5"
    with pytest.raises(Interrupt):
        extract(loaded, paths, out, batch_size=4, workers=0, on_progress=stop)
    partial = Path(str(out) + ".partial")
    first = sorted(partial.glob("seg-*.h5"))[0]
    torn = first.read_bytes()
    (partial / "seg-00000001.h5.tmp").write_bytes(torn[: len(torn) // 2])  # the next batch, half written
    extract(loaded, paths, out, batch_size=4, workers=0, resume=True)
    assert not partial.exists()
    whole, resumed = read_all(tmp_path / "whole.h5"), read_all(out)
    for name in whole:
        np.testing.assert_array_equal(resumed[name], whole[name], err_msg=name)


def test_existing_output_is_never_clobbered_without_overwrite(tmp_path, image_dir, run_cli):
    out = tmp_path / "c.h5"
    out.write_bytes(b"precious")
    args = ["extract", ARCH, image_dir, "-o", out, "--random-init", "--img-size", 32, "--workers", 0, "-q"]
    result = run_cli(*args)
    assert result.exit_code == 1 and "already exists; pass --overwrite" in result.stderr
    assert out.read_bytes() == b"precious"
    assert run_cli(*args, "--overwrite").exit_code == 0
    with open_cache(out) as cache:
        assert len(cache) == 10


def test_reader_rejects_foreign_truncated_and_unfinished_files(tmp_path, image_dir):
    extract(tiny("plain"), list_images([str(image_dir)]), tmp_path / "good.h5", workers=0)
    data = (tmp_path / "good.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(AttnflowError, match="cut.h5 is not a readable HDF5 file"):
        open_cache(tmp_path / "cut.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(AttnflowError, match="not a readable HDF5"):
        open_cache(tmp_path / "text.h5")
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(AttnflowError, match="not an attnflow file"):
        open_cache(tmp_path / "foreign.h5")
    for schema, message in (("attnflow.cache/2", "this attnflow reads 'attnflow.cache/1'"), ("attnflow.metrics/1", "is a metrics file, not an attention cache")):
        path = tmp_path / f"{schema.replace('/', '_')}.h5"
        path.write_bytes(data)
        with h5py.File(path, "r+") as f:
            f.attrs["schema"] = schema
        with pytest.raises(AttnflowError, match=message):
            open_cache(path)
    with pytest.raises(AttnflowError, match="no such file"):
        open_cache(tmp_path / "absent.h5")


def test_cli_errors_are_one_line_with_the_right_exit_code(tmp_path, image_dir, run_cli):
    usage = run_cli("extract", ARCH, image_dir, "-o", tmp_path / "c.h5", "--store", "everything")
    assert usage.exit_code == 2
    for args, needle in (
        (["extract", ARCH, image_dir, "-o", tmp_path / "c.h5"], "--random-init"),
        (["extract", ARCH, tmp_path / "nope", "-o", tmp_path / "c.h5", "--random-init"], "no such file or directory"),
        (["info", tmp_path / "absent.h5"], "no such file"),
        (["extract", ARCH, image_dir, "-o", tmp_path / "c.h5", "--checkpoint", tmp_path / "none.pth"], "checkpoint not found"),
    ):
        result = run_cli(*args)
        assert result.exit_code == 1, (args, result.stderr)
        assert result.stderr.startswith("attnflow: error: ") and needle in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_info_reports_attrs_and_shapes(tmp_path, image_dir, run_cli):
    extract(tiny("registers"), list_images([str(image_dir)]), tmp_path / "c.h5", store="rows", workers=0)
    result = run_cli("info", tmp_path / "c.h5", "--format", "json")
    assert result.exit_code == 0
    info = json.loads(result.stdout)
    assert info["attrs"]["num_registers"] == 4 and info["attrs"]["store"] == "rows"
    assert info["datasets"]["attn_rows"]["shape"] == [10, 2, 3, 5, 9]
    table = run_cli("info", tmp_path / "c.h5")
    assert "num_registers" in table.stdout and "/attn_rows" in table.stdout


def test_decoding_in_worker_processes_gives_the_same_rows(tmp_path, image_dir):
    loaded = tiny("plain")
    paths = list_images([str(image_dir)])
    extract(loaded, paths, tmp_path / "w0.h5", batch_size=4, workers=0)
    extract(loaded, paths, tmp_path / "w2.h5", batch_size=4, workers=2)
    a, b = read_all(tmp_path / "w0.h5"), read_all(tmp_path / "w2.h5")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_checkpoint_round_trip_through_the_cache_attrs(tmp_path, image_dir):
    """A cache records enough to rebuild its model with load_model."""
    from attnflow import load_model

    model = build_model(ARCH, random_init=True, img_size=32).model
    torch.save({"model": model.state_dict()}, tmp_path / "w.pth")
    loaded = build_model(ARCH, tmp_path / "w.pth", img_size=32)
    extract(loaded, list_images([str(image_dir)]), tmp_path / "c.h5", workers=0)
    with open_cache(tmp_path / "c.h5") as cache:
        a = cache.attrs
        rebuilt = load_model(a["model"], a["checkpoint"] or None, img_size=a["img_size"][0])
        assert a["checkpoint"] == str((tmp_path / "w.pth").resolve()) and a["label"] == f"{ARCH}@w"
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in model.state_dict().items())


def test_parallel_gzip_chunks_read_back_exactly(tmp_path, image_dir):
    """attnflow compresses chunks itself; libhdf5's own gzip+shuffle filters must read them back bit for bit."""
    loaded = tiny("registers")
    paths = list_images([str(image_dir)])
    for compression in ("gzip", "none", "lzf"):
        extract(loaded, paths, tmp_path / f"{compression}.h5", compression=compression, save_tokens=True, batch_size=4, workers=0)
    plain = read_all(tmp_path / "none.h5")
    for compression in ("gzip", "lzf"):
        packed = read_all(tmp_path / f"{compression}.h5")
        for name in ("attn", "tokens", "magnitude"):
            np.testing.assert_array_equal(packed[name], plain[name], err_msg=f"{compression}/{name}")
    for compression in ("gzip", "none", "lzf"):  # and attnflow's parallel reader gives the same rows
        with open_cache(tmp_path / f"{compression}.h5") as cache:
            for name in ("attn", "tokens"):
                np.testing.assert_array_equal(cache.read_rows(name, 3, 9), plain[name][3:9])
    # chunks that libhdf5 compressed itself (any level) decode the same way
    import shutil

    shutil.copy(tmp_path / "gzip.h5", tmp_path / "by_hdf5.h5")
    with h5py.File(tmp_path / "by_hdf5.h5", "r+") as f:
        chunks = f["attn"].chunks
        del f["attn"]
        f.create_dataset("attn", data=plain["attn"], chunks=chunks, compression="gzip", compression_opts=6, shuffle=True)
    with open_cache(tmp_path / "by_hdf5.h5") as cache:
        np.testing.assert_array_equal(cache.read_rows("attn", 0, 10), plain["attn"])
    with h5py.File(tmp_path / "gzip.h5", "r") as f:
        assert f["attn"].compression == "gzip" and f["attn"].shuffle
        stored = f["attn"].id.get_storage_size()
        assert 0 < stored < f["attn"].size * 2  # really compressed, and really stored
