"""Put several models' metrics side by side and test whether two groups of models differ.

Input is metrics files (one per model). For every model, metric and selected layer the per-image values
(heads reduced first by ``heads``) give a mean, a standard deviation, a 95% bootstrap confidence interval of
the mean and the number of images. Models are grouped by family (:mod:`attnflow.families`); for each
pair of groups summarised (``groups``: MIM vs JEA by default, any two families, or every pair present),
the images of all models of group A and of all models of group B are pooled per metric and layer, and
compared with a bootstrap CI of the difference of means A - B, a two-sided Mann-Whitney U test and Cliff's
delta.

Bootstrap streams, so that every interval can be recomputed by hand: model ``i`` (0-based, in input order)
draws its resamples from ``numpy.random.default_rng([seed, i])``, resample after resample, each
``integers(0, n, n)`` over its n images, shared by all its metrics and layers; summary row ``j`` (counted
over all pairs, in output order) draws from ``default_rng([seed, 1000 + j])`` first all group A resamples,
then all group B resamples. Intervals are the 2.5 and 97.5 percentiles (numpy's default linear
interpolation). Images whose value is NaN are left out of that metric's statistics.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from scipy import stats

from .cache import open_metrics
from .errors import AttnflowError, OptionError
from .families import FAMILIES, title
from .metrics import FUSIONS, REGISTRY, reduce_heads
from .render import Format, emit, format_cell, json_value

ROW_COLUMNS = ("model", "family", "metric", "layer", "mean", "std", "ci_low", "ci_high", "n_images")
DEFAULT_GROUPS = ("mim", "jea")
ALL_PAIRS = "all"  # --groups all: every pair of the families present
# The summary's generic keys and, for the groups mim,jea, the names attnflow 0.1 gave them in json:
# written as aliases for one release.
LEGACY_SUMMARY_KEYS = {
    "a_mean": "mim_mean", "b_mean": "jea_mean", "n_a": "n_mim", "n_b": "n_jea", "a_models": "mim_models",
    "b_models": "jea_models",
}
ALPHA = 0.05


@dataclass
class ModelMetrics:
    """One model's per-image values, heads already reduced: ``values[metric]`` is (n, L) float64."""

    label: str
    family: str
    path: Path
    num_layers: int
    img_size: tuple[int, ...]
    has_cls: bool
    values: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class LayerRow:
    """One row of the per-layer tables: its name and each model's layer index there (None: no such layer)."""

    name: str
    index: tuple[int | None, ...]


def load_models(
    paths: Sequence[str | Path],
    *,
    labels: Sequence[str | None] = (),
    families: Sequence[str | None] = (),
    metrics: Sequence[str] | None = None,
    heads: str = "mean",
    notes: list[str] | None = None,
) -> tuple[list[ModelMetrics], list[str]]:
    """Read the requested metrics of every file; returns the models and the metric names to report.

    ``labels``/``families`` override the files' own, position by position (``None`` keeps the file's).
    """
    notes = notes if notes is not None else []
    if not paths:
        raise AttnflowError("no metrics files to compare")
    if heads not in FUSIONS:
        raise AttnflowError(f"unknown head reduction '{heads}' (choose from {', '.join(FUSIONS)})")
    if len(labels) > len(paths) or len(families) > len(paths):
        raise AttnflowError(f"{max(len(labels), len(families))} labels/families given for {len(paths)} files")
    for name in metrics or ():
        if name not in REGISTRY:
            raise AttnflowError(f"unknown metric '{name}' (known: {', '.join(sorted(REGISTRY.names()))})")
    models: list[ModelMetrics] = []
    available: list[set[str]] = []
    for i, path in enumerate(paths):
        with open_metrics(path) as mf:
            a = mf.attrs
            family = (families[i] if i < len(families) else None) or a.get("family", "unknown")
            if family not in FAMILIES:
                raise AttnflowError(f"unknown family '{family}' for {path} (choose from {', '.join(FAMILIES)})")
            model = ModelMetrics(
                label=(labels[i] if i < len(labels) else None) or a.get("label") or Path(path).stem,
                family=family,
                path=Path(path),
                num_layers=int(a["num_layers"]),
                img_size=tuple(a.get("img_size", ())),
                has_cls=bool(a.get("has_cls", True)),
            )
            names = set(mf.metric_names)
            available.append(names)
            for name in metrics or REGISTRY.defaults:
                if name not in names:
                    continue
                data = mf.values(name).astype(np.float64)
                level = REGISTRY[name].level
                if level == "head":
                    data = reduce_heads(torch.from_numpy(data), heads, dim=-1).numpy()
                elif level == "image":  # one value per image: the same at every layer
                    data = np.repeat(data[:, None], model.num_layers, axis=1)
                model.values[name] = data
            models.append(model)
    _make_labels_unique(models, notes)
    # without --metric: the registry's default set, those of it that some file has
    chosen = list(metrics) if metrics else [m for m in REGISTRY.defaults if any(m in names for names in available)]
    for name in chosen:
        lacking = [m.label for m in models if name not in m.values]
        if len(lacking) == len(models):
            notes.append(f"no file has metric '{name}'")
        elif lacking:
            notes.append(f"metric '{name}' is missing for {', '.join(lacking)} (left blank)")
    for m in models:
        if not m.has_cls:
            notes.append(f"{m.label} has no cls token: its cls_* metrics are NaN")
    if len({m.img_size for m in models}) > 1:
        sizes = ", ".join(f"{m.label} {'x'.join(map(str, m.img_size))}" for m in models)
        notes.append(f"models ran at different resolutions ({sizes}): attn_distance is in each model's input pixels")
    return models, chosen


def _make_labels_unique(models: list[ModelMetrics], notes: list[str]) -> None:
    seen: dict[str, int] = {}
    for m in models:
        if m.label in seen:
            seen[m.label] += 1
            new = f"{m.label}#{seen[m.label]}"
            notes.append(f"two models are labelled '{m.label}'; {m.path} is shown as '{new}'")
            m.label = new
        else:
            seen[m.label] = 1


def plan_layers(models: Sequence[ModelMetrics], spec: str = "all", depth: str = "absolute", notes: list[str] | None = None,
                option: str = "--layers") -> list[LayerRow]:
    """Rows for ``--layers all|last|N,M,...`` at absolute layer indices or at relative depth.

    Relative depth d in (0, 1] maps to layer ``round(d * L) - 1`` of an L-block model; ``all`` then means
    the depths of the shallowest model's blocks, ``(k + 1) / L_min``, and explicit values are fractions.
    Absolute indices are 0-based; negative ones count from each model's last layer. An explicit index no
    model has is an error; one that only some models lack is a note (``option`` names the flag in both).
    """
    notes = notes if notes is not None else []
    depths = [m.num_layers for m in models]
    if depth not in ("absolute", "relative"):
        raise AttnflowError(f"--depth must be absolute or relative, not '{depth}'")
    spec = spec.strip()
    if spec == "last":
        return [LayerRow("last", tuple(L - 1 for L in depths))]
    if depth == "relative":
        if spec == "all":
            fractions = [(k + 1) / min(depths) for k in range(min(depths))]
        else:
            fractions = list(dict.fromkeys(_parse_list(spec, float, "--layers")))
            if any(not 0 < f <= 1 for f in fractions):
                raise AttnflowError("with --depth relative, --layers takes fractions of depth in (0, 1]")
        return [
            LayerRow(f"{f:.3g}", tuple(min(L - 1, max(0, round(f * L) - 1)) for L in depths)) for f in fractions
        ]
    if len(set(depths)) > 1:
        notes.append(
            "models have different depths (" + ", ".join(f"{m.label} {m.num_layers}" for m in models)
            + "): rows are absolute layer indices; --depth relative aligns them"
        )
    indices = list(range(max(depths))) if spec == "all" else list(dict.fromkeys(_parse_list(spec, int, "--layers")))
    rows = []
    for i in indices:
        per_model = tuple((i if i >= 0 else L + i) if -L <= i < L else None for L in depths)
        lacking = [m for m, index in zip(models, per_model) if index is None]
        if spec != "all" and len(lacking) == len(models):
            raise AttnflowError(
                f"{option} {i}: no model has layer {i} (" + ", ".join(f"{m.label} has {m.num_layers} blocks" for m in models)
                + "; layers are 0-based, negative from the end)"
            )
        if spec != "all" and lacking:
            notes.append(f"{option} {i}: " + ", ".join(f"{m.label} has only {m.num_layers} blocks" for m in lacking)
                         + (" (left blank)" if option == "--layers" else " (left out of the summary)"))
        rows.append(LayerRow(str(i), per_model))
    return rows


def _parse_list(spec: str, kind, option: str) -> list:
    try:
        return [kind(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise AttnflowError(f"{option} takes all, last or a comma-separated list, not '{spec}'") from None


def _finite_mean_resamples(x: np.ndarray, rng: np.random.Generator, n_resamples: int) -> np.ndarray:
    """(n, K) values -> (n_resamples, K) means over the finite values of bootstrap resamples of the rows.

    Resample r is ``rng.integers(0, n, n)``; rows are counted with bincount and the means taken as one
    matrix product per block of resamples, with all K columns sharing the resamples.
    """
    n, K = x.shape
    finite = np.isfinite(x)
    x0, f = np.where(finite, x, 0.0), finite.astype(np.float64)
    out = np.empty((n_resamples, K))
    block = max(1, min(n_resamples, 5_000_000 // max(n, 1)))
    for start in range(0, n_resamples, block):
        b = min(block, n_resamples - start)
        idx = rng.integers(0, n, size=(b, n))
        counts = np.bincount((idx + n * np.arange(b)[:, None]).ravel(), minlength=b * n).reshape(b, n).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start:start + b] = (counts @ x0) / (counts @ f)
    return out


def _percentile_ci(means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.percentile(means, [2.5, 97.5], axis=0)
    return low, high


def describe(
    models: Sequence[ModelMetrics], metrics: Sequence[str], rows: Sequence[LayerRow], *, n_bootstrap: int = 2000, seed: int = 0
) -> list[dict[str, Any]]:
    """Long-format records: one per model x metric x layer row (``ROW_COLUMNS``)."""
    if n_bootstrap < 1:
        raise AttnflowError(f"--bootstrap must be at least 1, got {n_bootstrap}")
    records = []
    for i, model in enumerate(models):
        cells = [(name, row, idx) for name in metrics if name in model.values for row in rows
                 if (idx := row.index[i]) is not None]
        if not cells:
            continue
        x = np.stack([model.values[name][:, idx] for name, _, idx in cells], axis=1)  # (n, K)
        finite = np.isfinite(x)
        n_ok = finite.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            means = np.nanmean(x, axis=0)
            stds = np.nanstd(x, axis=0, ddof=1)
        low, high = _percentile_ci(_finite_mean_resamples(x, np.random.default_rng([seed, i]), n_bootstrap))
        for k, (name, row, idx) in enumerate(cells):
            records.append({
                "model": model.label, "family": model.family, "metric": name, "layer": int(idx),
                "mean": float(means[k]), "std": float(stds[k]) if n_ok[k] > 1 else math.nan,
                "ci_low": float(low[k]), "ci_high": float(high[k]), "n_images": int(n_ok[k]),
                "row": row.name,
            })
    return records


def cliffs_delta(u_statistic: float, n_x: int, n_y: int) -> float:
    """Cliff's delta P(X > Y) - P(X < Y) from the Mann-Whitney U of X (ties count one half)."""
    return 2.0 * u_statistic / (n_x * n_y) - 1.0


def parse_groups(spec: str | Sequence[str]) -> tuple[str, str] | None:
    """``--groups``: ``"A,B"`` (or a pair of names) -> ``(A, B)``, two different families; ``"all"`` -> None,
    meaning every pair of the families present."""
    if isinstance(spec, str):
        if spec.strip() == ALL_PAIRS:
            return None
        names = [part.strip() for part in spec.split(",")]
    else:
        names = [str(part) for part in spec]
    shown = spec if isinstance(spec, str) else ",".join(names)
    if len(names) != 2 or not all(names):
        raise OptionError("--groups", f"takes two families A,B or {ALL_PAIRS}, not '{shown}'")
    for name in names:
        if name not in FAMILIES:
            raise OptionError("--groups", f"unknown family '{name}' (choose from {', '.join(FAMILIES)})")
    if names[0] == names[1]:
        raise OptionError("--groups", f"names '{names[0]}' twice; give two different families")
    return names[0], names[1]


def summary_pairs(models: Sequence[ModelMetrics], pair: tuple[str, str] | None, notes: list[str]) -> list[tuple[str, str]]:
    """The group pairs to summarise: ``pair`` when both of its families are present, or with ``pair`` None
    every pair of the families present, in family order. A pair that cannot be summarised is a note."""
    present = [f for f in FAMILIES if any(m.family == f for m in models)]
    if pair is None:
        pairs = list(itertools.combinations(present, 2))
        if not pairs and len(models) > 1:
            notes.append(f"no summary: every model is {title(present[0])}; --groups {ALL_PAIRS} compares the families present")
        return pairs
    missing = [f for f in pair if f not in present]
    if missing:
        if len(models) > 1:
            notes.append(f"no {title(pair[0])}-vs-{title(pair[1])} summary: no {title(missing[0])} model among the files "
                         f"(families here: {', '.join(present)}); --groups picks the two families")
        return []
    return [pair]


def verdict(metric: str, diff: float, ci_low: float, ci_high: float, p_value: float,
            groups: tuple[str, str] = DEFAULT_GROUPS) -> str:
    """In words, what the difference ``diff`` = group A - group B of ``metric`` says, when it is clear."""
    if not all(math.isfinite(v) for v in (diff, ci_low, ci_high, p_value)):
        return "not available"
    if p_value >= ALPHA or ci_low <= 0 <= ci_high:
        return "no clear difference"
    more, less = (title(groups[0]), title(groups[1])) if diff > 0 else (title(groups[1]), title(groups[0]))
    declared = REGISTRY.get(metric)
    return f"{more} {declared.meaning}" if declared else f"{more} {metric} higher than {less}"


def summarize(
    models: Sequence[ModelMetrics], metrics: Sequence[str], rows: Sequence[LayerRow], *, n_bootstrap: int = 2000,
    seed: int = 0, notes: list[str] | None = None, groups: Sequence[tuple[str, str]] = (DEFAULT_GROUPS,),
) -> list[dict[str, Any]]:
    """Group A vs group B per pair in ``groups``, metric and layer row; a pair whose families are not both
    present gives no rows."""
    notes = notes if notes is not None else []
    out: list[dict[str, Any]] = []
    for pair in groups:
        members = [[i for i, m in enumerate(models) if m.family == fam] for fam in pair]
        if not all(members):
            continue
        for fam, indices in zip(pair, members):
            if len(indices) > 1:
                notes.append(f"summary pools the images of {len(indices)} {title(fam)} models: "
                             + ", ".join(models[i].label for i in indices))
        labels = [[models[i].label for i in indices] for indices in members]
        for name in metrics:
            for row in rows:
                pools = []
                for indices in members:
                    parts = [models[i].values[name][:, row.index[i]] for i in indices
                             if name in models[i].values and row.index[i] is not None]
                    values = np.concatenate(parts) if parts else np.empty(0)
                    pools.append(values[np.isfinite(values)])
                j = len(out)
                out.append(_compare_pools(name, row, pair, pools, labels, n_bootstrap, np.random.default_rng([seed, 1000 + j])))
    return out


def _compare_pools(name: str, row: LayerRow, pair: tuple[str, str], pools: list[np.ndarray], labels: list[list[str]],
                   n_bootstrap: int, rng: np.random.Generator) -> dict[str, Any]:
    """One summary record: group A's pooled values ``pools[0]`` against group B's ``pools[1]``."""
    a, b = pools
    record: dict[str, Any] = {"metric": name, "layer": row.name, "a_group": pair[0], "b_group": pair[1]}
    record.update(dict.fromkeys(("a_mean", "b_mean", "diff", "ci_low", "ci_high", "p_value", "cliffs_delta"), math.nan))
    record.update({"n_a": int(a.size), "n_b": int(b.size), "a_models": ", ".join(labels[0]), "b_models": ", ".join(labels[1])})
    if a.size == 0 or b.size == 0:
        record["verdict"] = "not available"
        return record
    a_means = _finite_mean_resamples(a[:, None], rng, n_bootstrap)[:, 0]
    b_means = _finite_mean_resamples(b[:, None], rng, n_bootstrap)[:, 0]
    low, high = _percentile_ci(a_means - b_means)
    test = stats.mannwhitneyu(a, b, alternative="two-sided")
    diff = float(a.mean() - b.mean())
    record.update({
        "a_mean": float(a.mean()), "b_mean": float(b.mean()), "diff": diff,
        "ci_low": float(low), "ci_high": float(high), "p_value": float(test.pvalue),
        "cliffs_delta": cliffs_delta(float(test.statistic), a.size, b.size),
    })
    record["verdict"] = verdict(name, diff, record["ci_low"], record["ci_high"], record["p_value"], pair)
    return record


def with_legacy_keys(record: dict[str, Any]) -> dict[str, Any]:
    """A summary record plus, for the groups mim,jea, its keys under attnflow 0.1's names (``mim_mean``...)."""
    if (record.get("a_group"), record.get("b_group")) != DEFAULT_GROUPS:
        return record
    return {**record, **{old: record[new] for new, old in LEGACY_SUMMARY_KEYS.items()}}


def layer_tables(
    records: Sequence[dict[str, Any]], models: Sequence[ModelMetrics], metrics: Sequence[str], rows: Sequence[LayerRow]
) -> list[tuple[str, list[dict[str, Any]], list[str]]]:
    """Per metric a table ``(title, rows, columns)``: a row per layer row, a column per model, grouped by
    family in :data:`attnflow.families.FAMILIES` order (MIM first, then JEA, ...), each cell the mean over
    images."""
    order = sorted(range(len(models)), key=lambda i: FAMILIES.index(models[i].family))
    headers = {i: f"{models[i].label} ({models[i].family})" for i in order}
    cells = {(r["model"], r["metric"], r["row"]): r["mean"] for r in records}
    tables = []
    for name in metrics:
        table_rows = []
        for row in rows:
            entry: dict[str, Any] = {"layer": row.name}
            for i in order:
                entry[headers[i]] = cells.get((models[i].label, name, row.name), "")
            table_rows.append(entry)
        tables.append((name, table_rows, ["layer", *(headers[i] for i in order)]))
    return tables


def summary_table(summary: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The summary records of one group pair as display rows; the mean columns are named after the groups."""
    a, b = title(summary[0]["a_group"]), title(summary[0]["b_group"])
    rows = [
        {
            "metric": s["metric"], "layer": s["layer"], a: s["a_mean"], b: s["b_mean"], "diff": s["diff"],
            "95% CI": f"[{format_cell(s['ci_low'])}, {format_cell(s['ci_high'])}]",
            "p": f"{s['p_value']:.2g}" if math.isfinite(s["p_value"]) else "nan",
            "cliff's d": s["cliffs_delta"], "n": f"{s['n_a']}/{s['n_b']}", "verdict": s["verdict"],
        }
        for s in summary
    ]
    return rows, ["metric", "layer", a, b, "diff", "95% CI", "p", "cliff's d", "n", "verdict"]


@dataclass
class Comparison:
    """Everything ``attnflow compare`` reports: per-cell records, the group summaries and notes."""

    models: list[ModelMetrics]
    metrics: list[str]
    rows: list[LayerRow]
    records: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    notes: list[str]
    heads: str
    pairs: list[tuple[str, str]] = field(default_factory=list)  # the group pairs summarised, in summary order

    def summaries(self) -> list[tuple[tuple[str, str], list[dict[str, Any]]]]:
        """The summary records of each group pair that has any, in output order."""
        by_pair = [(pair, [r for r in self.summary if (r["a_group"], r["b_group"]) == pair]) for pair in self.pairs]
        return [(pair, records) for pair, records in by_pair if records]

    def write(self, fmt, out) -> None:
        """Write in ``fmt`` (a :class:`attnflow.render.Format`): tables, long-format csv/tsv or json."""
        fmt = Format(fmt)
        if fmt is Format.json:
            clean = lambda r: {k: json_value(v) for k, v in r.items() if k != "row"}  # noqa: E731
            json.dump({"rows": [clean(r) for r in self.records], "summary": [clean(with_legacy_keys(r)) for r in self.summary]},
                      out, indent=2)
            out.write("\n")
        elif fmt in (Format.csv, Format.tsv):
            emit(self.records, list(ROW_COLUMNS), fmt, out=out)
        else:
            for metric, table_rows, columns in layer_tables(self.records, self.models, self.metrics, self.rows):
                emit(table_rows, columns, fmt, title=f"{metric} (mean over images, heads: {self.heads})", out=out)
                out.write("\n")
            for k, ((a, b), records) in enumerate(self.summaries()):
                if k:
                    out.write("\n")
                display, columns = summary_table(records)
                emit(display, columns, fmt, title=f"{title(a)} vs {title(b)}", out=out)


def compare_files(
    paths: Sequence[str | Path],
    *,
    labels: Sequence[str | None] = (),
    families: Sequence[str | None] = (),
    metrics: Sequence[str] | None = None,
    heads: str = "mean",
    layers: str = "all",
    depth: str = "absolute",
    summary_layers: str = "last",
    groups: str | Sequence[str] = DEFAULT_GROUPS,
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> Comparison:
    """Load metrics files and compute every table ``attnflow compare`` prints.

    ``groups`` chooses the summary: two families ``"A,B"`` (or ``("A", "B")``; default MIM vs JEA), whose
    pooled images are compared as A - B, or ``"all"`` for every pair of the families present.
    """
    notes: list[str] = []
    pair = parse_groups(groups)
    metrics = list(dict.fromkeys(metrics)) if metrics else metrics  # a metric asked for twice: one table
    models, names = load_models(paths, labels=labels, families=families, metrics=metrics, heads=heads, notes=notes)
    pairs = summary_pairs(models, pair, notes)
    _note_repeated_files(models, pairs, notes)
    rows = plan_layers(models, layers, depth, notes)
    records = describe(models, names, rows, n_bootstrap=n_bootstrap, seed=seed)
    summary_rows = plan_layers(models, summary_layers, depth, notes if pairs else [], option="--summary-layers")
    summary = summarize(models, names, summary_rows, n_bootstrap=n_bootstrap, seed=seed, notes=notes, groups=pairs)
    return Comparison(models, names, rows, records, summary, list(dict.fromkeys(notes)), heads, pairs)


def _note_repeated_files(models: Sequence[ModelMetrics], pairs: Sequence[tuple[str, str]], notes: list[str]) -> None:
    """One file given twice is one model shown twice; in a summary its images would count once per copy."""
    copies: dict[str, list[ModelMetrics]] = {}
    for m in models:
        copies.setdefault(os.path.realpath(m.path), []).append(m)
    for same in copies.values():
        if len(same) > 1:
            pooled = [f"{title(a)}-vs-{title(b)}" for a, b in pairs if any(sum(m.family == fam for m in same) > 1 for fam in (a, b))]
            summaries = f"the {' and '.join(pooled)} {'summary counts' if len(pooled) == 1 else 'summaries count'}"
            notes.append(f"{same[0].path} is given {len(same)} times (as {', '.join(m.label for m in same)})"
                         + (f"; {summaries} its images once per copy" if pooled else ""))
