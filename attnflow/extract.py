"""The extraction pipeline: images -> model forward with capture -> cache, one batch at a time.

Decoding runs in DataLoader workers, the forward pass on the chosen device, and HDF5 writes in a
background thread, so that for large runs the forward pass is the only thing the model waits for.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .cache import CacheSpec, CacheWriter, inputs_digest
from .capture import AttentionCapture
from .errors import AttnflowError
from .images import ImageBatch, ImageDataset, Preprocessing, collate_images, resolve_preprocessing
from .models import LoadedModel


@dataclass
class ExtractResult:
    path: Path
    n_images: int
    n_skipped: int
    n_new: int  # images processed by this run (less than n_images after --resume)
    seconds: float


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AttnflowError("--device cuda was asked for, but no CUDA device is available")
    try:
        return torch.device(device)
    except RuntimeError:
        raise AttnflowError(f"unknown device '{device}' (use auto, cpu or cuda)") from None


def default_workers() -> int:
    return max(0, min(8, (os.cpu_count() or 1) - 1))


class BackgroundWriter:
    """Runs ``CacheWriter.append`` in a thread; at most ``depth`` batches wait, so memory stays bounded.

    An exception in the thread is re-raised in the caller at the next :meth:`put` or at :meth:`join`.
    """

    def __init__(self, writer: CacheWriter, depth: int = 2):
        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="attnflow-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:
                try:
                    self.writer.append(**item)
                except BaseException as e:  # handed to the main thread, which decides what it means
                    self._error = e

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, **item) -> None:
        self._raise_pending()
        self._queue.put(item)

    def join(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise_pending()


def extract(
    loaded: LoadedModel,
    paths: Sequence[Path],
    output: str | Path,
    *,
    store: str = "full",
    dtype: str = "float16",
    compression: str = "gzip",
    save_tokens: bool = False,
    labels_from_dirs: bool = False,
    batch_size: int = 32,
    workers: int | None = None,
    device: str = "auto",
    amp: bool = False,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    strict: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    on_skip: Callable[[str, str], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> ExtractResult:
    """Capture attention for ``paths`` with ``loaded.model`` into the cache ``output``.

    Args:
        on_skip: called once per undecodable file with (path, reason); with ``strict`` the first one raises.
        on_progress: called after each committed batch with (inputs done, inputs total).
    Returns the committed counts. On any error the ``.partial`` file keeps every committed batch.
    """
    if batch_size < 1:
        raise AttnflowError(f"--batch-size must be at least 1, got {batch_size}")
    if not paths:
        raise AttnflowError("no images to process")
    model = loaded.model
    torch_device = resolve_device(device)
    use_amp = amp and torch_device.type == "cuda"
    if amp and not use_amp:
        import warnings

        warnings.warn("--amp has no effect on the CPU; running in float32", stacklevel=2)
    layout = loaded.layout
    preprocessing = resolve_preprocessing(model, crop_pct=crop_pct, interpolation=interpolation)
    path_texts = [str(p) for p in paths]
    class_names = sorted({p.parent.name for p in paths}) if labels_from_dirs else None
    class_index = {c: i for i, c in enumerate(class_names or [])}

    spec = CacheSpec(
        layout=layout,
        num_layers=len(model.blocks),
        num_heads=int(model.blocks[0].attn.num_heads),
        store=store,
        dtype=dtype,
        compression=compression,
        token_dim=int(model.embed_dim) if save_tokens else None,
        class_names=class_names,
        attrs={
            "model": loaded.name,
            "label": loaded.label,
            "family": loaded.family,
            "weights": loaded.weights,
            "checkpoint": loaded.checkpoint,
            "checkpoint_sha256": loaded.checkpoint_sha256,
            "preprocessing": json.dumps(preprocessing.as_dict(), sort_keys=True),
            "amp": use_amp,
            "working_dir": os.getcwd(),
            "inputs_sha256": inputs_digest(path_texts),
            "n_inputs": len(paths),
        },
    )
    writer = CacheWriter(output, spec, resume=resume, overwrite=overwrite)
    start = writer.n_inputs_done
    n_before = writer.n_images
    t0 = time.perf_counter()
    try:
        model.to(torch_device)
        dataset = ImageDataset(paths[start:], preprocessing)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=default_workers() if workers is None else workers,
            collate_fn=collate_images,
            pin_memory=torch_device.type == "cuda",
        )
        background = BackgroundWriter(writer)
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
            if use_amp
            else contextlib.nullcontext()
        )
        try:
            with AttentionCapture(model) as capture, torch.inference_mode():
                for batch in loader:
                    skipped = [(path_texts[start + i], reason) for i, reason in batch.failures]
                    for path, reason in skipped:
                        if strict:
                            raise AttnflowError(f"cannot decode {path}: {reason}")
                        if on_skip:
                            on_skip(path, reason)
                    rows = _forward(model, capture, batch, preprocessing, torch_device, autocast, spec) if batch.indices else {}
                    done = start + max([*batch.indices, *(i for i, _ in batch.failures)]) + 1
                    ids = [path_texts[start + i] for i in batch.indices]
                    background.put(
                        rows=rows,
                        image_ids=ids,
                        n_inputs_done=done,
                        labels=[class_index[Path(p).parent.name] for p in ids] if class_names is not None else None,
                        skipped=skipped,
                    )
                    if on_progress:
                        on_progress(done, len(paths))
        finally:
            background.join()
    except BaseException:
        writer.close()
        raise
    n_images, n_skipped = writer.n_images, int(writer._file.attrs["n_skipped"])
    final = writer.finish()
    return ExtractResult(
        path=final, n_images=n_images, n_skipped=n_skipped, n_new=n_images - n_before,
        seconds=time.perf_counter() - t0,
    )


def _forward(
    model, capture: AttentionCapture, batch: ImageBatch, preprocessing: Preprocessing, device, autocast, spec: CacheSpec
) -> dict[str, np.ndarray]:
    """One forward pass; returns the rows the cache stores for this batch, as CPU numpy arrays."""
    pixels = preprocessing.normalize(batch.pixels.to(device, non_blocking=True))
    with autocast:
        model.forward_features(pixels)
    captured = capture.pop()
    storage = torch.float16 if spec.dtype == "float16" else torch.float32
    rows = {"magnitude": captured.magnitude}
    if spec.store == "full":
        rows["attn"] = captured.attn.to(storage)
    elif spec.store == "rows":
        rows["attn_rows"] = captured.attn[:, :, :, : spec.layout.num_prefix_tokens].to(storage)
    if spec.token_dim is not None:
        rows["tokens"] = captured.tokens.float()
    return {k: v.cpu().numpy() for k, v in rows.items()}
