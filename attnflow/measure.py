"""Turn an attention cache into a metrics file, and summarise a metrics file per layer.

The metric definitions live in :mod:`attnflow.metrics`; this module only moves batches of cache rows
through :func:`attnflow.metrics.batch_metrics` into a :class:`~attnflow.store.write.MetricsSpec` file.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .store.write import MetricsSpec

from .errors import AttnflowError
from .notes import note
from .store.names import FG, FLOW_MAP, LABELS, ROLLOUT_MAP, metric_dataset, StoreMode
from .store.read import MetricsFile, open_cache
from .flow import attention_flow
from .layout import TokenLayout
from .options import MetricsOptions, RolloutOptions, resolve_device
from .metrics import REGISTRY, ArtifactRule, available_metrics, batch_metrics

__all__ = ["SUMMARY_METRICS", "compute_metrics", "metric_rows", "warn_about_layout", "layer_summary"]

# The columns of the per-layer summary: the metrics the registry marks ``summary``, in its order.
SUMMARY_METRICS = REGISTRY.summary


def compute_metrics(
    cache_path: str | Path,
    output: str | Path,
    options: MetricsOptions | None = None,
    *,
    on_progress: Callable[[int, int], None] | None = None,
    **option_values: Any,
) -> Path:
    """Compute every available metric of the cache at ``cache_path`` into the metrics file ``output``.

    ``options`` (:class:`~attnflow.options.MetricsOptions`: rollout fusion and discard ratio, batch size,
    device, resume/overwrite), or single options as keywords (``batch_size=8``). Caches with ``store=rows``
    give the cls-row metrics only; ``store=none`` caches hold no maps (use ``attnflow extract --metrics``
    to compute metrics while extracting).
    """
    options = (options or MetricsOptions()).replace(**option_values)
    fusion, discard_ratio = options.rollout.fusion, options.rollout.discard_ratio
    batch_size, device = options.run.batch_size, options.run.device
    if Path(output).resolve() == Path(cache_path).resolve():
        raise AttnflowError("the metrics file must not be the cache itself")
    torch_device = resolve_device(device)
    with open_cache(cache_path) as cache:
        layout, store = cache.layout, cache.store
        if store == StoreMode.none:
            raise AttnflowError(
                f"{cache.path} stores no attention maps (store=none); extract with --store full or rows, "
                "or compute metrics during extraction with --metrics"
            )
        full_maps = store == StoreMode.full
        has_fg = FG in cache
        has_token_norm = cache.has_token_norm
        if options.flow.flow and not full_maps:
            raise AttnflowError(f"--flow needs every query's attention, but {cache.path} stores only the cls/register "
                                "rows (store=rows); extract with --store full")
        flow_layers = options.flow.layers(int(cache.attrs["num_layers"]))  # () without --flow
        warn_about_layout(layout, full_maps=full_maps)
        if not has_token_norm:
            note(f"{cache.path} holds no block output token norms (written by attnflow 0.1): the artifact metrics "
                 "are left out; re-extract to get them")
        spec = MetricsSpec(
            source_attrs=cache.attrs,
            metric_levels=available_metrics(layout, full_maps=full_maps, has_fg=has_fg, has_token_norm=has_token_norm,
                                            has_flow=bool(flow_layers)),
            has_rollout=full_maps,
            fusion=fusion,
            discard_ratio=discard_ratio,
            source=str(cache.path.resolve()),
            class_names=cache.class_names,
            artifact_rule=options.artifacts.rule,
            flow_layers=flow_layers,
            image_digests=cache.image_digests is not None,
        )
        writer = spec.writer(output, resume=options.run.resume, overwrite=options.run.overwrite, reads=[cache.path])
        if writer.complete_attrs is not None:  # --resume of a run that had finished, on the same cache
            writer.close()
            return writer.path
        try:
            n = len(cache)
            read_maps = cache.attention if full_maps else cache.prefix_rows
            image_ids, skipped, digests = cache.image_ids, cache.skipped, cache.image_digests
            for start in range(writer.n_inputs_done, n, batch_size):
                stop = min(start + batch_size, n)
                # checked reads: float32 tensors on the device, rows of maps summing to 1, magnitudes finite
                maps = read_maps(start, stop, device=torch_device)
                magnitude = cache.magnitude(start, stop, device=torch_device)
                fg = cache.fg(start, stop, device=torch_device) if has_fg else None
                token_norm = cache.token_norm(start, stop, device=torch_device) if has_token_norm else None
                rows = {name: value.cpu().numpy() for name, value in metric_rows(
                    layout, magnitude, fg=fg, token_norm=token_norm, rollout=options.rollout,
                    artifact_rule=options.artifacts.rule, flow_layers=flow_layers,
                    **({"attn": maps} if full_maps else {"attn_rows": maps}),
                ).items()}
                writer.append(
                    rows,
                    image_ids=image_ids[start:stop],
                    n_inputs_done=stop,
                    labels=cache.labels(start, stop) if LABELS in cache else None,
                    skipped=skipped if start == 0 else (),
                    image_digests=None if digests is None else digests[start:stop],
                )
                if on_progress:
                    on_progress(stop, n)
        except BaseException:
            writer.close()
            raise
        return writer.finish()


def metric_rows(
    layout: TokenLayout,
    magnitude: torch.Tensor,
    *,
    attn: torch.Tensor | None = None,
    attn_rows: torch.Tensor | None = None,
    fg: torch.Tensor | None = None,
    token_norm: torch.Tensor | None = None,
    rollout: RolloutOptions = RolloutOptions(),
    artifact_rule: ArtifactRule = ArtifactRule(),
    flow_layers: tuple[int, ...] = (),
) -> dict[str, torch.Tensor]:
    """One batch's rows of a metrics file, as ``attnflow metrics`` and ``attnflow extract --metrics`` both
    write them: every available metric (:func:`attnflow.metrics.batch_metrics`), the rollout maps (full maps
    only), the attention flow maps after ``flow_layers`` (full maps only; a max-flow per patch, on the CPU)
    and ``fg``, keyed by dataset name: float32 copies on the device of the inputs (flow on the CPU), fg as given.

    Shapes as in :func:`~attnflow.metrics.batch_metrics`: attn (B, L, H, T, T) or attn_rows (B, L, H, p, T),
    magnitude and token_norm (B, L, T), fg (B, P)."""
    fusion, discard_ratio = rollout.fusion, rollout.discard_ratio
    flow_maps = attention_flow(attn, layout, flow_layers, fusion, discard_ratio) if flow_layers else None
    values, rollout_maps = batch_metrics(
        layout, magnitude, attn=attn, attn_rows=attn_rows, fg=fg, fusion=fusion, discard_ratio=discard_ratio,
        token_norm=token_norm, artifact_rule=artifact_rule, flow_maps=flow_maps, flow_layers=flow_layers,
    )
    # copies: a value may share memory with the capture's buffers, which the next batch overwrites
    rows = {metric_dataset(name): value.to(torch.float32, copy=True) for name, value in values.items()}
    if rollout_maps is not None:
        rows[ROLLOUT_MAP] = rollout_maps.float()
    if flow_maps is not None:
        rows[FLOW_MAP] = flow_maps.float()
    if fg is not None:
        rows[FG] = fg
    return rows


def warn_about_layout(layout: TokenLayout, *, full_maps: bool) -> None:
    """Say once what a layout or a store mode leaves out of a metrics file."""
    if not layout.has_cls:
        note("the model has no cls token: every cls_* metric is NaN")
    if not full_maps:
        note("the cache keeps only cls/register rows (store=rows): patch metrics and rollout need full maps and are "
             "left out")


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
        data = metrics.values(name).astype(np.float64)
        means[name] = _nanmean(data.reshape(data.shape[0], L, -1), axis=(0, 2)) if len(metrics) else np.full(L, math.nan)
    rows = [{"layer": layer, **{name: float(means[name][layer]) for name in present}} for layer in range(L)]
    return rows, ["layer", *present]
