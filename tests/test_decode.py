"""``--decode gpu``: the batched decode-and-resize path, run here on the CPU device, against the PIL + timm path.

The reference is the default path (PIL decoding, timm's eval transform through torchvision on PIL images), an
independent implementation of the same preprocessing; the device path must agree with it to one uint8 level
on real photos, take the exact CPU path for everything it cannot decode as PIL does, and keep input order.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from attnflow.decode import (
    EncodedImages, EncodedJpeg, check_decode_device, collate_encoded, decode_batch, with_decode,
)
from attnflow.errors import AttnflowError, OptionError
from attnflow.extract import extract
from attnflow.images import ImageDataset, Preprocessing, collate_images
from attnflow.models import LoadedModel
from attnflow.options import InputOptions
from conftest import make_tiny_vit

CPU = torch.device("cpu")
IMAGENET = dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
# The configurations the device path mirrors: timm's default, another crop and filter, PIL's nearest, squash,
# a greyscale model.
CONFIGS = {
    "bicubic-0.875": Preprocessing((3, 224, 224), "bicubic", crop_pct=0.875, crop_mode="center", **IMAGENET),
    "bilinear-0.9": Preprocessing((3, 224, 224), "bilinear", crop_pct=0.9, crop_mode="center", **IMAGENET),
    "nearest-1.0": Preprocessing((3, 160, 160), "nearest", crop_pct=1.0, crop_mode="center", **IMAGENET),
    "bicubic-squash": Preprocessing((3, 192, 192), "bicubic", crop_pct=0.95, crop_mode="squash", **IMAGENET),
    # a greyscale model (the demo models' config): PIL's luma of the decoded RGB, not the JPEG's own
    "grey-bilinear-1.0": Preprocessing((1, 48, 48), "bilinear", mean=(0.5,), std=(0.5,), crop_pct=1.0, crop_mode="center"),
}
# Documented bound (README, --decode): on photos resized keeping their aspect, at most one uint8 level, on under
# 1% of the values; where the installed Pillow runs its vertical pass first (some squashes, see
# attnflow.decode.resize_and_crop), two levels.
MAX_LEVELS = 1
MAX_FRACTION_DIFFERING = 0.01
MAX_LEVELS_OTHER_PASS_ORDER = 2


def _save_jpeg(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, format="JPEG", quality=90, **kwargs)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    """Real photos as JPEG (quality 90): three colour ones, a greyscale one, a CMYK one, one with an EXIF
    rotation; a PNG; a truncated JPEG whose header parses, and JPEG magic followed by garbage."""
    folder = tmp_path_factory.mktemp("photos")
    files = {name: _save_jpeg(Image.fromarray(getattr(skimage.data, name)()), folder / f"{name}.jpg")
             for name in ("astronaut", "coffee", "chelsea")}
    files["camera_grey"] = _save_jpeg(Image.fromarray(skimage.data.camera()), folder / "camera_grey.jpg")
    files["astronaut_cmyk"] = _save_jpeg(Image.fromarray(skimage.data.astronaut()).convert("CMYK"), folder / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    files["coffee_rotated"] = _save_jpeg(Image.fromarray(skimage.data.coffee()), folder / "rotated.jpg", exif=exif)
    files["rocket_png"] = folder / "rocket.png"
    Image.fromarray(skimage.data.rocket()).save(files["rocket_png"])
    files["truncated"] = folder / "truncated.jpg"
    files["truncated"].write_bytes(files["coffee"].read_bytes()[:20_000])
    files["garbage"] = folder / "garbage.jpg"
    files["garbage"].write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 8)
    return files


def both_paths(paths: list[Path], preprocessing: Preprocessing, retried: list[int] | None = None):
    """The default path's batch and the device path's (on the CPU device) for ``paths``, and the encoded
    items the workers produced."""
    dataset = ImageDataset(paths, preprocessing)
    reference = collate_images([dataset[i] for i in range(len(paths))])
    items = [EncodedImages(dataset)[i] for i in range(len(paths))]

    def retry(index: int):
        if retried is not None:
            retried.append(index)
        return dataset[index]

    device = decode_batch(collate_encoded(items), with_decode(preprocessing, "gpu"), CPU, retry)
    return reference, device, items


@pytest.mark.parametrize("config", CONFIGS)
def test_device_path_matches_pil_on_real_photos(photos, config):
    preprocessing = CONFIGS[config]
    names = ["astronaut", "coffee", "chelsea", "camera_grey"]
    reference, device, items = both_paths([photos[n] for n in names], preprocessing)
    assert all(isinstance(item[1], EncodedJpeg) for item in items)  # all four went through the batched decoder
    assert device.indices == reference.indices == [0, 1, 2, 3] and device.failures == reference.failures == []
    assert device.pixels.shape == reference.pixels.shape == (4, *preprocessing.input_size)
    assert device.pixels.dtype == torch.uint8
    levels = (device.pixels.int() - reference.pixels.int()).abs()
    assert int(levels.max()) <= MAX_LEVELS, config
    assert float((levels > 0).float().mean()) < MAX_FRACTION_DIFFERING, config
    # normalised: one level is 1 / 255 / std, the largest step ImageNet's std allows
    normalised = (preprocessing.normalize(device.pixels) - preprocessing.normalize(reference.pixels)).abs()
    assert float(normalised.max()) <= MAX_LEVELS / 255 / min(IMAGENET_DEFAULT_STD) + 1e-6
    assert float(normalised.mean()) < MAX_FRACTION_DIFFERING / 255 / min(IMAGENET_DEFAULT_STD)


def test_odd_sizes_and_aspect_ratios_resize_like_timm(tmp_path):
    """Sizes where int(scale * long / short) truncates, upscaling, a crop offset of half a pixel, and squashes
    of tall images (where this machine's Pillow resamples vertically first); on smooth content."""
    rng = np.random.default_rng(0)
    paths = []
    for k, (h, w) in enumerate([(61, 300), (301, 97), (224, 225), (500, 333), (64, 64)]):
        smooth = rng.normal(size=(h // 8 + 2, w // 8 + 2, 3))
        pixels = np.asarray(Image.fromarray(((smooth - smooth.min()) / np.ptp(smooth) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC))
        paths.append(_save_jpeg(Image.fromarray(pixels), tmp_path / f"{k}.jpg"))
    for preprocessing in CONFIGS.values():
        reference, device, _ = both_paths(paths, preprocessing)
        assert device.pixels.shape == reference.pixels.shape
        assert int((device.pixels.int() - reference.pixels.int()).abs().max()) <= MAX_LEVELS_OTHER_PASS_ORDER


def test_what_the_device_cannot_decode_as_pil_does_takes_the_exact_cpu_path(photos):
    """CMYK, EXIF-rotated and PNG files are decoded by PIL in the worker: bit-identical to the default path."""
    names = ["astronaut_cmyk", "coffee_rotated", "rocket_png"]
    reference, device, items = both_paths([photos[n] for n in names], CONFIGS["bicubic-0.875"])
    assert not any(isinstance(item[1], EncodedJpeg) for item in items)
    assert device.indices == reference.indices == [0, 1, 2]
    assert torch.equal(device.pixels, reference.pixels)


def test_a_mixed_batch_keeps_input_order_and_skips_corrupt_files_with_the_usual_reason(photos):
    names = ["rocket_png", "coffee", "truncated", "garbage", "astronaut", "coffee_rotated", "chelsea"]
    retried: list[int] = []
    reference, device, items = both_paths([photos[n] for n in names], CONFIGS["bicubic-0.875"], retried)
    # the truncated JPEG's header parses: the device decoder gets it, rejects it, and the CPU path then skips it;
    # the garbage has no header PIL reads, so the worker gives it straight to the CPU path
    assert [isinstance(item[1], EncodedJpeg) for item in items] == [False, True, True, False, True, False, True]
    assert retried == [2]
    assert device.indices == reference.indices == [0, 1, 4, 5, 6]
    assert device.failures == reference.failures
    assert [i for i, _ in device.failures] == [2, 3]
    assert device.failures[0][1].startswith("OSError: image file is truncated")
    for row, name in enumerate(n for i, n in enumerate(names) if i in device.indices):
        levels = (device.pixels[row].int() - reference.pixels[row].int()).abs()
        if name in ("rocket_png", "coffee_rotated"):
            assert int(levels.max()) == 0, name  # the CPU path, bit for bit
        else:
            assert int(levels.max()) <= MAX_LEVELS, name  # the device path (taken, as asserted above): close


def test_object_masks_follow_the_image_on_both_paths(photos, tmp_path):
    """A JPEG's object fraction comes from its header's size on the device path: the same as from PIL's pixels."""
    mask = np.zeros((400, 600), dtype=np.uint8)
    mask[50:300, 100:250] = 255  # coffee's size (h, w)
    Image.fromarray(mask).save(tmp_path / "coffee.png")
    paths, masks = [photos["coffee"], photos["astronaut"]], [tmp_path / "coffee.png", None]
    preprocessing = CONFIGS["bicubic-0.875"]
    dataset = ImageDataset(paths, preprocessing, masks=masks, patch_size=(16, 16))
    reference = collate_images([dataset[i] for i in range(2)])
    items = [EncodedImages(dataset)[i] for i in range(2)]
    assert all(isinstance(item[1], EncodedJpeg) for item in items)
    device = decode_batch(collate_encoded(items), with_decode(preprocessing, "gpu"), CPU, dataset.__getitem__)
    assert device.fg.shape == (2, 14 * 14)
    torch.testing.assert_close(device.fg, reference.fg, rtol=0, atol=0, equal_nan=True)
    assert 0 < float(device.fg[0].nansum()) < 14 * 14 and bool(device.fg[1].isnan().all())


def test_a_batch_with_no_decodable_image_has_no_pixels(photos):
    reference, device, _ = both_paths([photos["truncated"], photos["garbage"]], CONFIGS["bicubic-0.875"])
    assert device.pixels is None and device.indices == [] and device.failures == reference.failures


def test_configurations_the_device_cannot_mirror_are_refused_naming_the_flag():
    base = CONFIGS["bicubic-0.875"]
    for config in (Preprocessing((3, 224, 224), "lanczos", crop_pct=0.875, crop_mode="center", **IMAGENET),
                   Preprocessing((3, 224, 224), "bicubic", crop_pct=0.875, crop_mode="border", **IMAGENET),
                   Preprocessing((3, 224, 256), "bicubic", crop_pct=0.875, crop_mode="center", **IMAGENET)):
        with pytest.raises(OptionError, match="^decode: "):
            with_decode(config, "gpu")
    assert with_decode(base, "cpu") == base
    with pytest.raises(OptionError, match="^decode: "):
        InputOptions(decode="nvjpeg")


def test_gpu_decode_needs_cuda_on_the_cli(run_cli, image_dir, tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        result = run_cli("extract", "vit_tiny_patch16_224", str(image_dir), "-o", tmp_path / "c.h5", "--random-init",
                         "--decode", "gpu")
        assert result.exit_code == 2
        assert result.stderr.strip().splitlines()[-1].endswith(
            "--decode: gpu decodes with nvJPEG on a CUDA device, and this machine has none: use --decode cpu")
        assert "Traceback" not in result.stderr
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CUDA machine, for the --device cpu rule
    with pytest.raises(OptionError, match="^decode: gpu decodes on the model's CUDA device, but device is cpu"):
        check_decode_device("gpu", "cpu")
    check_decode_device("gpu", "auto")
    check_decode_device("cpu", "cpu")


def _tiny() -> LoadedModel:
    return LoadedModel(model=make_tiny_vit("plain"), name="tiny-plain", checkpoint="", checkpoint_sha256="",
                       weights="random", family="unknown", label="tiny-plain")


def test_extract_with_the_device_path_on_cpu_is_close_to_the_default(photos, tmp_path):
    """End to end on the CPU device: the same images, skips and order; metrics within a measured bound; the
    decode mode in the cache's identity, so a resume with the other mode is refused."""
    names = ["astronaut", "rocket_png", "coffee", "truncated", "chelsea", "camera_grey", "coffee_rotated"]
    paths = [photos[n] for n in names]
    loaded = _tiny()
    runs = {}
    for decode in ("cpu", "gpu"):
        runs[decode] = extract(loaded, paths, tmp_path / f"{decode}.h5", metrics=tmp_path / f"{decode}.metrics.h5",
                               decode=decode, device="cpu", batch_size=4, workers=0, store="none")
    assert [(r.n_images, r.n_skipped) for r in runs.values()] == [(6, 1), (6, 1)]
    with h5py.File(tmp_path / "cpu.h5") as cpu, h5py.File(tmp_path / "gpu.h5") as gpu:
        assert list(cpu["image_ids"][()]) == list(gpu["image_ids"][()])
        assert "decode" not in json.loads(cpu.attrs["preprocessing"])
        assert json.loads(gpu.attrs["preprocessing"])["decode"] == "gpu"
    with h5py.File(tmp_path / "cpu.metrics.h5") as cpu, h5py.File(tmp_path / "gpu.metrics.h5") as gpu:
        names = [n for n in cpu["metrics"] if np.issubdtype(cpu["metrics"][n].dtype, np.floating)]
        assert names
        largest = 0.0
        for name in names:
            a, b = cpu["metrics"][name][()].astype(np.float64), gpu["metrics"][name][()].astype(np.float64)
            assert np.array_equal(np.isnan(a), np.isnan(b)), name
            scale = np.nanmax(np.abs(a)) if np.isfinite(a).any() else 1.0
            largest = max(largest, float(np.nanmax(np.abs(a - b), initial=0.0)) / max(scale, 1e-12))
        # measured 6.7e-5 of a metric's largest value (cls_gini) on this 32 px random-init model: one uint8 level
        # at a few pixels moves values a little; a wrong image, channel or order moves them by their size
        assert largest < 1e-3
    # the one line names the field that differs, not the whole preprocessing
    with pytest.raises(AttnflowError, match=r'made with preprocessing decode="gpu", this run has decode=\(unset\); pass --overwrite'):
        extract(loaded, paths, tmp_path / "gpu.h5", resume=True, decode="cpu", device="cpu", batch_size=4, workers=0,
                store="none")
