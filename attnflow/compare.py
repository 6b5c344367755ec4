"""Put several models' metrics side by side and test whether two groups of models differ.

Input is metrics files (one per model), or perturbation files (``attnflow perturb``, one per model; not both
kinds in one comparison). A perturbation file's "metrics" are the per-image areas of
:data:`attnflow.perturb.AREA_QUANTITIES` (``gap``, negative AUC - positive AUC, by default) and its rows are
its relevance maps instead of layers; everything below holds for them as it is. For every model, metric and selected layer the per-image values
(heads reduced first by ``heads``) give a mean, a standard deviation, a 95% bootstrap confidence interval of
the mean and the number of images. Models are grouped by family (:mod:`attnflow.families`); for each
pair of groups summarised (``groups``: MIM vs JEA by default, any two families, or every pair present),
:func:`summarize` tests the difference A - B per metric and layer with :mod:`attnflow.inference`: the
networks are the replicates when a group holds several (a claim about the families), two networks are
compared over images when each group holds one (a claim about those two networks), images are paired by id
when the networks share them, and the whole summary is one family of tests (Holm by default).

Bootstrap streams, so that every interval can be recomputed by hand: model ``i`` (0-based, in input order)
draws its resamples from ``numpy.random.default_rng([seed, i])``, resample after resample, each
``integers(0, n, n)`` over its n images, shared by all its metrics and layers; summary row ``j`` (counted
over all pairs, in output order) draws from ``default_rng([seed, 1000 + j])`` in the order
:mod:`attnflow.inference` documents. Intervals are the 2.5 and 97.5 percentiles (numpy's default linear
interpolation). Images whose value is NaN are left out of that metric's statistics.
"""
from __future__ import annotations

import contextlib
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

from .store.names import PERTURB_SCHEMA
from .store.validate import open_hdf5
from .store.read import open_metrics, open_perturbation
from .errors import AttnflowError, OptionError
from .notes import collect, note
from .families import FAMILIES, title
from .inference import (
    ALPHA, MAX_EXACT_RELABELINGS, Correction, adjust, between_models, bootstrap_means, percentile_ci, smallest_adjusted,
)
from .choices import choice_values
from .metrics import REGISTRY, Fusion, reduce_heads
from .render import Format, emit, format_cell, json_value

__all__ = [
    "ROW_COLUMNS", "METRICS", "PERTURBATION", "AXES", "DEFAULT_GROUPS", "ALL_PAIRS", "LEGACY_SUMMARY_KEYS",
    "ModelMetrics", "LayerRow", "load_models", "input_kind", "load_perturbations", "plan_relevance", "plan_layers",
    "describe", "parse_groups", "summary_pairs", "verdict", "summarize", "with_legacy_keys", "layer_tables",
    "EFFECT_SYMBOLS", "summary_table", "Comparison", "compare_files",
]

ROW_COLUMNS = ("model", "family", "metric", "layer", "mean", "std", "ci_low", "ci_high", "n_images")
# The kinds of file compare reads, by schema, and the name of their rows' axis in every output.
METRICS, PERTURBATION = "metrics", "perturbation"
AXES = {METRICS: "layer", PERTURBATION: "relevance"}
DEFAULT_GROUPS = ("mim", "jea")
ALL_PAIRS = "all"  # --groups all: every pair of the families present
# The summary's generic keys and, for the groups mim,jea, the names attnflow 0.1 gave them in json:
# written as aliases for one release.
LEGACY_SUMMARY_KEYS = {
    "a_mean": "mim_mean", "b_mean": "jea_mean", "n_a": "n_mim", "n_b": "n_jea", "a_models": "mim_models",
    "b_models": "jea_models",
}


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
    image_ids: list[str] = field(default_factory=list)
    given_label: str = ""  # the label before two equal ones were told apart (#2)
    weights: str = ""
    checkpoint_sha256: str = ""
    model_name: str = ""
    relevance: list[str] = field(default_factory=list)  # a perturbation file's relevance maps: the columns of values

    @classmethod
    def from_file(cls, path: str | Path, attrs, image_ids: Sequence[str], *, label: str | None, family: str | None,
                  **fields: Any) -> "ModelMetrics":
        """A model as its file's root attributes describe it (``label`` and ``family`` override them), with
        no values yet; an unknown family is refused."""
        family = family or attrs.get("family", "unknown")
        if family not in FAMILIES:
            raise AttnflowError(f"unknown family '{family}' for {path} (choose from {', '.join(FAMILIES)})")
        label = label or attrs.get("label") or Path(path).stem
        return cls(
            label=label, family=family, path=Path(path), num_layers=int(attrs["num_layers"]),
            img_size=tuple(attrs.get("img_size", ())), has_cls=bool(attrs.get("has_cls", True)),
            image_ids=_image_keys(image_ids, attrs.get("working_dir")), given_label=label,
            weights=str(attrs.get("weights", "")), checkpoint_sha256=str(attrs.get("checkpoint_sha256", "")),
            model_name=str(attrs.get("model", "")), **fields,
        )

    def network_keys(self) -> list[tuple[str, str]]:
        """What identifies the network behind the file: the file itself, its label, its checkpoint's digest,
        or the hub weights of a pretrained name."""
        keys = [("file", os.path.realpath(self.path)), ("label", self.given_label or self.label)]
        if self.checkpoint_sha256:
            keys.append(("checkpoint sha256", self.checkpoint_sha256))
        if self.weights == "pretrained" and self.model_name:
            keys.append(("pretrained weights", self.model_name))
        return keys


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
) -> tuple[list[ModelMetrics], list[str]]:
    """Read the requested metrics of every file; returns the models and the metric names to report.

    ``labels``/``families`` override the files' own, position by position (``None`` keeps the file's).
    """
    if not paths:
        raise AttnflowError("no metrics files to compare")
    if heads not in choice_values(Fusion):
        raise AttnflowError(f"unknown head reduction '{heads}' (choose from {', '.join(Fusion)})")
    if len(labels) > len(paths) or len(families) > len(paths):
        raise AttnflowError(f"{max(len(labels), len(families))} labels/families given for {len(paths)} files")
    for name in metrics or ():
        if name not in REGISTRY:
            from .perturb import AREA_QUANTITIES

            if name in AREA_QUANTITIES:
                raise AttnflowError(f"--metric {name}: a quantity of perturbation files (attnflow perturb); these are metrics files")
            raise AttnflowError(f"unknown metric '{name}' (known: {', '.join(sorted(REGISTRY.names()))})")
    models: list[ModelMetrics] = []
    available: list[set[str]] = []
    for i, path in enumerate(paths):
        with open_metrics(path) as mf:
            model = ModelMetrics.from_file(path, mf.attrs, mf.image_ids, label=labels[i] if i < len(labels) else None,
                                           family=families[i] if i < len(families) else None)
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
    _make_labels_unique(models)
    # without --metric: the registry's default set, those of it that some file has
    chosen = list(metrics) if metrics else [m for m in REGISTRY.defaults if any(m in names for names in available)]
    for name in chosen:
        lacking = [m.label for m in models if name not in m.values]
        if len(lacking) == len(models):
            note(f"no file has metric '{name}'")
        elif lacking:
            note(f"metric '{name}' is missing for {', '.join(lacking)} (left blank)")
    for m in models:
        if not m.has_cls:
            note(f"{m.label} has no cls token: its cls_* metrics are NaN")
    if len({m.img_size for m in models}) > 1:
        sizes = ", ".join(f"{m.label} {'x'.join(map(str, m.img_size))}" for m in models)
        note(f"models ran at different resolutions ({sizes}): attn_distance is in each model's input pixels")
    return models, chosen


def _image_keys(image_ids: Sequence[str], working_dir: str | None) -> list[str]:
    """Image ids as paths that two runs from different folders agree on: relative ids joined to the folder
    the run resolved them from."""
    if not working_dir:
        return list(image_ids)
    return [os.path.normpath(os.path.join(working_dir, i)) for i in image_ids]


def _make_labels_unique(models: list[ModelMetrics]) -> None:
    seen: dict[str, int] = {}
    for m in models:
        if m.label in seen:
            seen[m.label] += 1
            new = f"{m.label}#{seen[m.label]}"
            note(f"two models are labelled '{m.label}'; {m.path} is shown as '{new}'")
            m.label = new
        else:
            seen[m.label] = 1


def input_kind(paths: Sequence[str | Path]) -> str:
    """:data:`METRICS` or :data:`PERTURBATION`: what the files are, told by their schema. Perturbation files
    and other files together are refused in one line naming one of each; a file of neither kind is left to the
    metrics reader, which says what it is."""
    kinds: dict[str, Path] = {}
    for path in paths:
        with open_hdf5(path) as f:
            schema = f.attrs.get("schema")
        schema = schema.decode() if isinstance(schema, bytes) else schema
        kinds.setdefault(PERTURBATION if schema == PERTURB_SCHEMA else METRICS, Path(path))
    if len(kinds) > 1:
        raise AttnflowError(
            f"{kinds[PERTURBATION]} is a perturbation file and {kinds[METRICS]} is not: compare takes metrics files or "
            "perturbation files (attnflow perturb), not both in one comparison"
        )
    return next(iter(kinds), METRICS)


def load_perturbations(
    paths: Sequence[str | Path],
    *,
    labels: Sequence[str | None] = (),
    families: Sequence[str | None] = (),
    quantities: Sequence[str] | None = None,
) -> tuple[list[ModelMetrics], list[str]]:
    """Read perturbation files (validated) as models whose values are per-image areas: ``values[q]`` is
    (n, R) float64 for each quantity q of :data:`attnflow.perturb.AREA_QUANTITIES` asked for (default
    ``gap``), column r the file's relevance map ``relevance[r]``. Returns the models and the quantities.

    Areas are comparable only over the same fractions (they span [0, max f]): files measured at other
    fractions are refused; files perturbed another way (``mode``, ``readout``) give a note."""
    from .perturb import AREA_QUANTITIES, DEFAULT_AREA_QUANTITIES, area_values

    if len(labels) > len(paths) or len(families) > len(paths):
        raise AttnflowError(f"{max(len(labels), len(families))} labels/families given for {len(paths)} files")
    for name in quantities or ():
        if name not in AREA_QUANTITIES:
            what = "a metric of metrics files" if name in REGISTRY else "unknown"
            raise AttnflowError(f"--metric {name}: {what}; perturbation files give {', '.join(AREA_QUANTITIES)}")
    chosen = list(dict.fromkeys(quantities or DEFAULT_AREA_QUANTITIES))
    models: list[ModelMetrics] = []
    settings: list[dict[str, Any]] = []
    for i, path in enumerate(paths):
        with open_perturbation(path) as pf:
            a = pf.attrs
            model = ModelMetrics.from_file(path, a, pf.image_ids, label=labels[i] if i < len(labels) else None,
                                           family=families[i] if i < len(families) else None, relevance=pf.relevance)
            areas = area_values(pf.fractions, pf.orders, pf.similarity().astype(np.float64))
            model.values = {name: areas[name] for name in chosen}
            if not len(model.image_ids):
                note(f"{path} holds no images")
            settings.append({"fractions": pf.fractions, "mode": a.get("mode"), "readout": a.get("readout")})
        models.append(model)
    for m, setting in zip(models[1:], settings[1:]):
        if setting["fractions"] != settings[0]["fractions"]:
            shown = lambda f: ",".join(f"{x:g}" for x in f)  # noqa: E731
            raise AttnflowError(
                f"{models[0].path} was perturbed at the fractions {shown(settings[0]['fractions'])} and {m.path} at "
                f"{shown(setting['fractions'])}: their areas span different ranges; run attnflow perturb with the same --fractions"
            )
    for key in ("mode", "readout"):
        if len({s[key] for s in settings}) > 1:
            note(f"the files were perturbed with different --{key} ("
                 + ", ".join(f"{m.label} {s[key]}" for m, s in zip(models, settings))
                 + "): their areas measure different perturbations")
    _make_labels_unique(models)
    return models, chosen


def plan_relevance(models: Sequence[ModelMetrics], relevance: Sequence[str] | None) -> list[LayerRow]:
    """Rows for perturbation files: one per relevance map (``relevance``, default every map some file holds,
    in file order), each model's index the map's column in its file (None: the file lacks it, a note; a map
    no file has is an error)."""
    present = list(dict.fromkeys(name for m in models for name in m.relevance))
    names = list(dict.fromkeys(relevance)) if relevance else present
    rows = []
    for name in names:
        index = tuple(m.relevance.index(name) if name in m.relevance else None for m in models)
        lacking = [m.label for m, i in zip(models, index) if i is None]
        if len(lacking) == len(models):
            raise AttnflowError(f"--relevance {name}: no file has that relevance map (they have {', '.join(present)})")
        if lacking:
            note(f"relevance map '{name}' is missing for {', '.join(lacking)} (left blank, and left out of that map's "
                 "summary rows)")
        rows.append(LayerRow(name, index))
    return rows


def plan_layers(models: Sequence[ModelMetrics], spec: str = "all", depth: str = "absolute",
                option: str = "--layers") -> list[LayerRow]:
    """Rows for ``--layers all|last|N,M,...`` at absolute layer indices or at relative depth.

    Relative depth d in (0, 1] maps to layer ``round(d * L) - 1`` of an L-block model; ``all`` then means
    the depths of the shallowest model's blocks, ``(k + 1) / L_min``, and explicit values are fractions.
    Absolute indices are 0-based; negative ones count from each model's last layer. An explicit index no
    model has is an error; one that only some models lack is a note (``option`` names the flag in both).
    """
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
        note(
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
            note(f"{option} {i}: " + ", ".join(f"{m.label} has only {m.num_layers} blocks" for m in lacking)
                 + (" (left blank)" if option == "--layers" else " (left out of the summary)"))
        rows.append(LayerRow(str(i), per_model))
    return rows


def _parse_list(spec: str, kind, option: str) -> list:
    try:
        return [kind(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise AttnflowError(f"{option} takes all, last or a comma-separated list, not '{spec}'") from None


def describe(
    models: Sequence[ModelMetrics], metrics: Sequence[str], rows: Sequence[LayerRow], *, n_bootstrap: int = 2000, seed: int = 0,
    axis: str = "layer",
) -> list[dict[str, Any]]:
    """Long-format records: one per model x metric x layer row (``ROW_COLUMNS``). With ``axis="relevance"``
    (perturbation files) a record names its row's relevance map under ``relevance`` instead of ``layer``."""
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
        low, high = percentile_ci(bootstrap_means(x, np.random.default_rng([seed, i]), n_bootstrap))
        for k, (name, row, idx) in enumerate(cells):
            records.append({
                "model": model.label, "family": model.family, "metric": name,
                **({"layer": int(idx)} if axis == "layer" else {axis: row.name}),
                "mean": float(means[k]), "std": float(stds[k]) if n_ok[k] > 1 else math.nan,
                "ci_low": float(low[k]), "ci_high": float(high[k]), "n_images": int(n_ok[k]),
                "row": row.name,
            })
    return records


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
        raise OptionError("groups", f"takes two families A,B or {ALL_PAIRS}, not '{shown}'")
    for name in names:
        if name not in FAMILIES:
            raise OptionError("groups", f"unknown family '{name}' (choose from {', '.join(FAMILIES)})")
    if names[0] == names[1]:
        raise OptionError("groups", f"names '{names[0]}' twice; give two different families")
    return names[0], names[1]


def summary_pairs(models: Sequence[ModelMetrics], pair: tuple[str, str] | None) -> list[tuple[str, str]]:
    """The group pairs to summarise: ``pair`` when both of its families are present, or with ``pair`` None
    every pair of the families present, in family order. A pair that cannot be summarised is a note."""
    present = [f for f in FAMILIES if any(m.family == f for m in models)]
    if pair is None:
        pairs = list(itertools.combinations(present, 2))
        if not pairs and len(models) > 1:
            note(f"no summary: every model is {title(present[0])}; --groups {ALL_PAIRS} compares the families present")
        return pairs
    missing = [f for f in pair if f not in present]
    if missing:
        if len(models) > 1:
            note(f"no {title(pair[0])}-vs-{title(pair[1])} summary: no {title(missing[0])} model among the files "
                 f"(families here: {', '.join(present)}); --groups picks the two families")
        return []
    return [pair]


def verdict(metric: str, record: dict[str, Any], *, alpha: float = ALPHA) -> str:
    """In words, what summary ``record`` says about ``metric``, when it is clear.

    A verdict needs the adjusted p-value below ``alpha``, an interval of the difference that excludes 0, an
    effect size of the same sign as the difference, and a design that can reach ``alpha`` at all. With one
    network per group it names the two networks; with networks as the replicates it names the families.
    """
    diff, low, high, p = (record.get(k, math.nan) for k in ("diff", "ci_low", "ci_high", "p_adjusted"))
    if not all(math.isfinite(v) for v in (diff, low, high, p)):
        return "not available"
    if record.get("min_p_adjusted", 0.0) >= alpha:
        return "no verdict: too few models for this design"
    if p >= alpha or low <= 0 <= high:
        return "no clear difference"
    effect = record.get("effect", math.nan)
    if math.isfinite(effect) and effect * diff <= 0:
        return "no clear difference (the effect size disagrees with the difference)"
    a, b = _subjects(record)
    more, less = (a, b) if diff > 0 else (b, a)
    meaning = _meaning(metric, record)
    if record.get("unit") == "images":
        return f"{more} {meaning} than {less}" if meaning else f"{more} {metric} higher than {less}"
    return f"{more} {meaning}" if meaning else f"{more} {metric} higher than {less}"


def _meaning(metric: str, record: dict[str, Any]) -> str | None:
    """What a higher value means: the metric's declared meaning, or a perturbation area's about its map."""
    if "relevance" in record:
        from .perturb import AREA_QUANTITIES

        return AREA_QUANTITIES[metric][1].format(relevance=record["relevance"]) if metric in AREA_QUANTITIES else None
    declared = REGISTRY.get(metric)
    return declared.meaning if declared else None


def _subjects(record: dict[str, Any]) -> tuple[str, str]:
    """What a summary row compares: the two networks' labels (unit images) or the two families' titles."""
    if record.get("unit") == "images":
        return record["a_models"], record["b_models"]
    return title(record["a_group"]), title(record["b_group"])


def summarize(
    models: Sequence[ModelMetrics], metrics: Sequence[str], rows: Sequence[LayerRow], *, n_bootstrap: int = 2000,
    seed: int = 0, groups: Sequence[tuple[str, str]] = (DEFAULT_GROUPS,),
    correction: Correction | str = Correction.holm, axis: str = "layer",
) -> list[dict[str, Any]]:
    """Group A vs group B per pair in ``groups``, metric and layer row (:mod:`attnflow.inference`): networks
    are the replicates when a group has several, images are paired by id when the networks share them, and
    all rows together are one family of tests adjusted by ``correction``. A pair whose families are not both
    present gives no rows; summary row ``j`` (over all pairs, in output order) draws its bootstrap from
    ``numpy.random.default_rng([seed, 1000 + j])``. ``axis`` names the rows in the records: ``layer``, or
    ``relevance`` for perturbation files."""
    correction = Correction(correction)
    out: list[dict[str, Any]] = []
    for pair in groups:
        members = [[i for i, m in enumerate(models) if m.family == fam] for fam in pair]
        if not all(members):
            continue
        _refuse_one_network_twice([models[i] for indices in members for i in indices])
        shared = _shared_images(models, members, pair)
        for name in metrics:
            for row in rows:
                present = [[i for i in indices if name in models[i].values and row.index[i] is not None]
                           for indices in members]
                rng = np.random.default_rng([seed, 1000 + len(out)])
                out.append(_compare_groups(models, name, row, pair, present, shared, n_bootstrap, rng, axis))
        _note_design(models, members, pair, shared)
    adjusted = adjust([r["p_value"] for r in out], correction)
    n_tests = int(np.isfinite(adjusted).sum())
    for record, p in zip(out, adjusted):
        record.update({"p_adjusted": float(p), "correction": correction.value, "n_tests": n_tests,
                       "min_p_adjusted": smallest_adjusted(record["min_p"], n_tests, correction)})
        record["verdict"] = verdict(record["metric"], record)
    _note_multiplicity(out, correction, n_tests, "--summary-layers" if axis == "layer" else "--relevance")
    return out


def _shared_images(models: Sequence[ModelMetrics], members: list[list[int]], pair: tuple[str, str]) -> dict[int, np.ndarray] | None:
    """Row indices, per model, of the images every model of the pair holds (in the first model's order), or
    None when they share fewer than two images (then the groups are compared unpaired)."""
    everyone = [i for indices in members for i in indices]
    common = set(models[everyone[0]].image_ids)
    for i in everyone[1:]:
        common &= set(models[i].image_ids)
    if len(common) < 2:
        if common or any(set(models[i].image_ids) & set(models[j].image_ids) for i in everyone for j in everyone if i < j):
            note(f"{_pair_name(pair)}: the models share fewer than two images; compared unpaired, "
                 "as if their images were independent")
        return None
    order = [image for image in models[everyone[0]].image_ids if image in common]
    order = list(dict.fromkeys(order))
    partial = [models[i] for i in everyone if len(models[i].image_ids) != len(order)]
    if partial:
        note(f"{_pair_name(pair)}: {len(order)} images are held by all {len(everyone)} models ("
             + ", ".join(f"{m.label} {len(m.image_ids)}" for m in partial)
             + "); the summary pairs those and leaves the others out")
    positions = {}
    for i in everyone:
        first = {}
        for k, image in enumerate(models[i].image_ids):
            first.setdefault(image, k)
        positions[i] = np.array([first[image] for image in order])
    return positions


def _compare_groups(models: Sequence[ModelMetrics], name: str, row: LayerRow, pair: tuple[str, str],
                    present: list[list[int]], shared: dict[int, np.ndarray] | None, n_bootstrap: int,
                    rng: np.random.Generator, axis: str = "layer") -> dict[str, Any]:
    """One summary record: the networks of group A in ``present[0]`` against those of group B."""
    record: dict[str, Any] = {"metric": name, axis: row.name, "a_group": pair[0], "b_group": pair[1],
                              "a_models": ", ".join(models[i].label for i in present[0]),
                              "b_models": ", ".join(models[i].label for i in present[1])}
    if shared is not None:
        columns = [np.stack([models[i].values[name][shared[i], row.index[i]] for i in indices], axis=1)
                   if indices else np.empty((len(next(iter(shared.values()))), 0)) for indices in present]
        difference = between_models(columns[0:1], columns[1:2], rng, n_bootstrap, paired=True)
    else:
        values = [[models[i].values[name][:, row.index[i]] for i in indices] for indices in present]
        difference = between_models(values[0], values[1], rng, n_bootstrap, paired=False)
    record.update(difference.as_dict())
    # attnflow 0.1's names: the image counts, and Cliff's delta wherever it is the effect size
    record["n_a"], record["n_b"] = record.pop("n_images_a"), record.pop("n_images_b")
    record["cliffs_delta"] = record["effect"] if record["effect_size"] == "cliffs_delta" else math.nan
    return record


def _refuse_one_network_twice(members: Sequence[ModelMetrics]) -> None:
    """Two files of one network in a summary would count that network twice: refuse them."""
    seen: dict[Any, ModelMetrics] = {}
    for m in members:
        for key in m.network_keys():
            if key in seen:
                other = seen[key]
                raise AttnflowError(
                    f"{other.path} and {m.path} hold the same network ({key[0]} {key[1]}): a summary counts each "
                    "network once; leave one out, or give --label to tell two different networks apart"
                )
            seen[key] = m


def _pair_name(pair: tuple[str, str]) -> str:
    return f"{title(pair[0])} vs {title(pair[1])}"


def _note_design(models: Sequence[ModelMetrics], members: list[list[int]], pair: tuple[str, str],
                 shared: dict[int, np.ndarray] | None) -> None:
    """Say what the pair's rows can claim: about two networks, or about the families."""
    n_a, n_b = (len(indices) for indices in members)
    images = f"paired over {len(next(iter(shared.values())))} shared images" if shared is not None else "unpaired (no shared images)"
    if n_a == 1 and n_b == 1:
        a, b = (models[indices[0]].label for indices in members)
        note(f"{_pair_name(pair)}: one network per group ({a}, {b}): the rows compare these two networks "
             f"over images ({images}) and do not generalise to the families; several networks per group do")
        return
    note(f"{_pair_name(pair)}: {n_a} vs {n_b} networks are the replicates (images {images}); "
         "p from an exact permutation test of the family labels over the network means")
    relabelings = math.comb(n_a + n_b, n_a)
    if relabelings <= MAX_EXACT_RELABELINGS and 2 / relabelings >= ALPHA:
        note(f"{_pair_name(pair)}: with {n_a} vs {n_b} networks the smallest p a two-sided permutation test "
             f"can give is {min(1.0, 2 / relabelings):.3g}, not below {ALPHA}: no verdict is possible; "
             "more networks per group are needed")
    for fam, indices in zip(pair, members):
        if len(indices) == 1:
            note(f"{_pair_name(pair)}: {title(fam)} has one network ({models[indices[0]].label}): the interval "
                 "holds no between-network spread of that group, and Hedges' g needs two per group")


def _note_multiplicity(records: Sequence[dict[str, Any]], correction: Correction, n_tests: int,
                       rows_flag: str = "--summary-layers") -> None:
    if n_tests < 2:
        return
    if correction is Correction.none:
        note(f"the summary's {n_tests} p-values are not adjusted for multiple tests (--correction none)")
        return
    name = {"holm": "Holm (family-wise error)", "bh": "Benjamini-Hochberg (false discovery rate)"}[correction.value]
    note(f"the summary is one family of {n_tests} tests; verdicts use p-values adjusted by {name}")
    reachable = [r for r in records if math.isfinite(r["p_value"]) and r["min_p"] < ALPHA <= r["min_p_adjusted"]]
    if reachable:
        note(f"with {correction.value} over {n_tests} tests the smallest adjusted p this design can give is "
             f"{min(r['min_p_adjusted'] for r in reachable):.3g}: no verdict is possible; fewer tests "
             f"(--metric, {rows_flag}) or more networks per group are needed")


def with_legacy_keys(record: dict[str, Any]) -> dict[str, Any]:
    """A summary record plus, for the groups mim,jea, its keys under attnflow 0.1's names (``mim_mean``...)."""
    if (record.get("a_group"), record.get("b_group")) != DEFAULT_GROUPS:
        return record
    return {**record, **{old: record[new] for new, old in LEGACY_SUMMARY_KEYS.items()}}


def layer_tables(
    records: Sequence[dict[str, Any]], models: Sequence[ModelMetrics], metrics: Sequence[str], rows: Sequence[LayerRow],
    axis: str = "layer",
) -> list[tuple[str, list[dict[str, Any]], list[str]]]:
    """Per metric a table ``(title, rows, columns)``: a row per layer row (or relevance map, ``axis``), a
    column per model, grouped by family in :data:`attnflow.families.FAMILIES` order (MIM first, then JEA,
    ...), each cell the mean over images."""
    order = sorted(range(len(models)), key=lambda i: FAMILIES.index(models[i].family))
    headers = {i: f"{models[i].label} ({models[i].family})" for i in order}
    cells = {(r["model"], r["metric"], r["row"]): r["mean"] for r in records}
    tables = []
    for name in metrics:
        table_rows = []
        for row in rows:
            entry: dict[str, Any] = {axis: row.name}
            for i in order:
                entry[headers[i]] = cells.get((models[i].label, name, row.name), "")
            table_rows.append(entry)
        tables.append((name, table_rows, [axis, *(headers[i] for i in order)]))
    return tables


EFFECT_SYMBOLS = {"rank_biserial": "r", "cliffs_delta": "delta", "hedges_g": "g"}


def summary_table(summary: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str], str]:
    """The summary records of one group pair as display rows, their columns and the table's title. The mean
    columns are named after the two networks (one per group) or the two families."""
    first = summary[0]
    axis = "relevance" if "relevance" in first else "layer"
    a, b = _subjects(first)
    p_adjusted = "p" if first["correction"] == Correction.none.value else f"p {first['correction']}"
    rows = [
        {
            "metric": s["metric"], axis: s[axis], a: s["a_mean"], b: s["b_mean"], "diff": s["diff"],
            "95% CI": f"[{format_cell(s['ci_low'])}, {format_cell(s['ci_high'])}]",
            "effect [95% CI]": _effect_cell(s), "p": _p_cell(s["p_value"]), p_adjusted: _p_cell(s["p_adjusted"]),
            "n": _count_cell(s), "verdict": s["verdict"],
        }
        for s in summary
    ]
    columns = ["metric", axis, a, b, "diff", "95% CI", "effect [95% CI]", "p", p_adjusted, "n", "verdict"]
    if p_adjusted == "p":
        columns.remove("p")
        for row in rows:
            row["p"] = row.pop(p_adjusted, row["p"])
    return rows, columns, _summary_title(first)


def _summary_title(record: dict[str, Any]) -> str:
    pair = _pair_name((record["a_group"], record["b_group"]))
    images = "paired images" if record["design"] == "paired" else "unpaired images"
    if record["unit"] == "images":
        design = f"two networks, {record['a_models']} - {record['b_models']}, unit images ({images}, {record['test']})"
    else:
        design = (f"{record['n_models_a']} vs {record['n_models_b']} networks, unit models "
                  f"({images}, {record['test']} over network means)")
    tests = f"{record['correction']} over {record['n_tests']} tests" if record["correction"] != "none" else "not adjusted"
    return f"{pair}: {design}; {tests}"


def _p_cell(p: float) -> str:
    return f"{p:.2g}" if math.isfinite(p) else "nan"


def _effect_cell(record: dict[str, Any]) -> str:
    if not record["effect_size"] or not math.isfinite(record["effect"]):
        return ""
    symbol = EFFECT_SYMBOLS[record["effect_size"]]
    return f"{symbol} {record['effect']:+.2f} [{record['effect_low']:+.2f}, {record['effect_high']:+.2f}]"


def _count_cell(record: dict[str, Any]) -> str:
    if record["unit"] == "models":
        return f"{record['n_models_a']}/{record['n_models_b']} models"
    if record["design"] == "paired":
        return f"{record['n_a']} pairs"
    return f"{record['n_a']}/{record['n_b']}"


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
    kind: str = METRICS  # what the files were: METRICS or PERTURBATION (rows are relevance maps)

    @property
    def axis(self) -> str:
        """The name of the rows' axis in every output: ``layer``, or ``relevance`` for perturbation files."""
        return AXES[self.kind]

    @property
    def columns(self) -> list[str]:
        """The long-format columns: :data:`ROW_COLUMNS`, ``relevance`` in place of ``layer`` for perturbation files."""
        return [self.axis if c == "layer" else c for c in ROW_COLUMNS]

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
            emit(self.records, self.columns, fmt, out=out)
        else:
            for metric, table_rows, columns in layer_tables(self.records, self.models, self.metrics, self.rows, self.axis):
                emit(table_rows, columns, fmt, title=self._table_title(metric), out=out)
                out.write("\n")
            for k, ((a, b), records) in enumerate(self.summaries()):
                if k:
                    out.write("\n")
                display, columns, caption = summary_table(records)
                emit(display, columns, fmt, title=caption, out=out)

    def _table_title(self, metric: str) -> str:
        if self.kind == PERTURBATION:
            from .perturb import AREA_QUANTITIES

            return f"{metric} ({AREA_QUANTITIES[metric][0]}; mean over images)"
        return f"{metric} (mean over images, heads: {self.heads})"


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
    correction: Correction | str = Correction.holm,
    relevance: Sequence[str] | None = None,
) -> Comparison:
    """Load metrics files, or perturbation files, and compute every table ``attnflow compare`` prints.

    ``groups`` chooses the summary: two families ``"A,B"`` (or ``("A", "B")``; default MIM vs JEA), compared
    as A - B (see :func:`summarize`), or ``"all"`` for every pair of the families present. ``correction``
    adjusts the summary's p-values as one family of tests: holm, bh or none.

    Perturbation files (``attnflow perturb``; all files of one kind, see :func:`input_kind`): ``metrics``
    names quantities of :data:`attnflow.perturb.AREA_QUANTITIES` (default ``gap``, negative AUC - positive
    AUC per image), and the rows are relevance maps instead of layers: ``relevance`` (default every map some
    file holds). The summary covers those rows but ``random``, the baseline, unless ``relevance`` names it
    (or it is the only map). ``heads``, ``layers``, ``depth`` and ``summary_layers`` apply to metrics files
    only; ``relevance`` to perturbation files only.
    """
    try:
        correction = Correction(correction)
    except ValueError:
        raise OptionError("correction", f"takes {', '.join(c.value for c in Correction)}, not '{correction}'") from None
    pair = parse_groups(groups)
    metrics = list(dict.fromkeys(metrics)) if metrics else metrics  # a metric asked for twice: one table
    if not paths:
        raise AttnflowError("no metrics files to compare")
    with collect() as notes:
        if input_kind(paths) == PERTURBATION:
            given = {"--heads": heads != "mean", "--layers": layers != "all", "--depth": depth != "absolute",
                     "--summary-layers": summary_layers != "last"}
            for flag, changed in given.items():
                if changed:
                    raise AttnflowError(f"{flag} applies to metrics files; perturbation files have no layers or heads "
                                        "(--relevance picks their relevance maps)")
            models, names = load_perturbations(paths, labels=labels, families=families, quantities=metrics)
            pairs = summary_pairs(models, pair)
            _note_repeated_files(models, pairs)
            rows = plan_relevance(models, relevance)
            records = describe(models, names, rows, n_bootstrap=n_bootstrap, seed=seed, axis="relevance")
            summary_rows = rows
            if "random" not in (relevance or ()) and len(rows) > 1:
                summary_rows = [row for row in rows if row.name != "random"]
                if pairs and len(summary_rows) < len(rows):
                    note("the summary leaves out random, the baseline (removing random patches in either order is the "
                         "same in expectation); --relevance random includes it")
            summary = summarize(models, names, summary_rows, n_bootstrap=n_bootstrap, seed=seed, groups=pairs,
                                correction=correction, axis="relevance")
            return Comparison(models, names, rows, records, summary, notes, heads, pairs, PERTURBATION)
        if relevance:
            raise AttnflowError("--relevance applies to perturbation files (attnflow perturb); these are metrics files")
        models, names = load_models(paths, labels=labels, families=families, metrics=metrics, heads=heads)
        pairs = summary_pairs(models, pair)
        _note_repeated_files(models, pairs)
        rows = plan_layers(models, layers, depth)
        records = describe(models, names, rows, n_bootstrap=n_bootstrap, seed=seed)
        with contextlib.nullcontext() if pairs else collect():  # no summary: nothing to say about its rows
            summary_rows = plan_layers(models, summary_layers, depth, option="--summary-layers")
        summary = summarize(models, names, summary_rows, n_bootstrap=n_bootstrap, seed=seed, groups=pairs,
                            correction=correction)
        return Comparison(models, names, rows, records, summary, notes, heads, pairs)


def _note_repeated_files(models: Sequence[ModelMetrics], pairs: Sequence[tuple[str, str]]) -> None:
    """One file given twice is one model shown twice (a summary refuses it, see :func:`summarize`)."""
    copies: dict[str, list[ModelMetrics]] = {}
    for m in models:
        copies.setdefault(os.path.realpath(m.path), []).append(m)
    for same in copies.values():
        if len(same) > 1:
            note(f"{same[0].path} is given {len(same)} times (as {', '.join(m.label for m in same)})")
