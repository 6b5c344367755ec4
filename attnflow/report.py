"""``attnflow report``: one self-contained HTML page to explore attention across models, layers, heads and patches.

The page works offline, opened from disk: its script, style and data are inside it, and its content security
policy forbids every request. It holds

* per-layer curves of every metric the metrics files share with :data:`attnflow.metrics.REGISTRY`, with their
  95% bootstrap bands, for each head reduction (:func:`attnflow.plot.curve_data` of
  :func:`attnflow.compare.compare_files`, one comparison per reduction);
* the maps of a sample of images from the caches: per block, the readout attention per head and its head mean,
  the rollout, the flow where a metrics file of the same model stores it, and every patch's own attention row
  (the query view: their head mean, every head's too, or none, by ``query_rows``), with the object mask where the cache
  has one, the image as each model saw it beside them;
* the comparison summary as ``attnflow compare`` prints it, and the tables of probe result files.

Stored maps are quantised for display (:func:`quantise_share`): a patch's attention times the number of
patches P (the uniform share, as ``attnflow plot maps`` draws it), clipped to that figure's fixed log colour
scale (:data:`attnflow.plot.LOG_SHARE_LIMITS`) and rounded to one of 256 steps even in log, so a decoded share
within the scale is off by at most :data:`QUANTISATION_ERROR` (relative); one byte per value, deflated and
base64-encoded.
"""
from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import json
import math
import zlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .choices import choice_values
from .compare import DEFAULT_GROUPS, compare_files, summary_table
from .errors import AttnflowError, OptionError
from .notes import collect, note
from .output import atomic_output
from .families import get_family, title
from .metrics import REGISTRY, Fusion, renormalise_over_patches, rollout
from .options import QUERY_ROWS, REPORT_IMAGES
from .plot import MAP_COLORMAP, SHARE_LABEL, _family_colours, curve_data, display_image, shared_scale
from .render import format_cell
from .store.names import FG, FLOW_MAP, METRICS_SCHEMA, SCHEMA, StoreMode
from .store.validate import file_attrs, open_hdf5
from .store.read import open_cache, open_metrics
from .version import __version__

__all__ = [
    "SUFFIXES", "LEVELS", "SCALE", "QUANTISATION_ERROR", "BATCH_BYTES", "PICTURE_MAX_SIDE", "TEMPLATE",
    "DATA_MARKER", "quantise_share", "Report", "OnProgress", "check_output", "sort_inputs", "sample_images",
    "read_probe_table", "short_names", "render_page", "write_page", "build_report",
]

SUFFIXES = (".html", ".htm")
LEVELS = 256  # one byte per stored map value
SCALE = shared_scale([], "log")  # the fixed log colour scale of attnflow plot maps: 1/8 to 16 uniform shares
# Half a quantisation step, relative: how far a decoded share within the scale may be from the stored one.
QUANTISATION_ERROR = (SCALE.vmax / SCALE.vmin) ** (1 / (2 * (LEVELS - 1))) - 1
BATCH_BYTES = 256 * 2**20  # float64 maps held at once while reading a cache
PICTURE_MAX_SIDE = 160  # px: the images beside the maps are shrunk to this (never enlarged)
TEMPLATE = "report_page.html"
DATA_MARKER = "/*ATTNFLOW_DATA*/"


def quantise_share(share: np.ndarray) -> np.ndarray:
    """Uniform shares (attention x P) -> uint8 codes: clipped to the scale, 255 steps even in log."""
    low, high = SCALE.vmin, SCALE.vmax
    fraction = np.log(np.clip(share, low, high) / low) / math.log(high / low)
    return np.rint(fraction * (LEVELS - 1)).astype(np.uint8)


@dataclass
class Report:
    """What :func:`build_report` wrote."""

    path: Path
    size_bytes: int
    image_ids: list[str]  # the images whose maps the page holds, in page order
    models: list[str]  # the models whose maps it holds
    curve_models: list[str]  # the models whose curves it holds
    notes: list[str] = field(default_factory=list)


OnProgress = Callable[[int, int], None]


def check_output(output: str | Path) -> Path:
    """The page's path: an .html file in an existing folder (checked before any work)."""
    output = Path(output)
    if output.suffix.lower() not in SUFFIXES:
        raise OptionError("output", f"the report is an HTML page: give a path ending in .html, not '{output.name}'")
    if output.is_dir():
        raise OptionError("output", f"{output} is a directory; give a file path")
    if not output.absolute().parent.is_dir():
        raise OptionError("output", f"no such directory {output.absolute().parent}")
    return output


def sort_inputs(paths: Sequence[str | Path]) -> tuple[list[Path], list[Path]]:
    """Attention caches and metrics files among ``paths``, each list in the given order, by their schema."""
    caches, metrics = [], []
    for path in map(Path, paths):
        with open_hdf5(path) as f:
            schema = file_attrs(f).get("schema")
        if schema == SCHEMA:
            caches.append(path)
        elif schema == METRICS_SCHEMA:
            metrics.append(path)
        else:
            raise AttnflowError(f"{path} is neither an attnflow cache nor a metrics file (schema {schema!r})")
    return caches, metrics


def sample_images(n_total: int, n: int, labels: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """``n`` of ``n_total`` image indices, sorted, the same for the same arguments. With ``labels`` stratified:
    classes take turns in a seeded order, each giving its next image of a seeded shuffle, so no class has more
    than one image more than another unless it runs out."""
    if n >= n_total:
        return np.arange(n_total)
    rng = np.random.default_rng(seed)
    if labels is None:
        return np.sort(rng.choice(n_total, n, replace=False))
    classes = rng.permutation(np.unique(labels))
    queues = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    picked: list[int] = []
    for depth in range(max(len(q) for q in queues)):
        picked += [int(q[depth]) for q in queues if depth < len(q)][: n - len(picked)]
        if len(picked) == n:
            break
    return np.sort(np.array(picked))


def read_probe_table(path: str | Path) -> dict[str, Any]:
    """A probe results file (``attnflow probe -f csv``, the demo's probe.csv): its columns and rows as text."""
    path = Path(path)
    try:
        with open(path, newline="") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise AttnflowError(f"--probe {path}: cannot read it as a CSV table ({getattr(e, 'strerror', None) or e})") from None
    if len(rows) < 2 or not rows[0] or any(len(r) != len(rows[0]) for r in rows[1:]):
        raise AttnflowError(f"--probe {path}: not a CSV table with a header and rows of equal length "
                            "(write one with attnflow probe -f csv -o FILE)")
    return {"title": f"probes: {path.name}", "columns": rows[0], "rows": [[_shown(cell) for cell in r] for r in rows[1:]]}


def _shown(cell: str) -> str:
    """A csv cell as the tables show numbers: 4 significant digits, integers as they are."""
    try:
        value = float(cell)
    except ValueError:
        return cell
    return cell if cell.lstrip("-").isdigit() else format_cell(value)


def short_names(ids: Sequence[str]) -> list[str]:
    """The image ids without the folders they all share (the page lists them; the full id is its tooltip)."""
    parts = [Path(i).parts for i in ids]
    shared = 0
    while all(len(p) > shared + 1 and p[shared] == parts[0][shared] for p in parts):
        shared += 1
    return [str(Path(*p[shared:])) for p in parts]


# -- maps -------------------------------------------------------------------------------------------------


def _packed(codes: np.ndarray) -> dict[str, Any]:
    """A uint8 array for the page: its shape and its bytes (C order), deflated and base64-encoded."""
    data = np.ascontiguousarray(codes, dtype=np.uint8)
    return {"shape": list(data.shape), "deflate_base64": base64.b64encode(zlib.compress(data.tobytes(), 9)).decode("ascii")}


def _picture(pixels: np.ndarray) -> str:
    """An image as a data: URI, shrunk to :data:`PICTURE_MAX_SIDE`: PNG or JPEG, whichever is smaller."""
    image = Image.fromarray(pixels)
    scale = PICTURE_MAX_SIDE / max(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS)
    encoded = {}
    for kind, options in (("png", {"optimize": True}), ("jpeg", {"quality": 85})):
        buffer = io.BytesIO()
        image.save(buffer, format=kind.upper(), **options)
        encoded[kind] = buffer.getvalue()
    kind = min(encoded, key=lambda k: len(encoded[k]))
    return f"data:image/{kind};base64," + base64.b64encode(encoded[kind]).decode("ascii")


def _flow_source(attrs: dict[str, Any], ids: Sequence[str], metrics: Sequence[Path]) -> Path | None:
    """A metrics file of the same model (label and family) over the same images that stores flow maps."""
    for path in metrics:
        with open_metrics(path) as mf:
            a = mf.attrs
            if (a.get("label"), a.get("family")) == (attrs.get("label"), attrs.get("family")) and FLOW_MAP in mf \
                    and set(ids) <= set(mf.image_ids):
                return path
    return None


def _model_maps(path: Path, ids: Sequence[str], metrics: Sequence[Path], query_rows: str, views: dict[str, int],
                pictures: list[list[str | None]], progress: Callable[[], None]) -> dict[str, Any]:
    """One cache's part of the page: its description, its maps of images ``ids`` quantised, its pictures."""
    with open_cache(path) as cache:
        a, layout = cache.attrs, cache.layout
        L, H, P, p = int(a["num_layers"]), int(a["num_heads"]), layout.num_patches, layout.num_prefix_tokens
        position = {image_id: i for i, image_id in enumerate(cache.image_ids)}
        indices = [position[image_id] for image_id in ids]
        readout = "cls attention" if layout.has_cls else "mean patch row"
        store = cache.store
        n = len(ids)
        attention = np.zeros((n, L, H + 1, P), np.uint8) if store != StoreMode.none else None  # heads, then their mean
        roll = np.zeros((n, L, P), np.uint8) if store == StoreMode.full else None
        query_heads = query_rows == "heads"
        query = np.zeros((n, L, H + 1 if query_heads else 1, P, P), np.uint8) if store == StoreMode.full and query_rows != "none" else None
        fg = np.zeros((n, P), np.uint8) if FG in cache else None
        if store == StoreMode.none:
            note(f"{a['label']}: the cache holds no maps (store=none); the page shows only its curves")
        elif store == StoreMode.rows:
            note(f"{a['label']}: the cache keeps only cls/register rows: no rollout and no query view")
        view_key = json.dumps([cache.preprocessing, a.get("working_dir", "")], sort_keys=True)
        view = views.setdefault(view_key, len(views))
        if view == len(pictures):
            pictures.append([None] * n)
        missing = []
        # images a step: the float64 maps of a step stay within BATCH_BYTES, and rollout runs on a batch
        step = max(1, BATCH_BYTES // (L * H * layout.num_tokens ** 2 * 8))
        for first in range(0, n, step):
            batch = slice(first, min(n, first + step))
            if store == StoreMode.full:
                maps = torch.from_numpy(np.stack([cache.attention(i, i + 1)[0] for i in indices[batch]])).double()  # (B, L, H, T, T)
                patch_rows = renormalise_over_patches(maps[..., p:, :], layout)  # (B, L, H, P, P): each patch's row
                per_head = renormalise_over_patches(maps[..., 0, :], layout) if layout.has_cls else patch_rows.mean(-2)
                roll[batch] = quantise_share(rollout(maps, layout).numpy() * P)
                if query is not None:
                    chosen = patch_rows if query_heads else patch_rows[:, :, :0]
                    query[batch] = quantise_share(torch.cat([chosen, patch_rows.mean(2, keepdim=True)], 2).numpy() * P)
            elif store == StoreMode.rows:
                rows = np.stack([cache.prefix_rows(i, i + 1)[0, :, :, 0, :] for i in indices[batch]])  # (B, L, H, T)
                per_head = renormalise_over_patches(torch.from_numpy(rows), layout)
            if attention is not None:
                attention[batch] = quantise_share(torch.cat([per_head, per_head.mean(2, keepdim=True)], 2).numpy() * P)
            for k in range(batch.start, batch.stop):
                if fg is not None:
                    fg[k] = cache.fg(indices[k], indices[k] + 1)[0] >= 0.5
                if pictures[view][k] is None:
                    try:
                        pictures[view][k] = _picture(display_image(cache, ids[k]))
                    except AttnflowError:
                        missing.append(ids[k])
                progress()
        if missing:
            note(f"{a['label']}: {len(missing)} image file(s) cannot be read for display (first: {missing[0]}); "
                 "their maps are shown without the picture")
        arrays: dict[str, Any] = {}
        for name, codes in (("attention", attention), ("rollout", roll), ("query", query), ("fg", fg)):
            if codes is not None:
                arrays[name] = _packed(codes)
        flow_layers: list[int] = []
        flow_path = _flow_source(a, ids, metrics)
        if flow_path is not None:
            with open_metrics(flow_path) as mf:
                where = {image_id: i for i, image_id in enumerate(mf.image_ids)}
                flows = [mf.flow_maps(where[i], where[i] + 1) for i in ids]
            flow_layers = [int(x) for x in flows[0][1]]
            arrays["flow"] = _packed(quantise_share(np.concatenate([f[0] for f in flows]).astype(np.float64) * P))
        return {
            "label": a["label"], "family": a["family"], "family_title": title(a["family"]), "path": str(path),
            "layers": L, "heads": H, "grid": list(layout.grid_size), "readout": readout, "store": store,
            "query_rows": query_rows, "flow_layers": flow_layers, "view": view, "arrays": arrays,
        }


def _common_images(caches: Sequence[Path]) -> tuple[list[str], np.ndarray | None, list[str] | None]:
    """The image ids every cache holds (in the first cache's order), the labels of the first cache with labels
    for them, and its class names."""
    ids: list[str] | None = None
    labels = class_names = None
    for path in caches:
        with open_cache(path) as cache:
            held = cache.image_ids
            if ids is None:
                ids = held
            else:
                kept = set(held)
                common = [i for i in ids if i in kept]
                if not common:
                    raise AttnflowError(f"{path} holds none of the images of {caches[0]}; a report shows the same images for every model")
                if len(common) < len(ids) or len(common) < len(held):
                    note(f"the caches share {len(common)} images; the others are left out of the maps")
                ids = common
            if labels is None and cache.class_names is not None:
                by_id = dict(zip(held, cache.labels()))
                labels, class_names = by_id, cache.class_names
    assert ids is not None
    if not ids:
        raise AttnflowError(f"{caches[0]} holds no images")
    label_array = np.array([labels[i] for i in ids]) if labels is not None and all(i in labels for i in ids) else None
    return ids, label_array, class_names


# -- curves and tables -------------------------------------------------------------------------------------


_DASHES = {"-": "", "--": "6 3", "-.": "6 3 1.5 3", ":": "1.5 2.5"}


def _dasharray(linestyle: Any) -> str:
    """A matplotlib line style (a name, or an (offset, dashes) tuple) as an SVG stroke-dasharray."""
    if isinstance(linestyle, str):
        return _DASHES.get(linestyle, "")
    return " ".join(f"{1.5 * d:g}" for d in linestyle[1])


def _curves(metrics: Sequence[Path], groups: str | Sequence[str], n_bootstrap: int, seed: int,
            progress: Callable[[], None]) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
    """Per head reduction, per metric, each model's curve; the summary tables; the models drawn."""
    names: set[str] = set()
    for path in metrics:
        with open_metrics(path) as mf:
            names.update(mf.metric_names)
    chosen = [name for name in REGISTRY.names() if name in names]
    if not chosen:
        raise AttnflowError("the metrics files hold none of attnflow's metrics")
    reductions: dict[str, Any] = {}
    tables: list[dict[str, Any]] = []
    models: list[dict[str, Any]] = []
    x_label = ""
    for reduction in choice_values(Fusion):
        # the head reduction changes only head-level metrics: the others are compared once, with the mean
        names = chosen if reduction == Fusion.mean else [name for name in chosen if REGISTRY[name].level == "head"]
        if not names:
            progress()
            continue
        comparison = compare_files(metrics, metrics=names, heads=reduction, groups=groups, n_bootstrap=n_bootstrap, seed=seed)
        curves, x_label = curve_data(comparison)
        progress()
        reductions[reduction] = {name: [{"label": c.label, "x": c.x.tolist(), "mean": _finite(c.mean), "low": _finite(c.low),
                                         "high": _finite(c.high)} for c in found] for name, found in curves.items() if found}
        if reduction == Fusion.mean:  # compare's default: the summary and the models as compare shows them
            for text in comparison.notes:
                note(text)
            colours = _family_colours(comparison)
            from matplotlib.colors import to_hex

            models = [{"label": m.label, "family": m.family, "family_title": title(m.family), "colour": to_hex(colours[m.label]),
                       "dash": _dasharray(get_family(m.family).linestyle)} for m in comparison.models]
            for (a, b), records in comparison.summaries():
                rows, columns, caption = summary_table(records)
                tables.append({"title": f"{caption} (heads: mean; {', '.join(sorted({str(r['layer']) for r in records}))} layer)",
                               "columns": list(columns), "rows": [[format_cell(r.get(c, "")) for c in columns] for r in rows]})
    metric_info = {name: {"y_label": REGISTRY[name].y_label, "level": REGISTRY[name].level} for name in chosen
                   if name in reductions["mean"]}
    return {"x_label": x_label, "metrics": metric_info, "reductions": reductions, "models": models}, tables, [m["label"] for m in models]


def _finite(values: np.ndarray) -> list[float | None]:
    """JSON has no NaN: an undefined mean or band edge is null (the page leaves a gap)."""
    return [float(v) if math.isfinite(v) else None for v in values]


# -- the page ---------------------------------------------------------------------------------------------


def _colormap() -> list[str]:
    """The maps' colour map (:data:`attnflow.plot.MAP_COLORMAP`) as LEVELS hex colours, code k -> colour k."""
    try:
        import matplotlib
        from matplotlib.colors import to_hex
    except ImportError:
        raise AttnflowError("attnflow report needs matplotlib: pip install 'attnflow[plot]'") from None
    cmap = matplotlib.colormaps[MAP_COLORMAP].resampled(LEVELS)
    return [to_hex(cmap(k)) for k in range(LEVELS)]


def _scale_ticks() -> list[list[Any]]:
    ticks = [2.0 ** k for k in range(round(math.log2(SCALE.vmin)), round(math.log2(SCALE.vmax)) + 1)]
    return [[t, f"1/{round(1 / t)}" if t < 1 else f"{t:g}"] for t in ticks]


def render_page(data: dict[str, Any]) -> str:
    """The page: the template with ``data`` as JSON inside, every ``<`` escaped (``\\u003c``) so that no text in
    it (an image id, a label) can end the script or open a comment."""
    template = (resources.files("attnflow") / TEMPLATE).read_text(encoding="utf-8")
    if template.count(DATA_MARKER) != 1:
        raise AssertionError(f"{TEMPLATE} must hold {DATA_MARKER} once")
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    page_title = html.escape(data["title"])
    return template.replace("<title>attnflow report</title>", f"<title>{page_title}</title>").replace(DATA_MARKER, payload)


def write_page(path: Path, text: str, reads: Sequence[str | Path] = ()) -> None:
    """Write the page whole or not at all, never over one of ``reads`` nor through a link
    (:func:`attnflow.output.atomic_output`)."""
    with atomic_output(path, reads=reads) as temporary:
        temporary.write_text(text, encoding="utf-8")


def build_report(
    files: Sequence[str | Path],
    output: str | Path,
    *,
    probes: Sequence[str | Path] = (),
    n_images: int = REPORT_IMAGES,
    query_rows: str = "mean",
    groups: str | Sequence[str] = DEFAULT_GROUPS,
    n_bootstrap: int = 2000,
    seed: int = 0,
    on_progress: OnProgress | None = None,
) -> Report:
    """Write the report page of ``files`` (attention caches and metrics files, in any order) to ``output``.

    ``n_images`` images common to the caches are sampled (:func:`sample_images`, stratified by the first
    labelled cache's classes, ``seed``); ``query_rows`` says which rows of every patch the page stores for the query
    view (:data:`QUERY_ROWS`: their head ``mean``, every head's as well, H + 1 times as many, or ``none``; P x P
    values per image and block, the largest part of a page); ``probes`` are probe result CSV files shown as tables;
    ``groups``, ``n_bootstrap`` and ``seed`` are ``attnflow compare``'s. ``on_progress(done, total)`` follows
    the work: the comparisons, then the maps image by image.
    """
    output = check_output(output)
    if n_images < 1:
        raise OptionError("images", f"takes a positive number of images, not {n_images}")
    if query_rows not in QUERY_ROWS:
        raise OptionError("query_rows", f"choose from {', '.join(QUERY_ROWS)}, not '{query_rows}'")
    if not files:
        raise AttnflowError("give attention caches and/or metrics files")
    caches, metrics = sort_inputs(files)
    probe_tables = [read_probe_table(p) for p in probes]  # before the long work: a bad file fails at once
    with collect() as notes:
        ids: list[str] = []
        images: list[dict[str, Any]] = []
        n_total = 0
        if caches:
            all_ids, labels, class_names = _common_images(caches)
            n_total = len(all_ids)
            chosen = sample_images(len(all_ids), n_images, labels, seed)
            ids = [all_ids[i] for i in chosen]
            images = [{"id": image_id, "name": name, "class": class_names[labels[i]] if labels is not None and class_names else ""}
                      for image_id, name, i in zip(ids, short_names(ids), chosen)]
        # progress in steps: one comparison per head reduction, then one image of one cache
        total, done = (len(Fusion) if metrics else 0) + len(ids) * len(caches), [0]

        def step() -> None:
            done[0] += 1
            if on_progress:
                on_progress(done[0], total)

        curves, tables, curve_models = (_curves(metrics, groups, n_bootstrap, seed, step) if metrics
                                        else ({"models": [], "metrics": {}, "reductions": {}, "x_label": ""}, [], []))
        pictures: list[list[str | None]] = []
        views: dict[str, int] = {}
        models = [_model_maps(path, ids, metrics, query_rows, views, pictures, step) for path in caches]
    how = f"sampled with seed {seed}{', stratified by class' if images and images[0]['class'] else ''}"
    holds = [f"maps of {len(ids)} of the {n_total} images the caches share{'' if len(ids) == n_total else f' ({how})'}, "
             f"from {len(models)} cache(s)" if models else "no maps (no caches given)",
             f"curves of {len(curves['metrics'])} metrics of {len(curve_models)} model(s), and the comparison summary"
             if curve_models else "no curves (no metrics files given)"]
    data = {
        "title": "attnflow report: " + ", ".join(dict.fromkeys([m["label"] for m in models] + curve_models)),
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "attnflow_version": __version__,
        "holds": holds,
        "scale": {"vmin": SCALE.vmin, "vmax": SCALE.vmax, "levels": LEVELS, "label": SHARE_LABEL, "ticks": _scale_ticks(),
                  "colours": _colormap(), "error": QUANTISATION_ERROR},
        "images": images,
        "pictures": pictures,
        "models": models,
        "curves": curves,
        "tables": tables + probe_tables,
        "notes": notes,
    }
    write_page(output, render_page(data), reads=[*files, *probes])
    return Report(output, output.stat().st_size, ids, [m["label"] for m in models], curve_models, data["notes"])
