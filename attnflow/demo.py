"""``attnflow demo``: the whole MIM-vs-JEA analysis, offline, on the two shipped models and an untrained one.

Extract (with object masks and labels, metrics streamed) -> compare -> figures, then probes of cls
against selective pooling on held-out probe images. ``demo:random`` (the same architecture with seeded
random weights) runs beside ``demo:mae`` and ``demo:dino``, so that every number of a trained model can be
read against an untrained network; the summary compares every pair (one network each: the rows are about
these networks, not the families). The models are declared in :mod:`attnflow.demo_models`; the data recipe
and training scripts are in ``examples/``.
"""
from __future__ import annotations

import warnings
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .compare import ALL_PAIRS, Comparison, compare_files
from .demo_models import DEMO_MODELS, TRAINED_DEMO_MODELS, demo_data_dir
from .errors import AttnflowError
from .notes import note
from .extract import extract
from .images import list_images
from .models import build_model
from .output import atomic_output
from .plot import plot_curves, plot_maps, pyplot
from .probe import GAIN_COLUMNS, PROBE_COLUMNS, pools_for_store, probe_caches
from .progress import OnProgress
from .render import Format, emit
from .store.names import StoreMode
from .threads import threads_for

__all__ = [
    "DemoRun", "demo_images", "run_demo", "PROBE_EPOCHS", "demo_disk_use", "PROBE_IMAGES", "write_probe_images",
    "probe_cache_paths",
]


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
    stage_seconds: list = field(default_factory=list)  # (stage, seconds) in the order they ran
    probe_images: Path | None = None  # the folder of probe PNGs the probe caches were extracted from
    perturbation: list[Path] | None = None  # one perturbation file per trained model (attnflow perturb)
    perturbation_summary: object = None  # attnflow.perturb.PerturbSummary of those files


class _Stages:
    """Names each stage as it starts (to ``on_stage``) and times it: what each part of the demo costs."""

    def __init__(self, on_stage: Callable[[str], None] | None):
        self.on_stage = on_stage
        self.seconds: list[tuple[str, float]] = []
        self._started: tuple[str, float] | None = None

    def __call__(self, text: str) -> None:
        self.finish()
        if self.on_stage:
            self.on_stage(text)
        self._started = (text.split(" (")[0], time.perf_counter())

    def finish(self) -> None:
        if self._started is not None:
            name, start = self._started
            self.seconds.append((name, time.perf_counter() - start))
            self._started = None


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
    probe_images: int | None = None,
    threads: int | None = None,
    on_stage: Callable[[str], None] | None = None,
    on_progress: OnProgress | None = None,
) -> DemoRun:
    """Extract (with masks and labels, metrics streamed) -> compare, for the shipped models and the untrained
    reference; with ``perturb``, perturbation curves of the trained models on the same images (cls-attn,
    rollout, random; drop mode); then, with ``probe``, extract tokens of the 5,000 probe images and compare
    cls with selective pooling (``probe_images``: fewer of them, the same number per class).

    ``on_stage`` hears each stage's name as it starts, ``on_progress`` the progress within it (extraction by
    image, probes by epoch). torch's threads follow :mod:`attnflow.threads` (``threads`` overrides it) while
    the demo runs, and are restored afterwards."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stage = _Stages(on_stage)
    paths = demo_images(limit)
    caches, metrics = [], []
    for name in DEMO_MODELS:
        stage(f"extracting {name} ({len(paths)} images, metrics in the same pass)")
        short = name.split(":", 1)[1]
        with threads_for(threads, "model", workers or 0):
            result = extract(
                build_model(name), paths, out / f"{short}.h5", masks=demo_data_dir() / "masks", labels_from_dirs=True,
                metrics=out / f"{short}_metrics.h5", batch_size=50, workers=workers, device=device, overwrite=overwrite,
                on_progress=_images_progress(on_progress, f"extract {name}"),
            )
        caches.append(result.path)
        metrics.append(result.metrics_path)
    stage("comparing")
    comparison = compare_files(metrics, n_bootstrap=n_bootstrap, groups=ALL_PAIRS)
    compare_csv = _write_csv(comparison, out / "compare.csv")
    perturbation, perturbation_summary = None, None
    if perturb:
        perturbation, perturbation_summary = _run_perturb(out, paths, overwrite=overwrite, device=device, workers=workers,
                                                          n_bootstrap=n_bootstrap, threads=threads, stage=stage)
    probe_csv, probe_records = None, None
    if probe:
        probe_csv, probe_records = _run_probe(out, overwrite=overwrite, device=device, workers=workers, threads=threads,
                                              limit=probe_images,
                                              stage=stage, on_progress=on_progress)
    stage("drawing figures")
    figures = []
    try:
        pyplot()
    except AttnflowError as e:  # matplotlib is optional: the demo still runs, and says what it skipped
        warnings.warn(f"no figures: {e}", stacklevel=2)
    else:
        figures.append(plot_curves(metrics, out / "curves.png", n_bootstrap=n_bootstrap)[0])
        figures.append(plot_maps(caches, 0, out / "maps.png", heads=True)[0])
        if perturbation:
            from .plot import plot_perturbation

            figures.append(plot_perturbation(perturbation, out / "perturb.png", n_bootstrap=n_bootstrap)[0])
    stage.finish()
    return DemoRun(out, caches, metrics, compare_csv, comparison, len(paths), figures, probe_csv, probe_records,
                   stage.seconds, out / "probe_images" if probe else None, perturbation, perturbation_summary)


def _run_perturb(out: Path, paths: list[Path], *, overwrite: bool, device: str, workers: int | None, n_bootstrap: int,
                 threads: int | None, stage: _Stages) -> tuple[list[Path], object]:
    """Perturbation curves of the trained models on the demo images (attnflow perturb's defaults), and their
    summary, also written as ``perturb.csv`` (one record per curve point)."""
    from .perturb import perturb, summarize

    files = []
    for name in TRAINED_DEMO_MODELS:
        stage(f"perturbation curves of {name} ({len(paths)} images)")
        short = name.split(":", 1)[1]
        with threads_for(threads, "model", workers or 0):
            files.append(perturb(build_model(name), paths, out / f"{short}_perturb.h5", batch_size=50, workers=workers,
                                 device=device, overwrite=overwrite).path)
    summary = summarize(files, n_bootstrap=n_bootstrap)
    _write_csv(summary, out / "perturb.csv")
    return files, summary


PROBE_EPOCHS = 50


def _write_csv(result, path: Path) -> Path:
    """``result`` (anything with ``write(fmt, handle)``) as csv at ``path``, whole or not at all."""
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as handle:
        result.write(Format.csv, handle)
    return path


def demo_disk_use(run: DemoRun) -> str:
    """What the demo left in its folder, in MB: the whole folder, and the probe caches and probe images in it
    (most of it), so that nobody finds half a gigabyte unannounced."""
    def megabytes(paths) -> float:
        return sum(p.stat().st_size for p in paths if p.is_file()) / 1e6

    total = megabytes(run.out.rglob("*"))
    text = f"{run.out} holds {total:,.0f} MB"
    if run.probe_images is not None:
        probe_caches = list(probe_cache_paths(run.out).values())
        images = list(run.probe_images.rglob("*.png"))
        text += (f", of which the probe caches {megabytes(probe_caches):,.0f} MB and {len(images):,} probe images "
                 f"(PNG, in {run.probe_images}) {megabytes(images):,.0f} MB")
    return text


PROBE_IMAGES = 5000  # all the shipped probe images, 500 per class


def write_probe_images(folder: Path, limit: int | None = None) -> list[Path]:
    """The shipped probe images (``probe_images.npz``) as PNG files in class folders; ``limit`` takes the first
    ``limit // classes`` of every class (the same images whatever else is asked)."""
    with np.load(demo_data_dir() / "probe_images.npz") as data:
        images, labels, names = data["images"], data["labels"], [str(n) for n in data["class_names"]]
    keep = np.ones(len(labels), bool)
    if limit is not None:
        rank = np.zeros(len(labels), int)  # each image's position within its class
        for c in range(len(names)):
            rank[labels == c] = np.arange(int((labels == c).sum()))
        keep = rank < max(1, limit // len(names))
    paths = []
    for i, (image, label) in enumerate(zip(images, labels)):
        if not keep[i]:
            continue
        path = folder / names[label] / f"probe_{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(path)
        paths.append(path)
    return sorted(paths)


def _images_progress(on_progress: OnProgress | None, step: str):
    """extract's ``(done, total)`` callback reporting to ``on_progress`` as ``step``."""
    return None if on_progress is None else (lambda done, total: on_progress(step, done, total))


def probe_cache_paths(out: Path) -> dict[str, Path]:
    """The probe cache of each demo model in the demo folder ``out``, by model name."""
    return {name: out / f"{name.split(':', 1)[1]}_probe.h5" for name in DEMO_MODELS}


def _run_probe(out: Path, *, overwrite: bool, device: str, workers: int | None, threads: int | None, stage,
               on_progress: OnProgress | None, limit: int | None = None) -> tuple[Path, list]:
    stage(f"writing the probe images (PNG, into {out / 'probe_images'})")
    paths = write_probe_images(out / "probe_images", limit)
    caches, store = [], StoreMode.rows.value  # the cls rows the attention pools need; rollout pooling would need full maps
    for name, cache in probe_cache_paths(out).items():
        stage(f"extracting {name} probe images ({len(paths):,}, tokens kept)")
        with threads_for(threads, "model", workers or 0):
            caches.append(extract(
                build_model(name), paths, cache, store=store, save_tokens=True, labels_from_dirs=True,
                batch_size=100, workers=workers, device=device, overwrite=overwrite,
                on_progress=_images_progress(on_progress, f"extract {name} (probe images)"),
            ).path)
    stage(f"probes ({PROBE_EPOCHS} epochs per linear probe)")
    with threads_for(threads, "heads"):
        records, notes = probe_caches([(c, None) for c in caches], split=0.8, pools=pools_for_store(store),
                                      epochs=PROBE_EPOCHS, seed=0, on_progress=on_progress)
    for text in notes:
        note(text)
    probe_csv = out / "probe.csv"
    with atomic_output(probe_csv) as tmp, open(tmp, "w", newline="") as handle:
        emit(records, [*PROBE_COLUMNS, *GAIN_COLUMNS, "cls_entropy_norm"], Format.csv, out=handle)
    return probe_csv, records
