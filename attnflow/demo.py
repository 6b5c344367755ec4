"""The embedded demo: a tiny MAE-trained and a tiny DINO-trained ViT, and the data they were trained on.

Plain Fashion-MNIST puts one object on an empty background, where there is nothing to select. The demo
recipe (:func:`compose`) places the item at a random position on a larger canvas over low-contrast
clutter: a smooth texture and fragments of other items. The same recipe makes the training batches
(``examples/train_mae.py``, ``examples/train_dino.py``) and the shipped demo images, whose item masks
are kept for object relevance.

``demo:mae`` and ``demo:dino`` are accepted wherever attnflow takes a model name.
"""
from __future__ import annotations

import gzip
import time
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np
import timm
import torch
import torch.nn.functional as F

from .errors import AttnflowError

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
CLASS_NAMES = (
    "tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)
CANVAS = 48
ITEM = 28
CLUTTER_FRAGMENTS = 3
FRAGMENT = 14
CLUTTER_CONTRAST = 0.3
TEXTURE_CONTRAST = 0.15
MASK_THRESHOLD = 0.1

# The one architecture both demo models share: a timm VisionTransformer with a cls token, 64 patches.
DEMO_ARCH = "vit_tiny_patch16_224"
DEMO_KWARGS = dict(
    img_size=CANVAS, patch_size=6, in_chans=1, embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0,
    # what the demo images need: no resize, no crop, one grey channel around 0.5
    pretrained_cfg_overlay=dict(
        input_size=(1, CANVAS, CANVAS), crop_pct=1.0, interpolation="bilinear", mean=(0.5,), std=(0.5,),
    ),
)
NORMALIZE_MEAN, NORMALIZE_STD = 0.5, 0.5


@dataclass(frozen=True)
class DemoModel:
    checkpoint: str  # file name inside attnflow/demo_data
    family: str


DEMO_MODELS = {
    "demo:mae": DemoModel("mae.pth", "mim"),
    "demo:dino": DemoModel("dino.pth", "jea"),
}


def demo_data_dir() -> Path:
    return Path(str(resources.files("attnflow") / "demo_data"))


def create_demo_vit(**overrides) -> torch.nn.Module:
    """The demo encoder, randomly initialised (training scripts pass ``dynamic_img_size`` for local crops)."""
    return timm.create_model(DEMO_ARCH, pretrained=False, num_classes=0, **{**DEMO_KWARGS, **overrides})


def read_idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format), gzip-compressed or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str, root: str | Path = FASHION_MNIST) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 28, 28) uint8, labels (N,) uint8)`` of the ``train`` or ``test`` split."""
    prefix, root = {"train": "train", "test": "t10k"}[split], Path(root)
    image_file = root / f"{prefix}-images-idx3-ubyte.gz"
    if not image_file.exists():
        raise FileNotFoundError(f"{image_file} not found: apt-get install dataset-fashion-mnist")
    return read_idx(image_file), read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")


def _paste(canvas: torch.Tensor, patch: torch.Tensor, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """Max-blend (B, h, w) patches into (B, H, W) canvases at per-sample offsets."""
    B, h, w = patch.shape
    rows = (top[:, None] + torch.arange(h, device=canvas.device))[:, :, None]
    cols = (left[:, None] + torch.arange(w, device=canvas.device))[:, None, :]
    batch = torch.arange(B, device=canvas.device)[:, None, None]
    canvas = canvas.clone()
    canvas[batch, rows, cols] = torch.maximum(canvas[batch, rows, cols], patch)
    return canvas


def compose(items: torch.Tensor, clutter: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Place each item on a cluttered canvas.

    Args:
        items: (B, 28, 28) float in [0, 1], the objects.
        clutter: (M, 28, 28) float in [0, 1], a pool of other items to cut fragments from.
        generator: seeds every random choice (on the items' device).
    Returns:
        images (B, 48, 48) float in [0, 1] and masks (B, 48, 48) bool, True on the item's own pixels.
    """
    B, device = items.shape[0], items.device

    def randint(high: int, *shape: int) -> torch.Tensor:
        return torch.randint(0, high, shape, generator=generator, device=device)

    texture = torch.rand(B, 1, 6, 6, generator=generator, device=device)
    canvas = TEXTURE_CONTRAST * F.interpolate(texture, size=(CANVAS, CANVAS), mode="bilinear", align_corners=False)[:, 0]
    for _ in range(CLUTTER_FRAGMENTS):
        source = clutter[randint(clutter.shape[0], B)]
        r, c = randint(ITEM - FRAGMENT + 1, B), randint(ITEM - FRAGMENT + 1, B)
        rows = (r[:, None] + torch.arange(FRAGMENT, device=device))[:, :, None]
        cols = (c[:, None] + torch.arange(FRAGMENT, device=device))[:, None, :]
        fragment = source[torch.arange(B, device=device)[:, None, None], rows, cols]
        canvas = _paste(canvas, CLUTTER_CONTRAST * fragment, randint(CANVAS - FRAGMENT + 1, B), randint(CANVAS - FRAGMENT + 1, B))
    top, left = randint(CANVAS - ITEM + 1, B), randint(CANVAS - ITEM + 1, B)
    images = _paste(canvas, items, top, left)
    masks = _paste(torch.zeros_like(canvas), (items > MASK_THRESHOLD).to(canvas.dtype), top, left) > 0
    return images, masks


def normalize(images: torch.Tensor) -> torch.Tensor:
    """(B, 48, 48) in [0, 1] -> (B, 1, 48, 48) as the demo models see them (the shipped preprocessing)."""
    return ((images - NORMALIZE_MEAN) / NORMALIZE_STD)[:, None]


class TrainingStream:
    """Endless seeded batches of composed training images on one device (the demo recipe over the
    Fashion-MNIST training split)."""

    def __init__(self, device: torch.device | str, seed: int, root: Path = FASHION_MNIST):
        images, _ = load_fashion_mnist("train", root)
        self.items = torch.from_numpy(images.copy()).to(device).float().div(255)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def batch(self, size: int) -> torch.Tensor:
        """(size, 48, 48) images in [0, 1]."""
        index = torch.randint(0, self.items.shape[0], (size,), generator=self.generator, device=self.items.device)
        images, _ = compose(self.items[index], self.items, self.generator)
        return images


def cosine_schedule(step: int, total: int, peak: float, final: float = 0.0, warmup: int = 0) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to ``final`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return final + 0.5 * (peak - final) * (1 + np.cos(np.pi * min(1.0, progress)))


class TrainingClock:
    """The number of training steps, shortened to fit ``max_seconds`` once steps 20 to 60 have been timed
    (past start-up and compilation); the schedules follow the shortened plan."""

    CALIBRATION = (20, 60)

    def __init__(self, steps: int, max_seconds: float | None):
        self.steps = steps
        self.max_seconds = max_seconds
        self.start = time.perf_counter()
        self._calibration_start = 0.0

    def tick(self, step: int) -> int:
        """Call at the start of every step; returns the (possibly shortened) number of steps."""
        first, last = self.CALIBRATION
        if step == first:
            self._calibration_start = time.perf_counter()
        if step == last and self.max_seconds:
            rate = (last - first) / (time.perf_counter() - self._calibration_start)
            left = self.max_seconds - (time.perf_counter() - self.start)
            self.steps = max(step, min(self.steps, step + int(rate * left)))
        return self.steps

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


@dataclass
class DemoRun:
    out: Path
    caches: list[Path]
    metrics: list[Path]
    compare_csv: Path
    comparison: object  # attnflow.compare.Comparison
    n_images: int
    figures: list[Path]
    probe_csv: Path | None = None
    probe_records: list = None  # attnflow.probe records


def demo_images(limit: int | None = None) -> list[Path]:
    """The shipped demo images in sorted order; ``limit`` takes evenly spaced ones, so every class stays."""
    from .images import list_images

    paths = list_images([str(demo_data_dir() / "images")])
    if limit is not None and limit < len(paths):
        paths = [paths[round(i * len(paths) / limit)] for i in range(limit)]
    return paths


def run_demo(
    out: str | Path,
    *,
    limit: int | None = None,
    overwrite: bool = False,
    device: str = "auto",
    workers: int | None = 0,
    n_bootstrap: int = 2000,
    probe: bool = True,
    on_model: Callable[[str], None] | None = None,
) -> DemoRun:
    """Extract (with masks and labels, metrics streamed) -> compare, for both shipped models; then, with
    ``probe``, extract tokens of the 2,000 probe images and compare cls with selective pooling."""
    from .compare import compare_files
    from .extract import extract
    from .models import build_model
    from .render import Format

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = demo_images(limit)
    caches, metrics = [], []
    for name in DEMO_MODELS:
        if on_model:
            on_model(name)
        short = name.split(":", 1)[1]
        result = extract(
            build_model(name), paths, out / f"{short}.h5", masks=demo_data_dir() / "masks", labels_from_dirs=True,
            metrics=out / f"{short}_metrics.h5", batch_size=50, workers=workers, device=device, overwrite=overwrite,
        )
        caches.append(result.path)
        metrics.append(result.metrics_path)
    comparison = compare_files(metrics, n_bootstrap=n_bootstrap)
    compare_csv = out / "compare.csv"
    with open(compare_csv, "w", newline="") as handle:
        comparison.write(Format.csv, handle)
    probe_csv, probe_records = None, None
    if probe:
        probe_csv, probe_records = _run_probe(out, overwrite=overwrite, device=device, workers=workers, on_model=on_model)
    figures = []
    try:
        from .plot import plot_curves, plot_maps, pyplot

        pyplot()
    except AttnflowError as e:  # matplotlib is optional: the demo still runs, and says what it skipped
        warnings.warn(f"no figures: {e}", stacklevel=2)
    else:
        figures.append(plot_curves(metrics, out / "curves.png", n_bootstrap=n_bootstrap)[0])
        figures.append(plot_maps(caches, 0, out / "maps.png", heads=True)[0])
    return DemoRun(out, caches, metrics, compare_csv, comparison, len(paths), figures, probe_csv, probe_records)


PROBE_EPOCHS = 50


def write_probe_images(folder: Path) -> list[Path]:
    """The shipped probe images (``probe_images.npz``) as PNG files in class folders."""
    from PIL import Image

    with np.load(demo_data_dir() / "probe_images.npz") as data:
        images, labels, names = data["images"], data["labels"], [str(n) for n in data["class_names"]]
    paths = []
    for i, (image, label) in enumerate(zip(images, labels)):
        path = folder / names[label] / f"probe_{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(path)
        paths.append(path)
    return sorted(paths)


def _run_probe(out: Path, *, overwrite: bool, device: str, workers: int | None, on_model) -> tuple[Path, list]:
    from .extract import extract
    from .models import build_model
    from .probe import probe_caches
    from .render import Format, emit

    paths = write_probe_images(out / "probe_images")
    caches = []
    for name in DEMO_MODELS:
        if on_model:
            on_model(f"{name} (probe images)")
        short = name.split(":", 1)[1]
        caches.append(extract(
            build_model(name), paths, out / f"{short}_probe.h5", store="rows", save_tokens=True, labels_from_dirs=True,
            batch_size=100, workers=workers, device=device, overwrite=overwrite,
        ).path)
    records, notes = probe_caches([(c, None) for c in caches], split=0.8, epochs=PROBE_EPOCHS, seed=0)
    for note in notes:
        warnings.warn(note, stacklevel=3)
    probe_csv = out / "probe.csv"
    from .probe import PROBE_COLUMNS

    with open(probe_csv, "w", newline="") as handle:
        emit(records, [*PROBE_COLUMNS, "gain_over_cls", "cls_entropy_norm"], Format.csv, out=handle)
    return probe_csv, records
