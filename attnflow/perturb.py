"""Perturbation curves: does a model's representation depend on the patches a relevance map selects?

For every image, the clean forward pass gives the clean representation and, from the same pass, R relevance
maps over the P patches (:data:`RELEVANCE_MAPS`, plus ``probe:PATH``). For every map, two orders
(:data:`ORDERS`: ``positive`` removes the most relevant patches first, ``negative`` the least relevant first)
and every fraction f of ``fractions``, the first ``round(f P)`` patches of the order (rounded half up,
:func:`removed_count`) are removed and the image is run again:

- ``drop`` (:data:`MODES`): the removed patch tokens are taken out of the sequence after the position
  embedding, the prefix tokens (cls, registers) stay; only for ViTs whose positions are learned absolute
  embeddings added before the blocks (timm ``VisionTransformer``), see :func:`drop_problem`;
- ``pixels``: the removed patches' normalised pixels are set to 0, the normalisation's mean, for every
  architecture.

Measured: the cosine similarity of the perturbed representation to the clean one (``cls``: the final-normed
cls token; ``mean``: the mean of the final-normed patch tokens that are left) and, with a probe head saved by
``attnflow probe --save-heads`` and labels, whether its prediction is still right. Everything per image goes
into a perturbation file (:class:`~attnflow.store.read.PerturbFile`, written as ``attnflow extract`` writes a
cache: committed batch by batch, resumable, the path appearing only once complete); :func:`summarize` turns
files into curves (mean over images with a 95% bootstrap CI per fraction) and areas under them.

Cost: one clean forward with attention capture per image, then R x 2 x F forwards of perturbed copies, which
share the clean pass's embedding (drop mode) and run batched, without capture, on the shorter sequences.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence, TextIO

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .architectures import VisionTransformerAdapter, adapter_for
from .store.write import RowDataset, RowFileWriter, inputs_digest, utc_now
from .capture import AttentionCapture, resolve_blocks
from .checkpoint import file_sha256
from .errors import AttnflowError, OptionError
from .notes import collect, note
from .extract import default_workers, report_failures
from .decode import image_batches, with_decode, worker_deaths_reported
from .flow import attention_flow
from .images import ImageDataset, class_of, folder_classes, resolve_preprocessing
from .layout import TokenLayout
from .metrics import renormalise_over_patches, rollout
from .models import LoadedModel
from .options import InputOptions, RunOptions, _choice, _Groups, resolve_device
from .render import Format, emit, json_value
from .store.names import (
    PERTURB_CLEAN_CORRECT, PERTURB_CORRECT, PERTURB_RELEVANCE, PERTURB_SCHEMA, PERTURB_SIMILARITY, layout_attrs,
)
from .store.read import open_perturbation
from .version import __version__

__all__ = [
    "RELEVANCE_MAPS", "PROBE_PREFIX", "DEFAULT_RELEVANCE", "ORDERS", "MODES", "READOUTS", "DEFAULT_FRACTIONS",
    "HEAD_POOLS", "CURVE_COLUMNS", "ACCURACY_COLUMNS", "AUC_COLUMNS", "AREA_QUANTITIES", "DEFAULT_AREA_QUANTITIES",
    "PerturbationOptions", "PerturbOptions", "removed_count", "removal_order", "drop_problem", "embed",
    "forward_kept", "zero_patches", "representation", "probe_input", "attention_relevance", "random_relevance",
    "head_relevance", "auc", "area_values", "ProbeHead", "find_head", "PerturbResult", "open_writer", "perturb",
    "measure", "PerturbSummary", "summarize",
]

RELEVANCE_MAPS = ("cls-attn", "rollout", "flow", "random")
PROBE_PREFIX = "probe:"  # probe:PATH, the attention of a saved probe head
DEFAULT_RELEVANCE = ("cls-attn", "rollout", "random")
ORDERS = ("positive", "negative")
MODES = ("drop", "pixels")
READOUTS = ("cls", "mean")
DEFAULT_FRACTIONS = tuple(round(0.1 * i, 1) for i in range(1, 10))
# The saved heads a folder given as probe:DIR or --probe DIR is searched for, in this order (file names
# from attnflow.probe.head_path: DIR/<model label>.<pool>.pt).
HEAD_POOLS = ("abmilp", "ep", "ep+cls")

CURVE_COLUMNS = ("model", "family", "relevance", "order", "fraction", "similarity", "ci_low", "ci_high")
ACCURACY_COLUMNS = ("accuracy", "accuracy_ci_low", "accuracy_ci_high")
AUC_COLUMNS = (
    "model", "family", "relevance", "auc_positive", "auc_positive_ci_low", "auc_positive_ci_high",
    "auc_negative", "auc_negative_ci_low", "auc_negative_ci_high", "gap", "gap_ci_low", "gap_ci_high",
    "positive_vs_random", "positive_vs_random_ci_low", "positive_vs_random_ci_high",
    "negative_vs_random", "negative_vs_random_ci_low", "negative_vs_random_ci_high", "n_images",
)
# The per-image areas ``attnflow compare`` reads from perturbation files, as its "metrics": name -> (what it
# is, for a table's title; what a higher value means, phrased so that "<group> <meaning>" reads as a verdict).
AREA_QUANTITIES = {
    "gap": ("negative AUC - positive AUC of the perturbation curves",
            "representation depends more on the patches {relevance} ranks first"),
    "auc_positive": ("area under the positive curve, the most relevant patches removed first",
                     "representation changes less when the patches {relevance} ranks first are removed"),
    "auc_negative": ("area under the negative curve, the least relevant patches removed first",
                     "representation changes less when the patches {relevance} ranks last are removed"),
}
DEFAULT_AREA_QUANTITIES = ("gap",)


# -- options --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PerturbationOptions:
    """What ``attnflow perturb`` removes and measures.

    ``relevance``: maps of :data:`RELEVANCE_MAPS` or ``probe:PATH``; ``fractions``: fractions of the patches
    removed, each in (0, 1), stored increasing; ``mode`` and ``readout``: None picks ``drop`` where the
    architecture allows it (else ``pixels``) and ``cls`` where there is a cls token (else ``mean``);
    ``layer``: the block the attention maps are read at (0-based, negative from the last; rollout and flow:
    up to it); ``seed``: of ``random``; ``probe``: a saved probe head (file, or folder of heads) whose
    predictions are scored."""

    relevance: tuple[str, ...] = DEFAULT_RELEVANCE
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    mode: str | None = None
    readout: str | None = None
    layer: int = -1
    seed: int = 0
    probe: Path | None = None

    def __post_init__(self) -> None:
        relevance = tuple(self.relevance)
        object.__setattr__(self, "relevance", relevance)
        if not relevance:
            raise OptionError("relevance", "names no relevance map")
        for name in relevance:
            if name.startswith(PROBE_PREFIX):
                if not name[len(PROBE_PREFIX):]:
                    raise OptionError("relevance", "probe: needs the folder (or file) of a head saved by attnflow probe {save_heads}: probe:DIR")
            elif name not in RELEVANCE_MAPS:
                raise OptionError("relevance", f"choose from {', '.join(RELEVANCE_MAPS)} or probe:DIR, not '{name}'")
        if len(set(relevance)) != len(relevance):
            raise OptionError("relevance", f"names a map twice ({', '.join(relevance)})")
        fractions = tuple(float(f) for f in self.fractions)
        if not fractions:
            raise OptionError("fractions", "names no fraction")
        for f in fractions:
            if not (math.isfinite(f) and 0 < f < 1):
                raise OptionError("fractions", f"{f:g} is not in (0, 1): a fraction of the patches removed, above 0 and below 1")
        if len(set(fractions)) != len(fractions):
            raise OptionError("fractions", "names a fraction twice")
        object.__setattr__(self, "fractions", tuple(sorted(fractions)))
        if self.mode is not None:
            _choice("mode", self.mode, MODES)
        if self.readout is not None:
            _choice("readout", self.readout, READOUTS)
        if not 0 <= self.seed < 2**63:
            raise OptionError("seed", f"must be a non-negative integer below 2**63, not {self.seed}")
        if self.probe is not None:
            object.__setattr__(self, "probe", Path(self.probe))

    @staticmethod
    def parse_fractions(text: str) -> tuple[float, ...]:
        """``--fractions``' text: comma-separated numbers in (0, 1)."""
        try:
            return tuple(float(part) for part in text.split(","))
        except ValueError:
            raise OptionError("fractions", f"takes comma-separated numbers in (0, 1) such as 0.1,0.5,0.9, not '{text}'") from None


@dataclass(frozen=True)
class PerturbOptions(_Groups):
    """Everything ``attnflow perturb`` can be told, besides the model, the images and the output path."""

    GROUPS: ClassVar[dict[str, type]] = {"perturbation": PerturbationOptions, "inputs": InputOptions, "run": RunOptions}

    perturbation: PerturbationOptions = field(default_factory=PerturbationOptions)
    inputs: InputOptions = field(default_factory=InputOptions)
    run: RunOptions = field(default_factory=RunOptions)


# -- the pieces, each checkable on its own ------------------------------------------------------------------


def removed_count(fraction: float, num_patches: int) -> int:
    """``round(fraction * P)`` rounded half up (Python's ``round`` would round 2.5 to 2): the patches removed."""
    return int(math.floor(fraction * num_patches + 0.5))


def removal_order(relevance: torch.Tensor, order: str) -> torch.Tensor:
    """(..., P) relevance -> (..., P) int64 patch indices in the order they are removed: ``positive`` the most
    relevant first, ``negative`` the least relevant first; ties in patch order (a stable sort)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, not '{order}'")
    return torch.sort(relevance, dim=-1, descending=order == "positive", stable=True).indices


def drop_problem(model: nn.Module) -> str | None:
    """Why the patch tokens of ``model`` cannot be taken out of its sequence, worded to follow "'NAME' is";
    None where they can: a timm ``VisionTransformer`` adds learned absolute position embeddings once, before
    the blocks, so a token's position travels with it. BEiT's relative position bias and EVA's rotary
    embeddings are computed inside every attention from the full patch grid."""
    adapter = adapter_for(model)
    if isinstance(adapter, VisionTransformerAdapter):
        return None
    kind = type(model).__name__
    if kind == "Beit":
        return "a Beit, whose attention adds a relative position bias over the full patch grid"
    return f"a {kind}, whose attention rotates queries and keys by their grid position (RoPE)"


def embed(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) normalised pixels -> (B, T, D) the tokens entering block 0 of a timm ``VisionTransformer``
    (patch embedding, prefix tokens, position embedding, ``norm_pre``), as its ``forward_features`` makes them."""
    x = model.patch_embed(pixels)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def forward_kept(model: nn.Module, embedded: torch.Tensor, keep: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """The blocks and the final norm run on the prefix tokens and the kept patch tokens only.

    Args:
        embedded: (N, T, D) tokens entering block 0 (:func:`embed`), position embeddings added.
        keep: (N, K) int64 patch indices (0-based among the P patches) kept, the same K for every row.
    Returns:
        (N, p + K, D): the final-normed tokens, prefix first, then the kept patches in the order of ``keep``.
    """
    p, D = num_prefix_tokens, embedded.shape[-1]
    patches = embedded[:, p:].gather(1, keep[..., None].expand(-1, -1, D))
    x = torch.cat([embedded[:, :p], patches], 1)
    for block in model.blocks:
        x = block(x)
    return model.norm(x)


def zero_patches(pixels: torch.Tensor, removed: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """(N, C, H, W) normalised pixels with the patches where ``removed`` (N, P) bool is set to 0, the
    normalisation's mean (pixels beyond the patch grid, which the model never sees, are left as they are)."""
    gh, gw = layout.grid_size
    ph, pw = layout.patch_size
    mask = removed.view(-1, 1, gh, gw).repeat_interleave(ph, 2).repeat_interleave(pw, 3)
    mask = F.pad(mask, (0, pixels.shape[-1] - gw * pw, 0, pixels.shape[-2] - gh * ph))
    return pixels.masked_fill(mask, 0.0)


def representation(tokens: torch.Tensor, num_prefix_tokens: int, readout: str) -> torch.Tensor:
    """(N, p + K, D) final-normed tokens -> (N, D): the cls token (``cls``), or the mean of the patch tokens
    present (``mean``; prefix tokens left out)."""
    if readout == "cls":
        return tokens[:, 0]
    return tokens[:, num_prefix_tokens:].mean(1)


def probe_input(tokens: torch.Tensor, layout: TokenLayout, with_cls: bool) -> torch.Tensor:
    """What a saved pooling head reads, as ``attnflow probe`` fed it: the patch tokens (N, K, D), with cls
    first when the head was trained ``with_cls`` (registers left out)."""
    p = layout.num_prefix_tokens
    if with_cls and layout.has_cls:
        return torch.cat([tokens[:, :1], tokens[:, p:]], 1)
    return tokens[:, p:]


def attention_relevance(name: str, attn: torch.Tensor, layout: TokenLayout, layer: int) -> torch.Tensor:
    """(B, L, H, T, T) attention of the clean pass -> (B, P) float64 relevance summing to 1.

    ``cls-attn``: the cls row over the patches at block ``layer``, renormalised, mean over heads (without cls,
    the mean of the patch rows); ``rollout``: rollout's readout after block ``layer``; ``flow``: exact
    attention flow to block ``layer`` (:mod:`attnflow.flow`)."""
    if name == "cls-attn":
        if layout.has_cls:
            return renormalise_over_patches(attn[:, layer, :, 0, :], layout).mean(1)
        return renormalise_over_patches(attn[:, layer, :, layout.num_prefix_tokens:, :], layout).mean((1, 2))
    if name == "rollout":
        return rollout(attn, layout)[:, layer].double()
    if name == "flow":
        return attention_flow(attn, layout, (layer,))[:, 0].to(attn.device)
    raise ValueError(f"'{name}' is not an attention relevance map")


def random_relevance(seed: int, image_index: int, num_patches: int) -> torch.Tensor:
    """(P,) float64 relevance of one image, uniform random values summing to 1, from numpy's generator seeded
    with ``[seed, image_index]``: the same for an image whatever the batch, the run or a ``--resume``."""
    values = np.random.default_rng([seed, image_index]).random(num_patches)
    return torch.from_numpy(values / values.sum())


def head_relevance(head: nn.Module, config: dict[str, Any], tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """(B, T, D) final-normed tokens -> (B, P) float64: a saved head's pooling weights over the patches
    (abmilp: its softmax; ep: the mean of its queries' maps); a head that also attends to cls is renormalised
    over the patches."""
    seen = probe_input(tokens, layout, bool(config.get("with_cls")))
    weights = head.attention(seen).double()
    if weights.ndim == 3:  # ep: (B, M, N), one map per query
        weights = weights.mean(1)
    if config.get("with_cls") and layout.has_cls:
        weights = weights[:, 1:]
    return weights / weights.sum(-1, keepdim=True)


def auc(fractions: Sequence[float], similarity: np.ndarray) -> np.ndarray:
    """Area under a perturbation curve by the trapezoid rule over the points (0, 1) and (f_i, s_i): at f = 0
    nothing is removed and the similarity is 1. ``similarity`` (..., F) -> (...). The curve spans [0, max f]
    (0.9 with the default fractions)."""
    x = np.concatenate([[0.0], np.asarray(fractions, dtype=np.float64)])
    s = np.asarray(similarity, dtype=np.float64)
    y = np.concatenate([np.ones(s.shape[:-1] + (1,)), s], axis=-1)
    return ((y[..., 1:] + y[..., :-1]) / 2 * np.diff(x)).sum(-1)


def area_values(fractions: Sequence[float], orders: Sequence[str], similarity: np.ndarray) -> dict[str, np.ndarray]:
    """(n, R, O, F) similarities -> per image and relevance map, (n, R) each: ``auc_positive`` and
    ``auc_negative`` (:func:`auc` of each order's curve) and ``gap``, negative - positive
    (:data:`AREA_QUANTITIES`)."""
    areas = auc(fractions, similarity)  # (n, R, O)
    positive, negative = areas[:, :, list(orders).index("positive")], areas[:, :, list(orders).index("negative")]
    return {"auc_positive": positive, "auc_negative": negative, "gap": negative - positive}


# -- probe heads ------------------------------------------------------------------------------------------


@dataclass
class ProbeHead:
    """A saved head (:func:`attnflow.probe.load_head`) resolved for one model."""

    path: Path
    head: nn.Module
    config: dict[str, Any]

    @property
    def pool(self) -> str:
        return str(self.config["pool"])


def find_head(where: Path, loaded: LoadedModel, flag: str) -> ProbeHead:
    """The head at ``where`` (a file saved by ``probe --save-heads``, or a folder holding the model's
    ``<label>.<pool>.pt``, abmilp first, then ep, then ep+cls), checked against the model: token width,
    prefix tokens, patch grid, trained on the last block. One line naming ``flag`` when it does not fit."""
    from .probe import head_path, load_head

    if where.is_dir():
        candidates = [head_path(where, loaded.label, pool) for pool in HEAD_POOLS]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise AttnflowError(f"{_spelled(flag, where)}: no probe head for {loaded.label} there "
                                f"(looked for {', '.join(c.name for c in candidates)})")
        where = found
    elif not where.exists():
        raise AttnflowError(f"{_spelled(flag, where)}: no such file or directory")
    head, config = load_head(where)
    if not hasattr(head, "attention"):
        raise AttnflowError(f"{_spelled(flag, where)}: a head without pooling weights ({config.get('pool')})")
    adapter, layout = loaded.adapter, loaded.layout
    problems = []
    if int(config["dim"]) != adapter.width:
        problems.append(f"{config['dim']}-wide tokens, the model's are {adapter.width}")
    if int(config.get("num_prefix_tokens", layout.num_prefix_tokens)) != layout.num_prefix_tokens:
        problems.append(f"{config['num_prefix_tokens']} prefix tokens, the model has {layout.num_prefix_tokens}")
    if tuple(config.get("grid_size", layout.grid_size)) != tuple(layout.grid_size):
        problems.append(f"a {'x'.join(map(str, config['grid_size']))} patch grid, the model's is {'x'.join(map(str, layout.grid_size))}")
    if problems:
        raise AttnflowError(f"{_spelled(flag, where)} does not fit {loaded.label}: it was trained on {'; '.join(problems)}")
    block = config.get("block")
    if block is not None and int(block) != adapter.num_layers - 1:
        raise AttnflowError(f"{_spelled(flag, where)} was trained on the tokens of block {block}; perturb reads the last "
                            f"block's ({adapter.num_layers - 1}): use a head probed at the last block")
    if (config.get("model"), config.get("checkpoint_sha256")) != (loaded.name, loaded.checkpoint_sha256):
        note(f"{_spelled(flag, where)} was trained on {config.get('label')} ({config.get('model')}), not on {loaded.label}")
    return ProbeHead(where, head, config)


def _spelled(flag: str, where: Path) -> str:
    """How the user wrote the option: ``--probe DIR`` or ``--relevance probe:DIR``."""
    return f"{flag}{where}" if flag.endswith(":") else f"{flag} {where}"


# -- the run ----------------------------------------------------------------------------------------------


@dataclass
class PerturbResult:
    path: Path
    n_images: int
    n_skipped: int
    n_new: int  # images processed by this run (fewer than n_images after --resume)
    seconds: float
    mode: str
    readout: str
    relevance: tuple[str, ...]
    already_complete: bool = False


@dataclass
class _Plan:
    """One perturbation run, resolved from the model, the inputs and the options before any work."""

    loaded: LoadedModel
    layout: TokenLayout
    mode: str
    readout: str
    layer: int  # 0-based
    relevance: tuple[str, ...]  # as recorded: probe maps as probe:<pool>
    heads: dict[str, ProbeHead]  # relevance name -> head
    scorer: ProbeHead | None  # --probe
    options: PerturbOptions
    device: torch.device
    class_names: list[str] | None


def _resolve(loaded: LoadedModel, paths: Sequence[Path], options: PerturbOptions, class_names) -> _Plan:
    """Check the options against the model and the inputs: every refusal is one line naming its flag."""
    chosen = options.perturbation
    layout, adapter = loaded.layout, loaded.adapter
    problem = drop_problem(loaded.model)
    mode = chosen.mode or ("drop" if problem is None else "pixels")
    if mode == "drop" and problem is not None:
        raise OptionError("mode", f"drop: '{loaded.name}' is {problem}, so its tokens cannot be dropped; use {{mode}}=pixels")
    readout = chosen.readout or ("cls" if layout.has_cls else "mean")
    if readout == "cls" and not layout.has_cls:
        raise OptionError("readout", f"cls: '{loaded.name}' has no cls token; use {{readout}}=mean")
    try:
        (layer,) = resolve_blocks((chosen.layer,), adapter.num_layers)
    except ValueError as e:
        raise OptionError("layer", str(e)) from None
    if chosen.probe is not None and not chosen.probe.exists():
        raise AttnflowError(f"--probe {chosen.probe}: no such file or directory")
    heads, names = {}, []
    for name in chosen.relevance:
        if name.startswith(PROBE_PREFIX):
            head = find_head(Path(name[len(PROBE_PREFIX):]), loaded, f"--relevance {PROBE_PREFIX}")
            name = f"{PROBE_PREFIX}{head.pool}"
            if name in heads:
                raise OptionError("relevance", f"two probe maps resolve to the same kind of head ({head.pool})")
            heads[name] = head
        names.append(name)
    scorer = find_head(chosen.probe, loaded, "--probe") if chosen.probe is not None else None
    labels = options.inputs.labels_from_dirs
    if scorer is not None and not labels:
        raise OptionError("probe", "scores the probe's predictions against labels: add {labels_from_dirs}")
    names_of_classes = (list(class_names) if class_names is not None else folder_classes(paths)) if labels else None
    if scorer is not None and "classes" not in scorer.config:
        raise AttnflowError(f"--probe {scorer.path} holds a pooling head without its classifier; save heads with attnflow probe --save-heads")
    if scorer is not None and int(scorer.config["classes"]) != len(names_of_classes):
        raise AttnflowError(f"--probe {scorer.path} classifies {scorer.config['classes']} classes, the image folders "
                            f"hold {len(names_of_classes)}; give images of the classes it was trained on")
    return _Plan(
        loaded=loaded, layout=layout, mode=mode, readout=readout, layer=layer, relevance=tuple(names), heads=heads,
        scorer=scorer, options=options, device=resolve_device(options.run.device), class_names=names_of_classes,
    )


def _root_attrs(plan: _Plan, paths: Sequence[Path], preprocessing) -> dict[str, Any]:
    loaded, chosen = plan.loaded, plan.options.perturbation
    adapter = loaded.adapter
    return {
        "schema": PERTURB_SCHEMA,
        "attnflow_version": __version__,
        "created": utc_now(),
        "model": loaded.name, "label": loaded.label, "family": loaded.family, "weights": loaded.weights,
        "checkpoint": loaded.checkpoint, "checkpoint_sha256": loaded.checkpoint_sha256,
        **layout_attrs(plan.layout, adapter.num_layers, adapter.num_heads),
        "preprocessing": json.dumps(preprocessing.as_dict(), sort_keys=True),
        "working_dir": os.getcwd(),
        "inputs_sha256": inputs_digest([str(p) for p in paths]),
        "n_inputs": len(paths),
        "has_labels": plan.class_names is not None,
        "relevance": list(plan.relevance), "orders": list(ORDERS), "fractions": list(chosen.fractions),
        "mode": plan.mode, "readout": plan.readout, "relevance_layer": plan.layer, "seed": int(chosen.seed),
        "relevance_heads": json.dumps({name: str(head.path.resolve()) for name, head in plan.heads.items()}),
        "probe_head": str(plan.scorer.path.resolve()) if plan.scorer else "",
        "probe_head_sha256": file_sha256(plan.scorer.path) if plan.scorer else "",
    }


def _row_datasets(plan: _Plan) -> dict[str, RowDataset]:
    R, O, F_, P = len(plan.relevance), len(ORDERS), len(plan.options.perturbation.fractions), plan.layout.num_patches
    rows = {
        PERTURB_SIMILARITY: RowDataset((R, O, F_), "float32", (1024, R, O, F_), False),
        PERTURB_RELEVANCE: RowDataset((R, P), "float32", (64, R, P)),
    }
    if plan.scorer is not None:
        rows[PERTURB_CORRECT] = RowDataset((R, O, F_), "int8", (1024, R, O, F_), False)
        rows[PERTURB_CLEAN_CORRECT] = RowDataset((), "int8", (1024,), False)
    return rows


def open_writer(path: str | Path, attrs: dict[str, Any], rows: dict[str, RowDataset], *, class_names, resume: bool,
                overwrite: bool) -> RowFileWriter:
    """The one place a perturbation file is opened for writing: batches committed into ``<path>.partial/``,
    the file put in place by rename once complete (:class:`~attnflow.store.write.RowFileWriter`, as extract
    writes)."""
    return RowFileWriter(path, attrs, rows, class_names=class_names, compression="gzip", resume=resume, overwrite=overwrite)


def perturb(
    loaded: LoadedModel,
    paths: Sequence[Path],
    output: str | Path,
    options: PerturbOptions | None = None,
    *,
    class_names: Sequence[str] | None = None,
    on_skip: Callable[[str, str], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    **option_values: Any,
) -> PerturbResult:
    """Perturbation curves of ``loaded.model`` over ``paths`` into the perturbation file ``output``.

    Args:
        options: :class:`PerturbOptions`; single options can also be given as keywords (``relevance=("rollout",
            "random")``, ``fractions=(0.25, 0.5)``, ``mode="pixels"``, ``batch_size=8``), which override it.
        class_names: with ``labels_from_dirs``, the full list of classes (default: the folders of ``paths``).
        on_skip: called once per undecodable file with (path, reason); with ``strict`` the first one raises.
        on_progress: called after each committed batch with (inputs done, inputs total).
    Every option is checked against the model before any image is read (one-line errors naming the flag).
    Returns the committed counts; on an error the ``.partial`` folder keeps every committed batch for ``resume``.
    """
    options = (options or PerturbOptions()).replace(**option_values)
    if not paths:
        raise AttnflowError("no images to process")
    if options.inputs.masks is not None:
        raise OptionError("masks", "perturb does not read object masks")
    plan = _resolve(loaded, paths, options, class_names)
    inputs = options.inputs
    preprocessing = with_decode(resolve_preprocessing(
        loaded.model, crop_pct=inputs.crop_pct, interpolation=inputs.interpolation, preset=inputs.preprocess,
    ), inputs.decode)
    writer = open_writer(output, _root_attrs(plan, paths, preprocessing), _row_datasets(plan),
                         class_names=plan.class_names, resume=options.run.resume, overwrite=options.run.overwrite)
    common = dict(mode=plan.mode, readout=plan.readout, relevance=plan.relevance)
    if writer.complete_attrs is not None:
        writer.cleanup()
        attrs = writer.complete_attrs
        return PerturbResult(Path(output), int(attrs["n_images"]), int(attrs["n_skipped"]), 0, 0.0, already_complete=True, **common)
    n_before = writer.n_images
    t0 = time.perf_counter()
    try:
        _run(plan, paths, preprocessing, writer, on_skip=on_skip, on_progress=on_progress)
        writer.assemble()
    except BaseException:
        writer.close()
        raise
    writer.cleanup()
    return PerturbResult(writer.path, writer.n_images, writer.n_skipped, writer.n_images - n_before,
                         time.perf_counter() - t0, **common)


def _run(plan: _Plan, paths: Sequence[Path], preprocessing, writer: RowFileWriter, *, on_skip, on_progress) -> None:
    options, model, chosen = plan.options, plan.loaded.model, plan.options.perturbation
    start = writer.n_inputs_done
    path_texts = [str(p) for p in paths]
    class_index = {c: i for i, c in enumerate(plan.class_names or [])}
    model.to(plan.device)
    for head in [*plan.heads.values(), *([plan.scorer] if plan.scorer else [])]:
        head.head.to(plan.device)
    loader = image_batches(
        ImageDataset(paths[start:], preprocessing, read_timeout=options.run.read_timeout), device=plan.device, batch_size=options.run.batch_size,
        workers=default_workers() if options.run.workers is None else options.run.workers,
    )
    with torch.inference_mode(), worker_deaths_reported():
        for batch in loader:
            skipped = report_failures(batch, path_texts, start, options.inputs.strict, on_skip)
            labels = [class_index[class_of(paths[start + i])] for i in batch.indices] if plan.class_names is not None else None
            rows: dict[str, np.ndarray] = {}
            if batch.indices:
                pixels = preprocessing.normalize(batch.pixels.to(plan.device))
                image_index = [start + i for i in batch.indices]
                rows = measure(
                    model, pixels, plan.layout, plan.relevance, chosen.fractions, mode=plan.mode, readout=plan.readout,
                    layer=plan.layer, seed=chosen.seed, image_index=image_index, heads=plan.heads, scorer=plan.scorer,
                    labels=None if labels is None else torch.tensor(labels), chunk=options.run.batch_size,
                )
            done = start + max([*batch.indices, *(i for i, _ in batch.failures)]) + 1
            writer.append(rows, image_ids=[path_texts[start + i] for i in batch.indices], n_inputs_done=done,
                          labels=labels, skipped=skipped)
            if on_progress:
                on_progress(done, len(paths))


def measure(
    model: nn.Module,
    pixels: torch.Tensor,
    layout: TokenLayout,
    relevance: Sequence[str],
    fractions: Sequence[float],
    *,
    mode: str,
    readout: str,
    layer: int = -1,
    seed: int = 0,
    image_index: Sequence[int] | None = None,
    heads: dict[str, ProbeHead] | None = None,
    scorer: ProbeHead | None = None,
    labels: torch.Tensor | None = None,
    chunk: int = 32,
) -> dict[str, np.ndarray]:
    """Perturbation measurements of one batch of images (what :func:`perturb` stores per image).

    The clean pass runs with attention capture and gives the clean representation, the relevance maps and the
    clean prediction; then every perturbed copy runs, ``chunk`` sequences per forward pass, without capture.

    Args:
        pixels: (B, C, H, W) normalised images.
        relevance: R names of :data:`RELEVANCE_MAPS`, or keys of ``heads`` (``probe:<pool>``).
        fractions: F fractions in (0, 1).
        mode, readout: see :data:`MODES`, :data:`READOUTS` (``drop`` needs :func:`drop_problem` to be None).
        layer: the block the attention maps are read at, 0-based or negative from the last.
        image_index: the images' positions in the input list, which seed ``random`` (default 0..B-1).
        scorer, labels: a probe head and the (B,) true classes, to score its predictions.
    Returns:
        ``perturb/similarity`` (B, R, O, F) float32, ``perturb/relevance`` (B, R, P) float32 (each map sums
        to 1), and with ``scorer`` ``perturb/correct`` (B, R, O, F) and ``perturb/clean_correct`` (B,) int8.
    """
    if mode == "drop" and drop_problem(model) is not None:
        raise OptionError("mode", f"drop: the model is {drop_problem(model)}; use {{mode}}=pixels")
    if readout == "cls" and not layout.has_cls:
        raise OptionError("readout", "cls: the model has no cls token; use {readout}=mean")
    heads = heads or {}
    p, P, B = layout.num_prefix_tokens, layout.num_patches, pixels.shape[0]
    image_index = list(range(B)) if image_index is None else list(image_index)
    with AttentionCapture(model) as capture:
        clean_tokens = model.forward_features(pixels)  # (B, T, D), final norm applied
        attn = capture.pop().attn  # (B, L, H, T, T)
    layer = layer % attn.shape[1]
    clean = representation(clean_tokens, p, readout)
    maps = []
    for name in relevance:
        if name == "random":
            maps.append(torch.stack([random_relevance(seed, i, P) for i in image_index]).to(pixels.device))
        elif name in heads:
            maps.append(head_relevance(heads[name].head, heads[name].config, clean_tokens, layout))
        else:
            maps.append(attention_relevance(name, attn, layout, layer))
    del attn
    relevance_maps = torch.stack(maps, 1)  # (B, R, P) float64
    R, O, Fn = relevance_maps.shape[1], len(ORDERS), len(fractions)
    order = torch.stack([removal_order(relevance_maps, o) for o in ORDERS], 2).reshape(B * R * O, P)  # (N, P)
    image_of = torch.arange(B, device=pixels.device).repeat_interleave(R * O)  # (N,) the image of every copy
    similarity = torch.empty(B * R * O, Fn, dtype=torch.float64)
    correct = torch.empty(B * R * O, Fn, dtype=torch.int8)
    embedded = embed(model, pixels) if mode == "drop" else None  # computed once, shared by every copy
    for f, fraction in enumerate(fractions):
        k = removed_count(fraction, P)
        for lo in range(0, len(order), chunk):
            rows = slice(lo, lo + chunk)
            images = image_of[rows]
            if mode == "drop":
                keep = order[rows, k:].sort(-1).values  # raster order, as in the clean sequence
                tokens = forward_kept(model, embedded[images], keep, p)
            else:
                removed = torch.zeros(len(images), P, dtype=torch.bool, device=pixels.device)
                removed.scatter_(1, order[rows, :k], True)
                tokens = model.forward_features(zero_patches(pixels[images], removed, layout))
            similarity[rows, f] = F.cosine_similarity(
                representation(tokens, p, readout).double(), clean[images].double(), dim=-1).cpu()
            if scorer is not None:
                predicted = _predict(scorer, tokens, layout)
                correct[rows, f] = (predicted == labels.to(predicted.device)[images.to(predicted.device)]).to(torch.int8).cpu()
    out = {
        PERTURB_SIMILARITY: similarity.view(B, R, O, Fn).float().numpy(),
        PERTURB_RELEVANCE: relevance_maps.float().cpu().numpy(),
    }
    if scorer is not None:
        out[PERTURB_CORRECT] = correct.view(B, R, O, Fn).numpy()
        clean_predicted = _predict(scorer, clean_tokens, layout).cpu()
        out[PERTURB_CLEAN_CORRECT] = (clean_predicted == labels.cpu()).to(torch.int8).numpy()
    return out


def _predict(scorer: ProbeHead, tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """(N, p + K, D) final-normed tokens -> (N,) the probe's predicted classes."""
    return scorer.head(probe_input(tokens, layout, bool(scorer.config.get("with_cls")))).argmax(-1)


# -- the summary ------------------------------------------------------------------------------------------


def _bootstrap_ci(x: np.ndarray, rng: np.random.Generator, n_bootstrap: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, K) per-image values -> the 95% percentile bootstrap CI of each column's mean, (K,) low and high;
    the rows (images) are resampled together, so columns that are differences stay paired by image."""
    from .inference import bootstrap_means, percentile_ci

    return percentile_ci(bootstrap_means(x, rng, n_bootstrap))


@dataclass
class PerturbSummary:
    """What ``attnflow perturb`` prints: a record per curve point and one per model and relevance map."""

    curves: list[dict[str, Any]]
    aucs: list[dict[str, Any]]
    has_accuracy: bool
    notes: list[str] = field(default_factory=list)

    @property
    def curve_columns(self) -> list[str]:
        return [*CURVE_COLUMNS, *(ACCURACY_COLUMNS if self.has_accuracy else ()), "n_images"]

    def write(self, fmt: Format | str, out: TextIO) -> None:
        """json: ``{"curves": [...], "auc": [...]}``; csv/tsv: the curve points (one record each); table and
        markdown: the curves, then the areas."""
        fmt = Format(fmt)
        if fmt is Format.json:
            clean = lambda r: {k: json_value(v) for k, v in r.items()}  # noqa: E731
            json.dump({"curves": [clean(r) for r in self.curves], "auc": [clean(r) for r in self.aucs]}, out, indent=2)
            out.write("\n")
        elif fmt in (Format.csv, Format.tsv):
            emit(self.curves, self.curve_columns, fmt, out=out)
        else:
            emit(self.curves, self.curve_columns, fmt, out=out,
                 title="perturbation curves: cosine similarity to the clean representation (mean over images, 95% bootstrap CI)")
            out.write("\n")
            display = [_auc_display(r) for r in self.aucs]
            emit(display, ["model", "family", "relevance", "auc_positive", "auc_negative", "gap", "positive_vs_random",
                           "negative_vs_random", "n_images"], fmt, out=out,
                 title="area under the curves [95% bootstrap CI; the unit is the image, within one network]; gap = negative - "
                       "positive and *_vs_random = the map's area - random's, each paired by image")


def _auc_display(record: dict[str, Any]) -> dict[str, Any]:
    shown = {k: record[k] for k in ("model", "family", "relevance", "n_images")}
    for key in ("auc_positive", "auc_negative", "gap", "positive_vs_random", "negative_vs_random"):
        value = record[key]
        shown[key] = "" if value is None or (isinstance(value, float) and math.isnan(value)) else \
            f"{value:+.3f} [{record[key + '_ci_low']:+.3f}, {record[key + '_ci_high']:+.3f}]"
    return shown


def summarize(paths: Sequence[str | Path], *, n_bootstrap: int = 2000, seed: int = 0) -> PerturbSummary:
    """Curves and areas of perturbation files, one model each.

    Per model, relevance map, order and fraction: the mean similarity over images with a 95% percentile
    bootstrap CI (and the probe's accuracy where measured; fraction 0 is the clean image, similarity 1).
    Per model and relevance map: each order's area under the curve (:func:`auc`) with its CI, the gap
    negative - positive, and each order's area minus that of ``random`` (when the file has it), both as
    differences paired by image with a bootstrap CI over images. The unit of every CI is the image, within
    one network: they say how sure the mean over these images is, not how another training run would do.
    """
    with collect() as notes:
        curves, aucs, has_accuracy = [], [], False
        for m, path in enumerate(paths):
            with open_perturbation(path) as f:
                label, family = f.attrs["label"], f.attrs["family"]
                relevance, orders, fractions = f.relevance, f.orders, f.fractions
                similarity = f.similarity().astype(np.float64)  # (n, R, O, F)
                correct = clean = None
                if f.has_accuracy:
                    correct, clean = f.correct()
                    has_accuracy = True
            n = similarity.shape[0]
            if n == 0:
                note(f"{path} holds no images")
                continue
            R, O, Fn = similarity.shape[1:]
            rng = np.random.default_rng([seed, m])
            low, high = _bootstrap_ci(similarity.reshape(n, -1), rng, n_bootstrap)
            low, high = low.reshape(R, O, Fn), high.reshape(R, O, Fn)
            mean = similarity.mean(0)
            if correct is not None:
                acc = np.concatenate([np.broadcast_to(clean[:, None, None, None], (n, R, O, 1)), correct], -1).astype(np.float64)
                acc_low, acc_high = _bootstrap_ci(acc.reshape(n, -1), rng, n_bootstrap)
                acc_mean, acc_low, acc_high = acc.mean(0), acc_low.reshape(R, O, Fn + 1), acc_high.reshape(R, O, Fn + 1)
            for r, name in enumerate(relevance):
                for o, order in enumerate(orders):
                    for f, fraction in enumerate([0.0, *fractions]):
                        record = {"model": label, "family": family, "relevance": name, "order": order, "fraction": fraction,
                                  "similarity": 1.0 if f == 0 else float(mean[r, o, f - 1]),
                                  "ci_low": 1.0 if f == 0 else float(low[r, o, f - 1]),
                                  "ci_high": 1.0 if f == 0 else float(high[r, o, f - 1]), "n_images": n}
                        if correct is not None:
                            record.update(accuracy=float(acc_mean[r, o, f]), accuracy_ci_low=float(acc_low[r, o, f]),
                                          accuracy_ci_high=float(acc_high[r, o, f]))
                        curves.append(record)
            columns = area_values(fractions, orders, similarity)  # auc_positive, auc_negative, gap: (n, R) each
            rand = relevance.index("random") if "random" in relevance else None
            if rand is not None:
                columns["positive_vs_random"] = columns["auc_positive"] - columns["auc_positive"][:, rand:rand + 1]
                columns["negative_vs_random"] = columns["auc_negative"] - columns["auc_negative"][:, rand:rand + 1]
            stacked = np.concatenate(list(columns.values()), 1)  # (n, K * R): resampled together, paired by image
            low, high = _bootstrap_ci(stacked, rng, n_bootstrap)
            for r, name in enumerate(relevance):
                record: dict[str, Any] = {"model": label, "family": family, "relevance": name}
                for k, key in enumerate(AUC_COLUMNS[3:-1:3]):
                    if key in columns and not (name == "random" and key.endswith("_vs_random")):
                        record.update({key: float(columns[key][:, r].mean()), f"{key}_ci_low": float(low[k * R + r]),
                                       f"{key}_ci_high": float(high[k * R + r])})
                    else:
                        record.update({key: math.nan, f"{key}_ci_low": math.nan, f"{key}_ci_high": math.nan})
                record["n_images"] = n
                aucs.append(record)
        return PerturbSummary(curves, aucs, has_accuracy, notes)
