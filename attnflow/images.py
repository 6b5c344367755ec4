"""Find images, decode them robustly and preprocess them exactly as timm would for the model.

Decoding runs inside DataLoader workers; a file that cannot be decoded becomes a ``(path, reason)`` record
instead of a batch element, so one corrupt JPEG among 50,000 costs one line on stderr, not the run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import os
import queue
import re
import stat
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageOps, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform, resolve_data_config

from .architectures import adapter_for
from .choices import StrEnum, choice_values
from .errors import AttnflowError, OptionError

__all__ = [
    "IMAGE_EXTENSIONS", "Interpolation", "CROP_PCT_MIN", "Preprocess", "BEYOND_CLS_SIZE", "BEYOND_CLS_RESIZE",
    "DecodeMode", "build_size", "list_images", "class_of", "folder_classes", "MAX_RESIZED_PIXELS", "READ_TIMEOUT_S", "ReadStalled", "read_image_file",
    "content_digest", "decode_image", "Preprocessing", "resolve_preprocessing", "index_masks", "decode_mask",
    "ImageItem", "ImageDataset", "describe_decode_error", "ImageBatch", "collate_images", "image_id", "path_of_id",
]

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif"}
)

# The resize interpolations timm's eval transform accepts (timm.data.transforms.str_to_interp_mode; its
# 'random' is for training transforms only and fails in the eval transform).
class Interpolation(StrEnum):
    nearest = "nearest"
    bilinear = "bilinear"
    bicubic = "bicubic"
    box = "box"
    hamming = "hamming"
    lanczos = "lanczos"

# crop_pct: the image is resized to img_size / crop_pct, then centre-cropped to img_size (timm's convention).
# Above 1 the resized image is smaller than the crop and timm pads it with black (zero) borders the model
# attends to; far below 1 every image is upscaled enormously (0.001 at 224 px: 224,000 px a side) for a
# crop of a tiny centre. Accepted: [CROP_PCT_MIN, 1].
CROP_PCT_MIN = 0.1

# ``--preprocess``: ``timm`` resolves each model's own eval data config at the resolution it was built at;
# ``beyond-cls`` is what the Beyond [cls] code (gmum/beyond_cls: util/datasets.py, the validation transform of
# build_dataset_v2 that main_attention_stats.py measures on) feeds every model whatever its config says:
# Resize(int(224 * 16 / 14) = 256, bicubic) of the shorter side, CenterCrop(224), ImageNet mean and std. In
# timm's terms that is crop_pct 224 / 256 = 0.875 (floor(224 / 0.875) = 256 exactly), on models built at 224.
class Preprocess(StrEnum):
    timm = "timm"
    beyond_cls = "beyond-cls"
BEYOND_CLS_SIZE = 224
BEYOND_CLS_RESIZE = 256

# ``--decode``: ``cpu`` decodes with PIL and transforms with timm in the workers (exact, the default); ``gpu``
# decodes JPEGs in batches on the device and mirrors the transform there (attnflow.decode).
class DecodeMode(StrEnum):
    cpu = "cpu"
    gpu = "gpu"


def build_size(preset: str, img_size: int | None) -> int | None:
    """The ``--img-size`` to build the model at under ``preset``: as given for ``timm``; 224 for
    ``beyond-cls``, whose inputs are 224 x 224 (another --img-size is an :class:`OptionError`)."""
    if preset != Preprocess.beyond_cls:
        return img_size
    if img_size is not None and img_size != BEYOND_CLS_SIZE:
        raise OptionError("img_size", f"{{preprocess}}=beyond-cls feeds 224 x 224 inputs; drop {{img_size}}={img_size} or give 224")
    return BEYOND_CLS_SIZE


# Image ids, as caches, metrics and perturbation files store them (``image_ids``, ``skipped``): the image's path as
# it was given (relative ones relative to the file's ``working_dir``), as UTF-8 text. Linux names are bytes: a
# byte that is not part of valid UTF-8 (Python holds it as the surrogate U+DCNN, os.fsdecode) is written as the
# six characters ``\udcNN``, NN its value in lowercase hex (Python's "backslashreplace"); every valid UTF-8
# name is stored exactly as it is. :func:`path_of_id` undoes the escape, so such a file is found again.
_ESCAPED_BYTE = re.compile(r"\\udc([89a-f][0-9a-f])")


def image_id(path: str | os.PathLike) -> str:
    """The id under which the image at ``path`` is stored: UTF-8 text, each non-UTF-8 byte written ``\\udcNN``."""
    return os.fspath(path).encode("utf-8", "backslashreplace").decode("utf-8")


def path_of_id(stored_id: str, working_dir: str = "") -> Path:
    """The file a stored image id names: ``\\udcNN`` escapes back to their bytes; a relative id as it is, else
    under ``working_dir`` (the folder the extraction ran in, itself escaped the same way).

    A valid UTF-8 name that itself holds the text ``\\udcNN`` is stored unchanged, so an id may read both ways:
    the unescaped file is taken when it exists, else the id as written, else (neither exists) the unescaped path.
    """
    def unescaped(text: str) -> str:
        return _ESCAPED_BYTE.sub(lambda m: chr(0xDC00 + int(m.group(1), 16)), text)

    def places(text: str, folder: str) -> list[Path]:
        path = Path(text)
        return [path, Path(folder) / path] if folder and not path.is_absolute() else [path]

    meant = places(unescaped(stored_id), unescaped(working_dir))
    written = places(stored_id, working_dir)
    found = next((path for path in (*meant, *written) if os.path.lexists(path)), None)
    return found if found is not None else meant[-1]


def list_images(
    inputs: Sequence[str], *, stdin: Iterable[str] | None = None, on_duplicates: Callable[[int], None] | None = None
) -> list[Path]:
    """Expand command-line inputs into an ordered list of image paths.

    Files are taken as given (whatever their extension), directories are searched recursively for common
    image extensions in sorted order, and ``-`` reads newline-separated paths from ``stdin``. A named file or
    directory that does not exist is an error; paths read from stdin that turn out unreadable are skipped
    later with a reason, like corrupt files.

    A file reached twice (named twice, named and inside a named directory, or through a symlink) is kept
    once, at its first occurrence and spelled as given there; paths are compared after
    ``os.path.realpath``. ``on_duplicates`` is called with the number dropped, when there are any.
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
    return _drop_duplicates(paths, on_duplicates)


def _drop_duplicates(paths: list[Path], on_duplicates: Callable[[int], None] | None) -> list[Path]:
    seen: set[str] = set()
    unique: list[Path] = []
    for path in paths:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            unique.append(path)
    if on_duplicates is not None and len(unique) < len(paths):
        on_duplicates(len(paths) - len(unique))
    return unique


def class_of(path: Path) -> str:
    """An image's class under ``--labels-from-dirs``: its parent folder's name (the ImageFolder layout)."""
    return Path(path).parent.name


def folder_classes(paths: Sequence[Path]) -> list[str]:
    """The classes of ``paths`` under ``--labels-from-dirs``, sorted: label i is ``folder_classes(...)[i]``."""
    return sorted({class_of(p) for p in paths})


def _walk_images(root: Path) -> list[Path]:
    found = []
    for path in root.rglob("*"):  # rglob does not follow directory symlinks, so a symlink loop ends
        try:
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                found.append(path)
        except OSError:  # a dangling or looping link: nothing to read there
            continue
    return sorted(found)


# The most pixels an image may have once resized for the model (before the crop): about 100 MB of RGB. A
# 1 x 1,000,000 PNG passes PIL's decompression-bomb limit (on decoded pixels) but would resize to 256 x
# 256,000,000; anything with an aspect ratio under about 500:1 stays below.
MAX_RESIZED_PIXELS = 1 << 25


# How long one image file's read may go without receiving any data before it counts as stalled (a hung
# network mount): the run stops naming the file instead of waiting forever. A slow read that keeps
# receiving data is never cut.
READ_TIMEOUT_S = 60.0
_READ_CHUNK = 1 << 20


class ReadStalled(AttnflowError):
    """A file read that received no data for the read timeout: its file system is hung, not the image bad.
    It ends the run rather than becoming an image's skip reason, since every later file would stall too."""


def read_image_file(path: Path | str, timeout: float | None = READ_TIMEOUT_S) -> bytes:
    """The bytes of the regular file ``path``. Anything else (a FIFO, a device, a socket) is refused without
    waiting for it: opened non-blocking, checked by ``fstat`` on the very file opened.

    The read runs in this process's reader thread, so that a read blocked in the kernel (a hung mount cannot
    be interrupted) is abandoned: :class:`ReadStalled` when no data arrived for ``timeout`` seconds (None or
    0: wait as long as it takes).
    """
    if not timeout:
        return _read_regular_file(path, lambda: None)
    return _READER.read(path, timeout)


class _Reader:
    """A daemon thread that reads files for this process. One thread for every read, not one per read:
    starting a thread costs more than reading a small image. A thread the kernel holds in a stalled read is
    left behind, and the next read starts another."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue | None = None
        self._pid = -1

    def read(self, path: Path | str, timeout: float) -> bytes:
        with self._lock:
            if self._jobs is None or self._pid != os.getpid():  # no thread yet, or this is a forked child
                self._jobs, self._pid = queue.SimpleQueue(), os.getpid()
                threading.Thread(target=self._serve, args=(self._jobs,), name="attnflow-read", daemon=True).start()
            outcome: list[bytes | BaseException] = []
            progress = threading.Event()
            self._jobs.put((path, outcome, progress))
            while not outcome:
                if not progress.wait(timeout):
                    self._jobs = None
                    raise ReadStalled(f"reading {path} received no data for {timeout:g} s: its file system is not answering")
                progress.clear()
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    @staticmethod
    def _serve(jobs: queue.SimpleQueue) -> None:
        while True:
            path, outcome, progress = jobs.get()
            try:
                outcome.append(_read_regular_file(path, progress.set))
            except BaseException as e:  # handed to the caller's thread
                outcome.append(e)
            progress.set()


_READER = _Reader()


def _read_regular_file(path: Path | str, on_progress: Callable[[], None]) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        on_progress()  # opening is the first step a hung mount can block in
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"
            raise ValueError(f"{kind}, not an image file")
        chunks = []
        while chunk := os.read(fd, _READ_CHUNK):
            chunks.append(chunk)
            on_progress()
        return b"".join(chunks)
    finally:
        os.close(fd)


def content_digest(data: bytes) -> str:
    """An image file's content digest, as a cache stores it (``image_sha256``)."""
    return hashlib.sha256(data).hexdigest()


def _open_image(path: Path | str, data: bytes | None = None, read_timeout: float | None = READ_TIMEOUT_S) -> Image.Image:
    """PIL's image over ``data``, the bytes of the regular file ``path`` (read here when not given), named by
    its path when PIL cannot read it."""
    try:
        return Image.open(io.BytesIO(read_image_file(path, read_timeout) if data is None else data))
    except UnidentifiedImageError:
        raise UnidentifiedImageError(f"cannot identify image file {str(path)!r}") from None


def decode_image(path: Path | str, channels: int, data: bytes | None = None) -> Image.Image:
    """Open an image as 8-bit RGB (``channels == 3``) or greyscale (``channels == 1``); ``data``: the file's
    bytes when they were read already.

    Only regular files are read (:func:`read_image_file`). EXIF orientation is applied; palette, alpha,
    16-bit and float modes are converted explicitly (16-bit values are scaled to 8 bits rather than clipped,
    which is what a plain ``convert('L')`` would do).
    """
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; a bomb is a bad input either way.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with _open_image(path, data) as im:
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
    preset: str = "timm"  # the --preprocess preset this config came from
    decode: str = DecodeMode.cpu.value  # where the pixels were decoded and resized (they differ by rounding)

    def as_dict(self) -> dict:
        """The JSON-able form a cache stores in its ``preprocessing`` attribute (``decode`` only when not the
        default, so that a default run records what every earlier cache did)."""
        return {
            "input_size": list(self.input_size),
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
            "preset": self.preset,
            **({"decode": self.decode} if self.decode != DecodeMode.cpu else {}),
        }

    @classmethod
    def from_dict(cls, config: dict) -> "Preprocessing":
        """Back from :meth:`as_dict`; caches written before presets existed have no ``preset`` key and were
        all preprocessed with the model's timm config."""
        return cls(
            input_size=tuple(config["input_size"]), interpolation=config["interpolation"], mean=tuple(config["mean"]),
            std=tuple(config["std"]), crop_pct=float(config["crop_pct"]), crop_mode=config["crop_mode"],
            preset=config.get("preset", Preprocess.timm.value), decode=config.get("decode", DecodeMode.cpu.value),
        )

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

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) timm's eval transform resizes a ``height`` x ``width`` image to before its crop.

        ``scale = floor(input / crop_pct)`` per side; the centre mode (square inputs) resizes the shorter side to
        ``scale`` and the longer one to ``int(scale * longer / shorter)`` (torchvision's ``Resize(int)``); squash
        resizes to exactly ``scale``.
        """
        scale_h, scale_w = (math.floor(side / self.crop_pct) for side in self.input_size[1:])
        if self.crop_mode == "squash":
            return scale_h, scale_w
        short, long = sorted((height, width))
        new_long = int(scale_h * long / short)
        return (scale_h, new_long) if height <= width else (new_long, scale_h)

    def check_size(self, width: int, height: int) -> None:
        """Refuse an image whose resize for the model would exceed :data:`MAX_RESIZED_PIXELS`, saying so."""
        new_h, new_w = self.resized_size(height, width)
        if new_h * new_w > MAX_RESIZED_PIXELS:
            raise ValueError(f"{width} x {height} pixels would be resized to {new_w} x {new_h} for the model, above "
                             f"the limit of {MAX_RESIZED_PIXELS:,} resized pixels (aspect ratio too extreme)")

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> the float tensor timm's normalising transform gives, on ``pixels``' device.

        Workers hand over uint8, a quarter of the bytes of float32, and the arithmetic runs where the model
        does; the operations are the same as ``ToTensor`` then ``Normalize``.
        """
        mean = torch.tensor(self.mean, device=pixels.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(1, -1, 1, 1)
        return (pixels.float().div(255) - mean) / std


def resolve_preprocessing(
    model: nn.Module, *, crop_pct: float | None = None, interpolation: str | None = None, preset: str = "timm"
) -> Preprocessing:
    """The preprocessing for ``model``: with ``preset="timm"`` its timm data config with ``input_size`` forced
    to the resolution the model was built at (``crop_pct`` and ``interpolation`` override the config); with
    ``"beyond-cls"`` the Beyond [cls] paper's fixed transform (see :class:`Preprocess`), which needs a
    model built at 224 x 224 and takes no overrides."""
    if preset not in choice_values(Preprocess):
        raise AttnflowError(f"unknown preprocessing preset '{preset}' (choose from {', '.join(Preprocess)})")
    channels, height, width = adapter_for(model).input_size
    if preset == Preprocess.beyond_cls:
        if (height, width) != (BEYOND_CLS_SIZE, BEYOND_CLS_SIZE):
            raise AttnflowError(
                f"--preprocess beyond-cls feeds 224 x 224 inputs, but the model was built at {height} x {width}: "
                f"build it at 224 (--img-size 224)"
            )
        if crop_pct is not None or interpolation is not None:
            raise AttnflowError("--preprocess beyond-cls fixes the crop and the interpolation: drop --crop-pct and --interpolation")
        config = {"mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "crop_pct": BEYOND_CLS_SIZE / BEYOND_CLS_RESIZE,
                  "interpolation": "bicubic", "crop_mode": "center"}
    else:
        config = resolve_data_config({}, model=model)
    mean, std = tuple(config["mean"]), tuple(config["std"])
    if len(mean) != channels:
        # A greyscale model whose config still carries RGB statistics: use their average per channel.
        mean, std = (float(np.mean(mean)),) * channels, (float(np.mean(std)),) * channels
    if crop_pct is not None and not CROP_PCT_MIN <= crop_pct <= 1:
        raise AttnflowError(f"--crop-pct must be in [{CROP_PCT_MIN}, 1], got {crop_pct}")
    if interpolation is not None and interpolation not in choice_values(Interpolation):
        raise AttnflowError(f"unknown interpolation '{interpolation}' (choose from {', '.join(Interpolation)})")
    return Preprocessing(
        input_size=(channels, height, width),
        interpolation=interpolation or config.get("interpolation", "bicubic"),
        mean=mean,
        std=std,
        crop_pct=float(crop_pct if crop_pct is not None else config.get("crop_pct", 0.875)),
        crop_mode=config.get("crop_mode", "center"),
        preset=preset,
    )


def index_masks(folder: str | Path) -> dict[str, Path]:
    """Mask files under ``folder`` (recursively) by file stem; two masks with one stem are ambiguous."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AttnflowError(f"--masks needs a directory: {folder}")
    masks: dict[str, Path] = {}
    for path in _walk_images(folder):
        if path.stem in masks:
            raise AttnflowError(f"two masks for '{path.stem}': {masks[path.stem]} and {path}")
        masks[path.stem] = path
    return masks


def decode_mask(path: Path | str, read_timeout: float | None = READ_TIMEOUT_S) -> Image.Image:
    """A mask file as an 'L' image: 255 where the file is nonzero (object), 0 elsewhere.

    Nonzero means any nonzero palette index, grey level or colour channel (alpha is ignored).
    """
    with _open_image(path, read_timeout=read_timeout) as im:
        im = ImageOps.exif_transpose(im)
        arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr[..., :3].any(-1)
    return Image.fromarray(np.where(arr != 0, 255, 0).astype(np.uint8), mode="L")


# One dataset item: (position, uint8 (C, H, W) pixels or None, (P,) object fraction or None, skip reason or None,
# the file's content digest or "").
ImageItem = tuple[int, torch.Tensor | None, torch.Tensor | None, str | None, str]


class ImageDataset(torch.utils.data.Dataset):
    """Decode, resize and crop one image per index into a uint8 (C, H, W) tensor (normalise with
    :meth:`Preprocessing.normalize`); failures come back as a reason instead of a tensor.

    With ``masks`` (one mask path or ``None`` per image) each item also carries ``fg`` (P,): the fraction
    of each patch that is object after the mask went through the image's resize and crop (bilinear, so
    that a patch's value is an area fraction); NaN where an image has no mask.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        preprocessing: Preprocessing,
        masks: Sequence[Path | None] | None = None,
        patch_size: tuple[int, int] | None = None,
        read_timeout: float | None = READ_TIMEOUT_S,
    ):
        self.paths = list(paths)
        self.read_timeout = read_timeout
        self.preprocessing = preprocessing
        self.channels = preprocessing.input_size[0]
        self.transform = preprocessing.transform(normalized=False)
        self.masks = None if masks is None else list(masks)
        if self.masks is not None:
            if patch_size is None or len(self.masks) != len(self.paths):
                raise ValueError("masks need a patch size and one entry per image")
            height, width = preprocessing.input_size[1:]
            geometry = dataclasses.replace(preprocessing, input_size=(1, height, width), interpolation="bilinear")
            self.mask_transform = geometry.transform(normalized=False)
            self.patch_size = patch_size
            self.num_patches = (height // patch_size[0]) * (width // patch_size[1])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> ImageItem:
        try:
            data = read_image_file(self.paths[index], self.read_timeout)
            image = decode_image(self.paths[index], self.channels, data)
            self.preprocessing.check_size(*image.size)
            fg = self.object_fraction(index, image.size)
            return index, self.transform(image), fg, None, content_digest(data)
        except ReadStalled:
            raise
        except Exception as e:  # every decode failure of a user's file is a skip with its reason
            return self.failure(index, e)

    def failure(self, index: int, error: BaseException) -> ImageItem:
        """The item of an image that cannot be used, with ``error`` as its skip reason."""
        return index, None, None, describe_decode_error(error), ""

    def object_fraction(self, index: int, image_size: tuple[int, int]) -> torch.Tensor | None:
        """With masks, image ``index``'s (P,) object fraction per patch, given its decoded (width, height)
        (NaN without a mask); None without masks. A mask that cannot be read raises, naming it."""
        if self.masks is None:
            return None
        mask_path = self.masks[index]
        if mask_path is None:
            return torch.full((self.num_patches,), float("nan"))
        try:
            mask = decode_mask(mask_path, self.read_timeout)
        except ReadStalled:
            raise
        except Exception as e:  # reported as the image's skip reason, naming the mask
            raise ValueError(f"mask {mask_path}: {describe_decode_error(e)}") from None
        if mask.size != image_size:
            (mask_w, mask_h), (image_w, image_h) = mask.size, image_size
            if abs(mask_w * image_h - mask_h * image_w) > max(mask_w, mask_h, image_w, image_h):  # beyond a pixel's rounding
                raise ValueError(f"mask {mask_path} is {mask_w} x {mask_h} pixels, another aspect ratio than the "
                                 f"image's {image_w} x {image_h}: it is not this image's mask")
            mask = mask.resize(image_size, Image.Resampling.NEAREST)
        pixels = self.mask_transform(mask).float().div(255)  # (1, H, W) in [0, 1]
        return torch.nn.functional.avg_pool2d(pixels[None], self.patch_size)[0, 0].flatten()


def describe_decode_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    detail = text[0] if text else ""
    name = type(e).__name__
    return f"{name}: {detail}" if detail else name


@dataclass
class ImageBatch:
    indices: list[int]  # positions in the input list of the decoded images, in order
    pixels: torch.Tensor | None  # (B, C, H, W) uint8, None when every image of the batch failed
    fg: torch.Tensor | None  # (B, P) object fraction per patch, with masks
    failures: list[tuple[int, str]]  # (position, reason)
    digests: list[str] = dataclasses.field(default_factory=list)  # content digest of each decoded image, in order

    def pin_memory(self) -> "ImageBatch":
        """The batch with its pixels in page-locked memory, so that the copy to a GPU runs without blocking
        (the DataLoader's ``pin_memory`` thread calls this on every batch of a custom type)."""
        return dataclasses.replace(self, pixels=None if self.pixels is None else self.pixels.pin_memory())


def collate_images(items: list[ImageItem]) -> ImageBatch:
    good = [(i, x, fg, digest) for i, x, fg, err, digest in items if err is None]
    with_fg = bool(good) and good[0][2] is not None
    return ImageBatch(
        indices=[i for i, _, _, _ in good],
        pixels=torch.stack([x for _, x, _, _ in good]) if good else None,
        fg=torch.stack([fg for _, _, fg, _ in good]) if with_fg else None,
        failures=[(i, err) for i, _, _, err, _ in items if err is not None],
        digests=[digest for _, _, _, digest in good],
    )
