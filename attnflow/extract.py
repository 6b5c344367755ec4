"""The extraction pipeline: images -> model forward with capture -> cache (and metrics), a batch at a time.

Decoding runs in DataLoader workers (with ``--decode gpu``, JPEGs on the device: :mod:`attnflow.decode`),
the forward pass and the optional streaming metrics on the chosen device, and HDF5 writes in a background
thread, so that for large runs the forward pass is the only thing the model waits for. The capture writes
every batch's maps into one reused buffer, and on a GPU the rows reach the host through asynchronous copies
that only the writer thread waits for (:class:`HostRows`).
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
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .store.write import CacheSpec, MetricsSpec, RowFileWriter, inputs_digest, masks_digest
from .capture import AttentionCapture, MagnitudeUpdate
from .errors import AttnflowError, OptionError
from .notes import note
from .decode import image_batches, with_decode, worker_deaths_reported
from .images import ImageBatch, ImageDataset, Preprocessing, class_of, folder_classes, index_masks, resolve_preprocessing
from .measure import metric_rows, warn_about_layout
from .metrics import available_metrics
from .models import LoadedModel
from .options import ExtractOptions, resolve_device
from .store.names import ATTN, ATTN_ROWS, FG, MAGNITUDE, TOKEN_NORM, TOKENS, DType, StoreMode

__all__ = [
    "ExtractResult", "LARGE_INPUT_SIDE", "ANNOUNCED_CACHE_BYTES", "LARGE_IMAGE_BYTES", "cache_bytes_per_image",
    "size_notes", "LONG_EXTRACT_SECONDS", "time_note", "report_failures", "default_workers", "HostRows",
    "BackgroundWriter", "extract",
]


@dataclass
class ExtractResult:
    path: Path
    n_images: int
    n_skipped: int
    n_new: int  # images processed by this run (less than n_images after --resume)
    seconds: float
    metrics_path: Path | None = None
    already_complete: bool = False  # --resume of a run that had finished: nothing was computed


# A model's default input above this side (px) is unusual for analysing attention (DINOv2 names build at
# 518 px: 1,370 tokens, every map 29 times the size of one at 224 px): a note says so and how to change it.
LARGE_INPUT_SIDE = 384
# A cache estimated above this many bytes, or above LARGE_IMAGE_BYTES an image, is announced before it is written.
ANNOUNCED_CACHE_BYTES = 1 << 30
LARGE_IMAGE_BYTES = 10 << 20


def cache_bytes_per_image(loaded: LoadedModel, options: ExtractOptions) -> int:
    """What one image adds to a cache of ``loaded`` before compression: its attention maps as ``--store`` and
    ``--dtype`` keep them (full: L x H x T x T; rows: the p prefix rows of each), its stored tokens, and the
    float32 magnitudes and token norms (L x T each) every cache holds."""
    adapter, layout, store = loaded.adapter, loaded.layout, options.store
    L, T = adapter.num_layers, layout.num_prefix_tokens + layout.num_patches
    rows = {StoreMode.full: T, StoreMode.rows: layout.num_prefix_tokens, StoreMode.none: 0}[store.store]
    maps = L * adapter.num_heads * rows * T * (2 if store.dtype == DType.float16 else 4)
    tokens = 0
    if store.save_tokens:
        tokens = len(store.token_blocks(L)) * T * adapter.width * (2 if store.tokens_dtype == DType.float16 else 4)
    return maps + tokens + 2 * L * T * 4


def size_notes(loaded: LoadedModel, options: ExtractOptions, n_images: int, *, img_size_given: bool) -> list[str]:
    """What to say before writing a cache that will be large: the estimated size when it passes
    :data:`ANNOUNCED_CACHE_BYTES` (or :data:`LARGE_IMAGE_BYTES` an image), and a model's unusually large default
    resolution (above :data:`LARGE_INPUT_SIDE` px, when ``--img-size`` was not given) with what 224 px gives."""
    notes = []
    per_image = cache_bytes_per_image(loaded, options)
    layout, side = loaded.layout, loaded.adapter.input_size[-1]
    tokens = layout.num_prefix_tokens + layout.num_patches
    if not img_size_given and side > LARGE_INPUT_SIDE:
        at_224 = layout.num_prefix_tokens + (224 // layout.patch_size[0]) * (224 // layout.patch_size[1])
        notes.append(f"{loaded.name} builds at {side} px by default ({tokens:,} tokens, {_size(per_image)} an image "
                     f"before compression with --store {options.store.store}); --img-size 224 gives {at_224:,} tokens")
    if per_image * n_images > ANNOUNCED_CACHE_BYTES or per_image > LARGE_IMAGE_BYTES:
        notes.append(f"the cache will take about {_size(per_image * n_images)} before compression "
                     f"({_size(per_image)} an image x {n_images:,}); --store rows or none, or a smaller --img-size, keeps less")
    return notes


# An extract whose first batch says the rest will take longer than this (seconds) gets a line saying how long:
# a log file has no progress bar to read the ETA from.
LONG_EXTRACT_SECONDS = 60.0


def time_note(done: int, total: int, seconds: float) -> str | None:
    """After the first batch of ``done`` of ``total`` images took ``seconds`` (start-up included, so an upper
    estimate): how long the rest will take, when that is more than :data:`LONG_EXTRACT_SECONDS`."""
    if done <= 0 or done >= total:
        return None
    per_image = seconds / done
    remaining = per_image * (total - done)
    if remaining <= LONG_EXTRACT_SECONDS:
        return None
    minutes, secs = divmod(round(remaining), 60)
    hours, minutes = divmod(minutes, 60)
    duration = f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"
    return (f"the first {done:,} images took {per_image:.2g} s each (start-up included); the other "
            f"{total - done:,} will take about {duration}")


def _size(n_bytes: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n_bytes < 1000 or unit == "GB":
            return f"{n_bytes:,.0f} {unit}" if unit == "bytes" else f"{n_bytes:,.1f} {unit}"
        n_bytes /= 1000
    raise AssertionError("unreachable")


def report_failures(batch: ImageBatch, path_texts: Sequence[str], start: int, strict: bool,
                    on_skip: Callable[[str, str], None] | None) -> list[tuple[str, str]]:
    """The batch's images that could not be read, as (path, reason): an error under ``strict``, else each
    handed to ``on_skip`` and returned to be recorded as skipped."""
    skipped = [(path_texts[start + i], reason) for i, reason in batch.failures]
    for path, reason in skipped:
        if strict:
            raise AttnflowError(f"cannot decode {path}: {reason}")
        if on_skip:
            on_skip(path, reason)
    return skipped


def default_workers() -> int:
    return max(0, min(8, (os.cpu_count() or 1) - 1))


class HostRows:
    """One batch's rows for each file (``rows[file key][dataset]``), on their way to the host.

    On a GPU the copies are queued without waiting (into pinned memory, which torch's host allocator
    recycles) and one event marks their end: the main loop goes on to the next forward pass at once, and
    only the writer thread waits for the copies, in :meth:`numpy`.
    """

    def __init__(self, rows: dict[str, dict[str, torch.Tensor]]):
        tensors = [t for file_rows in rows.values() for t in file_rows.values()]
        self._ready: torch.cuda.Event | None = None
        if any(t.is_cuda for t in tensors):
            rows = {key: {name: _to_pinned(t) for name, t in file_rows.items()} for key, file_rows in rows.items()}
            self._ready = torch.cuda.Event()
            self._ready.record()
        self._rows = rows

    @classmethod
    def empty(cls, keys) -> "HostRows":
        return cls({key: {} for key in keys})

    def numpy(self) -> dict[str, dict[str, np.ndarray]]:
        if self._ready is not None:
            self._ready.synchronize()
        return {key: {name: t.numpy() for name, t in file_rows.items()} for key, file_rows in self._rows.items()}


def _to_pinned(tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_cuda:
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


class BackgroundWriter:
    """Commits batches to one or more files in a thread; at most ``depth`` batches wait, so memory stays
    bounded. An exception in the thread is re-raised in the caller at the next :meth:`put` or at :meth:`join`.
    """

    def __init__(self, writers: dict[str, RowFileWriter], depth: int = 2):
        self.writers = writers
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
                    host_rows, common = item
                    rows = host_rows.numpy()
                    for key, writer in self.writers.items():
                        writer.append(rows=rows[key], **common)
                except BaseException as e:  # handed to the main thread, which decides what it means
                    self._error = e

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, rows: HostRows, **common: Any) -> None:
        """Queue one batch: its rows for each file, ``common`` (ids, labels, ...) for all."""
        self._raise_pending()
        self._queue.put((rows, common))

    def join(self) -> None:
        self._queue.put(None)
        while True:
            try:
                self._thread.join()
                break
            except RuntimeError as e:
                # torch's SIGCHLD handler raises in whatever the main thread is doing when a decoding worker
                # dies; the loader already ended the run with one line, and the batches queued must still land
                if "DataLoader worker" not in str(e):
                    raise
        self._raise_pending()


def _align_for_resume(cache: RowFileWriter, metrics: RowFileWriter) -> None:
    """Two files written side by side commit one after the other; after an interruption one may be a batch
    ahead (or, if metrics were added on resume, many): cut it back to the other."""
    behind, ahead = sorted((cache, metrics), key=lambda w: w.n_inputs_done)
    if ahead.n_inputs_done != behind.n_inputs_done:
        ahead.rewind(behind.n_images, behind.n_skipped, behind.n_inputs_done)


def extract(
    loaded: LoadedModel,
    paths: Sequence[Path],
    output: str | Path,
    options: ExtractOptions | None = None,
    *,
    metrics: str | Path | None = None,
    class_names: Sequence[str] | None = None,
    on_skip: Callable[[str, str], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    allow_empty: bool = False,
    **option_values: Any,
) -> ExtractResult:
    """Capture attention for ``paths`` with ``loaded.model`` into the cache ``output``.

    Args:
        options: what to store and how to run (:class:`~attnflow.options.ExtractOptions`); single options can
            also be given as keywords (``batch_size=8, store="rows"``), which override ``options``.
        metrics: also write a metrics file computed batch by batch from the float32 maps in flight (any
            ``store`` mode, ``none`` included), with the rollout options, and attention flow with ``flow=True``.
        class_names: with ``labels_from_dirs``, the full list of classes (default: the folders of ``paths``;
            a shard of a distributed run gets the classes of the whole input list, so indices agree).
        on_skip: called once per undecodable file with (path, reason); with ``strict`` the first one raises.
        on_progress: called after each committed batch with (inputs done, inputs total).
        allow_empty: write a cache even when no input could be decoded (a distributed run's shard); otherwise
            that is an AttnflowError and nothing is written.
    Returns the committed counts. On any error the ``.partial`` files keep every committed batch.
    """
    options = (options or ExtractOptions()).replace(**option_values)
    if not paths:
        raise AttnflowError("no images to process")
    if metrics is not None and Path(metrics).resolve() == Path(output).resolve():
        raise AttnflowError("the metrics file and the cache must be different files")
    if options.flow.flow and metrics is None:
        raise OptionError("flow", "computes attention flow into the metrics file: add {metrics}")
    plan = _plan(loaded, paths, options, class_names)
    files = {"cache": (plan.cache_spec(output), output, metrics)}
    if metrics is not None:
        warn_about_layout(loaded.layout, full_maps=True)
        files["metrics"] = (plan.metrics_spec(files["cache"][0], output), metrics, output)
    writers = _open_writers(files, len(paths), resume=options.run.resume, overwrite=options.run.overwrite, reads=plan.reads)
    finished = _finished_run(writers, output, metrics)
    if finished is not None:
        return finished
    if "metrics" in writers and options.run.resume:
        _align_for_resume(writers["cache"], writers["metrics"])
    cache_writer = writers["cache"]
    n_before = cache_writer.n_images
    t0 = time.perf_counter()
    try:
        _run(plan, files["cache"][0], writers, on_skip=on_skip, on_progress=on_progress)
    except BaseException:
        for writer in writers.values():
            writer.close()
        raise
    if cache_writer.n_images == 0 and not allow_empty:
        for writer in writers.values():
            writer.cleanup()
        raise AttnflowError(f"none of the {cache_writer.n_skipped} inputs could be decoded (each skip is listed above, "
                            "or rerun with --strict to stop at the first); no cache written")
    _assemble(writers)
    return ExtractResult(
        path=cache_writer.path, n_images=cache_writer.n_images, n_skipped=cache_writer.n_skipped,
        n_new=cache_writer.n_images - n_before, seconds=time.perf_counter() - t0,
        metrics_path=writers["metrics"].path if "metrics" in writers else None,
    )


@dataclass(frozen=True)
class _Plan:
    """What one extraction will do, resolved from the model, the inputs and the options before any work."""

    loaded: LoadedModel
    paths: Sequence[Path]
    options: ExtractOptions
    device: torch.device
    amp: bool
    preprocessing: Preprocessing
    class_names: list[str] | None
    mask_paths: list[Path | None] | None

    @property
    def flow_layers(self) -> tuple[int, ...]:
        """The blocks after which attention flow goes into the metrics file (() without ``flow``)."""
        return self.options.flow.layers(self.loaded.adapter.num_layers)

    @property
    def reads(self) -> list[Path]:
        """Every file the run reads, which no output may be."""
        checkpoint = [Path(self.loaded.checkpoint)] if self.loaded.checkpoint else []
        return [*self.paths, *(m for m in self.mask_paths or () if m is not None), *checkpoint]

    def cache_spec(self, output: str | Path) -> CacheSpec:
        loaded, adapter, store = self.loaded, self.loaded.adapter, self.options.store
        return CacheSpec(
            layout=loaded.layout,
            num_layers=adapter.num_layers,
            num_heads=adapter.num_heads,
            store=store.store,
            dtype=store.dtype,
            compression=store.compression,
            token_dim=adapter.width if store.save_tokens else None,
            token_layers=store.token_blocks(adapter.num_layers),
            tokens_dtype=store.tokens_dtype,
            class_names=self.class_names,
            has_masks=self.mask_paths is not None,
            final_norm=_final_layer_norm(adapter.final_norm) if store.save_tokens else None,
            image_digests=True,
            attrs={
                "model": loaded.name,
                "label": loaded.label,
                "family": loaded.family,
                "weights": loaded.weights,
                "checkpoint": loaded.checkpoint,
                "checkpoint_sha256": loaded.checkpoint_sha256,
                # only when set: absent in every cache written before they were recorded
                **({"checkpoint_key": loaded.checkpoint_key} if loaded.checkpoint_key else {}),
                **({"masks_sha256": masks_digest(self.paths, self.mask_paths)} if self.mask_paths is not None else {}),
                "preprocessing": json.dumps(self.preprocessing.as_dict(), sort_keys=True),
                "amp": self.amp,
                # only when not the default: absent means after the layer scale, as in every cache of attnflow 0.1
                **({"magnitude_update": store.magnitude} if store.magnitude != MagnitudeUpdate.after_layer_scale else {}),
                "working_dir": os.getcwd(),
                "inputs_sha256": inputs_digest([str(p) for p in self.paths]),
                "n_inputs": len(self.paths),
            },
        )

    def metrics_spec(self, cache: CacheSpec, output: str | Path) -> MetricsSpec:
        return MetricsSpec(
            source_attrs=cache.root_attrs(),
            metric_levels=available_metrics(
                self.loaded.layout, full_maps=True, has_fg=self.mask_paths is not None, has_token_norm=True,
                has_flow=bool(self.flow_layers),
            ),
            has_rollout=True,
            fusion=self.options.rollout.fusion,
            discard_ratio=self.options.rollout.discard_ratio,
            source=str(Path(output).resolve()),
            class_names=self.class_names,
            artifact_rule=self.options.artifacts.rule,
            flow_layers=self.flow_layers,
            image_digests=True,
        )


def _plan(loaded: LoadedModel, paths: Sequence[Path], options: ExtractOptions, class_names: Sequence[str] | None) -> _Plan:
    device = resolve_device(options.run.device)
    amp = options.run.amp and device.type == "cuda"
    if options.run.amp and not amp:
        note("--amp has no effect on the CPU; running in float32")
    inputs = options.inputs
    return _Plan(
        loaded=loaded,
        paths=paths,
        options=options,
        device=device,
        amp=amp,
        preprocessing=with_decode(resolve_preprocessing(
            loaded.model, crop_pct=inputs.crop_pct, interpolation=inputs.interpolation, preset=inputs.preprocess
        ), inputs.decode),
        class_names=(list(class_names) if class_names is not None else folder_classes(paths)) if inputs.labels_from_dirs else None,
        mask_paths=_match_masks(paths, inputs.masks) if inputs.masks is not None else None,
    )


def _run(plan: _Plan, spec: CacheSpec, writers: dict[str, RowFileWriter], *, on_skip, on_progress) -> None:
    """Every input after the last committed batch: decode in workers, forward with capture, hand the rows
    of each batch to the background writer."""
    model, options, paths = plan.loaded.model, plan.options, plan.paths
    start = writers["cache"].n_inputs_done
    path_texts = [str(p) for p in paths]
    class_index = {c: i for i, c in enumerate(plan.class_names or [])}
    model.to(plan.device)
    dataset = ImageDataset(
        paths[start:], plan.preprocessing,
        masks=None if plan.mask_paths is None else plan.mask_paths[start:], patch_size=plan.loaded.layout.patch_size,
        read_timeout=options.run.read_timeout,
    )
    loader = image_batches(
        dataset, device=plan.device, batch_size=options.run.batch_size,
        workers=default_workers() if options.run.workers is None else options.run.workers,
    )
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        if plan.amp
        else contextlib.nullcontext()
    )
    background = BackgroundWriter(writers)
    try:
        capture = AttentionCapture(model, magnitude=options.store.magnitude, token_layers=spec.stored_token_layers, reuse_buffer=True)
        with capture, torch.inference_mode(), worker_deaths_reported():
            for batch in loader:
                skipped = report_failures(batch, path_texts, start, options.inputs.strict, on_skip)
                rows = HostRows.empty(writers)
                if batch.indices:
                    rows = _process(model, capture, batch, plan, autocast, spec, writers)
                done = start + max([*batch.indices, *(i for i, _ in batch.failures)]) + 1
                ids = [path_texts[start + i] for i in batch.indices]
                background.put(
                    rows,
                    image_ids=ids,
                    n_inputs_done=done,
                    labels=[class_index[class_of(paths[start + i])] for i in batch.indices] if plan.class_names is not None else None,
                    skipped=skipped,
                    image_digests=batch.digests,
                )
                if on_progress:
                    on_progress(done, len(paths))
    finally:
        background.join()


def _assemble(writers: dict[str, RowFileWriter]) -> None:
    """Put every file not yet complete in place, and only then remove the run folders: a kill in between
    leaves each file resumable."""
    try:
        for writer in writers.values():
            if writer.complete_attrs is None:
                writer.assemble()
    except BaseException:
        for writer in writers.values():
            writer.close()
        raise
    for writer in writers.values():
        writer.cleanup()


def _open_writers(files: dict[str, tuple[Any, Any, Any]], n_inputs: int, *, resume: bool, overwrite: bool,
                  reads: Sequence[Path]) -> dict[str, RowFileWriter]:
    """A writer per file (``key -> (spec, path, companion)``). With ``--resume``, a file that is complete
    while its companion must still be computed is computed again beside it: the two always hold the same
    batches."""
    writers: dict[str, RowFileWriter] = {}
    try:
        for key, (spec, path, companion) in files.items():
            writers[key] = spec.writer(path, companion=companion, resume=resume, overwrite=overwrite, reads=reads)
        complete = [key for key, w in writers.items() if w.complete_attrs is not None]
        behind = [w.path for w in writers.values() if w.complete_attrs is None and w.n_inputs_done < n_inputs]
        if complete and behind:
            note(f"{', '.join(str(writers[k].path) for k in complete)} is complete but {', '.join(map(str, behind))} "
                 "is not: computing both")
            for key in complete:
                spec, path, companion = files[key]
                writers[key].close()
                writers[key] = spec.writer(path, companion=companion, overwrite=True, reads=reads)
    except BaseException:
        for writer in writers.values():
            writer.close()
        raise
    return writers


def _finished_run(writers: dict[str, RowFileWriter], output, metrics) -> ExtractResult | None:
    """``--resume`` of a run whose files are complete (and are this run's): its result, with nothing new.

    A kill between the removal of the two run folders leaves one file complete and the other's folder
    holding every batch: that one is assembled again."""
    complete = [w for w in writers.values() if w.complete_attrs is not None]
    if not complete:
        return None
    cache = writers["cache"]
    attrs = cache.complete_attrs or {"n_images": cache.n_images, "n_skipped": cache.n_skipped}
    _assemble(writers)  # every batch of the others is in, as _open_writers saw to
    return ExtractResult(
        path=Path(output), n_images=int(attrs["n_images"]), n_skipped=int(attrs["n_skipped"]), n_new=0, seconds=0.0,
        metrics_path=None if metrics is None else Path(metrics), already_complete=True,
    )


def _final_layer_norm(norm: torch.nn.Module) -> tuple[np.ndarray, np.ndarray, float] | None:
    """The model's final norm as (weight, bias, eps) when it is an affine LayerNorm, which turns the stored
    tokens into what users read (None otherwise: the tokens are used as stored)."""
    if isinstance(norm, torch.nn.LayerNorm) and norm.elementwise_affine:
        return norm.weight.detach().float().cpu().numpy(), norm.bias.detach().float().cpu().numpy(), norm.eps
    return None


def _stored_tokens(tokens: torch.Tensor, dtype: str) -> torch.Tensor:
    """Tokens (any shape) as stored in ``dtype``; a value float16 cannot hold is refused rather than stored as
    infinity (high-norm artifact tokens can be large)."""
    tokens = tokens.float()
    if dtype == DType.float32:
        return tokens
    largest = float(tokens.abs().amax()) if tokens.numel() else 0.0
    if not largest <= torch.finfo(torch.float16).max:
        raise AttnflowError(f"a token value ({largest:.4g}) exceeds what float16 holds ({torch.finfo(torch.float16).max:g}); "
                            "store tokens with --tokens-dtype float32")
    return tokens.half()


def _match_masks(paths: Sequence[Path], folder: str | Path) -> list[Path | None]:
    index = index_masks(folder)
    matched = [index.get(p.stem) for p in paths]
    missing = sum(m is None for m in matched)
    if missing == len(paths):
        raise AttnflowError(f"no mask in {folder} has the file stem of any image")
    if missing:
        note(f"no mask in {folder} for {missing} of {len(paths)} images: their fg is NaN")
    return matched


def _process(
    model, capture: AttentionCapture, batch: ImageBatch, plan: _Plan, autocast, spec: CacheSpec,
    writers: dict[str, RowFileWriter],
) -> "HostRows":
    """One forward pass; returns, per file, the rows it stores for this batch, on their way to the host."""
    device = plan.device
    pixels = plan.preprocessing.normalize(batch.pixels.to(device, non_blocking=True))
    with autocast:
        model.forward_features(pixels)
    captured = capture.pop()
    storage = torch.float16 if spec.dtype == DType.float16 else torch.float32
    cache_rows = {MAGNITUDE: captured.magnitude, TOKEN_NORM: captured.token_norm}
    # captured.attn is the capture's reused buffer, which the next batch overwrites while the writer may
    # still hold this one: whatever is stored from it is a copy
    if spec.store == StoreMode.full:
        cache_rows[ATTN] = captured.attn.to(storage, copy=True)
    elif spec.store == StoreMode.rows:
        cache_rows[ATTN_ROWS] = captured.attn[:, :, :, : spec.layout.num_prefix_tokens].to(storage, copy=True)
    if spec.token_dim is not None:
        # (B, S, T, D) for several blocks, (B, T, D) for one (the default, stored as every earlier cache)
        tokens = captured.layer_tokens if spec.tokens_dataset != TOKENS else captured.layer_tokens[:, 0]
        cache_rows[spec.tokens_dataset] = _stored_tokens(tokens, spec.tokens_dtype)
    if batch.fg is not None:
        cache_rows[FG] = batch.fg
    rows = {"cache": cache_rows}
    if "metrics" in writers:
        rows["metrics"] = metric_rows(
            spec.layout, captured.magnitude, attn=captured.attn, fg=None if batch.fg is None else batch.fg.to(device),
            token_norm=captured.token_norm, rollout=plan.options.rollout, artifact_rule=plan.options.artifacts.rule,
            flow_layers=plan.flow_layers,
        )
        if batch.fg is not None:
            rows["metrics"][FG] = batch.fg  # the host's copy, as the cache stores it
    return HostRows(rows)
