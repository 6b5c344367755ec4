"""The demo data recipe and training helpers shared by the scripts in this folder.

Plain Fashion-MNIST puts one object on an empty background, where there is nothing to select. The demo
recipe (:func:`compose`) places the item at a random position on a larger canvas over low-contrast
clutter: a smooth texture and fragments of other items. The same recipe makes the training batches
(``train_mae.py``, ``train_dino.py``), the shipped demo and probe images (``make_demo_images.py``), whose
item masks are kept for object relevance, and the evaluation sets (``evaluate_demo.py``).
"""
from __future__ import annotations

import gzip
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from attnflow.demo_models import CANVAS, NORMALIZE_MEAN, NORMALIZE_STD

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
CLASS_NAMES = (
    "tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)
ITEM = 28
CLUTTER_FRAGMENTS = 3
FRAGMENT = 14
CLUTTER_CONTRAST = 0.3
TEXTURE_CONTRAST = 0.15
MASK_THRESHOLD = 0.1


def read_idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format), gzip-compressed or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_files(split: str, root: str | Path = FASHION_MNIST) -> tuple[Path, Path]:
    """The (images, labels) idx files of the ``train`` or ``test`` split under ``root``."""
    prefix, root = {"train": "train", "test": "t10k"}[split], Path(root)
    return root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"


def missing_fashion_mnist(splits: tuple[str, ...], root: str | Path = FASHION_MNIST) -> str | None:
    """A one-line message naming the first missing file of ``splits`` under ``root``, or None."""
    for split in splits:
        for path in fashion_mnist_files(split, root):
            if not path.is_file():
                return f"{path} not found (Fashion-MNIST's idx files: apt-get install dataset-fashion-mnist)"
    return None


def load_fashion_mnist(split: str, root: str | Path = FASHION_MNIST) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 28, 28) uint8, labels (N,) uint8)`` of the ``train`` or ``test`` split."""
    message = missing_fashion_mnist((split,), root)
    if message is not None:
        raise FileNotFoundError(message)
    image_file, label_file = fashion_mnist_files(split, root)
    return read_idx(image_file), read_idx(label_file)


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
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * min(1.0, progress)))


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
