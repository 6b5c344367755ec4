"""--preprocess beyond-cls against torchvision's own transform on real photos, and the maps figure's data:
every map in units of the uniform share, on one colour scale per figure, with a labelled colour bar."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from attnflow import AttnflowError, open_cache
from attnflow.store.read import open_metrics
from attnflow.errors import OptionError
from attnflow.extract import extract
from attnflow.images import ImageDataset, Preprocessing, build_size, collate_images, list_images, resolve_preprocessing
from attnflow.models import LoadedModel
from attnflow.options import InputOptions
from attnflow.plot import LOG_SHARE_LIMITS, SHARE_LABEL, plot_maps, shared_scale, uniform_share
from conftest import make_tiny, tiny

# The paper's numbers, typed here rather than imported, so the test does not borrow the code's constants.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def model_at_224() -> torch.nn.Module:
    return make_tiny("vit_tiny_patch16_224", img_size=224, patch_size=16, depth=1, embed_dim=48, num_heads=3)


def photos(folder) -> list:
    """Real photos of two aspect ratios (landscape 300 x 451 upscaled, 400 x 600 downscaled), lossless."""
    skimage_data = pytest.importorskip("skimage.data")  # the test extra; scikit-image ships these photos
    folder.mkdir()
    paths = []
    for name in ("chelsea", "coffee"):
        path = folder / f"{name}.png"
        Image.fromarray(getattr(skimage_data, name)()).save(path)
        paths.append(path)
    return paths


def test_beyond_cls_preset_equals_torchvision_on_real_photos(tmp_path):
    from torchvision import transforms

    paths = photos(tmp_path / "photos")
    pre = resolve_preprocessing(model_at_224(), preset="beyond-cls")
    reference = transforms.Compose([
        transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    crop_only = transforms.Compose([
        transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224),
        transforms.PILToTensor(),
    ])
    # attnflow's real path: decode, resize and crop to uint8 in a worker process, normalise afterwards
    loader = torch.utils.data.DataLoader(ImageDataset(paths, pre), batch_size=2, num_workers=1, collate_fn=collate_images)
    (batch,) = list(loader)
    assert batch.failures == [] and batch.pixels.dtype == torch.uint8
    ours = pre.normalize(batch.pixels)
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            image = im.convert("RGB")
        torch.testing.assert_close(batch.pixels[i], crop_only(image), rtol=0, atol=0)  # the same pixels exactly
        torch.testing.assert_close(ours[i], reference(image), rtol=0, atol=2e-6)  # float rounding of (x/255-m)/s
    assert pre.as_dict()["preset"] == "beyond-cls"
    # the flag matters: this model's own timm config (mean 0.5, std 0.5, crop 0.9) gives other inputs
    timm_pre = resolve_preprocessing(model_at_224())
    assert timm_pre.preset == "timm" and not torch.allclose(timm_pre.transform()(image), reference(image))


def test_beyond_cls_refuses_what_would_not_be_the_paper(tmp_path, run_cli):
    with pytest.raises(AttnflowError, match="built at 32 x 32"):
        resolve_preprocessing(tiny("plain").model, preset="beyond-cls")
    with pytest.raises(AttnflowError, match="fixes the crop"):
        resolve_preprocessing(model_at_224(), preset="beyond-cls", crop_pct=1.0)
    with pytest.raises(OptionError, match="^crop_pct: "):
        InputOptions(preprocess="beyond-cls", crop_pct=0.9)
    with pytest.raises(OptionError, match="^interpolation: "):
        InputOptions(preprocess="beyond-cls", interpolation="bilinear")
    with pytest.raises(OptionError, match="^preprocess: choose from timm, beyond-cls"):
        InputOptions(preprocess="paper")
    assert build_size("beyond-cls", None) == 224 and build_size("beyond-cls", 224) == 224
    assert build_size("timm", None) is None and build_size("timm", 256) == 256
    (tmp_path / "a.png").write_bytes(b"")
    result = run_cli("extract", "vit_tiny_patch16_224", tmp_path / "a.png", "--random-init", "--preprocess", "beyond-cls",
                     "--img-size", "256", "-o", tmp_path / "c.h5")
    assert result.exit_code == 2 and "--img-size" in result.stderr and "224" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_preset_is_recorded_and_caches_without_it_still_read(tmp_path):
    paths = photos(tmp_path / "photos")
    loaded = LoadedModel(model=model_at_224(), name="tiny224", checkpoint="", checkpoint_sha256="", weights="random",
                         family="unknown", label="tiny224")
    extract(loaded, paths, tmp_path / "c.h5", preprocess="beyond-cls", store="none", workers=0)
    with open_cache(tmp_path / "c.h5") as cache:
        recorded = cache.preprocessing
        raw = json.loads(cache.attrs["preprocessing"])
    assert raw["preset"] == "beyond-cls" and raw["input_size"] == [3, 224, 224] and raw["interpolation"] == "bicubic"
    assert raw["crop_pct"] == 0.875 and raw["mean"] == list(IMAGENET_MEAN) and raw["std"] == list(IMAGENET_STD)
    assert Preprocessing.from_dict(recorded) == resolve_preprocessing(loaded.model, preset="beyond-cls")
    old = {key: value for key, value in raw.items() if key != "preset"}  # a cache written before presets
    assert Preprocessing.from_dict(old).preset == "timm"


def test_uniform_share_by_hand():
    flat = np.full((4, 4), 1 / 16)
    np.testing.assert_array_equal(uniform_share(flat), np.ones((4, 4)))
    one_hot = np.zeros((2, 3))
    one_hot[1, 2] = 1.0
    want = np.zeros((2, 3))
    want[1, 2] = 6.0
    np.testing.assert_array_equal(uniform_share(one_hot), want)
    heads = np.stack([flat, np.eye(4) / 4])  # (H, 4, 4): per head, P = 16 cells
    np.testing.assert_array_equal(uniform_share(heads)[1], np.eye(4) * 4.0)


def readout_share(attn_row: np.ndarray, skip: int) -> np.ndarray:
    """A plain float64 reference: an attention row over T tokens -> patch part renormalised, times P."""
    patches = [float(v) for v in attn_row[skip:]]
    total = sum(patches)
    return np.array([v / total * len(patches) for v in patches])


def test_maps_figure_data_is_in_uniform_shares_on_one_scale(tmp_path, image_dir):
    matplotlib = pytest.importorskip("matplotlib")
    paths = list_images([str(image_dir)])
    extract(tiny("plain"), paths, tmp_path / "a.h5", dtype="float32", metrics=tmp_path / "am.h5", workers=0)
    extract(tiny("registers"), paths, tmp_path / "b.h5", dtype="float32", metrics=tmp_path / "bm.h5", workers=0)
    caches = [tmp_path / "a.h5", tmp_path / "b.h5"]
    # SVG with text kept as text, so the drawn colour bar label and ticks can be read back from the file
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        path, rows, _ = plot_maps(caches, 1, tmp_path / "maps.svg", layer=0, heads=True)
    drawn = path.read_text()
    assert SHARE_LABEL in drawn and ">1/8<" in drawn and ">16<" in drawn
    expected_peaks = []
    for row, cache_path, metrics_path in zip(rows, caches, [tmp_path / "am.h5", tmp_path / "bm.h5"]):
        with open_cache(cache_path) as cache, open_metrics(metrics_path) as metrics:
            skip = cache.layout.num_prefix_tokens
            attn = cache["attn"][1, 0].astype(np.float64)  # (H, T, T) of image 1, block 0
            heads = [readout_share(attn[h, 0], skip) for h in range(attn.shape[0])]
            rollout = metrics["rollout/map"][1, 0].astype(np.float64) * (cache.layout.num_tokens - skip)
        grid = row.panels[0].share.shape
        assert [p.title for p in row.panels] == ["cls attention, block 0", "rollout to block 0", "head 0", "head 1", "head 2"]
        np.testing.assert_allclose(row.panels[0].share.ravel(), np.mean(heads, axis=0), rtol=1e-9)
        np.testing.assert_allclose(row.panels[1].share.ravel(), rollout, rtol=1e-5)
        for h, panel in enumerate(row.panels[2:]):
            assert panel.share.shape == grid
            np.testing.assert_allclose(panel.share.ravel(), heads[h], rtol=1e-9)
            assert panel.share.mean() == pytest.approx(1.0)  # a share map averages the uniform level
        expected_peaks += [np.max(heads), np.max(rollout)]
    # one scale for the whole figure: log, the fixed limits, the same object in every row
    assert rows[0].scale is rows[1].scale
    assert (rows[0].scale.kind, rows[0].scale.vmin, rows[0].scale.vmax) == ("log", 1 / 8, 16.0) == ("log", *LOG_SHARE_LIMITS)
    assert rows[0].scale.label == SHARE_LABEL
    # linear: 0 to the largest share any panel holds (the head maxima bound the head-mean's)
    _, linear_rows, _ = plot_maps(caches, 1, tmp_path / "maps_linear.png", layer=0, heads=True, scale="linear")
    scale = linear_rows[0].scale
    assert scale.kind == "linear" and scale.vmin == 0.0 and scale is linear_rows[1].scale
    assert scale.vmax == pytest.approx(max(expected_peaks), rel=1e-5)
    assert shared_scale(linear_rows, "linear") == scale
    with pytest.raises(OptionError, match="^scale: "):
        plot_maps(caches, 1, tmp_path / "x.png", scale="sqrt")


def test_flow_column_matches_the_metrics_files_flow_maps(tmp_path, image_dir):
    pytest.importorskip("matplotlib")
    from attnflow.measure import compute_metrics

    paths = list_images([str(image_dir)])
    extract(tiny("plain"), paths, tmp_path / "a.h5", dtype="float32", workers=0)
    extract(tiny("plain"), paths, tmp_path / "rows.h5", store="rows", workers=0)
    compute_metrics(tmp_path / "a.h5", tmp_path / "m.h5", flow=True, flow_layers=(0,))
    _, rows, notes = plot_maps([tmp_path / "a.h5", tmp_path / "rows.h5"], 2, tmp_path / "f.png", layer=0, flow=True)
    assert [p.title for p in rows[0].panels] == ["cls attention, block 0", "rollout to block 0", "flow to block 0"]
    with open_metrics(tmp_path / "m.h5") as metrics:
        maps, layers = metrics.flow_maps(2, 3)
    assert layers == (0,)
    # the figure's flow (computed from the cache for this image) is the metrics file's, in uniform shares
    np.testing.assert_allclose(rows[0].panels[2].share.ravel(), maps[0, 0].astype(np.float64) * maps.shape[-1], rtol=1e-5)
    assert rows[1].panels[2].share is None and any("no flow map" in n for n in notes)
