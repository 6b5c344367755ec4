"""Odd and hostile flag values and inputs: each is a usage error (exit 2), a one-line data error (exit 1) or
a note on stderr, never a traceback, an empty table or a silently wrong result."""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
import torch

from attnflow import AttnflowError, open_cache
from attnflow.extract import extract
from attnflow.choices import choice_values
from attnflow.images import CROP_PCT_MIN, Interpolation, list_images, resolve_preprocessing
from conftest import one_line_error, write_images, synthetic, write_metrics, tiny

ARCH = "vit_tiny_patch16_224"  # 16 px patches


def flat(text: str) -> str:
    """A usage error's message without the box and the wrapping typer's panel adds."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def usage_error(result, flag: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert "Traceback" not in result.stderr and flag in result.stderr, result.stderr


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Image folders and tiny-model caches (tokens and labels) shared by the tests of this module."""
    root = tmp_path_factory.mktemp("odd")
    paths = write_images(root / "imgs", 8)
    one = write_images(root / "one", 4, classes=("cat",))
    few = write_images(root / "few", 7, classes=("cat", "dog", "cat", "dog", "cat", "dog", "bird"))  # bird: 1 image
    opts = dict(save_tokens=True, labels_from_dirs=True, workers=0)
    extract(tiny("plain"), paths, root / "plain.h5", metrics=root / "plain_m.h5", **opts)
    extract(tiny("registers"), paths, root / "regs.h5", **opts)
    extract(tiny("plain"), one, root / "one.h5", **opts)
    extract(tiny("plain"), few, root / "few.h5", **opts)
    extract(tiny("no_cls_gap"), paths, root / "gap.h5", **opts)
    rng = __import__("numpy").random.default_rng(0)
    write_metrics(root / "deep.h5", synthetic(rng, n=10, L=4), family="mim", label="deep", num_layers=4)
    write_metrics(root / "shallow.h5", synthetic(rng, n=10, L=2), family="jea", label="shallow", num_layers=2)
    return root


def extract_args(work: Path, *extra) -> list:
    return ["extract", ARCH, work / "imgs", "-o", work / "never.h5", "--random-init", "--workers", 0, "-q", *extra]


# -- 1. --interpolation and a tiny --img-size -------------------------------------------------------------


@pytest.mark.parametrize("extra, flag", [
    (["--img-size", 32, "--interpolation", "bogus"], "--interpolation"),
    (["--img-size", 32, "--interpolation", "random"], "--interpolation"),  # timm's training-only mode
    (["--img-size", 7], "--img-size"),
    (["--img-size", 0], "--img-size"),
    (["--img-size", -16], "--img-size"),
    (["--img-size", 16], "--img-size"),  # one patch: every attention-over-patches metric is trivial
])
def test_bad_interpolation_and_tiny_img_size_are_usage_errors(work, run_cli, extra, flag):
    result = run_cli(*extract_args(work, *extra))
    usage_error(result, flag)
    assert not (work / "never.h5").exists() and not (work / "never.h5.partial").exists()


def test_tiny_img_size_names_the_smallest_valid_size(work, run_cli):
    assert "use at least 32" in flat(run_cli(*extract_args(work, "--img-size", 7)).stderr)


def test_interpolations_are_timms(work):
    from timm.data.transforms import str_to_interp_mode

    for name in choice_values(Interpolation):
        str_to_interp_mode(name)  # each is accepted by the eval transform
    model = tiny("plain").model
    image = __import__("PIL.Image", fromlist=["Image"]).open(next((work / "imgs").rglob("*.png"))).convert("RGB")
    for name in choice_values(Interpolation):
        assert resolve_preprocessing(model, interpolation=name).transform()(image).shape == (3, 32, 32)
    with pytest.raises(AttnflowError, match="unknown interpolation 'bogus'"):
        resolve_preprocessing(model, interpolation="bogus")


# -- 2. --crop-pct ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "1.5", "-0.5", "nan", "inf", "0.01"])
def test_crop_pct_out_of_range_is_a_usage_error(work, run_cli, value):
    usage_error(run_cli(*extract_args(work, "--img-size", 32, "--crop-pct", value)), "--crop-pct")


def test_crop_pct_range_in_the_api(work):
    model = tiny("plain").model
    assert resolve_preprocessing(model, crop_pct=CROP_PCT_MIN).crop_pct == CROP_PCT_MIN
    assert resolve_preprocessing(model, crop_pct=1.0).crop_pct == 1.0
    for bad in (0.0, 1.5, CROP_PCT_MIN / 2, math.nan):
        with pytest.raises(AttnflowError, match="crop-pct"):
            resolve_preprocessing(model, crop_pct=bad)


# -- 3. --img-size that is not a multiple of the patch size -------------------------------------------------


def test_img_size_off_the_patch_grid_is_refused_with_the_nearest_sizes(work, run_cli):
    result = run_cli(*extract_args(work, "--img-size", 70))
    usage_error(result, "--img-size")
    assert "70 is not a multiple of the patch size 16x16" in flat(result.stderr) and "use 64 or 80" in flat(result.stderr)
    dinov2 = run_cli("extract", "vit_small_patch14_dinov2", work / "imgs", "-o", work / "never.h5", "--random-init",
                     "--img-size", 32, "--workers", 0)
    usage_error(dinov2, "--img-size")
    assert "use 28 or 42" in flat(dinov2.stderr)


def test_the_library_refuses_what_the_command_refuses_before_any_weights():
    from attnflow.errors import OptionError
    from attnflow.models import build_model

    with pytest.raises(OptionError, match=r"^img_size: 70 is not a multiple of the patch size 16x16.*use 64 or 80"):
        build_model("vit_tiny_patch16_224", random_init=True, img_size=70)
    with pytest.raises(OptionError, match=r"^img_size: 8 is smaller than 2 x 2 patches of 16x16 px; use at least 32"):
        build_model("vit_tiny_patch16_224.augreg_in21k", img_size=8)  # refused before timm tries the hub
    with pytest.raises(OptionError, match="^checkpoint_key: selects a container inside checkpoint"):
        build_model("vit_tiny_patch16_224", random_init=True, checkpoint_key="student")
    assert build_model("vit_tiny_patch16_224", random_init=True, img_size=64).adapter.patch_size == (16, 16)


# -- 4. the same input twice ----------------------------------------------------------------------------------


def test_list_images_drops_duplicates_keeping_the_first(work, tmp_path):
    first = sorted((work / "imgs").rglob("*.png"))
    link = tmp_path / "link.png"
    link.symlink_to(first[1])
    seen = []
    found = list_images([str(first[0]), str(work / "imgs"), str(first[0]), str(link)], on_duplicates=seen.append)
    assert found[0] == first[0]  # stored as given at its first occurrence
    assert len(found) == len(first) and seen == [3]
    assert len({os.path.realpath(p) for p in found}) == len(found)
    untouched = []
    assert list_images([str(first[0])], on_duplicates=untouched.append) == [first[0]] and untouched == []


def test_extract_notes_duplicate_inputs_and_metrics_quiet_is_silent(work, run_cli):
    image = sorted((work / "imgs").rglob("*.png"))[0]
    out = work / "dupes.h5"
    result = run_cli("extract", ARCH, image, image, work / "imgs", "-o", out, "--random-init", "--img-size", 32, "--workers", 0)
    assert result.exit_code == 0, result.stderr
    assert "attnflow: note: 2 duplicate input paths dropped" in result.stderr
    with open_cache(out) as cache:
        assert len(cache) == 8 and cache.image_ids[0] == str(image)
    # 7. --quiet: no progress, no summary line and no table, whatever the format
    for fmt in ("table", "csv"):
        quiet = run_cli("metrics", out, "-o", work / f"dupes_m_{fmt}.h5", "--quiet", "--format", fmt)
        assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == "", quiet
        assert (work / f"dupes_m_{fmt}.h5").exists()


# -- 5. compare --layers beyond every model's depth -----------------------------------------------------------


def test_compare_layer_no_model_has_is_an_error(work, run_cli):
    files = [work / "deep.h5", work / "shallow.h5"]
    result = run_cli("compare", *files, "--layers", "99")
    one_line_error(result, "--layers 99: no model has layer 99")
    assert "deep has 4 blocks" in result.stderr and "shallow has 2 blocks" in result.stderr
    one_line_error(run_cli("compare", *files, "--summary-layers", "-9"), "--summary-layers -9: no model has layer -9")
    partial = run_cli("compare", *files, "--layers", "3", "--bootstrap", 10, "-f", "csv")
    assert partial.exit_code == 0 and "--layers 3: shallow has only 2 blocks (left blank)" in partial.stderr
    assert {row.split(",")[0] for row in partial.stdout.splitlines()[1:]} == {"deep"}


def test_compare_layer_syntax_against_depth_is_a_usage_error(work, run_cli):
    files = [work / "deep.h5", work / "shallow.h5"]
    usage_error(run_cli("compare", *files, "--layers", "1.5"), "--layers")
    usage_error(run_cli("compare", *files, "--summary-layers", "0.5"), "--summary-layers")
    usage_error(run_cli("compare", *files, "--depth", "relative", "--layers", "2"), "--layers")
    usage_error(run_cli("compare", *files, "--depth", "relative", "--layers", "nan"), "--layers")
    assert run_cli("compare", *files, "--depth", "relative", "--layers", "0.5,1", "--bootstrap", 10).exit_code == 0


def test_compare_same_file_twice_says_so(work, run_cli):
    one_line_error(run_cli("compare", "--mim", work / "deep.h5", "--mim", work / "deep.h5", "--jea", work / "shallow.h5",
                           "--bootstrap", 10, "-f", "csv"),
                   f"{work / 'deep.h5'} and {work / 'deep.h5'} hold the same network (file {work / 'deep.h5'})")
    tables_only = run_cli("compare", work / "deep.h5", work / "deep.h5", "--bootstrap", 10, "-f", "csv")
    assert tables_only.exit_code == 0, tables_only.stderr  # no summary: one network shown twice is only a note
    assert f"{work / 'deep.h5'} is given 2 times (as deep, deep#2)" in tables_only.stderr


# -- 6. probes with one class, or classes too small to split ---------------------------------------------------


def test_probe_refuses_a_single_class(work, run_cli):
    one_line_error(run_cli("probe", work / "one.h5", "--split", "0.8", "--epochs", 1, "--bootstrap", 5),
                   f"probing needs at least two classes; {work / 'one.h5'} has one: cat")
    one_line_error(run_cli("probe", "--train", work / "one.h5", "--test", work / "one.h5", "--epochs", 1, "--bootstrap", 5,
                           "--allow-overlap"), "probing needs at least two classes")


@pytest.mark.parametrize("split, needle", [
    ("0.8", "1 class has no test images (bird): too few images to divide, not tested"),
    ("0.3", "1 class has test images but no training images (bird): their test images can only count as errors"),
])
def test_probe_notes_a_class_too_small_to_split(work, run_cli, split, needle):
    result = run_cli("probe", work / "few.h5", "--split", split, "--epochs", 1, "--bootstrap", 5, "--pool", "cls",
                     "--evaluator", "knn", "-f", "csv")
    assert result.exit_code == 0, result.stderr
    assert needle in result.stderr


def test_probe_train_and_test_of_different_models_or_classes(work, run_cli):
    args = ["--epochs", 1, "--bootstrap", 5]
    one_line_error(run_cli("probe", "--train", work / "plain.h5", "--test", work / "regs.h5", *args), "come from different models")
    one_line_error(run_cli("probe", "--train", work / "plain.h5", "--test", work / "few.h5", *args),
                   "have different classes (cat, dog vs bird, cat, dog)")
    usage_error(run_cli("probe", "--train", work / "plain.h5", "--test", work / "plain.h5", "--split", "0.5", *args), "--split")


# -- 8. other hostile flag values -------------------------------------------------------------------------------


def test_bad_seeds_bootstraps_and_devices_are_usage_errors(work, run_cli):
    metrics, cache = work / "deep.h5", work / "plain.h5"
    usage_error(run_cli("compare", metrics, "--seed", "-1"), "--seed")
    usage_error(run_cli("compare", metrics, "--bootstrap", "1000000000"), "--bootstrap")
    usage_error(run_cli("plot", "curves", metrics, "-o", work / "c.png", "--seed", "-1"), "--seed")
    usage_error(run_cli("probe", cache, "--split", "0.5", "--seed", "-1"), "--seed")
    usage_error(run_cli("probe", cache, "--split", "0.5", "--seed", str(2**64)), "--seed")
    usage_error(run_cli("probe", cache, "--split", "0.5", "--bootstrap", "1000000000"), "--bootstrap")
    for command in (["metrics", cache, "-o", work / "never_m.h5"], ["probe", cache, "--split", "0.5"], ["demo", "--out", work / "never_demo"],
                    extract_args(work, "--img-size", 32)):
        for device in ("bogus", "cuda:x", "mps", "gpu"):
            usage_error(run_cli(*command, "--device", device), "--device")
    usage_error(run_cli(*extract_args(work, "--img-size", 32, "--checkpoint-key", "student")), "--checkpoint-key")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_cuda_is_a_one_line_error(work, run_cli):
    one_line_error(run_cli("probe", work / "plain.h5", "--split", "0.5", "--device", "cuda"), "no CUDA device is available")
    one_line_error(run_cli("metrics", work / "plain.h5", "-o", work / "never_m.h5", "--device", "cuda:1"), "no CUDA device is available")


def test_outputs_in_missing_folders_are_one_line_errors(work, run_cli):
    missing = work / "no" / "such"
    one_line_error(run_cli("compare", work / "deep.h5", "-o", missing / "c.csv", "--bootstrap", 10), "no such directory")
    one_line_error(run_cli("compare", work / "deep.h5", "-o", work, "--bootstrap", 10), "is a directory")
    one_line_error(run_cli("probe", work / "plain.h5", "--split", "0.5", "-o", missing / "p.csv"), "no such directory")
    pytest.importorskip("matplotlib")
    one_line_error(run_cli("plot", "curves", work / "plain_m.h5", "-o", missing / "c.png"), "no such directory")
    one_line_error(run_cli("plot", "maps", work / "plain.h5", "--image", 0, "-o", missing / "m.png"), "no such directory")
    assert not missing.exists()


def test_probe_says_why_a_pool_has_no_row_and_repeats_nothing(work, run_cli):
    args = ["--split", "0.5", "--epochs", 1, "--bootstrap", 5, "-f", "csv"]
    no_cls = run_cli("probe", work / "gap.h5", *args, "--pool", "cls", "--pool", "mean", "--evaluator", "knn")
    assert no_cls.exit_code == 0 and "tiny-no_cls_gap has no cls token: cls pooling skipped" in no_cls.stderr
    assert [row.split(",")[2] for row in no_cls.stdout.splitlines()[1:]] == ["mean"]
    knn_only = run_cli("probe", work / "plain.h5", *args, "--pool", "abmilp", "--evaluator", "knn")
    assert knn_only.exit_code == 0 and "abmilp pooling is trained with the linear probe" in knn_only.stderr
    twice = run_cli("probe", work / "plain.h5", *args, "--pool", "cls", "--pool", "cls", "--evaluator", "knn", "--evaluator", "knn")
    assert twice.exit_code == 0 and len(twice.stdout.splitlines()) == 2  # header and one row


def test_compare_repeated_metric_or_layer_gives_one_row(work, run_cli):
    result = run_cli("compare", work / "deep.h5", "-m", "cls_self", "-m", "cls_self", "--layers", "0,0,1", "--bootstrap", 10, "-f", "csv")
    assert result.exit_code == 0, result.stderr
    assert [tuple(row.split(",")[2:4]) for row in result.stdout.splitlines()[1:]] == [("cls_self", "0"), ("cls_self", "1")]


def test_demo_out_that_is_a_file_is_a_one_line_error(work, run_cli):
    one_line_error(run_cli("demo", "--out", work / "deep.h5"), "is a file; the demo writes into a folder")


def test_probe_same_cache_twice_gets_distinct_labels(work, run_cli):
    result = run_cli("probe", work / "plain.h5", work / "plain.h5", "--split", "0.5", "--epochs", 1, "--bootstrap", 5,
                     "--pool", "cls", "--evaluator", "knn", "-f", "csv")
    assert result.exit_code == 0, result.stderr
    assert [row.split(",")[0] for row in result.stdout.splitlines()[1:]] == ["tiny-plain", "tiny-plain#2"]
    assert "two models are labelled 'tiny-plain'" in result.stderr


def test_plot_maps_missing_layer_or_image_is_a_one_line_error(work, run_cli):
    pytest.importorskip("matplotlib")
    out = work / "m.png"
    one_line_error(run_cli("plot", "maps", work / "plain.h5", "--image", 0, "-o", out, "--layer", 99), "--layer 99 is out of range")
    one_line_error(run_cli("plot", "maps", work / "plain.h5", "--image", "nope", "-o", out), "no image 'nope' in the cache")
    one_line_error(run_cli("plot", "maps", work / "plain.h5", "--image", 99, "-o", out), "image index 99 is out of range")
    assert not out.exists()
