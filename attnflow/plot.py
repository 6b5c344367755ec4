"""Figures: per-layer metric curves (models coloured by family) and attention maps over images.

The numbers each figure shows are computed first (:func:`curve_data`, :func:`map_data`) and only then
drawn, so they can be checked against the metrics without reading pixels. matplotlib is an optional
dependency: ``pip install 'attnflow[plot]'``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .cache import open_cache
from .compare import Comparison, compare_files
from .errors import AttnflowError
from .families import get_family
from .images import Preprocessing, decode_image
from .metrics import REGISTRY, renormalise_over_patches, rollout
from .schema import FG

DPI = 150
PANEL_SIZE = (4.2, 3.2)  # inches per curve panel
MAP_SIZE = 2.2  # inches per map panel
FORMATS = (".png", ".svg", ".pdf")
MAP_COLORMAP = "inferno"  # perceptually uniform
MASK_COLOR = "cyan"


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend, or one clear line saying how to get it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AttnflowError("attnflow plot needs matplotlib: pip install 'attnflow[plot]'") from None
    return plt


def _check_output(output: str | Path) -> Path:
    output = Path(output)
    if output.suffix.lower() not in FORMATS:
        raise AttnflowError(f"cannot write a figure as '{output.suffix or output.name}': use {', '.join(FORMATS)}")
    if output.is_dir():
        raise AttnflowError(f"{output} is a directory; the output must be a file path")
    if not output.absolute().parent.is_dir():  # checked before the work, not found by savefig after it
        raise AttnflowError(f"cannot write {output}: no such directory {output.absolute().parent}")
    return output


# -- per-layer curves -----------------------------------------------------------------------------------


@dataclass
class Curve:
    """One model's line in one panel: x per layer, mean over images and its 95% bootstrap band."""

    label: str
    family: str
    x: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray


def curve_data(comparison: Comparison) -> tuple[dict[str, list[Curve]], str]:
    """Per metric, a curve per model from ``comparison``'s records; x is the block index, or the relative
    depth (block + 1) / L when the models' depths differ. Returns the curves and the x-axis label."""
    depths = {m.num_layers for m in comparison.models}
    relative = len(depths) > 1
    curves: dict[str, list[Curve]] = {name: [] for name in comparison.metrics}
    for model in comparison.models:
        for name in comparison.metrics:
            cells = sorted((r for r in comparison.records if r["model"] == model.label and r["metric"] == name), key=lambda r: r["layer"])
            if not cells:
                continue
            layers = np.array([r["layer"] for r in cells], dtype=float)
            curves[name].append(Curve(
                label=model.label, family=model.family,
                x=(layers + 1) / model.num_layers if relative else layers,
                mean=np.array([r["mean"] for r in cells]), low=np.array([r["ci_low"] for r in cells]),
                high=np.array([r["ci_high"] for r in cells]),
            ))
    return curves, "relative depth (block / depth)" if relative else "block"


def plot_curves(
    paths: Sequence[str | Path],
    output: str | Path,
    *,
    metrics: Sequence[str] | None = None,
    heads: str = "mean",
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> tuple[Path, dict[str, list[Curve]], list[str]]:
    """Draw one panel per metric (default: ``attnflow compare``'s default set) with a line per model into
    ``output``; returns the path, the curves drawn and the notes about the inputs."""
    output = _check_output(output)
    plt = pyplot()
    comparison = compare_files(paths, metrics=metrics, heads=heads, n_bootstrap=n_bootstrap, seed=seed)
    curves, xlabel = curve_data(comparison)
    panels = [name for name in comparison.metrics if curves[name]]
    if not panels:
        raise AttnflowError("none of the files has any of the metrics to plot")
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(PANEL_SIZE[0] * ncols, PANEL_SIZE[1] * nrows + 0.6), dpi=DPI, squeeze=False)
    colours = _family_colours(comparison)
    for ax, name in zip(axes.flat, panels):
        for curve in curves[name]:
            colour = colours[curve.label]
            ax.plot(curve.x, curve.mean, linestyle=get_family(curve.family).linestyle, marker="o", markersize=3, color=colour,
                    label=f"{curve.label} ({curve.family})")
            ax.fill_between(curve.x, curve.low, curve.high, color=colour, alpha=0.2, linewidth=0)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(REGISTRY[name].y_label, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), frameon=False)
    fig.suptitle(f"per-layer attention metrics (mean over images, heads: {heads}; bands: 95% bootstrap CI)")
    fig.tight_layout(rect=(0, 0.6 / (PANEL_SIZE[1] * nrows + 0.6), 1, 1))
    fig.savefig(output, dpi=DPI)
    plt.close(fig)
    return output, curves, comparison.notes


def _family_colours(comparison: Comparison) -> dict[str, Any]:
    import matplotlib

    colours = {}
    for family in {m.family for m in comparison.models}:
        members = [m for m in comparison.models if m.family == family]
        cmap = matplotlib.colormaps[get_family(family).colormap]
        for i, m in enumerate(members):
            colours[m.label] = cmap(0.55 + 0.4 * i / max(1, len(members) - 1) if len(members) > 1 else 0.75)
    return colours


# -- attention maps over an image -----------------------------------------------------------------------


@dataclass
class MapData:
    """What one row of the maps figure shows for one model and image; maps are (grid_h, grid_w)."""

    label: str
    family: str
    image_id: str
    image: np.ndarray  # (H, W) or (H, W, 3) uint8, as the model saw it (resized and cropped)
    layer: int
    readout: str  # "cls" or "mean of patch rows"
    attention: np.ndarray | None  # head-mean readout attention over patches at ``layer``, sums to 1
    rollout: np.ndarray | None  # rollout readout after ``layer`` + 1 blocks, sums to 1
    heads: np.ndarray | None  # (H, grid_h, grid_w) per-head readout attention
    fg: np.ndarray | None  # object fraction per patch
    notes: list[str]


def find_image(image_ids: Sequence[str], image: str | int) -> int:
    """An image by index, by its path as stored, by file name or by file stem."""
    if isinstance(image, int) or (isinstance(image, str) and image.lstrip("-").isdigit()):
        index = int(image)
        if not -len(image_ids) <= index < len(image_ids):
            raise AttnflowError(f"image index {index} is out of range (the cache holds {len(image_ids)} images)")
        return index % len(image_ids)
    for key in (lambda p: p, lambda p: Path(p).name, lambda p: Path(p).stem):
        hits = [i for i, p in enumerate(image_ids) if key(p) == image]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise AttnflowError(f"'{image}' matches {len(hits)} images ({', '.join(image_ids[i] for i in hits[:3])}); give the path")
    raise AttnflowError(f"no image '{image}' in the cache (give an index, a path, a file name or a stem)")


def _readout(rows: np.ndarray, layout) -> np.ndarray:
    """(..., T) attention rows -> (..., P) float64 restricted to patches and renormalised."""
    return renormalise_over_patches(torch.from_numpy(np.asarray(rows)), layout).numpy()


def map_data(cache_path: str | Path, image: str | int, *, layer: int = -1, heads: bool = False) -> MapData:
    """The maps of one image from one cache: readout attention at ``layer``, its rollout, and per head."""
    with open_cache(cache_path) as cache:
        layout, a = cache.layout, cache.attrs
        ids = cache.image_ids
        index = find_image(ids, image)
        L = int(a["num_layers"])
        if not -L <= layer < L:
            raise AttnflowError(f"--layer {layer} is out of range for {a['label']} ({L} blocks)")
        layer %= L
        notes: list[str] = []
        attention = head_maps = rollout_map = None
        readout = "cls" if layout.has_cls else "mean of patch rows"
        if cache.store == "full":
            attn = cache.attention(index, index + 1)[0].astype(np.float64)  # (L, H, T, T)
            rows = attn[layer, :, 0, :] if layout.has_cls else None
            per_head = _readout(rows, layout) if rows is not None else _readout(attn[layer, :, layout.num_prefix_tokens:, :], layout).mean(-2)
            rollout_map = rollout(torch.from_numpy(attn[None]), layout)[0, layer].numpy()
        elif cache.store == "rows" and layout.has_cls:
            per_head = _readout(cache.prefix_rows(index, index + 1, layer)[0, :, 0, :].astype(np.float64), layout)
            notes.append(f"{a['label']}: the cache keeps only cls/register rows, so there is no rollout map")
        else:
            per_head = None
            notes.append(f"{a['label']}: the cache holds no maps to draw (store={a['store']})")
        grid = tuple(layout.grid_size)
        if per_head is not None:
            attention = per_head.mean(0).reshape(grid)
            head_maps = per_head.reshape(-1, *grid) if heads else None
        if rollout_map is not None:
            rollout_map = rollout_map.reshape(grid)
        fg = cache.fg(index, index + 1)[0].reshape(grid) if FG in cache else None
        path = _image_path(ids[index], a.get("working_dir", ""))
        pre = cache.preprocessing
        preprocessing = Preprocessing(
            input_size=tuple(pre["input_size"]), interpolation=pre["interpolation"], mean=tuple(pre["mean"]),
            std=tuple(pre["std"]), crop_pct=pre["crop_pct"], crop_mode=pre["crop_mode"],
        )
        try:
            pixels = preprocessing.transform(normalized=False)(decode_image(path, preprocessing.input_size[0]))
        except Exception as e:  # the image moved or broke since extraction: say which
            raise AttnflowError(f"cannot read image {path} for display: {e}") from None
        shown = pixels.permute(1, 2, 0).numpy()
        return MapData(
            label=a["label"], family=a["family"], image_id=ids[index], image=shown[..., 0] if shown.shape[-1] == 1 else shown,
            layer=layer, readout=readout, attention=attention, rollout=rollout_map, heads=head_maps, fg=fg, notes=notes,
        )


def _image_path(image_id: str, working_dir: str) -> Path:
    path = Path(image_id)
    if not path.is_absolute() and not path.exists() and working_dir:
        return Path(working_dir) / path
    return path


def plot_maps(
    caches: Sequence[str | Path], image: str | int, output: str | Path, *, layer: int = -1, heads: bool = False
) -> tuple[Path, list[MapData], list[str]]:
    """A row per cache: the image, the head-mean readout attention of ``layer``, the rollout map and, with
    ``heads``, each head's map, upsampled onto the image; the object mask outlined when the cache has one."""
    output = _check_output(output)
    plt = pyplot()
    rows = [map_data(c, image, layer=layer, heads=heads) for c in caches]
    ncols = 3 + (max(len(r.heads) for r in rows if r.heads is not None) if heads and any(r.heads is not None for r in rows) else 0)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(MAP_SIZE * ncols, MAP_SIZE * len(rows) + 0.5), dpi=DPI, squeeze=False)
    for ax_row, row in zip(axes, rows):
        panels = [("image", None), (f"{row.readout} attention, block {row.layer}", row.attention), (f"rollout to block {row.layer}", row.rollout)]
        if row.heads is not None:
            panels += [(f"head {h}", m) for h, m in enumerate(row.heads)]
        for i, (ax, (title, values)) in enumerate(zip(ax_row, panels)):
            _draw_map(ax, row, values, placeholder=i > 0)
            ax.set_title(title, fontsize=8)
        for ax in ax_row[len(panels):]:
            ax.set_visible(False)
        ax_row[0].set_ylabel(f"{row.label}\n({row.family})", fontsize=8)
    fig.suptitle(f"{Path(rows[0].image_id).name}: attention over patches (brighter = more)", fontsize=9)
    fig.tight_layout()
    fig.savefig(output, dpi=DPI)
    plt.close(fig)
    return output, rows, [n for r in rows for n in r.notes]


def _draw_map(ax, row: MapData, values: np.ndarray | None, placeholder: bool) -> None:
    height, width = row.image.shape[:2]
    ax.imshow(row.image, cmap="gray" if row.image.ndim == 2 else None, extent=(0, width, height, 0))
    if values is not None:
        ax.imshow(values, cmap=MAP_COLORMAP, alpha=0.6, extent=(0, width, height, 0), interpolation="bilinear")
    elif placeholder:
        ax.text(0.5, 0.5, "not in cache", transform=ax.transAxes, ha="center", va="center", color="white", fontsize=8)
    if row.fg is not None and row.fg.min() < 0.5 < row.fg.max():
        gh, gw = row.fg.shape
        xs = (np.arange(gw) + 0.5) * width / gw
        ys = (np.arange(gh) + 0.5) * height / gh
        ax.contour(xs, ys, row.fg, levels=[0.5], colors=MASK_COLOR, linewidths=0.8)
    ax.set_xticks([])
    ax.set_yticks([])
