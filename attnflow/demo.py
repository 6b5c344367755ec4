"""``attnflow demo``: the whole MIM-vs-JEA analysis, offline, on the two shipped models.

Extract (with object masks and labels, metrics streamed) -> compare -> figures, then probes of cls
against selective pooling on held-out probe images. The models are declared in
:mod:`attnflow.demo_models`; the data recipe and training scripts are in ``examples/``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .compare import Comparison, compare_files
from .demo_models import DEMO_MODELS, demo_data_dir
from .errors import AttnflowError, AttnflowNote
from .extract import extract
from .images import list_images
from .models import build_model
from .plot import plot_curves, plot_maps, pyplot
from .probe import PROBE_COLUMNS, pools_for_store, probe_caches
from .render import Format, emit


@dataclass
class DemoRun:
    out: Path
    caches: list[Path]
    metrics: list[Path]
    compare_csv: Path
    comparison: Comparison
    n_images: int
    figures: list[Path]
    probe_csv: Path | None = None
    probe_records: list = None  # attnflow.probe records
    perturbation: list[Path] | None = None  # one perturbation file per model (attnflow perturb)
    perturbation_summary: object = None  # attnflow.perturb.PerturbSummary of those files


def demo_images(limit: int | None = None) -> list[Path]:
    """The shipped demo images in sorted order; ``limit`` takes evenly spaced ones, so every class stays."""
    paths = list_images([str(demo_data_dir() / "images")])
    if limit is not None and limit < len(paths):
        paths = [paths[round(i * len(paths) / limit)] for i in range(limit)]
    return paths


def run_demo(
    out: str | Path,
    *,
    limit: int | None = None,
    overwrite: bool = False,
    device: str = "auto",
    workers: int | None = 0,
    n_bootstrap: int = 2000,
    probe: bool = True,
    perturb: bool = True,
    on_model: Callable[[str], None] | None = None,
) -> DemoRun:
    """Extract (with masks and labels, metrics streamed) -> compare, for both shipped models; with ``perturb``,
    perturbation curves of the same images (cls-attn, rollout, random; drop mode); then, with ``probe``,
    extract tokens of the 5,000 probe images and compare cls with selective pooling."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = demo_images(limit)
    caches, metrics = [], []
    for name in DEMO_MODELS:
        if on_model:
            on_model(name)
        short = name.split(":", 1)[1]
        result = extract(
            build_model(name), paths, out / f"{short}.h5", masks=demo_data_dir() / "masks", labels_from_dirs=True,
            metrics=out / f"{short}_metrics.h5", batch_size=50, workers=workers, device=device, overwrite=overwrite,
        )
        caches.append(result.path)
        metrics.append(result.metrics_path)
    comparison = compare_files(metrics, n_bootstrap=n_bootstrap)
    compare_csv = out / "compare.csv"
    with open(compare_csv, "w", newline="") as handle:
        comparison.write(Format.csv, handle)
    perturbation, perturbation_summary = None, None
    if perturb:
        perturbation, perturbation_summary = _run_perturb(out, paths, overwrite=overwrite, device=device, workers=workers,
                                                          n_bootstrap=n_bootstrap, on_model=on_model)
    probe_csv, probe_records = None, None
    if probe:
        probe_csv, probe_records = _run_probe(out, overwrite=overwrite, device=device, workers=workers, on_model=on_model)
    figures = []
    try:
        pyplot()
    except AttnflowError as e:  # matplotlib is optional: the demo still runs, and says what it skipped
        warnings.warn(f"no figures: {e}", stacklevel=2)
    else:
        figures.append(plot_curves(metrics, out / "curves.png", n_bootstrap=n_bootstrap)[0])
        figures.append(plot_maps(caches, 0, out / "maps.png", heads=True)[0])
        if perturbation:
            from .perturb import plot_perturbation

            figures.append(plot_perturbation(perturbation, out / "perturb.png", n_bootstrap=n_bootstrap)[0])
    return DemoRun(out, caches, metrics, compare_csv, comparison, len(paths), figures, probe_csv, probe_records,
                   perturbation, perturbation_summary)


def _run_perturb(out: Path, paths: list[Path], *, overwrite: bool, device: str, workers: int | None, n_bootstrap: int,
                 on_model) -> tuple[list[Path], object]:
    """Perturbation curves of both models on the demo images (attnflow perturb's defaults), and their summary,
    also written as ``perturb.csv`` (one record per curve point)."""
    from .perturb import perturb, summarize

    files = []
    for name in DEMO_MODELS:
        if on_model:
            on_model(f"{name} (perturbation curves)")
        short = name.split(":", 1)[1]
        files.append(perturb(build_model(name), paths, out / f"{short}_perturb.h5", batch_size=50, workers=workers,
                             device=device, overwrite=overwrite).path)
    summary = summarize(files, n_bootstrap=n_bootstrap)
    with open(out / "perturb.csv", "w", newline="") as handle:
        summary.write(Format.csv, handle)
    return files, summary


PROBE_EPOCHS = 50


def write_probe_images(folder: Path) -> list[Path]:
    """The shipped probe images (``probe_images.npz``) as PNG files in class folders."""
    with np.load(demo_data_dir() / "probe_images.npz") as data:
        images, labels, names = data["images"], data["labels"], [str(n) for n in data["class_names"]]
    paths = []
    for i, (image, label) in enumerate(zip(images, labels)):
        path = folder / names[label] / f"probe_{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(path)
        paths.append(path)
    return sorted(paths)


def _run_probe(out: Path, *, overwrite: bool, device: str, workers: int | None, on_model) -> tuple[Path, list]:
    paths = write_probe_images(out / "probe_images")
    caches, store = [], "rows"  # the cls rows the attention pools need; rollout pooling would need full maps
    for name in DEMO_MODELS:
        if on_model:
            on_model(f"{name} (probe images)")
        short = name.split(":", 1)[1]
        caches.append(extract(
            build_model(name), paths, out / f"{short}_probe.h5", store=store, save_tokens=True, labels_from_dirs=True,
            batch_size=100, workers=workers, device=device, overwrite=overwrite,
        ).path)
    records, notes = probe_caches([(c, None) for c in caches], split=0.8, pools=pools_for_store(store),
                                  epochs=PROBE_EPOCHS, seed=0)
    for note in notes:
        warnings.warn(AttnflowNote(note), stacklevel=3)
    probe_csv = out / "probe.csv"
    with open(probe_csv, "w", newline="") as handle:
        emit(records, [*PROBE_COLUMNS, "gain_over_cls", "cls_entropy_norm"], Format.csv, out=handle)
    return probe_csv, records
