"""Figures a paper can take: TrueType fonts in PDFs, text in SVGs, no text running into other text or off
the figure, y ranges shared by metrics of one unit, reference lines where uniform attention has a value,
and a grid of several images. Checked on the saved files and on the figure's own artists."""
from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from attnflow import plot
from attnflow.store.read import open_metrics
from attnflow.demo import demo_images
from attnflow.demo_models import demo_data_dir
from attnflow.extract import extract
from attnflow.metrics import REGISTRY
from attnflow.models import build_model


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    """Both demo models over 4 demo images, with masks: caches and metrics files."""
    folder = tmp_path_factory.mktemp("figures")
    caches, metrics = [], []
    for name in ("demo:mae", "demo:dino"):
        short = name.split(":")[1]
        result = extract(build_model(name), demo_images(4), folder / f"{short}.h5", masks=demo_data_dir() / "masks",
                         metrics=folder / f"{short}_metrics.h5", workers=0)
        caches.append(result.path)
        metrics.append(result.metrics_path)
    return caches, metrics


@pytest.fixture
def drawn(monkeypatch):
    """The figures plot saves, kept for inspection after they were written (the real writer still runs)."""
    figures = []
    save = plot.save_figure

    def keep(fig, output, reads=()):
        figures.append(fig)
        save(fig, output, reads)

    monkeypatch.setattr(plot, "save_figure", keep)
    return figures


def texts(fig):
    """(text, pixel extent) of every text matplotlib draws on ``fig``: titles, labels, legend, colour bar and the
    tick labels of the ticks in view."""
    from matplotlib.axis import Tick
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    canvas = FigureCanvasAgg(fig)  # a closed figure has lost its canvas; Agg is what wrote the PNG
    canvas.draw()
    renderer = canvas.get_renderer()
    of_ticks = {id(t) for tick in fig.findobj(Tick) for t in (tick.label1, tick.label2)}
    tick_labels = [t for ax in fig.axes if ax.get_visible() for axis in (ax.xaxis, ax.yaxis)
                   for tick in axis._update_ticks() for t in (tick.label1, tick.label2) if t.get_visible()]
    others = [t for t in fig.findobj(Text)
              if id(t) not in of_ticks and t.get_visible() and (t.axes is None or t.axes.get_visible())]
    return [(t.get_text(), t.get_window_extent(renderer)) for t in tick_labels + others if t.get_text().strip()]


def assert_text_laid_out(fig):
    items = texts(fig)
    assert len(items) > 10
    box = fig.bbox
    clipped = [s for s, b in items if b.x0 < box.x0 - 0.5 or b.y0 < box.y0 - 0.5 or b.x1 > box.x1 + 0.5 or b.y1 > box.y1 + 0.5]
    assert not clipped, f"text off the figure: {clipped}"
    overlapping = [(a, c) for (a, b), (c, d) in itertools.combinations(items, 2) if b.overlaps(d)]
    assert not overlapping, f"texts overlap: {overlapping}"


CURVE_METRICS = ["cls_top10_mass", "cls_fg_mass", "attn_distance", "cls_entropy_norm", "rollout_entropy_norm"]


def test_pdf_fonts_are_truetype_and_svg_text_is_text(demo_files, tmp_path):
    caches, metrics = demo_files
    pdf, _, _ = plot.plot_curves(metrics, tmp_path / "curves.pdf", metrics=CURVE_METRICS, n_bootstrap=20)
    data = pdf.read_bytes()
    # font dictionaries are not compressed; Type 42 embeds the TrueType program (FontFile2)
    assert b"/Subtype /Type3" not in data and b"/FontFile2" in data
    maps_pdf, _, _ = plot.plot_maps(caches, 0, tmp_path / "maps.pdf")
    assert b"/Subtype /Type3" not in maps_pdf.read_bytes()
    svg, _, _ = plot.plot_curves(metrics, tmp_path / "curves.svg", metrics=CURVE_METRICS, n_bootstrap=20)
    text = svg.read_text()
    shown = re.findall(r"<text[^>]*>([^<]*)</text>", text)
    assert "cls_top10_mass" in shown and "block" in shown  # titles and labels are editable text


def test_curves_layout_shared_units_and_reference_lines(demo_files, tmp_path, drawn):
    _, metrics = demo_files
    plot.plot_curves(metrics, tmp_path / "curves.png", metrics=CURVE_METRICS, n_bootstrap=20)
    fig = drawn[-1]
    assert_text_laid_out(fig)
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    # one unit, one range: the two shares of cls attention; the entropies
    assert panels["cls_top10_mass"].get_ylim() == panels["cls_fg_mass"].get_ylim()
    assert panels["cls_entropy_norm"].get_ylim() == panels["rollout_entropy_norm"].get_ylim()

    def references(ax):
        return sorted(line.get_ydata()[0] for line in ax.get_lines() if line.get_label() == "uniform attention")

    assert references(panels["cls_entropy_norm"]) == [1.0] and references(panels["attn_distance"]) == []
    fg_frac = []
    for path in metrics:
        with open_metrics(path) as m:
            fg_frac.append(float(np.nanmean(m.values("fg_frac"))))
    assert references(panels["cls_fg_mass"]) == pytest.approx(sorted(set(np.round(fg_frac, 9))))
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend.count("uniform attention") == 1 and len(legend) == 3

    plot.plot_curves(metrics, tmp_path / "own.png", metrics=CURVE_METRICS, n_bootstrap=20, share_y="none")
    own = {ax.get_title(): ax for ax in drawn[-1].axes}
    assert own["cls_top10_mass"].get_ylim() != own["cls_fg_mass"].get_ylim()


def test_every_declared_reference_is_what_uniform_attention_scores():
    from attnflow.layout import TokenLayout
    from attnflow.metrics import cls_metrics
    import torch

    layout = TokenLayout(has_cls=True, num_prefix_tokens=1, grid_size=(4, 4), patch_size=(8, 8))
    rows = torch.full((1, 1, 17), 1 / 17, dtype=torch.float64)
    fg = torch.zeros(1, 1, 16, dtype=torch.float64)
    fg[..., :5] = 1.0
    values = cls_metrics(rows, layout, fg)
    for name, value in values.items():
        uniform = REGISTRY[name].uniform
        if isinstance(uniform, float):
            assert float(value) == pytest.approx(uniform), name
        elif uniform == "fg_frac":
            assert float(value) == pytest.approx(5 / 16), name


def test_maps_grid_single_row_and_probe_head_titles_fit(demo_files, tmp_path, drawn):
    caches, _ = demo_files
    _, rows, _ = plot.plot_maps(caches, [0, 1, 2], tmp_path / "grid.png")
    assert [(r.label, r.image_id) for r in rows] == [(label, image) for image in [r.image_id for r in rows[::2]]
                                                     for label in ("demo:mae", "demo:dino")]
    assert len({r.image_id for r in rows}) == 3
    assert_text_laid_out(drawn[-1])
    plot.plot_maps(caches[:1], 0, tmp_path / "one.png", heads=True)  # a single row: row label and colour-bar label
    assert_text_laid_out(drawn[-1])


def test_maps_with_probe_heads_keep_titles_apart(tmp_path, drawn):
    from attnflow.probe import probe_caches

    paths = demo_images(40)
    cache = extract(build_model("demo:dino"), paths, tmp_path / "dino.h5", store="rows", save_tokens=True,
                    labels_from_dirs=True, workers=0).path
    heads = tmp_path / "heads"
    heads.mkdir()
    probe_caches([(cache, None)], split=0.5, pools=["abmilp", "ep"], evaluators=["linear"], epochs=1, n_bootstrap=10,
                 save_heads=heads)
    plot.plot_maps([cache], 0, tmp_path / "heads.png", heads_dir=heads)
    fig = drawn[-1]
    assert sum("probe" in ax.get_title() for ax in fig.axes) == 2
    assert_text_laid_out(fig)


def test_cli_grid_and_share_y(demo_files, tmp_path, run_cli):
    caches, metrics = demo_files
    grid = run_cli("plot", "maps", *caches, "--image", "0", "--image", "1", "-o", tmp_path / "g.svg")
    assert grid.exit_code == 0, grid.stderr
    assert "<text" in (tmp_path / "g.svg").read_text()
    curves = run_cli("plot", "curves", *metrics, "-o", tmp_path / "c.png", "--share-y", "none", "--bootstrap", "20")
    assert curves.exit_code == 0, curves.stderr
    assert "--groups" not in curves.stderr and "--depth" not in curves.stderr
    bad = run_cli("plot", "curves", *metrics, "-o", tmp_path / "c.png", "--share-y", "all")
    assert bad.exit_code == 2
