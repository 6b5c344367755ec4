"""``--decode gpu``: JPEGs decoded in batches on the device (nvJPEG) and resized there, mirroring PIL + timm.

The default path (``--decode cpu``, :class:`~attnflow.images.ImageDataset`) decodes with PIL and runs timm's
eval transform in DataLoader workers; at ImageNet scale that caps extraction well below the forward pass. With
``gpu``, workers only read each file's bytes and look at its header; the main process decodes every plain JPEG
of a batch with one ``torchvision.io.decode_jpeg(list, device=...)`` call and resizes and crops each image on
the device the way PIL does it (see :func:`resize_and_crop`). Everything else takes the exact CPU path per file,
in the worker: PNGs and other formats, CMYK JPEGs, JPEGs with an EXIF orientation, images past PIL's
decompression-bomb limit, and files whose header does not parse. A JPEG the device decoder rejects is retried on
the CPU path in the main process, and skipped with the CPU path's reason if that fails too.

The result is an :class:`~attnflow.images.ImageBatch` of uint8 pixels like the CPU path's, on the device; the
two paths differ only by the rounding of the resampling arithmetic (PIL's fixed point against float32; for some
squashes, Pillow's order of passes) and by the decoder's IDCT (nvJPEG against libjpeg-turbo), as measured in the
README.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import signal
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image

from .errors import AttnflowError, OptionError, first_line
from .images import (
    DecodeMode, ImageBatch, ImageDataset, ImageItem, Preprocessing, ReadStalled, collate_images, content_digest, read_image_file,
)

__all__ = [
    "JPEG_MAGIC", "EXIF_ORIENTATION", "DEVICE_INTERPOLATIONS", "DEVICE_CROP_MODES", "with_decode",
    "check_device_decodable", "check_decode_device", "scaled_size", "resize_and_crop", "EncodedJpeg", "EncodedItem",
    "EncodedImages", "EncodedBatch", "collate_encoded", "decode_batch", "image_batches", "worker_deaths_reported",
]

JPEG_MAGIC = b"\xff\xd8\xff"  # SOI marker and the first byte of the next marker: every JPEG file starts so
EXIF_ORIENTATION = 0x0112

# timm/PIL filter -> the torch.nn.functional.interpolate mode computing the same weights (antialiased: PIL's
# filters, bicubic with a = -0.5). PIL's nearest is mirrored by its own index table; its box, hamming and
# lanczos filters have no torch counterpart.
_FILTERS = {"bilinear": "bilinear", "bicubic": "bicubic"}
DEVICE_INTERPOLATIONS = ("nearest", *_FILTERS)
DEVICE_CROP_MODES = ("center", "squash")

# The modes of the JPEGs the device decodes as PIL would, per model input channels: decode_jpeg's RGB mode
# replicates a greyscale JPEG into three equal channels as PIL's convert('RGB') does, and greyscale models get
# PIL's luma of that (see _pil_luma). CMYK (and Adobe YCCK) JPEGs go to the CPU path: PIL and torchvision's CPU
# decoder agree on them, but nvJPEG's handling is unverified.
_DEVICE_MODES = {3: ("RGB", "L"), 1: ("L", "RGB")}
# PIL's RGB -> L weights (ITU-R 601-2 luma in 16-bit fixed point, Convert.c), summing to 2**16
_LUMA_WEIGHTS = (19595, 38470, 7471)


def with_decode(preprocessing: Preprocessing, decode: str) -> Preprocessing:
    """``preprocessing`` decoded the ``decode`` way (:class:`~attnflow.images.DecodeMode`); ``gpu`` must be able
    to mirror it, else an :class:`OptionError` naming ``decode``."""
    if decode != DecodeMode.cpu:
        check_device_decodable(preprocessing)
    return dataclasses.replace(preprocessing, decode=decode)


def check_device_decodable(preprocessing: Preprocessing) -> None:
    """Refuse, with an :class:`OptionError` naming ``decode``, a preprocessing the device path cannot mirror."""
    if preprocessing.interpolation not in DEVICE_INTERPOLATIONS:
        raise OptionError("decode", f"gpu resizes with {', '.join(DEVICE_INTERPOLATIONS)}, not "
                                      f"{preprocessing.interpolation}: use {{decode}}=cpu or {{interpolation}}=bicubic")
    square = preprocessing.input_size[1] == preprocessing.input_size[2]
    if preprocessing.crop_mode not in DEVICE_CROP_MODES or (preprocessing.crop_mode == "center" and not square):
        raise OptionError("decode", f"gpu mirrors timm's centre crop of square inputs and its squash crop, not the "
                                      f"{preprocessing.crop_mode} crop of {preprocessing.input_size[1]} x "
                                      f"{preprocessing.input_size[2]} inputs: use {{decode}}=cpu")


def check_decode_device(decode: str, device: str) -> None:
    """The CLI's rule for ``--decode`` and ``--device`` (their texts): ``gpu`` decodes with nvJPEG on the model's
    device, so it needs CUDA; refused, naming ``--decode``, on a machine without CUDA or with ``--device cpu``.
    (The Python API also runs the batched path on the CPU, for comparisons.)"""
    if decode == DecodeMode.cpu:
        return
    if not torch.cuda.is_available():
        raise OptionError("decode", f"{decode} decodes with nvJPEG on a CUDA device, and this machine has none: use {{decode}}=cpu")
    if device == "cpu":
        raise OptionError("decode", f"{decode} decodes on the model's CUDA device, but {{device}} is cpu: drop one of them")


def scaled_size(height: int, width: int, preprocessing: Preprocessing) -> tuple[int, int]:
    """The (height, width) timm's eval transform resizes a ``height`` x ``width`` image to before its crop.

    ``scale = floor(input / crop_pct)`` per side; the centre mode (square inputs) resizes the shorter side to
    ``scale`` and the longer one to ``int(scale * longer / shorter)`` (torchvision's ``Resize(int)``); squash
    resizes to exactly ``scale``.
    """
    return preprocessing.resized_size(height, width)


def resize_and_crop(pixels: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """uint8 (C, h, w) -> uint8 (C, H, W) on ``pixels``' device: timm's eval resize and centre crop, as PIL
    computes them.

    PIL resamples with a filter in two passes, horizontal then vertical (Pillow's Resample.c), and rounds (half
    up) and clips to uint8 after each; one 2-D float pass instead differs from it by up to 6 levels at sharp
    edges where bicubic overshoots. So each pass runs here on its own, rounded and clipped the same way; what
    remains is PIL's fixed-point arithmetic against float32 (at most one level at a few pixels, on real
    photos). Pillow 13.0.0 as installed here runs the vertical pass first for some shapes (squashing tall
    images, by an undocumented rule); there the two differ by up to two levels. Nearest copies the very pixels
    PIL copies.
    """
    height, width = pixels.shape[-2:]
    out_h, out_w = scaled_size(height, width, preprocessing)
    if preprocessing.interpolation == "nearest":
        image = pixels.index_select(-2, _pil_nearest_sources(height, out_h, pixels.device))
        image = image.index_select(-1, _pil_nearest_sources(width, out_w, pixels.device))
    else:
        mode = _FILTERS[preprocessing.interpolation]
        image = pixels[None].float()
        for size, changed in (((height, out_w), out_w != width), ((out_h, out_w), out_h != height)):
            if changed:
                image = torch.nn.functional.interpolate(image, size=size, mode=mode, antialias=True, align_corners=False)
                image = image.add_(0.5).floor_().clamp_(0, 255)
        image = image[0].to(torch.uint8)
    crop_h, crop_w = preprocessing.input_size[1:]
    # torchvision's CenterCrop offsets (Python's round, half to even); the resized image is never smaller
    top, left = int(round((out_h - crop_h) / 2.0)), int(round((out_w - crop_w) / 2.0))
    return image[:, top: top + crop_h, left: left + crop_w]


def _pil_nearest_sources(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """(n_out,) int64 on ``device``: the source pixel PIL's NEAREST resize copies to each output pixel along one
    axis (see :func:`_pil_nearest_positions`)."""
    return torch.tensor(_pil_nearest_positions(n_in, n_out), dtype=torch.int64, device=device)


@functools.lru_cache(maxsize=256)
def _pil_nearest_positions(n_in: int, n_out: int) -> tuple[int, ...]:
    """PIL (Resample.c, then ImagingScaleAffine in Geometry.c) starts a float64 position at half a step and adds
    the step ``n_in / n_out`` per pixel, truncating each; the closed form ``floor((k + 0.5) * step)`` (torch's
    'nearest-exact') differs from that running sum where its rounding lands just below an integer. Cached: a
    batch's images mostly share their sizes, and this is a Python loop per output pixel."""
    step = n_in / n_out
    position = step * 0.5
    sources = []
    for _ in range(n_out):
        sources.append(int(position))
        position += step
    return tuple(sources)


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG's bytes, read by a worker and decoded in the main process."""

    data: torch.Tensor  # (N,) uint8, the whole file


# An :class:`EncodedImages` item: an :data:`~attnflow.images.ImageItem` whose pixels may still be encoded.
EncodedItem = tuple[int, torch.Tensor | EncodedJpeg | None, torch.Tensor | None, str | None, str]


class EncodedImages(torch.utils.data.Dataset):
    """The items of an :class:`ImageDataset`, with the pixels of a plain JPEG left encoded: ``(index,
    EncodedJpeg, fg, None)`` for those, ``dataset[index]`` (the exact CPU path) for every other file."""

    def __init__(self, dataset: ImageDataset):
        self.dataset = dataset
        self.modes = _DEVICE_MODES[dataset.channels]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> EncodedItem:
        try:
            data = read_image_file(self.dataset.paths[index], self.dataset.read_timeout)
        except (OSError, ValueError):
            return self.dataset[index]  # unreadable: the CPU path gives the skip reason the default run gives
        size = self._device_decodable(data)
        if size is None:
            return self.dataset[index]
        try:
            self.dataset.preprocessing.check_size(*size)
            fg = self.dataset.object_fraction(index, size)
        except Exception as e:  # a bad mask: the image's skip reason, as on the CPU path
            return self.dataset.failure(index, e)
        return index, EncodedJpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8)), fg, None, content_digest(data)

    def _device_decodable(self, data: bytes) -> tuple[int, int] | None:
        """The (width, height) of a JPEG the device decodes as :func:`~attnflow.images.decode_image` would;
        None for any other file. Only the header is parsed, not the pixels."""
        if not data.startswith(JPEG_MAGIC):
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)  # as decode_image: past it, a skip
                with Image.open(io.BytesIO(data)) as im:
                    # MPO (a camera's multi-picture JPEG) and the rest: PIL's choices, on the CPU path
                    plain = im.format == "JPEG" and im.mode in self.modes
                    if plain and im.getexif().get(EXIF_ORIENTATION, 1) == 1:
                        return im.size
        except Exception:  # a header PIL cannot read: the CPU path says why, as the default run does
            return None
        return None


@dataclass
class EncodedBatch:
    """A batch of :class:`EncodedImages` items, in input order, before the device decodes its JPEGs."""

    items: list[EncodedItem]


def collate_encoded(items: list[EncodedItem]) -> EncodedBatch:
    return EncodedBatch(items=list(items))


def decode_batch(
    batch: EncodedBatch, preprocessing: Preprocessing, device: torch.device, retry: Callable[[int], ImageItem]
) -> ImageBatch:
    """Decode the JPEGs of ``batch`` on ``device`` in one call, resize and crop them there, and merge them with
    the items the workers finished on the CPU, in input order.

    A JPEG the device decoder rejects is handed to ``retry`` (the CPU path, by index), whose failure is the
    image's skip reason. ``pixels`` of the result are uint8 (B, C, H, W) on ``device``.
    """
    items: list[EncodedItem] = list(batch.items)
    encoded = [k for k, (_, payload, _, _, _) in enumerate(items) if isinstance(payload, EncodedJpeg)]
    decoded = _decode_jpegs([items[k][1].data for k in encoded], device)
    for k, pixels in zip(encoded, decoded):
        index, _, fg, _, digest = items[k]
        if pixels is None:
            items[k] = retry(index)
            continue
        if preprocessing.input_size[0] == 1:
            pixels = _pil_luma(pixels)
        items[k] = index, resize_and_crop(pixels, preprocessing), fg, None, digest
    moved = [(i, None if x is None else x.to(device, non_blocking=True), fg, err, digest) for i, x, fg, err, digest in items]
    return collate_images(moved)


def _pil_luma(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 (3, h, w) -> uint8 (1, h, w): PIL's convert('L'), bit for bit (rounded fixed point). The decoder's
    own greyscale output is the JPEG's stored luma instead, up to two levels away after a resize."""
    weights = torch.tensor(_LUMA_WEIGHTS, dtype=torch.int32, device=rgb.device).view(3, 1, 1)
    return ((rgb.int() * weights).sum(0, keepdim=True) + (1 << 15)).bitwise_right_shift(16).to(torch.uint8)


def _decode_jpegs(data: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """uint8 (3, h, w) RGB per file on ``device``, None where the decoder rejects it. One batched call; when it
    fails (it returns nothing then), each file alone, to find the ones it rejects."""
    if not data:
        return []
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.RGB
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders for TorchCodec; they are what this path is built on
        warnings.simplefilter("ignore", DeprecationWarning)
        # Whatever the device decoder raises, the file is retried on the CPU path, which is exact or says why not.
        try:
            return list(decode_jpeg(list(data), mode=mode, device=device))
        except Exception:
            pass
        decoded: list[torch.Tensor | None] = []
        for one in data:
            try:
                decoded.append(decode_jpeg(one, mode=mode, device=device))
            except Exception:
                decoded.append(None)
        return decoded


def image_batches(dataset: ImageDataset, *, device: torch.device, batch_size: int, workers: int) -> Iterable[ImageBatch]:
    """The batches of ``dataset`` in order, each an :class:`ImageBatch` of uint8 pixels, decoded as its
    preprocessing's ``decode`` says: by PIL in ``workers`` processes (``cpu``), or with the JPEGs decoded on
    ``device`` (``gpu``; the CLI requires CUDA there, the Python API also runs this path on the CPU, for
    comparisons)."""
    if dataset.preprocessing.decode == DecodeMode.cpu:
        return _surviving(torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_images,
            pin_memory=device.type == "cuda", worker_init_fn=_leave_interrupts_to_the_parent,
        ))
    check_device_decodable(dataset.preprocessing)
    loader = torch.utils.data.DataLoader(
        EncodedImages(dataset), batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_encoded,
        worker_init_fn=_leave_interrupts_to_the_parent,
    )
    return (decode_batch(batch, dataset.preprocessing, device, dataset.__getitem__) for batch in _surviving(loader))


def _leave_interrupts_to_the_parent(worker_id: int) -> None:
    """Ctrl-C on a terminal reaches every process of the group: a worker ignores it, so that the parent alone
    stops the run and says so in one line (each worker would print its own traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.excepthook = _silent_about_a_departed_parent


def _silent_about_a_departed_parent(kind: type[BaseException], error: BaseException, traceback) -> None:
    """A worker's excepthook. multiprocessing's resource sharer, the thread that hands a batch's file
    descriptors to the parent, reports a connection the parent dropped (it was exiting on Ctrl-C) through
    ``sys.excepthook``, which would print a traceback under the parent's one line. A parent still running
    sees the failed handover itself and reports it, so nothing is lost by staying quiet here."""
    if isinstance(error, (OSError, EOFError)):
        return
    sys.__excepthook__(kind, error, traceback)


def _surviving(loader: Iterable) -> Iterable:
    """The loader's batches; a worker process that dies (killed, out of memory) or a read that stalls ends the
    run with one line instead of the DataLoader's traceback, its committed batches kept."""
    try:
        with worker_deaths_reported():  # the DataLoader's own report of a worker that died
            yield from loader
    except ReadStalled as e:
        message, in_worker = _stalled_message(e)
        # The kernel holds a thread blocked in a hung mount's read until the mount answers (FUSE: even past
        # SIGKILL); in a worker process the run can end without it, in this process it cannot.
        held = "" if in_worker else "; with --workers 0 the read is this process's own, so it exits only once the read returns"
        raise ReadStalled(f"{message} (--read-timeout); the committed batches are kept: rerun with --resume once it "
                          f"answers{held}") from None
    except (OSError, EOFError) as e:
        # a batch cut off in transfer by a dying worker (the dataset turns every failure of a user's file into a
        # skip reason, so nothing else is raised here)
        raise _worker_died(e) from None


@contextlib.contextmanager
def worker_deaths_reported() -> Iterator[None]:
    """Around the loop that consumes :func:`image_batches`: the DataLoader's SIGCHLD handler raises a worker's
    death in the main thread wherever it happens to be, often in the model's forward pass rather than in the
    loader, so the loop's body needs the same one-line report as the loader itself."""
    try:
        yield
    except RuntimeError as e:
        if "DataLoader worker" not in str(e):
            raise
        raise _worker_died(e) from None


def _worker_died(error: BaseException) -> AttnflowError:
    return AttnflowError(f"a decoding worker process died ({type(error).__name__}: {first_line(error)}); the "
                         "committed batches are kept: rerun with --resume (with fewer --workers if memory ran out)")


def _stalled_message(error: ReadStalled) -> tuple[str, bool]:
    """The reader's own message, and whether a worker process raised it: the DataLoader re-raises a worker's
    exception with the whole traceback as its text, the original message after the qualified name."""
    text = str(error)
    marker = f"{ReadStalled.__module__}.{ReadStalled.__qualname__}: "
    return (text[text.rindex(marker) + len(marker):].strip(), True) if marker in text else (text, False)
