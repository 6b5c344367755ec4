"""Figures: per-layer metric curves (models coloured by family) and attention maps over images.

The numbers each figure shows are computed first (:func:`curve_data`, :func:`map_data`) and only then
drawn, so they can be checked against the metrics without reading pixels. matplotlib is an optional
dependency: ``pip install 'attnflow[plot]'``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from .compare import Comparison, describe, load_models, plan_layers
from .errors import AttnflowError, OptionError
from .notes import collect, note
from .families import get_family
from .flow import attention_flow
from .images import Preprocessing, content_digest, decode_image, image_id as stored_id, path_of_id, read_image_file
from .metrics import REGISTRY, renormalise_over_patches, rollout
from .output import atomic_output, check_output_path
from .perturb import ORDERS, PerturbSummary, summarize as summarize_perturbation
from .registry import Y_SHARING
from .store.names import FG, StoreMode
from .store.read import open_cache

__all__ = [
    "DPI", "PANEL_SIZE", "MAP_SIZE", "FORMATS", "MAP_COLORMAP", "MAP_SCALES", "LOG_SHARE_LIMITS", "SHARE_LABEL",
    "COLORBAR_WIDTH", "MASK_COLOR", "PAPER_RC", "REFERENCE_STYLE", "LABEL_POINTS", "pyplot", "save_figure",
    "wrap_text", "Curve", "curve_data", "CurvesFigure", "plot_curves", "curve_comparison", "reference_values", "share_y_by_unit",
    "MapData", "MapPanel", "MapScale", "uniform_share", "shared_scale", "find_image", "map_data",
    "probe_head_panels", "display_image", "MapsFigure", "plot_maps", "plot_perturbation",
]

DPI = 150
PANEL_SIZE = (4.2, 3.2)  # inches per curve panel
MAP_SIZE = 2.2  # inches per map panel
FORMATS = (".png", ".svg", ".pdf")
MAP_COLORMAP = "inferno"  # perceptually uniform
# Maps are drawn in units of the uniform share: a patch's attention x P, so 1 is what every patch gets from a
# uniform map, whatever the grid; one colour scale serves every panel of a figure, so a flat map looks flat.
MAP_SCALES = ("log", "linear")
# The log scale's limits: fixed rather than fitted to the figure, so that two figures read alike; shares
# outside are drawn in the end colours (the colour bar's arrows).
LOG_SHARE_LIMITS = (1 / 8, 16.0)
SHARE_LABEL = "attention / uniform share (value x P; 1 = uniform)"
COLORBAR_WIDTH = 0.95  # inches at the right of the maps figure: the bar, its ticks and its label
MASK_COLOR = "cyan"
# Paper-ready files: TrueType (Type 42) fonts in PDF and PostScript, which venues accept where they reject
# Type 3, and SVG text kept as <text> elements, editable in a vector editor, instead of drawn as paths.
PAPER_RC = {"pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "none"}
REFERENCE_STYLE = dict(color="0.35", linestyle=(0, (1, 2)), linewidth=1.0, zorder=1)
LABEL_POINTS = 8  # font size of axis labels and panel titles


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend, or one clear line saying how to get it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AttnflowError("attnflow plot needs matplotlib: pip install 'attnflow[plot]'") from None
    return plt


def _check_output(output: str | Path, reads: Sequence[str | Path]) -> Path:
    output = Path(output)
    if output.suffix.lower() not in FORMATS:
        raise OptionError("output", f"cannot write a figure as '{output.suffix or output.name}': use {', '.join(FORMATS)}")
    return check_output_path(output, reads=reads)  # before the work, not found by savefig after it


def save_figure(fig, output: Path, reads: Sequence[str | Path] = ()) -> None:
    """Write ``fig`` whole (never over one of ``reads``) with :data:`PAPER_RC` (fonts embedded as TrueType,
    SVG text as text) and close it."""
    import matplotlib

    with matplotlib.rc_context(PAPER_RC), atomic_output(output, reads=reads) as tmp:
        fig.savefig(tmp, dpi=DPI, format=output.suffix.lower()[1:])
    pyplot().close(fig)


def wrap_text(text: str, inches: float, points: float = LABEL_POINTS) -> str:
    """``text`` broken into lines that fit ``inches`` at ``points`` (an average glyph is about half an em wide),
    so that a long label or title stays inside its panel instead of running into its neighbour."""
    import textwrap

    width = max(12, int(inches * 72 / (0.55 * points)))
    return "\n".join(textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)) or text


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


class CurvesFigure(NamedTuple):
    """What :func:`plot_curves` returns (a tuple: ``path, curves, notes = plot_curves(...)``)."""

    path: Path
    curves: dict[str, list[Curve]]
    notes: list[str]


class MapsFigure(NamedTuple):
    """What :func:`plot_maps` returns (a tuple: ``path, rows, notes = plot_maps(...)``)."""

    path: Path
    rows: list[MapData]
    notes: list[str]


def plot_curves(
    paths: Sequence[str | Path],
    output: str | Path,
    *,
    metrics: Sequence[str] | None = None,
    heads: str = "mean",
    n_bootstrap: int = 2000,
    seed: int = 0,
    share_y: str = "unit",
) -> CurvesFigure:
    """Draw one panel per metric (default: ``attnflow compare``'s default set) with a line per model into
    ``output``; returns the path, the curves drawn and the notes about the inputs.

    ``share_y="unit"``: panels whose metrics share a unit share one y range; ``"none"``: each panel its own.
    Where a metric declares what uniform attention scores (:attr:`~attnflow.registry.Metric.uniform`), a
    dotted reference line marks it (per model where it depends on the images, as ``fg_frac`` does)."""
    if share_y not in Y_SHARING:
        raise OptionError("share_y", f"choose from {', '.join(Y_SHARING)}, not '{share_y}'")
    output = _check_output(output, paths)
    plt = pyplot()
    comparison = curve_comparison(paths, metrics=metrics, heads=heads, n_bootstrap=n_bootstrap, seed=seed)
    curves, xlabel = curve_data(comparison)
    panels = [name for name in comparison.metrics if curves[name]]
    if not panels:
        raise AttnflowError("none of the files has any of the metrics to plot")
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(PANEL_SIZE[0] * ncols, PANEL_SIZE[1] * nrows + 0.6), dpi=DPI, squeeze=False)
    colours = _family_colours(comparison)
    references = {name: reference_values(comparison, name) for name in panels}
    for ax, name in zip(axes.flat, panels):
        for curve in curves[name]:
            colour = colours[curve.label]
            ax.plot(curve.x, curve.mean, linestyle=get_family(curve.family).linestyle, marker="o", markersize=3, color=colour,
                    label=f"{curve.label} ({curve.family})")
            ax.fill_between(curve.x, curve.low, curve.high, color=colour, alpha=0.2, linewidth=0)
        for value in references[name]:
            ax.axhline(value, label="uniform attention", **REFERENCE_STYLE)
        ax.set_title(name, fontsize=LABEL_POINTS + 1)
        ax.set_xlabel(xlabel, fontsize=LABEL_POINTS)
        # the label runs along the panel's height: wrapped to it, it cannot reach the title
        ax.set_ylabel(wrap_text(REGISTRY[name].y_label, 0.8 * PANEL_SIZE[1]), fontsize=LABEL_POINTS)
        ax.tick_params(labelsize=LABEL_POINTS - 1)
        ax.grid(alpha=0.3)
    if share_y == "unit":
        share_y_by_unit(list(zip(axes.flat, panels)))
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    legend = {}
    for ax in list(axes.flat)[:len(panels)]:  # every model once, and the reference line once if any panel has one
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=min(4, len(legend)), frameon=False,
               fontsize=LABEL_POINTS)
    fig.suptitle(wrap_text(f"per-layer attention metrics (mean over images, heads: {heads}; bands: 95% bootstrap CI)",
                           PANEL_SIZE[0] * ncols, 12))
    legend_rows = math.ceil(len(legend) / min(4, len(legend)))
    fig.tight_layout(rect=(0, (0.25 + 0.2 * legend_rows) / (PANEL_SIZE[1] * nrows + 0.6), 1, 1))
    save_figure(fig, output, paths)
    return CurvesFigure(output, curves, comparison.notes)


def curve_comparison(paths: Sequence[str | Path], *, metrics: Sequence[str] | None, heads: str, n_bootstrap: int,
                     seed: int) -> Comparison:
    """The per-layer records the curves draw, with the notes about the inputs; not ``compare``'s group summary,
    whose notes speak of options (``--groups``, ``--depth``) that ``plot curves`` does not have: curves align
    models of different depths by themselves (:func:`curve_data`)."""
    metrics = list(dict.fromkeys(metrics)) if metrics else metrics
    with collect() as notes:
        models, names = load_models(paths, metrics=metrics, heads=heads)
    with collect():  # its note on depths is compare's, see above
        rows = plan_layers(models, "all", "absolute")
    records = describe(models, names, rows, n_bootstrap=n_bootstrap, seed=seed)
    return Comparison(models, names, rows, records, [], notes, heads)


def reference_values(comparison: Comparison, name: str) -> list[float]:
    """Where metric ``name``'s reference lines go: its declared uniform value, or the mean of the image metric
    it names over each model's images (distinct values only: models of the same images draw one line)."""
    uniform = REGISTRY[name].uniform
    if uniform is None:
        return []
    if not isinstance(uniform, str):
        return [float(uniform)]
    from .store.read import open_metrics

    values = []
    for model in comparison.models:
        with open_metrics(model.path) as metrics:
            if uniform in metrics.metric_names:
                values.append(float(np.nanmean(metrics.values(uniform))))
    return sorted({round(v, 9) for v in values if math.isfinite(v)})


def share_y_by_unit(panels: Sequence[tuple[Any, str]]) -> None:
    """Give the panels whose metrics share a unit one y range: the union of their own."""
    by_unit: dict[str, list[Any]] = {}
    for ax, name in panels:
        by_unit.setdefault(REGISTRY[name].unit, []).append(ax)
    for group in by_unit.values():
        low = min(ax.get_ylim()[0] for ax in group)
        high = max(ax.get_ylim()[1] for ax in group)
        for ax in group:
            ax.set_ylim(low, high)


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
    """What one row of the maps figure shows for one model and image; maps are (grid_h, grid_w) and sum to 1,
    ``panels`` hold them as drawn, in units of the uniform share."""

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
    flow: np.ndarray | None = None  # attention flow (attnflow.flow) read out after ``layer``, sums to 1; with ``flow``
    panels: list["MapPanel"] = field(default_factory=list)  # the map panels of the row, in drawing order
    scale: "MapScale | None" = None  # the figure's shared colour scale, set by plot_maps (one object per figure)
    image_path: Path | None = None  # the image file drawn


@dataclass
class MapPanel:
    """One map panel: its title and the map in units of the uniform share."""

    title: str
    share: np.ndarray | None  # (grid_h, grid_w) map x P (1 = uniform share; mean 1); None: not in the cache


@dataclass(frozen=True)
class MapScale:
    """The colour scale every map panel of one figure is drawn on, in units of the uniform share."""

    kind: str  # "log" or "linear"
    vmin: float
    vmax: float
    label: str = SHARE_LABEL

    def norm(self):
        """The matplotlib normalisation of this scale."""
        from matplotlib.colors import LogNorm, Normalize

        return LogNorm(self.vmin, self.vmax) if self.kind == "log" else Normalize(self.vmin, self.vmax)


def uniform_share(attention: np.ndarray | None) -> np.ndarray | None:
    """(..., grid_h, grid_w) maps that each sum to 1 -> the same in units of the uniform share (x P)."""
    return None if attention is None else attention * (attention.shape[-2] * attention.shape[-1])


def _check_scale(kind: str) -> None:
    if kind not in MAP_SCALES:
        raise OptionError("scale", f"choose from {', '.join(MAP_SCALES)}, not '{kind}'")


def shared_scale(rows: Sequence[MapData], kind: str = "log") -> MapScale:
    """The one colour scale for all of ``rows``' panels: ``log`` from 1/8 to 16 times the uniform share
    (fixed); ``linear`` from 0 to the largest share any panel holds (at least 1, the uniform level)."""
    _check_scale(kind)
    if kind == "log":
        return MapScale("log", *LOG_SHARE_LIMITS)
    peaks = [float(np.max(panel.share)) for row in rows for panel in row.panels if panel.share is not None]
    return MapScale("linear", 0.0, max([1.0, *peaks]))


def find_image(image_ids: Sequence[str], image: str | int) -> int:
    """An image by index, by its path as stored, by file name or by file stem; a number that is also an
    image's name or stem is refused as ambiguous. A name that is not UTF-8 matches given as the file system
    passes it or as stored (:func:`attnflow.images.image_id`)."""
    if isinstance(image, str):
        image = stored_id(image)
    if isinstance(image, int) or (isinstance(image, str) and image.lstrip("-").isdigit()):
        index = int(image)
        in_range = -len(image_ids) <= index < len(image_ids)
        named = [p for p in image_ids if str(image) in (p, Path(p).name, Path(p).stem)]
        if named and not (in_range and named == [image_ids[index]]):
            at = f" (at index {index}: {image_ids[index]})" if in_range else ""
            raise AttnflowError(f"--image {image} is both an index{at} and the name of {named[0]}: give the path as stored")
        if not in_range:
            raise AttnflowError(f"image index {index} is out of range (the cache holds {len(image_ids)} images)")
        return index % len(image_ids)
    for key in (lambda p: p, lambda p: Path(p).name, lambda p: Path(p).stem):
        hits = [i for i, p in enumerate(image_ids) if key(p) == image]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise AttnflowError(f"'{image}' matches {len(hits)} images ({', '.join(image_ids[i] for i in hits[:3])}); give the path")
    raise AttnflowError(f"no image '{image}' in the cache (give an index, a path, a file name or a stem)")


def _index_of_id(image_ids: Sequence[str], image_id: str, path: Path) -> int:
    hits = [i for i, p in enumerate(image_ids) if p == image_id]
    if not hits:
        raise AttnflowError(f"{path} does not hold image {image_id} (the models saw different images); "
                            "draw caches of the same images")
    return hits[0]


def _readout(rows: np.ndarray, layout) -> np.ndarray:
    """(..., T) attention rows -> (..., P) float64 restricted to patches and renormalised."""
    return renormalise_over_patches(torch.from_numpy(np.asarray(rows)), layout).numpy()


def map_data(cache_path: str | Path, image: str | int, *, layer: int = -1, heads: bool = False, flow: bool = False,
             heads_dir: str | Path | None = None, ep_queries_each: bool = False, by_id: bool = False) -> MapData:
    """The maps of one image from one cache: readout attention at ``layer``, its rollout, with ``flow`` its
    exact attention flow (computed here from the full maps, mean head fusion as for the rollout), with
    ``heads_dir`` the attention of the probe heads saved there for this model (:func:`probe_head_panels`),
    and per head. ``image`` as :func:`find_image` takes it, or with ``by_id`` the image's stored id exactly."""
    with open_cache(cache_path) as cache, collect() as notes:
        layout, a = cache.layout, cache.attrs
        ids = cache.image_ids
        index = _index_of_id(ids, str(image), cache.path) if by_id else find_image(ids, image)
        L = int(a["num_layers"])
        if not -L <= layer < L:
            raise AttnflowError(f"--layer {layer} is out of range for {a['label']} ({L} blocks)")
        layer %= L
        attention = head_maps = rollout_map = flow_map = None
        readout = "cls" if layout.has_cls else "mean of patch rows"
        if cache.store == StoreMode.full:
            attn = cache.attention(index, index + 1)[0].astype(np.float64)  # (L, H, T, T)
            rows = attn[layer, :, 0, :] if layout.has_cls else None
            per_head = _readout(rows, layout) if rows is not None else _readout(attn[layer, :, layout.num_prefix_tokens:, :], layout).mean(-2)
            rollout_map = rollout(torch.from_numpy(attn[None]), layout)[0, layer].numpy()
            if flow:
                flow_map = attention_flow(torch.from_numpy(attn[None]), layout, (layer,))[0, 0].numpy().reshape(layout.grid_size)
        elif cache.store == StoreMode.rows and layout.has_cls:
            per_head = _readout(cache.prefix_rows(index, index + 1, layer)[0, :, 0, :].astype(np.float64), layout)
            note(f"{a['label']}: the cache keeps only cls/register rows, so there is no rollout map")
        else:
            per_head = None
            note(f"{a['label']}: the cache holds no maps to draw (store={a['store']})")
        grid = tuple(layout.grid_size)
        if per_head is not None:
            attention = per_head.mean(0).reshape(grid)
            head_maps = per_head.reshape(-1, *grid) if heads else None
        if rollout_map is not None:
            rollout_map = rollout_map.reshape(grid)
        panels = [MapPanel(f"{readout} attention, block {layer}", uniform_share(attention)),
                  MapPanel(f"rollout to block {layer}", uniform_share(rollout_map))]
        if flow:
            panels.append(MapPanel(f"flow to block {layer}", uniform_share(flow_map)))
            if flow_map is None and per_head is not None:
                note(f"{a['label']}: the cache keeps only cls/register rows, so there is no flow map")
        if heads_dir is not None:
            panels += probe_head_panels(cache, index, heads_dir, each=ep_queries_each)
        if head_maps is not None:
            panels += [MapPanel(f"head {h}", share) for h, share in enumerate(uniform_share(head_maps))]
        fg = cache.fg(index, index + 1)[0].reshape(grid) if FG in cache else None
        path = _image_path(ids[index], a.get("working_dir", ""))
        return MapData(
            label=a["label"], family=a["family"], image_id=ids[index], image_path=path, image=display_image(cache, ids[index]),
            layer=layer, readout=readout, attention=attention, rollout=rollout_map, heads=head_maps, fg=fg, notes=notes,
            flow=flow_map, panels=panels,
        )


def probe_head_panels(cache, index: int, heads_dir: str | Path, *, each: bool = False) -> list[MapPanel]:
    """The attention of the probe heads in ``heads_dir`` (``attnflow probe --save-heads``) trained on this
    cache's model, over image ``index``: computed from the cache's tokens of the block each head was trained
    on, with the final norm as ``probe`` applies it, through the head's ``attention`` in float64. abmilp: its
    weights over the patches; ep: the mean of its queries' maps (``each``: a panel per query). An ep head that
    also attends to cls is shown over the patches, renormalised (the share it gives cls is noted). Each map
    is (grid_h, grid_w) in uniform shares."""
    from .probe import ProbeSet, load_head, pool_tokens

    directory = Path(heads_dir)
    if not directory.is_dir():
        raise AttnflowError(f"--heads-dir {directory}: no such directory")
    layout, a = cache.layout, cache.attrs
    loaded = [(path, *load_head(path)) for path in sorted(directory.glob("*.pt"))]
    same_model = [(path, head, c) for path, head, c in loaded
                  if (c["model"], c["checkpoint_sha256"]) == (str(a.get("model")), str(a.get("checkpoint_sha256")))]
    width = cache.tokens(index, index + 1, normalised=False).shape[-1]  # one line when the cache has no tokens
    fitting = [(path, head, c) for path, head, c in same_model
               if c["dim"] == width and c["num_prefix_tokens"] == layout.num_prefix_tokens and tuple(c["grid_size"]) == tuple(layout.grid_size)]
    if not fitting:
        held = ", ".join(f"{c['label']} ({c['dim']}-wide tokens)" for _, _, c in loaded) or "none"
        raise AttnflowError(f"{directory} holds no probe heads for {a['label']} ({a.get('model')}, {width}-wide tokens, "
                            f"{'x'.join(map(str, layout.grid_size))} patches); it holds: {held}")
    grid, p = tuple(layout.grid_size), layout.num_prefix_tokens
    panels = []
    for path, head, config in fitting:
        block = cache.token_layer(config["block"])  # one line when the cache lacks that block's tokens
        tokens = torch.from_numpy(cache.tokens(index, index + 1, layer=block, normalised=cache.has_final_norm)).double()
        seen = pool_tokens(ProbeSet(tokens, torch.zeros(1, dtype=torch.long), layout), config["with_cls"])
        with torch.no_grad():
            weights = head.double().attention(seen).reshape(-1, seen.shape[1]).numpy()  # (1 or M, N)
        if config["with_cls"]:
            note(f"{a['label']}: the {config['pool']} head gives the cls token "
                 f"{weights[:, 0].mean():.1%} of its attention; its map is renormalised over the patches")
            weights = weights[:, 1:] / weights[:, 1:].sum(-1, keepdims=True)
        maps = uniform_share(weights.reshape(-1, *grid))
        name = f"{config['pool']} probe ({path.stem.rsplit('.', 1)[0]}), block {block}"
        if config["pool"] in ("ep", "ep+cls") and each:
            panels += [MapPanel(f"ep query {m}, block {block}", share) for m, share in enumerate(maps)]
        else:
            panels.append(MapPanel(name if len(maps) == 1 else f"{name}, mean of {len(maps)} queries", maps.mean(0)))
    return panels


def display_image(cache, image_id: str) -> np.ndarray:
    """Image ``image_id`` of ``cache`` as its model saw it (resized and cropped, not normalised): (H, W) or
    (H, W, 3) uint8, or one line naming the file when it moved or broke since extraction."""
    path = _image_path(image_id, cache.attrs.get("working_dir", ""))
    preprocessing = Preprocessing.from_dict(cache.preprocessing)
    try:
        data = read_image_file(path)
        decoded = decode_image(path, preprocessing.input_size[0], data)
        preprocessing.check_size(*decoded.size)
        pixels = preprocessing.transform(normalized=False)(decoded)
    except Exception as e:  # the image moved or broke since extraction: say which
        raise AttnflowError(f"cannot read image {path} for display: {e}") from None
    digests = cache.image_digests
    if digests is not None and content_digest(data) != digests[cache.image_ids.index(image_id)]:
        raise AttnflowError(f"image {path} has changed since {cache.path} was extracted (its content differs): "
                            "its maps would be drawn over another picture; restore it or extract again")
    shown = pixels.permute(1, 2, 0).numpy()
    return shown[..., 0] if shown.shape[-1] == 1 else shown


def _image_path(stored_id: str, working_dir: str) -> Path:
    return path_of_id(stored_id, working_dir)


def plot_maps(
    caches: Sequence[str | Path], image: str | int | Sequence[str | int], output: str | Path, *, layer: int = -1,
    heads: bool = False, scale: str = "log", flow: bool = False, heads_dir: str | Path | None = None,
    ep_queries_each: bool = False,
) -> MapsFigure:
    """A row per image and cache (``image``: one image, or several for a grid, each found in every cache as
    :func:`find_image` does; rows go image by image, the caches in order within each): the image, the head-mean
    readout attention of ``layer``, the rollout map, with ``flow`` the attention flow map, with ``heads_dir`` the
    saved probe heads' attention (:func:`probe_head_panels`; ``ep_queries_each``: each ep query) and, with
    ``heads``, each head's map, over the image's extent; the object mask outlined when the cache has one.

    Every map is drawn in units of the uniform share (x P) on one colour scale for the whole figure
    (:func:`shared_scale`: ``log`` or ``linear``), with a labelled colour bar. Returns the path, the rows
    drawn (each with its ``panels`` and the shared ``scale``) and the notes about the inputs.
    """
    _check_scale(scale)  # before any work
    output = _check_output(output, caches)
    plt = pyplot()
    images = [image] if isinstance(image, (str, int)) else list(image)
    if not images:
        raise OptionError("image", "names no image")
    with open_cache(caches[0]) as first:  # each image is named once; every other cache is searched by its id
        image_ids = [first.image_ids[find_image(first.image_ids, one)] for one in images]
    rows = [map_data(c, image_id, layer=layer, heads=heads, flow=flow, heads_dir=heads_dir, ep_queries_each=ep_queries_each,
                     by_id=True) for image_id in image_ids for c in caches]
    shared = shared_scale(rows, scale)
    for row in rows:
        row.scale = shared
    ncols = 1 + max(len(r.panels) for r in rows)
    # Room inside the figure for what lies outside the map panels, so nothing is clipped: the row labels at
    # the left, the wrapped titles above each row, the suptitle, and the colour bar with its label at the right.
    title_lines = max(wrap_text(p.title, MAP_SIZE * 0.95).count("\n") + 1 for r in rows for p in r.panels)
    row_height = MAP_SIZE + 0.18 * title_lines
    left_margin = 0.45 if len(images) == 1 else 0.6
    width = left_margin + MAP_SIZE * ncols + COLORBAR_WIDTH
    height = row_height * len(rows) + 0.5
    fig = plt.figure(figsize=(width, height), dpi=DPI)
    grid = fig.add_gridspec(len(rows), ncols, left=left_margin / width, right=1 - COLORBAR_WIDTH / width,
                            bottom=0.1 / height, top=1 - (0.4 + 0.18 * title_lines) / height, wspace=0.08,
                            hspace=0.18 * title_lines / MAP_SIZE + 0.05)
    axes = np.array([[fig.add_subplot(grid[r, c]) for c in range(ncols)] for r in range(len(rows))])
    for ax_row, row in zip(axes, rows):
        _draw_image(ax_row[0], row)
        _finish_panel(ax_row[0], row)
        ax_row[0].set_title("image", fontsize=LABEL_POINTS)
        for ax, panel in zip(ax_row[1:], row.panels):
            _draw_map(ax, row, panel.share, shared)
            ax.set_title(wrap_text(panel.title, MAP_SIZE * 0.95), fontsize=LABEL_POINTS)
        for ax in ax_row[1 + len(row.panels):]:
            ax.set_visible(False)
        name = f"{Path(row.image_id).name}\n" if len(images) > 1 else ""
        ax_row[0].set_ylabel(f"{name}{row.label}\n({row.family})", fontsize=LABEL_POINTS - (len(images) > 1))
    what = Path(rows[0].image_id).name if len(images) == 1 else f"{len(images)} images"
    fig.suptitle(wrap_text(f"{what}: attention over patches, one {scale} colour scale for all maps", width - 0.2, 9),
                 fontsize=9)
    top, bottom = axes[0, 0].get_position().y1, axes[-1, 0].get_position().y0
    right = 1 - COLORBAR_WIDTH / width
    cax = fig.add_axes((right + 0.1 * COLORBAR_WIDTH / width, bottom, 0.15 * COLORBAR_WIDTH / width, top - bottom))
    _draw_colorbar(fig, cax, shared, wrap_inches=max(0.5, top - bottom) * height)
    reads = [*caches, *(row.image_path for row in rows), *(Path(heads_dir).glob("*.pt") if heads_dir is not None else ())]
    save_figure(fig, output, reads)
    return MapsFigure(output, rows, list(dict.fromkeys(n for r in rows for n in r.notes)))


def _draw_colorbar(fig, cax, scale: MapScale, wrap_inches: float = 4.0) -> None:
    from matplotlib.cm import ScalarMappable

    bar = fig.colorbar(ScalarMappable(norm=scale.norm(), cmap=MAP_COLORMAP), cax=cax,
                       extend="both" if scale.kind == "log" else "neither")  # linear reaches the largest share: nothing clipped
    if scale.kind == "log":
        ticks = [2.0**k for k in range(round(math.log2(scale.vmin)), round(math.log2(scale.vmax)) + 1)]
        bar.set_ticks(ticks, labels=[f"1/{round(1 / t)}" if t < 1 else f"{t:g}" for t in ticks])
        bar.minorticks_off()
    bar.ax.axhline(1.0, color="white", linewidth=1.2)  # the uniform level
    bar.ax.tick_params(labelsize=7)
    bar.set_label(wrap_text(scale.label, 0.9 * wrap_inches, 7), fontsize=7)  # along the bar: wrapped to its length


def _draw_image(ax, row: MapData, alpha: float = 1.0) -> None:
    height, width = row.image.shape[:2]
    ax.imshow(row.image, cmap="gray" if row.image.ndim == 2 else None, extent=(0, width, height, 0), alpha=alpha)


def _draw_map(ax, row: MapData, share: np.ndarray | None, scale: MapScale) -> None:
    """One map, opaque (so that its colour is the colour bar's), a square per patch; or, when the cache
    lacks it, the greyed image with a note."""
    height, width = row.image.shape[:2]
    if share is None:
        _draw_image(ax, row, alpha=0.4)
        ax.text(0.5, 0.5, "not in cache", transform=ax.transAxes, ha="center", va="center", fontsize=8)
    else:
        # clipped into the scale's range: out-of-range shares take the end colours (a log norm would blank zeros)
        ax.imshow(np.clip(share, scale.vmin, scale.vmax), cmap=MAP_COLORMAP, norm=scale.norm(),
                  extent=(0, width, height, 0), interpolation="nearest")
    _finish_panel(ax, row)


def _finish_panel(ax, row: MapData) -> None:
    height, width = row.image.shape[:2]
    if row.fg is not None and row.fg.min() < 0.5 < row.fg.max():
        gh, gw = row.fg.shape
        xs = (np.arange(gw) + 0.5) * width / gw
        ys = (np.arange(gh) + 0.5) * height / gh
        ax.contour(xs, ys, row.fg, levels=[0.5], colors=MASK_COLOR, linewidths=0.8)
    ax.set_xticks([])
    ax.set_yticks([])


# -- perturbation curves -------------------------------------------------------------------------------------------


def plot_perturbation(paths: Sequence[str | Path], output: str | Path, *, n_bootstrap: int = 2000,
                      seed: int = 0) -> tuple[Path, PerturbSummary]:
    """``attnflow plot perturb``: one panel per relevance map, x the fraction of patches removed, y the mean
    similarity to the clean representation with its 95% bootstrap band; a line per model and order, models
    coloured by family (as ``plot curves`` colours them), ``positive`` solid and ``negative`` dashed. With
    probe predictions, a second row of panels shows the accuracy. Returns the path and the summary drawn."""
    from types import SimpleNamespace

    output = _check_output(output, paths)
    plt = pyplot()
    summary = summarize_perturbation(paths, n_bootstrap=n_bootstrap, seed=seed)
    if not summary.curves:
        raise AttnflowError("none of the perturbation files holds any image")
    maps = list(dict.fromkeys(r["relevance"] for r in summary.curves))
    models = list(dict.fromkeys((r["model"], r["family"]) for r in summary.curves))
    colours = _family_colours(SimpleNamespace(models=[SimpleNamespace(label=m, family=f) for m, f in models]))
    rows = [("similarity", "ci_low", "ci_high", "cosine similarity to the clean representation")]
    if summary.has_accuracy:
        rows.append(("accuracy", "accuracy_ci_low", "accuracy_ci_high", "probe accuracy"))
    fig, axes = plt.subplots(len(rows), len(maps), figsize=(PANEL_SIZE[0] * len(maps), PANEL_SIZE[1] * len(rows) + 0.6),
                             dpi=DPI, squeeze=False, sharey="row")
    for row, (key, low, high, ylabel) in enumerate(rows):
        for column, name in enumerate(maps):
            ax = axes[row, column]
            for model, family in models:
                for order, style in zip(ORDERS, ("-", "--")):
                    points = [r for r in summary.curves if (r["model"], r["relevance"], r["order"]) == (model, name, order)
                              and r.get(key) is not None and not math.isnan(r[key])]
                    if not points:
                        continue
                    x = np.array([r["fraction"] for r in points])
                    ax.plot(x, [r[key] for r in points], linestyle=style, marker="o", markersize=3, color=colours[model],
                            label=f"{model} ({family}), {order}")
                    ax.fill_between(x, [r[low] for r in points], [r[high] for r in points], color=colours[model], alpha=0.15, linewidth=0)
            ax.set_title(name if row == 0 else f"{name}: probe accuracy")
            ax.set_xlabel("fraction of patches removed")
            ax.set_ylabel(ylabel, fontsize=8)
            ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), frameon=False)
    fig.suptitle("perturbation curves: positive removes the most relevant patches first (solid), negative the least (dashed); "
                 "bands: 95% bootstrap CI over images", fontsize=9)
    fig.tight_layout(rect=(0, 0.6 / (PANEL_SIZE[1] * len(rows) + 0.6) + 0.04 * math.ceil(len(labels) / 4), 1, 1))
    save_figure(fig, output, paths)
    return output, summary
