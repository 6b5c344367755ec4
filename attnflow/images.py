"""Find images, decode them robustly and preprocess them exactly as timm would for the model.

Decoding runs inside DataLoader workers; a file that cannot be decoded becomes a ``(path, reason)`` record
instead of a batch element, so one corrupt JPEG among 50,000 costs one line on stderr, not the run.
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageOps
from timm.data import create_transform, resolve_data_config

from .errors import AttnflowError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif"}
)


def list_images(inputs: Sequence[str], *, stdin: Iterable[str] | None = None) -> list[Path]:
    """Expand command-line inputs into an ordered list of image paths.

    Files are taken as given (whatever their extension), directories are searched recursively for common
    image extensions in sorted order, and ``-`` reads newline-separated paths from ``stdin``. A named file or
    directory that does not exist is an error; paths read from stdin that turn out unreadable are skipped
    later with a reason, like corrupt files.
    """
    paths: list[Path] = []
    for item in inputs:
        if item == "-":
            source = sys.stdin if stdin is None else stdin
            paths += [Path(line.strip()) for line in source if line.strip()]
            continue
        path = Path(item)
        if path.is_dir():
            paths += _walk_images(path)
        elif path.exists():
            paths.append(path)
        else:
            raise AttnflowError(f"no such file or directory: {item}")
    return paths


def _walk_images(root: Path) -> list[Path]:
    found = []
    for path in root.rglob("*"):  # rglob does not follow directory symlinks, so a symlink loop ends
        try:
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                found.append(path)
        except OSError:  # a dangling or looping link: nothing to read there
            continue
    return sorted(found)


def decode_image(path: Path | str, channels: int) -> Image.Image:
    """Open an image as 8-bit RGB (``channels == 3``) or greyscale (``channels == 1``).

    EXIF orientation is applied; palette, alpha, 16-bit and float modes are converted explicitly (16-bit
    values are scaled to 8 bits rather than clipped, which is what a plain ``convert('L')`` would do).
    """
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; a bomb is a bad input either way.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        im = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if im.mode in ("P", "PA") or (im.mode == "L" and "transparency" in im.info):
        im = im.convert("RGBA")
    target = "RGB" if channels == 3 else "L"
    if channels not in (1, 3):
        raise AttnflowError(f"models with {channels} input channels are not supported (need 1 or 3)")
    return im if im.mode == target else im.convert(target)


@dataclass(frozen=True)
class Preprocessing:
    """timm's eval data config resolved for a model at its actual input resolution."""

    input_size: tuple[int, int, int]
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    crop_mode: str

    def as_dict(self) -> dict:
        return {
            "input_size": list(self.input_size),
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
        }

    def transform(self, *, normalized: bool = True) -> Callable[[Image.Image], torch.Tensor]:
        """timm's eval transform: a normalised float tensor, or with ``normalized=False`` the resized and
        cropped uint8 tensor (timm's prefetcher form), to be finished by :meth:`normalize` on the device."""
        return create_transform(
            input_size=self.input_size,
            is_training=False,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            crop_pct=self.crop_pct,
            crop_mode=self.crop_mode,
            use_prefetcher=not normalized,
        )

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> the float tensor timm's normalising transform gives, on ``pixels``' device.

        Workers hand over uint8, a quarter of the bytes of float32, and the arithmetic runs where the model
        does; the operations are the same as ``ToTensor`` then ``Normalize``.
        """
        mean = torch.tensor(self.mean, device=pixels.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(1, -1, 1, 1)
        return (pixels.float().div(255) - mean) / std


def resolve_preprocessing(
    model: nn.Module, *, crop_pct: float | None = None, interpolation: str | None = None
) -> Preprocessing:
    """The model's timm data config with ``input_size`` forced to the resolution the model was built at."""
    config = resolve_data_config({}, model=model)
    channels = int(model.patch_embed.proj.in_channels)
    height, width = (int(s) for s in model.patch_embed.img_size)
    mean, std = tuple(config["mean"]), tuple(config["std"])
    if len(mean) != channels:
        # A greyscale model whose config still carries RGB statistics: use their average per channel.
        mean, std = (float(np.mean(mean)),) * channels, (float(np.mean(std)),) * channels
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise AttnflowError(f"--crop-pct must be in (0, 1], got {crop_pct}")
    return Preprocessing(
        input_size=(channels, height, width),
        interpolation=interpolation or config.get("interpolation", "bicubic"),
        mean=mean,
        std=std,
        crop_pct=float(crop_pct if crop_pct is not None else config.get("crop_pct", 0.875)),
        crop_mode=config.get("crop_mode", "center"),
    )


class ImageDataset(torch.utils.data.Dataset):
    """Decode, resize and crop one image per index into a uint8 (C, H, W) tensor (normalise with
    :meth:`Preprocessing.normalize`); failures come back as a reason instead of a tensor."""

    def __init__(self, paths: Sequence[Path], preprocessing: Preprocessing):
        self.paths = list(paths)
        self.channels = preprocessing.input_size[0]
        self.transform = preprocessing.transform(normalized=False)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            image = decode_image(self.paths[index], self.channels)
            return index, self.transform(image), None
        except Exception as e:  # every decode failure of a user's file is a skip with its reason
            return index, None, describe_decode_error(e)


def describe_decode_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    detail = text[0] if text else ""
    name = type(e).__name__
    return f"{name}: {detail}" if detail else name


@dataclass
class ImageBatch:
    indices: list[int]  # positions in the input list of the decoded images, in order
    pixels: torch.Tensor | None  # (B, C, H, W) uint8, None when every image of the batch failed
    failures: list[tuple[int, str]]  # (position, reason)


def collate_images(items: list[tuple[int, torch.Tensor | None, str | None]]) -> ImageBatch:
    good = [(i, x) for i, x, err in items if err is None]
    return ImageBatch(
        indices=[i for i, _ in good],
        pixels=torch.stack([x for _, x in good]) if good else None,
        failures=[(i, err) for i, x, err in items if err is not None],
    )
