"""Turn an attention cache into a metrics file, and summarise a metrics file per layer.

The metric definitions live in :mod:`attnflow.metrics`; this module only moves batches of cache rows
through :func:`attnflow.metrics.batch_metrics` into a :class:`~attnflow.cache.MetricsSpec` file.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .cache import METRICS_GROUP, ROLLOUT_MAP, MetricsFile, MetricsSpec, open_cache
from .errors import AttnflowError
from .extract import resolve_device, warn_about_layout
from .metrics import FUSIONS, available_metrics, batch_metrics

# The columns of the per-layer summary, in the order a reader of "Beyond [cls]" looks for them.
SUMMARY_METRICS = (
    "cls_self", "cls_entropy_norm", "cls_top10_mass", "cls_fg_mass", "patch_to_cls", "patch_entropy_norm",
    "attn_distance", "rollout_entropy_norm", "rollout_fg_mass", "magnitude_cls", "magnitude_patch",
)


def compute_metrics(
    cache_path: str | Path,
    output: str | Path,
    *,
    fusion: str = "mean",
    discard_ratio: float = 0.0,
    batch_size: int = 16,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Compute every available metric of the cache at ``cache_path`` into the metrics file ``output``.

    Caches with ``store=rows`` give the cls-row metrics only; ``store=none`` caches hold no maps (use
    ``attnflow extract --metrics`` to compute metrics while extracting).
    """
    if fusion not in FUSIONS:
        raise AttnflowError(f"unknown fusion '{fusion}' (choose from {', '.join(FUSIONS)})")
    if not 0 <= discard_ratio < 1:
        raise AttnflowError(f"--discard-ratio must be in [0, 1), got {discard_ratio}")
    if batch_size < 1:
        raise AttnflowError(f"--batch-size must be at least 1, got {batch_size}")
    if Path(output).resolve() == Path(cache_path).resolve():
        raise AttnflowError("the metrics file must not be the cache itself")
    torch_device = resolve_device(device)
    with open_cache(cache_path) as cache:
        layout, store = cache.layout, cache.attrs["store"]
        if store == "none":
            raise AttnflowError(
                f"{cache.path} stores no attention maps (store=none); extract with --store full or rows, "
                "or compute metrics during extraction with --metrics"
            )
        full_maps = store == "full"
        has_fg = "fg" in cache
        warn_about_layout(layout, full_maps=full_maps)
        spec = MetricsSpec(
            source_attrs=cache.attrs,
            metric_levels=available_metrics(layout, full_maps=full_maps, has_fg=has_fg),
            has_rollout=full_maps,
            fusion=fusion,
            discard_ratio=discard_ratio,
            source=str(cache.path.resolve()),
            class_names=cache.class_names,
        )
        writer = spec.writer(output, resume=resume, overwrite=overwrite)
        if writer.complete_attrs is not None:  # --resume of a run that had finished, on the same cache
            writer.close()
            return writer.path
        try:
            n = len(cache)
            maps_name = "attn" if full_maps else "attn_rows"
            skipped = list(zip(_texts(cache["skipped"][:]), _texts(cache["skipped_reason"][:])))
            for start in range(writer.n_inputs_done, n, batch_size):
                stop = min(start + batch_size, n)
                # checked reads: float32 tensors on the device, rows of maps summing to 1, magnitudes finite
                maps = cache.read_rows(maps_name, start, stop, device=torch_device)
                magnitude = cache.read_rows("magnitude", start, stop, device=torch_device)
                fg = cache.read_rows("fg", start, stop, device=torch_device) if has_fg else None
                values, rollout_maps = batch_metrics(
                    layout, magnitude, fg=fg, fusion=fusion, discard_ratio=discard_ratio,
                    **({"attn": maps} if full_maps else {"attn_rows": maps}),
                )
                rows = {f"{METRICS_GROUP}/{name}": value.float().cpu().numpy() for name, value in values.items()}
                if rollout_maps is not None:
                    rows[ROLLOUT_MAP] = rollout_maps.float().cpu().numpy()
                if has_fg:
                    rows["fg"] = fg.cpu().numpy()
                writer.append(
                    rows,
                    image_ids=_texts(cache["image_ids"][start:stop]),
                    n_inputs_done=stop,
                    labels=cache["labels"][start:stop] if "labels" in cache else None,
                    skipped=skipped if start == 0 else (),
                )
                if on_progress:
                    on_progress(stop, n)
        except BaseException:
            writer.close()
            raise
        return writer.finish()


def _texts(values: Any) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _nanmean(x: np.ndarray, axis) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices (no-cls models) stay NaN, silently
        return np.nanmean(x, axis=axis)


def layer_summary(metrics: MetricsFile, names: tuple[str, ...] = SUMMARY_METRICS) -> tuple[list[dict[str, Any]], list[str]]:
    """Per layer, the mean over images (and heads) of each metric present: ``(rows, columns)``."""
    present = [name for name in names if name in metrics.metric_names]
    L = int(metrics.attrs["num_layers"])
    means = {}
    for name in present:
        data = metrics.metric(name)[()].astype(np.float64)
        means[name] = _nanmean(data.reshape(data.shape[0], L, -1), axis=(0, 2)) if len(metrics) else np.full(L, math.nan)
    rows = [{"layer": layer, **{name: float(means[name][layer]) for name in present}} for layer in range(L)]
    return rows, ["layer", *present]
