"""The ``attnflow`` command: a thin layer over the Python API.

Data goes to stdout, messages and progress to stderr. Exit codes: 0 success, 1 a data/model error (one
line on stderr), 2 a usage error.
"""
from __future__ import annotations

import inspect
import json
import os
import re
import signal
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import typer

from .version import __version__
from .errors import AttnflowError, AttnflowNote, OptionError
from .notes import note
from .capture import MagnitudeUpdate
from .families import FAMILIES
from .images import READ_TIMEOUT_S, DecodeMode as Decode, Interpolation, Preprocess, ReadStalled
from .inference import Correction
from .metrics import DEFAULT_ARTIFACT_FACTOR, REGISTRY, Fusion as Reduction  # rollout's --fusion and compare's --heads
from .probe import EP_QUERIES, Evaluator, Pool
from .store.names import Compression, DType, StoreMode as Store
from .registry import Y_SHARING
from .render import Format, Table
from .options import QUERY_ROWS, REPORT_IMAGES

__all__ = [
    "app", "Family", "InfoFormat", "ShareY", "QueryRows", "MAX_BOOTSTRAP", "MAX_SEED", "FLOW_LAYERS_HELP", "extract",
    "metrics_command", "Depth", "compare", "demo", "probe_command", "PerturbMode", "PerturbReadout",
    "perturb_command", "plot_app", "plot_curves_command", "plot_maps_command", "plot_perturb_command",
    "report_command", "info", "models", "main",
]

app = typer.Typer(
    name="attnflow",
    help="See how information flows through the attention of Vision Transformers (MIM vs JEA).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain text: "Beyond [cls]" is a paper title, not a markup tag
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _choices(name: str, values: Sequence[str]) -> type[Enum]:
    """A typer choice over values the library declares (typer needs an Enum; the list lives in one place)."""
    return Enum(name, {value: value for value in values}, type=str)


Family = _choices("Family", FAMILIES)
InfoFormat = _choices("InfoFormat", ("table", "json"))
ShareY = _choices("ShareY", Y_SHARING)
QueryRows = _choices("QueryRows", QUERY_ROWS)


MAX_BOOTSTRAP = 100_000  # plenty for percentile CIs; more only exhausts memory (compare) or time (probe)
MAX_SEED = 2**64 - 1  # torch generators take seeds up to here; numpy's take any non-negative integer


def _device_option(value: str) -> str:
    """--device must name a device attnflow knows; whether this machine has it is checked later (exit 1)."""
    from .options import DEVICE_PATTERN

    if DEVICE_PATTERN.fullmatch(value) is None:
        raise typer.BadParameter(f"takes auto, cpu, cuda or cuda:N, not '{value}'")
    return value


def _check_metric_names(names: Sequence[str], areas: Sequence[str] = ()) -> None:
    """--metric names a metric attnflow declares (or one of ``areas``, compare's quantities of perturbation
    files): any other name is a usage error (exit 2), whatever the files hold."""
    unknown = [name for name in names if name not in REGISTRY and name not in areas]
    if unknown:
        also = f"; perturbation files: {', '.join(areas)}" if areas else ""
        raise typer.BadParameter(f"unknown metric '{unknown[0]}' (known: {', '.join(sorted(REGISTRY.names()))}{also})",
                                 param_hint="'--metric'")


def _check_output(output: Optional[Path], reads: Sequence[Path]) -> None:
    """Fail before the work, not after it, when -o cannot be a file: a missing folder, a folder, an input."""
    if output is not None:
        from .output import check_output_path

        check_output_path(output, reads=reads)


def _deliver(result, fmt, output: Optional[Path] = None, reads: Sequence[Path] = ()) -> None:
    """Every command's data goes out here: to stdout, or with -o into a file committed whole (and a line
    saying so); ``reads`` are the command's inputs, which -o must not be."""
    if output is None:
        result.write(fmt, _text_stdout())
        return
    from .output import atomic_output

    with atomic_output(output, reads=reads) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        result.write(fmt, handle)
    _stderr_console().print(f"attnflow: wrote {output}", markup=False)


def _text_stdout():
    """stdout, writing what its encoding cannot hold (a non-ASCII label on an ASCII terminal) as escapes
    instead of failing half-way through a table."""
    if sys.stdout.errors not in ("strict", None) or not hasattr(sys.stdout, "reconfigure"):
        return sys.stdout
    try:
        sys.stdout.reconfigure(errors="backslashreplace")
    except (ValueError, OSError):  # a stream that cannot change (a test's capture): written as it is
        pass
    return sys.stdout


def _refuse_copies(paths: Sequence[Path]) -> None:
    """Two paths holding byte for byte the same metrics file are one model, not two (one path given twice is
    shown twice, as asked). Only files of equal size are read."""
    import hashlib

    by_size: dict[int, list[Path]] = {}
    for path in dict.fromkeys(Path(p).resolve() for p in paths):
        if path.is_file():
            by_size.setdefault(path.stat().st_size, []).append(path)
    for same_size in (group for group in by_size.values() if len(group) > 1):
        seen: dict[str, Path] = {}
        for path in same_size:
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            if digest in seen:
                raise AttnflowError(f"{seen[digest]} and {path} are byte-identical copies of one file, so they "
                                    "are one model, not two; give it once")
            seen[digest] = path


def _input_images(images: Sequence[str], limit: Optional[int], console) -> list[Path]:
    """The images a command reads: the files and folders given (or - for stdin), duplicates dropped with a
    note, the first ``limit``; none at all is an error."""
    from .images import list_images

    paths = list_images(
        images, on_duplicates=lambda n: console.print(f"attnflow: note: {n} duplicate input path{'s' if n > 1 else ''} dropped", markup=False)
    )
    if limit is not None:
        paths = paths[:limit]
    if not paths:
        raise AttnflowError("no images found in " + " ".join(images))
    return paths


def _print_notes(notes) -> None:
    """Notes a command's result carries, printed as the CLI prints every :class:`AttnflowNote`."""
    for text in notes:
        print(f"attnflow: note: {text}", file=sys.stderr)


def _stderr_console():
    from rich.console import Console

    # soft_wrap: a message about a long path stays one greppable line instead of wrapping at 80 columns.
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"attnflow {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """attnflow: capture, measure and compare attention in timm Vision Transformers."""


FLOW_LAYERS_HELP = ("With --flow: the 0-based blocks after which flow is read out, comma-separated (negative from the end), "
                    "or last (the default).")


@app.command()
def extract(
    model: str = typer.Argument(..., help="timm model name, with a pretrained tag (vit_base_patch16_224.mae) or with --checkpoint."),
    images: List[str] = typer.Argument(..., help="Image files, directories (searched recursively), or - to read paths from stdin."),
    output: Path = typer.Option(..., "-o", "--output", help="Cache file to write (HDF5)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Local weights: .pth/.pt/.bin/.tar or .safetensors, in raw, MAE, MoCo v3, DINO/iBOT or I-JEPA layout."),
    checkpoint_key: Optional[str] = typer.Option(None, help="Container inside the checkpoint, e.g. 'student' for a DINO student (default: teacher, target_encoder, model or state_dict)."),
    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint", help="Allow a checkpoint pickle that runs code when loaded. Only for files you trust."),
    random_init: bool = typer.Option(False, "--random-init", help="Analyse random weights on purpose (for untagged names without a checkpoint)."),
    img_size: Optional[int] = typer.Option(None, help="Build the model at this input resolution; position embeddings are resampled. A multiple of the patch size, at least 2 patches."),
    family: Optional[Family] = typer.Option(None, help="Model family for later comparisons (default: from the pretrained tag; with --checkpoint from its layout (MAE decoder, DINO teacher/student, I-JEPA target encoder...) or unknown)."),
    label: Optional[str] = typer.Option(None, help="Name of the model in later tables (default: model name, plus checkpoint stem)."),
    store: Store = typer.Option(Store.full, help="full: every attention map; rows: only cls/register query rows; none: no maps (magnitudes and tokens only)."),
    dtype: DType = typer.Option(DType.float16, help="Storage type of attention maps."),
    compression: Compression = typer.Option(Compression.gzip, help="HDF5 compression of maps and tokens."),
    save_tokens: bool = typer.Option(False, "--save-tokens", help="Also store the last block's output tokens (before the final norm)."),
    token_layers: Optional[str] = typer.Option(None, "--token-layers", help="With --save-tokens: the blocks whose output tokens are stored, comma-separated, 0-based or negative from the last (default -1, the last block; e.g. -1,-4,-7)."),
    tokens_dtype: DType = typer.Option(DType.float32, "--tokens-dtype", help="With --save-tokens: storage type of the tokens (float16 halves their size)."),
    masks: Optional[Path] = typer.Option(None, help="Folder of object masks (nonzero = object) matched to images by file stem; stores each patch's object fraction."),
    metrics: Optional[Path] = typer.Option(None, help="Also compute the metrics file in the same pass, from the float32 maps (works with --store none)."),
    fusion: Reduction = typer.Option(Reduction.mean, help="Rollout head fusion, with --metrics."),
    discard_ratio: float = typer.Option(0.0, help="Rollout: zero this fraction, in [0, 1), of the lowest off-diagonal entries per image and layer, with --metrics."),
    artifact_factor: Optional[float] = typer.Option(None, help=f"A patch token is a high-norm artifact when its block output norm exceeds this times the image's median patch norm at that block with --metrics (default {DEFAULT_ARTIFACT_FACTOR:g}; see the README)."),
    artifact_norm: Optional[float] = typer.Option(None, help="Instead of --artifact-factor: a patch token is an artifact when its block output norm exceeds this absolute value."),
    flow: bool = typer.Option(False, "--flow", help="With --metrics: also compute exact attention flow (flow/map and the flow_* metrics; a max-flow per patch on the CPU: seconds per ViT-S/16 image)."),
    flow_layers: Optional[str] = typer.Option(None, "--flow-layers", help=FLOW_LAYERS_HELP),
    magnitude: MagnitudeUpdate = typer.Option(MagnitudeUpdate.after_layer_scale, help="Take the magnitude's attention update after the block's layer scale (what the residual stream receives) or before it (as the Beyond [cls] code does; differs on layer-scale models such as DINOv2)."),
    labels_from_dirs: bool = typer.Option(False, "--labels-from-dirs", help="Store each image's parent folder as its class (ImageFolder layout)."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=1, help="Images per forward pass."),
    workers: Optional[int] = typer.Option(None, min=0, help="Decoding worker processes (default: CPU count - 1, at most 8)."),
    read_timeout: float = typer.Option(READ_TIMEOUT_S, "--read-timeout", metavar="SECONDS", help="Stop the run, naming the file, when reading one image receives no data for this long (a hung network mount; --resume continues); a slow read that keeps receiving data is never cut. 0: wait forever."),
    device: str = typer.Option("auto", callback=_device_option, help="auto, cpu, cuda or cuda:N."),
    amp: bool = typer.Option(False, "--amp", help="bfloat16 autocast on the GPU; attention is still captured in float32."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Intra-op threads of torch's forward pass (default: every core, whatever --workers, so that the bits do not depend on it; OMP_NUM_THREADS when set; 1 is often faster on a busy machine)."),
    crop_pct: Optional[float] = typer.Option(None, help="Override the model's eval crop fraction, in [0.1, 1]: images are resized to img-size / crop-pct, then centre-cropped (timm's convention; above 1 timm would pad black borders)."),
    interpolation: Optional[Interpolation] = typer.Option(None, help="Override the resize interpolation."),
    preprocess: Preprocess = typer.Option(Preprocess.timm, help="timm: each model's own eval config; beyond-cls: the Beyond [cls] paper's Resize 256 (bicubic), CenterCrop 224, ImageNet mean/std for every model (built at 224)."),
    decode: Decode = typer.Option(Decode.cpu, help="cpu: PIL and timm's transform in the workers (exact); gpu: JPEGs decoded in batches with nvJPEG and resized on the GPU (close, not identical: see the README); other formats stay on the CPU."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first image that cannot be decoded."),
    limit: Optional[int] = typer.Option(None, min=1, help="Process only the first N images."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted extraction of the same inputs into the same output."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output (only once the new cache is complete)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, no summary."),
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1, help="Run as N processes on this machine (gloo on CPUs, NCCL on GPUs, one GPU each) without torchrun; the same cache as one process. Several machines: torchrun (see the README)."),
) -> None:
    """Capture every block's attention for IMAGES into an HDF5 cache.

    \b
    Example: find data -name '*.JPEG' | head -500 | attnflow extract vit_small_patch16_224.dino - -o dino.h5
    """
    from rich.markup import escape

    from .progress import progress_bar

    from . import distributed
    from .extract import default_workers, extract as run_extract, size_notes, time_note
    from .threads import set_threads
    from .decode import check_decode_device
    from .images import build_size
    from .models import build_model, check_model_options
    from .options import ExtractOptions, FlowOptions, StoreOptions, resolve_device

    console = _stderr_console()
    if nproc is not None and nproc > 1:
        if distributed.launched_rank() is None:
            for target in (output, metrics):  # before N processes start only to say so
                if target is not None and target.exists() and not (overwrite or resume):
                    raise AttnflowError(f"{target} already exists; pass --overwrite to replace it")
            raise typer.Exit(distributed.spawn_local(nproc, sys.argv[1:]))
        if distributed.launched_rank().world != nproc:
            raise OptionError("nproc", f"is {nproc} but the launcher (torchrun) started {distributed.launched_rank().world} processes; drop {{nproc}} under torchrun")
    set_threads(threads, "model", default_workers() if workers is None else workers)
    options = ExtractOptions().replace(
        store=store.value, dtype=dtype.value, compression=compression.value, save_tokens=save_tokens,
        token_layers=(-1,) if token_layers is None else StoreOptions.parse_token_layers(token_layers), tokens_dtype=tokens_dtype.value,
        fusion=fusion.value, discard_ratio=discard_ratio, crop_pct=crop_pct,
        interpolation=interpolation.value if interpolation else None, labels_from_dirs=labels_from_dirs, masks=masks,
        preprocess=preprocess.value, artifact_factor=artifact_factor, artifact_norm=artifact_norm, magnitude=magnitude.value,
        flow=flow, flow_layers=None if flow_layers is None else FlowOptions.parse_layers(flow_layers),
        decode=decode.value, strict=strict, batch_size=batch_size, workers=workers, read_timeout=read_timeout, device=device, amp=amp,
        resume=resume, overwrite=overwrite,
    )
    img_size = build_size(preprocess.value, img_size)
    check_model_options(model, checkpoint, img_size=img_size, checkpoint_key=checkpoint_key)  # before reading the inputs
    check_decode_device(decode.value, device)  # before --device's own check: without CUDA it is --decode's usage error
    resolve_device(device)
    paths = _input_images(images, limit, console)
    loaded = build_model(
        model, checkpoint, img_size=img_size, checkpoint_key=checkpoint_key, random_init=random_init,
        trust_checkpoint=trust_checkpoint, family=family.value if family else None, label=label,
    )
    if loaded.weights == "random" and not quiet:
        console.print(f"attnflow: note: {escape(model)} has random weights (--random-init)")
    for text in size_notes(loaded, options, len(paths), img_size_given=img_size is not None):
        note(text)  # before the work, while it can still be changed

    def on_skip(path: str, reason: str) -> None:
        console.print(f"attnflow: skipped {escape(path)}: {escape(reason)}")

    if distributed.launched_rank() is not None:
        written = distributed.extract_sharded(loaded, paths, output, options, metrics=metrics, on_skip=on_skip)
        if written is not None and not quiet:
            console.print(f"attnflow: wrote {escape(str(output))} over {distributed.launched_rank().world} shards "
                          f"({len(paths)} inputs)" + (f"; metrics in {escape(str(metrics))}" if metrics is not None else ""))
        return
    progress = progress_bar(console, quiet=quiet, rate=True)
    with progress:
        task = progress.add_task("extract", total=len(paths), rate="")
        started: list[float] = []
        import time

        begun = time.perf_counter()

        def on_progress(done: int, total: int) -> None:
            now = time.perf_counter()
            if not started:
                started.extend((now, done))
                note = None if quiet or resume else time_note(done, total, now - begun)
                if note:  # above the bar on a terminal; the only estimate a log file gets
                    progress.console.print(f"attnflow: note: {note}", markup=False)
            elapsed = now - started[0]
            rate = f"{(done - started[1]) / elapsed:.1f} img/s" if elapsed > 0 else ""
            progress.update(task, completed=done, rate=rate)

        result = run_extract(loaded, paths, output, options, metrics=metrics, on_skip=on_skip, on_progress=on_progress)
    if not quiet:
        rate = result.n_new / result.seconds if result.seconds > 0 else float("nan")
        size_mb = result.path.stat().st_size / 1e6
        console.print(
            f"attnflow: wrote {escape(str(result.path))} ({size_mb:.1f} MB): {result.n_images} images, "
            f"{result.n_skipped} skipped, {escape(loaded.label)} ({loaded.family}), "
            + (f"{result.n_new} new in {result.seconds:.1f} s ({rate:.1f} img/s)" if not result.already_complete else "already complete, nothing to do")
            + (f"; metrics in {escape(str(result.metrics_path))}" if result.metrics_path else "")
        )


@app.command("metrics")
def metrics_command(
    cache: Path = typer.Argument(..., help="Attention cache written by `attnflow extract`."),
    output: Path = typer.Option(..., "-o", "--output", help="Metrics file to write (HDF5)."),
    fusion: Reduction = typer.Option(Reduction.mean, help="How rollout fuses heads: mean, max or min."),
    discard_ratio: float = typer.Option(0.0, help="Rollout: zero this fraction, in [0, 1), of the lowest off-diagonal entries of each image's fused map."),
    artifact_factor: Optional[float] = typer.Option(None, help=f"A patch token is a high-norm artifact when its block output norm exceeds this times the image's median patch norm at that block (default {DEFAULT_ARTIFACT_FACTOR:g}; see the README)."),
    artifact_norm: Optional[float] = typer.Option(None, help="Instead of --artifact-factor: a patch token is an artifact when its block output norm exceeds this absolute value."),
    flow: bool = typer.Option(False, "--flow", help="Also compute exact attention flow (flow/map and the flow_* metrics; a max-flow per patch: seconds per ViT-S/16 image). Needs --store full."),
    flow_layers: Optional[str] = typer.Option(None, "--flow-layers", help=FLOW_LAYERS_HELP),
    batch_size: int = typer.Option(16, "--batch-size", "-b", min=1, help="Images per step."),
    device: str = typer.Option("auto", callback=_device_option, help="auto, cpu, cuda or cuda:N."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Intra-op threads of torch (default: every core; OMP_NUM_THREADS when set)."),
    format: Format = typer.Option(Format.table, "--format", "-f", help="Per-layer summary on stdout: table, markdown, csv, tsv or json."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output (once the new one is complete)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no summary table."),
) -> None:
    """Compute every attention metric per image, layer and head of CACHE; print the per-layer means.

    cls self-attention, entropies, concentration, attention distance, rollout, magnitudes and, with masks,
    object relevance.

    The definitions are in the README's "Metrics" section.
    """
    from .store.read import open_cache, open_metrics
    from .measure import compute_metrics, layer_summary
    from .options import FlowOptions, MetricsOptions, resolve_device
    from .progress import progress_bar
    from .threads import set_threads

    console = _stderr_console()
    set_threads(threads, "model")
    options = MetricsOptions().replace(
        fusion=fusion.value, discard_ratio=discard_ratio, batch_size=batch_size, device=device, resume=resume,
        overwrite=overwrite, artifact_factor=artifact_factor, artifact_norm=artifact_norm,
        flow=flow, flow_layers=None if flow_layers is None else FlowOptions.parse_layers(flow_layers),
    )
    resolve_device(device)
    with open_cache(cache) as opened:  # the total from the start: a bar with an end and an ETA, not 0/?
        total = len(opened)
    progress = progress_bar(console, quiet=quiet)
    with progress:
        task = progress.add_task("metrics", total=total)
        path = compute_metrics(
            cache, output, options, on_progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    if quiet:  # --quiet: no summary table either, stdout stays empty
        return
    with open_metrics(path) as result:
        rows, columns = layer_summary(result)
        console.print(f"attnflow: wrote {path}: {len(result)} images, {len(result.metric_names)} metrics "
                      f"(mean over images and heads per layer below)", markup=False)
    _deliver(Table(rows, columns, f"{result.attrs['label']} ({result.attrs['family']})"), format)


class Depth(str, Enum):
    absolute = "absolute"
    relative = "relative"


def _layers_option(value: str) -> str:
    parts = [p.strip() for p in value.split(",")]
    if value.strip() in ("all", "last"):
        return value.strip()
    try:
        [float(p) for p in parts]
    except ValueError:
        raise typer.BadParameter(f"takes all, last or a comma-separated list of layers, not '{value}'") from None
    return value


def _check_layers(value: str, depth: "Depth", option: str) -> None:
    """--layers/--summary-layers against --depth: whole layer indices, or fractions of depth in (0, 1]."""
    if value in ("all", "last"):
        return
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if depth is Depth.absolute:
        bad = [p for p in parts if re.fullmatch(r"[+-]?\d+", p) is None]
        if bad:
            raise typer.BadParameter(f"takes 0-based layer indices (fractions need --depth relative), not '{bad[0]}'", param_hint=f"'{option}'")
    else:
        bad = [p for p in parts if not 0 < float(p) <= 1]
        if bad:
            raise typer.BadParameter(f"with --depth relative takes fractions of depth in (0, 1], not '{bad[0]}'", param_hint=f"'{option}'")


@app.command()
def compare(
    files: Optional[List[Path]] = typer.Argument(None, help="Metrics files, or perturbation files of attnflow perturb, one per model (family and label from each file); not both kinds at once."),
    mim: List[Path] = typer.Option([], "--mim", help="A metrics (or perturbation) file of a MIM model (repeatable)."),
    jea: List[Path] = typer.Option([], "--jea", help="A metrics (or perturbation) file of a JEA model (repeatable)."),
    label: List[str] = typer.Option([], "--label", help="Model labels in file order (positional files, then --mim, then --jea); repeatable."),
    family: List[Family] = typer.Option([], "--family", help="Model families in the same order; repeatable."),
    metric: List[str] = typer.Option([], "--metric", "-m", help=f"Metric to compare (repeatable; default: those of {', '.join(REGISTRY.defaults)} that some file has). Perturbation files: gap (negative AUC - positive AUC per image, the default), auc_positive, auc_negative."),
    relevance: List[str] = typer.Option([], "--relevance", "-r", help="Perturbation files: the relevance maps compared, the rows (repeatable; default every map the files hold; the summary leaves out random unless it is named here)."),
    groups: str = typer.Option("mim,jea", "--groups", help=f"The summary: two families A,B (reports A - B), or all for every pair of the families present. Families: {', '.join(FAMILIES)}."),
    heads: Reduction = typer.Option(Reduction.mean, help="How heads are reduced before images are averaged (metrics files)."),
    layers: str = typer.Option("all", callback=_layers_option, help="Metrics files: layers in the per-layer tables: all, last or N,M,... (0-based; negative from the end; fractions with --depth relative)."),
    depth: Depth = typer.Option(Depth.absolute, help="relative aligns models of different depths at fractions of depth."),
    summary_layers: str = typer.Option("last", callback=_layers_option, help="Metrics files: layers of the group summary, same syntax as --layers."),
    bootstrap: int = typer.Option(2000, min=1, max=MAX_BOOTSTRAP, help="Bootstrap resamples for the confidence intervals."),
    seed: int = typer.Option(0, min=0, help="Seed of the bootstrap (a non-negative integer)."),
    correction: Correction = typer.Option(Correction.holm, "--correction", help="How the summary's p-values are adjusted as one family of tests: holm (family-wise error), bh (Benjamini-Hochberg q-values) or none."),
    format: Format = typer.Option(Format.table, "--format", "-f", help="table, markdown, csv, tsv or json (csv/tsv: one row per model x metric x layer)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the data here instead of stdout."),
) -> None:
    """Compare models' metrics per layer and test the difference between two groups (MIM vs JEA by default).

    With several networks per group the networks are the replicates (hierarchical bootstrap CI, exact
    permutation test, Hedges' g): the verdict is about the families. With one network per group the rows
    compare those two networks over images (paired by image id when they share images: Wilcoxon signed-rank
    and rank-biserial; otherwise Mann-Whitney U and Cliff's delta), and the verdict names them. Verdicts use
    p-values adjusted over the whole summary (--correction). See the README, "How attnflow tests differences".

    Perturbation files (attnflow perturb) are compared the same way: per relevance map (the rows, --relevance)
    the per-image area difference gap = negative AUC - positive AUC (--metric auc_positive, auc_negative for
    each order's area); --heads and the layer options apply to metrics files only.

    \b
    Example: attnflow compare --mim mae.h5 --mim simmim.h5 --jea dino.h5 --jea dinov2.h5 --format markdown
    Example: attnflow compare mae_perturb.h5 dino_perturb.h5 -r cls-attn -r rollout
    """
    from .compare import compare_files

    paths = [*(files or []), *mim, *jea]
    if not paths:
        raise typer.BadParameter("give at least one metrics file", param_hint="FILES")
    if len(family) > len(paths):
        raise typer.BadParameter(f"{len(family)} families for {len(paths)} files", param_hint="--family")
    if len(label) > len(paths):
        raise typer.BadParameter(f"{len(label)} labels for {len(paths)} files", param_hint="--label")
    from .perturb import AREA_QUANTITIES

    _check_metric_names(metric, tuple(AREA_QUANTITIES))
    _check_layers(layers, depth, "--layers")
    _check_layers(summary_layers, depth, "--summary-layers")
    _check_output(output, paths)
    _refuse_copies(paths)
    implied = [None] * len(files or []) + ["mim"] * len(mim) + ["jea"] * len(jea)
    families = [family[i].value if i < len(family) else implied[i] for i in range(len(paths))]
    comparison = compare_files(
        paths, labels=label, families=families, metrics=metric or None, heads=heads.value, layers=layers,
        depth=depth.value, summary_layers=summary_layers, groups=groups, n_bootstrap=bootstrap, seed=seed,
        correction=correction, relevance=relevance or None,
    )
    _print_notes(comparison.notes)
    _deliver(comparison, format, output, paths)


@app.command()
def demo(
    out: Path = typer.Option(Path("attnflow-demo"), "--out", help="Folder for the caches, metrics files and compare.csv."),
    limit: Optional[int] = typer.Option(None, min=2, help="Use only this many of the 200 demo images (evenly over the classes)."),
    format: Format = typer.Option(Format.table, "--format", "-f", help="How to print the comparison: table, markdown, csv, tsv or json."),
    device: str = typer.Option("auto", callback=_device_option, help="auto, cpu, cuda or cuda:N."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the files of an earlier demo run."),
    probe: bool = typer.Option(True, "--probe/--no-probe", help="Also probe cls against selective pooling on the 5,000 held-out probe images shipped with the demo."),
    probe_images: Optional[int] = typer.Option(None, "--probe-images", min=20, max=5000, help="Probe on fewer of the held-out images (the same number of each of the 10 classes; default all 5,000)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Intra-op threads of torch (default: all cores for the models, 1 for the probe heads; OMP_NUM_THREADS when set)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No stage lines and no progress bars (the tables and the summary line stay)."),
    perturb: bool = typer.Option(True, "--perturb/--no-perturb", help="Also draw perturbation curves (attnflow perturb: cls-attn, rollout, random) of both models on the demo images."),
) -> None:
    """Run the whole MIM-vs-JEA analysis offline on the two tiny shipped models (demo:mae, demo:dino).

    Extracts attention (with object masks and labels) and metrics for 200 composed Fashion-MNIST images,
    compares the two models, prints the tables and writes everything into --out.
    """
    from .demo import run_demo
    from .options import resolve_device
    from .progress import StepProgress, progress_bar

    console = _stderr_console()
    resolve_device(device)
    if out.exists() and not out.is_dir():
        raise AttnflowError(f"--out {out} is a file; the demo writes into a folder")
    with progress_bar(console, quiet=quiet) as progress:
        def on_stage(text: str) -> None:  # printed above the bar, so every stage stays on record
            if not quiet:
                progress.console.print(f"attnflow: demo: {text}", markup=False)

        run = run_demo(out, limit=limit, overwrite=overwrite, device=device, probe=probe, perturb=perturb, threads=threads,
                       probe_images=probe_images,
                       on_stage=on_stage, on_progress=StepProgress(progress))
    _print_notes(run.comparison.notes)
    _deliver(run.comparison, format)
    if run.perturbation_summary is not None:
        from .perturb import AUC_COLUMNS

        if format not in (Format.csv, Format.tsv, Format.json):
            sys.stdout.write("\n")
        _deliver(Table(run.perturbation_summary.aucs, list(AUC_COLUMNS), "perturbation curves: areas under them (95% bootstrap CIs over images)"), format)
    if run.probe_records:
        from .probe import GAIN_COLUMNS, PROBE_COLUMNS

        columns = [*PROBE_COLUMNS, *GAIN_COLUMNS, "cls_entropy_norm"]
        if format not in (Format.csv, Format.tsv, Format.json):
            sys.stdout.write("\n")
        first = run.probe_records[0]
        n_probe = int(first["n_train"]) + int(first["n_test"])
        _deliver(Table(run.probe_records, columns, f"probes: cls vs selective pooling (80/20 split of {n_probe:,} probe images)"), format)
    console.print(
        f"attnflow: demo: {run.n_images} images; caches {', '.join(map(str, run.caches))}; metrics "
        f"{', '.join(map(str, run.metrics))}; table {run.compare_csv}"
        + (f"; figures {', '.join(map(str, run.figures))}" if run.figures else "")
        + (f"; probes {run.probe_csv}" if run.probe_csv else "")
        + (f"; perturbation curves {', '.join(map(str, run.perturbation))}" if run.perturbation else ""),
        markup=False,
    )
    if quiet:
        return
    from .demo import PROBE_EPOCHS, demo_disk_use, probe_cache_paths

    console.print("attnflow: demo: seconds per stage: " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in run.stage_seconds)
                  + f"; total {sum(seconds for _, seconds in run.stage_seconds):.1f}", markup=False)
    console.print(f"attnflow: demo: {demo_disk_use(run)}", markup=False)
    if run.probe_records:
        console.print(f"attnflow: demo: the probes trained {PROBE_EPOCHS} epochs each (attnflow probe's default is 100); "
                      f"the same numbers: attnflow probe {' '.join(map(str, probe_cache_paths(out).values()))} "
                      f"--split 0.8 --epochs {PROBE_EPOCHS}", markup=False)


@app.command("probe")
def probe_command(
    caches: Optional[List[Path]] = typer.Argument(None, help="Caches to divide into training and test images with --split (one model each)."),
    train: List[Path] = typer.Option([], "--train", help="Training cache of a model (repeatable, paired in order with --test)."),
    test: List[Path] = typer.Option([], "--test", help="Test cache of the same model."),
    split: Optional[float] = typer.Option(None, min=0.05, max=0.95, help="Fraction of each class for training when a cache is divided (stratified, seeded)."),
    pool: List[Pool] = typer.Option([], "--pool", help="Aggregation (repeatable; default all): cls, mean, cls-attn, min-entropy-head, rollout, abmilp, ep."),
    evaluator: List[Evaluator] = typer.Option([], "--evaluator", help="knn and/or linear (default both)."),
    abmilp_relu: bool = typer.Option(False, "--abmilp-relu", help="Score patches with a hidden ReLU layer instead of one linear layer."),
    ep_queries: int = typer.Option(EP_QUERIES, "--ep-queries", min=1, help="Learned queries of the ep pool (must divide the token width)."),
    ep_with_cls: bool = typer.Option(False, "--ep-with-cls", help="Let the ep pool attend over the cls token too, not only the patches."),
    epochs: int = typer.Option(100, min=1, help="Linear-probe epochs (the best on a held-out 10% of training images is kept)."),
    bootstrap: int = typer.Option(1000, min=1, max=MAX_BOOTSTRAP, help="Bootstrap resamples for the accuracy CIs."),
    seed: int = typer.Option(0, min=0, max=MAX_SEED, help="Seed of the split, the probes and the bootstrap (a non-negative integer)."),
    device: str = typer.Option("cpu", callback=_device_option, help="auto, cpu, cuda or cuda:N for the probes."),
    with_attention: bool = typer.Option(False, "--with-attention", help="Add each model's cls_entropy_norm of the probed block, the last by default (csv/tsv column too)."),
    save_heads: Optional[Path] = typer.Option(None, "--save-heads", help="Save each model's trained abmilp and ep heads into this folder (created if missing; one <label>.<pool>.pt each, characters other than letters, digits, '.', '_', '-' in the label written as '_'; for plot maps --heads-dir and attnflow.probe.load_head)."),
    layer: Optional[int] = typer.Option(None, "--layer", help="Probe the output tokens of this block (0-based, negative from the last), stored with extract --token-layers, with its attention for cls-attn, min-entropy-head and rollout (up to it); adds a layer column (default: the deepest stored block, the last unless --token-layers said otherwise)."),
    allow_overlap: bool = typer.Option(False, "--allow-overlap", help="Probe even when a --test cache holds training images (same path or content); an n_overlap column says how many."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Intra-op threads of torch on the CPU (default 1: small heads train faster alone than with threads waiting for cores; OMP_NUM_THREADS when set)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    format: Format = typer.Option(Format.table, "--format", "-f", help="table, markdown, csv, tsv or json."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the data here instead of stdout."),
) -> None:
    """Measure how much selective pooling of patch tokens beats the cls token, with k-NN and linear probes.

    Reads cached tokens and labels (extract with --save-tokens --labels-from-dirs).

    \b
    Example: attnflow probe mae.h5 dino.h5 --split 0.8 --with-attention
    """
    from .options import resolve_device
    from .probe import GAIN_COLUMNS, POOLS, PROBE_COLUMNS, probe_caches
    from .progress import StepProgress, progress_bar
    from .threads import set_threads

    if len(train) != len(test):
        raise typer.BadParameter(f"{len(train)} --train caches for {len(test)} --test caches", param_hint="--train/--test")
    if caches and split is None:
        raise typer.BadParameter("caches given without --train/--test need --split", param_hint="--split")
    if split is not None and not caches:
        raise typer.BadParameter("divides caches given as arguments; --train/--test pairs are used as they are", param_hint="--split")
    device = str(resolve_device(device))
    probed = [*(caches or []), *train, *test]
    _check_output(output, probed)
    pairs = [(c, None) for c in caches or []] + list(zip(train, test))
    if not pairs:
        raise typer.BadParameter("give caches with --split, or --train/--test pairs", param_hint="CACHES")
    set_threads(threads, "heads")
    with progress_bar(_stderr_console(), quiet=quiet) as progress:
        records, notes = probe_caches(
            pairs, split=split, pools=list(dict.fromkeys(p.value for p in pool)) or list(POOLS),  # a repeated flag: one row
            evaluators=list(dict.fromkeys(e.value for e in evaluator)) or ["knn", "linear"],
            epochs=epochs, relu=abmilp_relu, ep_queries=ep_queries, ep_with_cls=ep_with_cls, seed=seed,
            n_bootstrap=bootstrap, device=device, layer=layer, save_heads=save_heads, allow_overlap=allow_overlap,
            on_progress=StepProgress(progress),
        )
    _print_notes(notes)
    columns = list(PROBE_COLUMNS) + (["cls_entropy_norm"] if with_attention else [])
    if layer is not None:  # the 0-based block probed, after the model
        columns.insert(columns.index("model") + 1, "layer")
    if format in (Format.csv, Format.tsv):
        columns += GAIN_COLUMNS  # after attnflow 0.1's columns, which keep their places
    else:
        columns[columns.index("n_train"):columns.index("n_train")] = GAIN_COLUMNS
    if allow_overlap:
        columns.append("n_overlap")
    _deliver(Table(records, columns, "linear and k-NN probes (accuracy, 95% bootstrap CI over test images; gain over cls: "
                                     "paired CI, McNemar p, Holm-adjusted)"), format, output, probed)


# -- attnflow perturb --------------------------------------------------------------------------------------
# The model, checkpoint, preprocessing and image options are extract's own declarations, reused as they are.
_EXTRACT_OPTIONS = {name: parameter.default for name, parameter in inspect.signature(extract).parameters.items()}
PerturbMode = _choices("PerturbMode", ("drop", "pixels"))
PerturbReadout = _choices("PerturbReadout", ("cls", "mean"))


@app.command("perturb")
def perturb_command(
    model: str = _EXTRACT_OPTIONS["model"],
    images: List[str] = _EXTRACT_OPTIONS["images"],
    output: Path = typer.Option(..., "-o", "--output", help="Perturbation file to write (HDF5): every per-image value."),
    relevance: List[str] = typer.Option([], "--relevance", "-r", help="Relevance map patches are removed by (repeatable; default cls-attn, rollout, random): cls-attn (head-mean cls row at --layer; without cls the mean patch row), rollout, flow (exact attention flow), probe:DIR (a head saved by probe --save-heads: abmilp weights or the mean of ep's queries), random (seeded; the baseline)."),
    fractions: str = typer.Option("0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", "--fractions", help="Fractions of the P patches removed, comma-separated, each in (0, 1); round(f x P) patches (half up)."),
    mode: Optional[PerturbMode] = typer.Option(None, "--mode", help="drop: removed patch tokens leave the sequence after the position embedding (ViTs with learned absolute positions; the default there); pixels: removed patches set to the normalised zero, the dataset mean (every architecture; the default elsewhere)."),
    readout: Optional[PerturbReadout] = typer.Option(None, "--readout", help="The representation compared with the clean one: cls (the final-normed cls token, the default where there is one) or mean (of the final-normed patch tokens left)."),
    layer: int = typer.Option(-1, "--layer", help="Block the attention maps are read at, 0-based or negative from the last (rollout and flow: up to it)."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**63 - 1, help="Seed of the random relevance map (per image, so resumed runs agree)."),
    probe: Optional[Path] = typer.Option(None, "--probe", help="A probe head saved by probe --save-heads (the file, or the folder holding <label>.abmilp.pt / .ep.pt): also score whether its prediction stays right (needs --labels-from-dirs)."),
    bootstrap: int = typer.Option(2000, min=1, max=MAX_BOOTSTRAP, help="Bootstrap resamples for the 95% CIs of the summary."),
    format: Format = typer.Option(Format.table, "--format", "-f", help="The summary on stdout: table, markdown, csv or tsv (one record per curve point), json (curves and areas)."),
    checkpoint: Optional[Path] = _EXTRACT_OPTIONS["checkpoint"],
    checkpoint_key: Optional[str] = _EXTRACT_OPTIONS["checkpoint_key"],
    trust_checkpoint: bool = _EXTRACT_OPTIONS["trust_checkpoint"],
    random_init: bool = _EXTRACT_OPTIONS["random_init"],
    img_size: Optional[int] = _EXTRACT_OPTIONS["img_size"],
    family: Optional[Family] = _EXTRACT_OPTIONS["family"],
    label: Optional[str] = _EXTRACT_OPTIONS["label"],
    labels_from_dirs: bool = _EXTRACT_OPTIONS["labels_from_dirs"],
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=1, help="Images per clean forward pass; the perturbed copies run in passes of this many sequences."),
    workers: Optional[int] = _EXTRACT_OPTIONS["workers"],
    read_timeout: float = _EXTRACT_OPTIONS["read_timeout"],
    device: str = _EXTRACT_OPTIONS["device"],
    crop_pct: Optional[float] = _EXTRACT_OPTIONS["crop_pct"],
    interpolation: Optional[Interpolation] = _EXTRACT_OPTIONS["interpolation"],
    preprocess: Preprocess = _EXTRACT_OPTIONS["preprocess"],
    strict: bool = _EXTRACT_OPTIONS["strict"],
    limit: Optional[int] = _EXTRACT_OPTIONS["limit"],
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted perturbation run of the same inputs and options into the same output."),
    overwrite: bool = _EXTRACT_OPTIONS["overwrite"],
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no summary on stdout."),
) -> None:
    """Remove patches in order of relevance and measure how the representation changes (perturbation curves).

    For each image, relevance map, order (positive: most relevant first; negative: least relevant first) and
    fraction, the cosine similarity of the perturbed representation to the clean one, and with --probe whether
    the probe's prediction stays right. Prints per curve point the mean over images with a 95% bootstrap CI,
    and per relevance map the areas under the curves (f = 0 counts as similarity 1) with the gap negative -
    positive, paired by image. Every value per image goes into OUT.h5.

    Example: attnflow perturb demo:dino attnflow/demo_data/images -o dino_perturb.h5 -r cls-attn -r rollout -r random
    """
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .images import build_size
    from .models import build_model, check_model_options
    from .options import resolve_device
    from .perturb import DEFAULT_RELEVANCE, PerturbationOptions, PerturbOptions, perturb, summarize

    console = _stderr_console()
    options = PerturbOptions().replace(
        relevance=tuple(relevance) or DEFAULT_RELEVANCE, fractions=PerturbationOptions.parse_fractions(fractions),
        mode=mode.value if mode else None, readout=readout.value if readout else None, layer=layer, seed=seed,
        probe=probe, crop_pct=crop_pct, interpolation=interpolation.value if interpolation else None,
        labels_from_dirs=labels_from_dirs, preprocess=preprocess.value, strict=strict, batch_size=batch_size,
        workers=workers, read_timeout=read_timeout, device=device, resume=resume, overwrite=overwrite,
    )
    img_size = build_size(preprocess.value, img_size)
    check_model_options(model, checkpoint, img_size=img_size, checkpoint_key=checkpoint_key)  # before reading the inputs
    resolve_device(device)
    paths = _input_images(images, limit, console)
    _check_output(output, paths)
    loaded = build_model(
        model, checkpoint, img_size=img_size, checkpoint_key=checkpoint_key, random_init=random_init,
        trust_checkpoint=trust_checkpoint, family=family.value if family else None, label=label,
    )

    def on_skip(path: str, reason: str) -> None:
        console.print(f"attnflow: skipped {escape(path)}: {escape(reason)}")

    progress = Progress(
        TextColumn("perturb"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, disable=quiet or not console.is_terminal, transient=True,
    )
    with progress:
        task = progress.add_task("perturb", total=len(paths))
        result = perturb(loaded, paths, output, options, on_skip=on_skip,
                         on_progress=lambda done, total: progress.update(task, completed=done))
    if quiet:
        return
    if loaded.weights == "random":  # after the run: an option the model refuses stays a one-line error
        console.print(f"attnflow: note: {escape(model)} has random weights (--random-init)")
    console.print(
        f"attnflow: wrote {escape(str(result.path))}: {result.n_images} images, {result.n_skipped} skipped, "
        f"{escape(loaded.label)} ({loaded.family}), mode {result.mode}, readout {result.readout}, "
        + (f"{result.n_new} new in {result.seconds:.1f} s" if not result.already_complete else "already complete, nothing to do"),
        markup=False,
    )
    summary = summarize([result.path], n_bootstrap=bootstrap, seed=seed)
    _print_notes(summary.notes)
    _deliver(summary, format)


plot_app = typer.Typer(help="Figures: per-layer metric curves and attention maps over images (needs matplotlib).", no_args_is_help=True,
                       rich_markup_mode=None)
app.add_typer(plot_app, name="plot")


@plot_app.command("curves")
def plot_curves_command(
    files: List[Path] = typer.Argument(..., help="Metrics files, one per model."),
    output: Path = typer.Option(..., "-o", "--output", help="Figure to write: .png, .svg or .pdf."),
    metric: List[str] = typer.Option([], "--metric", "-m", help=f"Metric to draw (repeatable; default: those of {', '.join(REGISTRY.defaults)} that some file has)."),
    heads: Reduction = typer.Option(Reduction.mean, help="How heads are reduced before images are averaged."),
    bootstrap: int = typer.Option(2000, min=1, max=MAX_BOOTSTRAP, help="Bootstrap resamples for the 95% bands."),
    seed: int = typer.Option(0, min=0, help="Seed of the bootstrap (a non-negative integer)."),
    share_y: ShareY = typer.Option(ShareY("unit"), "--share-y", help="unit: panels whose metrics share a unit share one y range; none: each panel scales its own."),
) -> None:
    """Per-layer curves: a panel per metric, a line per model with its 95% bootstrap band.

    x = block (relative depth when depths differ), y = mean over images; families are told apart by colour
    and line style. A dotted line marks what uniform attention scores where a metric has such a reference
    (1 for normalised entropies, the object's share of the image for *_fg_mass). PDFs embed TrueType fonts;
    SVG text stays text.
    """
    from .plot import plot_curves

    _check_metric_names(metric)
    path, _, notes = plot_curves(files, output, metrics=metric or None, heads=heads.value, n_bootstrap=bootstrap, seed=seed,
                                 share_y=share_y.value)
    _print_notes(notes)
    _stderr_console().print(f"attnflow: wrote {path}", markup=False)


@plot_app.command("maps")
def plot_maps_command(
    caches: List[Path] = typer.Argument(..., help="Attention caches, one row each."),
    image: List[str] = typer.Option(..., "--image", help="The image: an index, its path as stored, a file name or a stem; repeat it for a grid, a row per image and cache."),
    output: Path = typer.Option(..., "-o", "--output", help="Figure to write: .png, .svg or .pdf."),
    layer: int = typer.Option(-1, help="Block whose attention is drawn (0-based; negative from the end)."),
    heads: bool = typer.Option(False, "--heads", help="Also draw each head's map."),
    flow: bool = typer.Option(False, "--flow", help="Also draw the exact attention flow map to --layer (computed from the cache's full maps)."),
    scale: str = typer.Option("log", help="Colour scale shared by all maps, in units of the uniform share (1 = uniform): log (1/8 to 16, clipped) or linear (0 to the largest share drawn)."),
    heads_dir: Optional[Path] = typer.Option(None, "--heads-dir", help="Also draw the attention of the probe heads saved here by probe --save-heads for each cache's model (abmilp; ep: the mean of its queries); the cache needs the tokens (--save-tokens) of the block they were trained on."),
    ep_queries_each: bool = typer.Option(False, "--ep-queries-each", help="With --heads-dir, draw each ep query's map instead of their mean."),
) -> None:
    """Attention maps over images: a row per image and model (repeat --image for a grid).

    The image, the head-mean cls attention (or, without cls, the mean patch row) of --layer, the rollout
    map, and with --heads each head; the object mask outlined when the cache has one. Every map is drawn
    as attention x P (1 = the uniform share) on one colour scale, with a colour bar.
    """
    from .plot import plot_maps

    path, _, notes = plot_maps(caches, image[0] if len(image) == 1 else image, output, layer=layer, heads=heads, scale=scale, flow=flow,
                               heads_dir=heads_dir, ep_queries_each=ep_queries_each)
    _print_notes(notes)
    _stderr_console().print(f"attnflow: wrote {path}", markup=False)


@plot_app.command("perturb")
def plot_perturb_command(
    files: List[Path] = typer.Argument(..., help="Perturbation files (attnflow perturb), one per model."),
    output: Path = typer.Option(..., "-o", "--output", help="Figure to write: .png, .svg or .pdf."),
    bootstrap: int = typer.Option(2000, min=1, max=MAX_BOOTSTRAP, help="Bootstrap resamples for the 95% bands."),
    seed: int = typer.Option(0, min=0, help="Seed of the bootstrap (a non-negative integer)."),
) -> None:
    """Perturbation curves: a panel per relevance map, a line per model and order (positive solid, negative
    dashed), models coloured by family, with 95% bootstrap bands; probe accuracy in a second row where measured."""
    from .plot import plot_perturbation

    path, summary = plot_perturbation(files, output, n_bootstrap=bootstrap, seed=seed)
    _print_notes(summary.notes)
    _stderr_console().print(f"attnflow: wrote {path}", markup=False)

@app.command("report")
def report_command(
    files: List[Path] = typer.Argument(..., help="Attention caches (maps) and metrics files (curves, summary), one model each, in any order."),
    output: Path = typer.Option(..., "-o", "--output", help="The page to write (.html): one file, opened offline from disk."),
    images: int = typer.Option(REPORT_IMAGES, "--images", min=1, help="Images whose maps the page holds, sampled reproducibly (--seed) from those all caches share, stratified by class when they have labels; 100 demo images make about 6 MB."),
    probe: List[Path] = typer.Option([], "--probe", help="A probe results CSV (attnflow probe -f csv -o FILE, or the demo's probe.csv) to show as a table (repeatable)."),
    query_rows: QueryRows = typer.Option(QueryRows("mean"), "--query-rows", help="Every patch's own attention rows stored for the query view (P x P values per image and block, most of the page): their head mean, every head's as well (heads + 1 times as many), or none (hovering then only reads the map)."),
    groups: str = typer.Option("mim,jea", "--groups", help="The summary table, as compare's --groups: two families A,B, or all."),
    bootstrap: int = typer.Option(2000, min=1, max=MAX_BOOTSTRAP, help="Bootstrap resamples for the curves' bands and the summary."),
    seed: int = typer.Option(0, min=0, max=MAX_SEED, help="Seed of the image sample and the bootstrap (a non-negative integer)."),
) -> None:
    """Write one self-contained HTML page to explore the models' attention: curves, maps, tables.

    Curves of every metric per block with 95% bands (from metrics files); maps of a sample of images per block, head and readout, and each patch's own attention row on hover (from caches); the comparison summary and probe tables. Everything is inside the file: it opens offline.

    Example: attnflow report mae.h5 dino.h5 mae_metrics.h5 dino_metrics.h5 -o report.html --images 100
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .report import build_report, check_output

    check_output(output)
    console = _stderr_console()
    progress = Progress(TextColumn("report"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, disable=not console.is_terminal, transient=True)
    with progress:
        task = progress.add_task("report", total=None)
        report = build_report(files, output, probes=probe, n_images=images, query_rows=query_rows.value, groups=groups,
                              n_bootstrap=bootstrap, seed=seed,
                              on_progress=lambda done, total: progress.update(task, completed=done, total=total))
    _print_notes(report.notes)
    console.print(f"attnflow: wrote {report.path} ({report.size_bytes / 1e6:.1f} MB): maps of {len(report.image_ids)} images "
                  f"from {len(report.models)} model(s), curves of {len(report.curve_models)}", markup=False)


@app.command()
def info(
    path: Path = typer.Argument(..., help="An attnflow cache or metrics file."),
    format: InfoFormat = typer.Option(InfoFormat("table"), "--format", "-f", help="table or json."),
) -> None:
    """Print what an attnflow file holds: its attributes and dataset shapes."""
    from .store.read import describe

    described = describe(path)
    if format is InfoFormat("json"):
        json.dump(described, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return
    rows = [{"key": k, "value": v} for k, v in described["attrs"].items()]
    rows += [
        {"key": f"/{name}", "value": f"{'x'.join(map(str, d['shape'])) or 'scalar'} {d['dtype']}"
                                     + (f" ({', '.join(d['dims'])})" if d.get("dims") else "")}
        for name, d in described["datasets"].items()
    ]
    _deliver(Table(rows, ["key", "value"], str(path)), Format.table)


@app.command()
def models(
    family: Optional[Family] = typer.Option(None, help="Only models of this family."),
    format: Format = typer.Option(Format.table, "--format", "-f", help="table, markdown, csv, tsv or json."),
) -> None:
    """List the pretrained timm ViTs attnflow supports, with their inferred family."""
    from .models import supported_pretrained

    rows = [{"model": n, "family": f} for n, f in supported_pretrained(family.value if family else None)]
    _deliver(Table(rows, ["model", "family"], "pretrained ViTs in timm"), format)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, AttnflowNote):
        _print_notes([message])
    else:
        print(f"attnflow: warning: {message}", file=sys.stderr)


class _Interrupted(BaseException):
    """Ctrl-C or SIGTERM. Not a KeyboardInterrupt, which typer turns into a silent exit: a stopped run
    unwinds like any error (its committed batches stay resumable) and says so in one line."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum, frame) -> None:
    raise _Interrupted(signum)


def _flags_of_command(args: list[str]) -> Callable[[str], str]:
    """How the command on this command line names a Python parameter: by its long flag (``batch_size`` ->
    ``--batch-size``) or an argument's metavar (``IMAGES``); a parameter it lacks, as a flag would be spelled."""
    command = typer.main.get_command(app)
    words = iter(a for a in args if not a.startswith("-"))
    while hasattr(command, "commands") and (word := next(words, None)) in command.commands:
        command = command.commands[word]
    names = {}
    for parameter in getattr(command, "params", []):
        if parameter.param_type_name == "option":
            names[parameter.name] = max(parameter.opts, key=len)
        else:
            names[parameter.name] = parameter.name.upper()
    return lambda name: names.get(name, "--" + name.replace("_", "-"))


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 1; Ctrl-C and SIGTERM one
    line and the shell's codes 130 and 143."""
    warnings.showwarning = _show_warning
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        app()
    except ReadStalled as e:
        sys.stdout.flush()
        print(f"attnflow: error: {e}", file=sys.stderr, flush=True)
        # multiprocessing's exit handler would join the worker that the kernel holds in the hung read
        os._exit(1)
    except OptionError as e:
        print(f"attnflow: error: {e.render(_flags_of_command(sys.argv[1:]), assigns=' ')}", file=sys.stderr)
        sys.exit(2)
    except AttnflowError as e:
        print(f"attnflow: error: {e}", file=sys.stderr)
        sys.exit(1)
    except _Interrupted as e:
        what = "interrupted" if e.signum == signal.SIGINT else "stopped (SIGTERM)"
        print(f"attnflow: {what}; an interrupted extract or metrics run continues with --resume", file=sys.stderr)
        sys.exit(128 + e.signum)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
