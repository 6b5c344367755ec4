"""Attention statistics of the *Beyond [cls]* analysis, attention rollout and object relevance.

Pure, batched functions over post-softmax attention (rows are queries) with an explicit
:class:`~attnflow.layout.TokenLayout`; they work on attention from anywhere, not only from a cache. Every
function accepts any leading dimensions (``(B, H, T, T)``, ``(B, L, H, T, T)``, ...), computes in float64
and returns float64.

Every metric a metrics file holds is declared once (an :class:`~attnflow.registry.Metric` in the
:class:`~attnflow.registry.MetricGroup` of the function that computes it, right below that function) and
collected in :data:`REGISTRY`; :func:`batch_metrics` computes what the registry makes available.

Notation: T tokens ordered ``[cls (if any), registers..., patches in raster order]``, p prefix tokens, S the
P = T - p patches. ``Q_i(j) = A[i, j] / sum_{k in S} A[i, k]`` (j in S) is query i's attention renormalised
over patches; ``H(q) = -sum q ln q`` in nats with ``0 ln 0 = 0``.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch

from .layout import TokenLayout
from .registry import Level, Metric, MetricGroup, Need, Registry, check_group_output

Fusion = Literal["mean", "max", "min"]
FUSIONS = ("mean", "max", "min")
TOP_FRACTION = 0.1

# Units shared by several metrics.
ROW_SHARE = "share of the row's attention"
CLS_SHARE = "share of cls attention over patches"
ROLLOUT_SHARE = "share of the rollout map"
NORMALISED_ENTROPY = "entropy / ln P"


def entropy(q: torch.Tensor) -> torch.Tensor:
    """``-sum q ln q`` over the last dimension, in nats, with ``0 ln 0 = 0``."""
    q = q.double()
    return -torch.special.xlogy(q, q).sum(-1)


def top_mass(q: torch.Tensor, fraction: float = TOP_FRACTION) -> torch.Tensor:
    """Sum of the ``ceil(fraction * P)`` largest values over the last dimension."""
    k = math.ceil(fraction * q.shape[-1])
    return q.double().topk(k, dim=-1).values.sum(-1)


def gini(q: torch.Tensor) -> torch.Tensor:
    """Gini coefficient over the last dimension: ``sum_i (2i - P - 1) s_i / (P sum s)``, s sorted ascending."""
    s = q.double().sort(dim=-1).values
    P = s.shape[-1]
    weights = 2 * torch.arange(1, P + 1, dtype=s.dtype, device=s.device) - P - 1
    return (s * weights).sum(-1) / (P * s.sum(-1))


def _normalised_entropy(h: torch.Tensor, P: int) -> torch.Tensor:
    return h / math.log(P) if P > 1 else torch.full_like(h, math.nan)


def distribution_stats(q: torch.Tensor) -> dict[str, torch.Tensor]:
    """Concentration of distributions over patches ``q`` (..., P), each summing to 1.

    Returns ``entropy`` (nats), ``entropy_norm`` (entropy / ln P: 1 uniform, 0 one patch), ``top10_mass``,
    ``eff_frac`` (exp(entropy) / P) and ``gini``, each of shape (...).
    """
    P = q.shape[-1]
    h = entropy(q)
    return {
        "entropy": h,
        "entropy_norm": _normalised_entropy(h, P),
        "top10_mass": top_mass(q),
        "eff_frac": h.exp() / P,
        "gini": gini(q),
    }


def renormalise_over_patches(rows: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """(..., T) attention rows -> (..., P) the same rows restricted to patches and renormalised (``Q_i``)."""
    patches = rows.double()[..., layout.num_prefix_tokens:]
    return patches / patches.sum(-1, keepdim=True)


def patch_distances(layout: TokenLayout, device: torch.device | str | None = None) -> torch.Tensor:
    """(P, P) Euclidean distances between patch positions ``(row * patch_h, col * patch_w)``, in pixels."""
    gh, gw = layout.grid_size
    ph, pw = layout.patch_size
    rows = torch.arange(gh, dtype=torch.float64, device=device).repeat_interleave(gw) * ph
    cols = torch.arange(gw, dtype=torch.float64, device=device).repeat(gh) * pw
    return torch.sqrt((rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2)


@dataclass
class Batch:
    """What the metric groups of one batch of images read, and the intermediate quantities they share.

    Attributes:
        maps: (B, L, H, T, T) full maps, or (B, L, H, p, T) the prefix rows only (``full_maps`` False).
        magnitude: (B, L, T) per-token magnitude ratios.
        fg: (B, P) fraction of each patch that is object, or None without masks.
    """

    layout: TokenLayout
    maps: torch.Tensor
    full_maps: bool
    magnitude: torch.Tensor
    fg: torch.Tensor | None = None
    fusion: Fusion = "mean"
    discard_ratio: float = 0.0

    @cached_property
    def fg_per_head(self) -> torch.Tensor | None:
        """(B, 1, P) float64 object fractions, broadcasting against one layer's (B, H, P)."""
        return None if self.fg is None else self.fg.double()[:, None, :]

    @cached_property
    def rollout_maps(self) -> torch.Tensor:
        """(B, L, P) rollout readout after every layer (full maps only), computed once per batch."""
        if not self.full_maps:
            raise ValueError("rollout needs full attention maps")
        return rollout(self.maps, self.layout, self.fusion, self.discard_ratio)


def cls_metrics(cls_rows: torch.Tensor, layout: TokenLayout, fg: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Metrics of the cls token's attention row ``A[0, :]``.

    Args:
        cls_rows: (..., T) the cls query's attention, e.g. ``attn[..., 0, :]``.
        fg: (..., P) fraction of each patch that is object, broadcastable against ``cls_rows[..., p:]``.
    Returns (...) tensors: ``cls_self``, ``cls_to_patch``, ``cls_to_registers`` (models with registers),
    ``cls_entropy``, ``cls_entropy_norm``, ``cls_top10_mass``, ``cls_eff_frac``, ``cls_gini`` and, with
    ``fg``, ``cls_fg_mass``. All NaN for models without a cls token.
    """
    rows = cls_rows.double()
    p = layout.num_prefix_tokens
    out = {
        "cls_self": rows[..., 0],
        "cls_to_patch": rows[..., p:].sum(-1),
    }
    if layout.num_registers:
        out["cls_to_registers"] = rows[..., 1:p].sum(-1)
    q = renormalise_over_patches(rows, layout)
    stats = distribution_stats(q)
    out.update({
        "cls_entropy": stats["entropy"],
        "cls_entropy_norm": stats["entropy_norm"],
        "cls_top10_mass": stats["top10_mass"],
        "cls_eff_frac": stats["eff_frac"],
        "cls_gini": stats["gini"],
    })
    if fg is not None:
        out["cls_fg_mass"] = (q * fg.double()).sum(-1)
    if not layout.has_cls:
        out = {name: torch.full_like(value, math.nan) for name, value in out.items()}
    return out


CLS_ROW = MetricGroup(
    "cls row",
    compute=lambda batch, maps: cls_metrics(maps[..., 0, :], batch.layout, batch.fg_per_head),
    per_layer=True,
    metrics=(
        Metric("cls_self", "head", {Need.prefix_rows}, ROW_SHARE, "cls → cls attention", "cls attends more to itself",
               "A[0, 0]", default=True, summary=True, nan_when=("no_cls",)),
        Metric("cls_to_patch", "head", {Need.prefix_rows}, ROW_SHARE, "cls → patches attention", "cls attends more to patches",
               "sum_{j in S} A[0, j]", nan_when=("no_cls",)),
        Metric("cls_to_registers", "head", {Need.prefix_rows, Need.registers}, ROW_SHARE, "cls → registers attention",
               "cls attends more to registers", "sum_{0 < j < p} A[0, j]", nan_when=("no_cls",)),
        Metric("cls_entropy", "head", {Need.prefix_rows}, "nats", "cls attention entropy", "cls attention more uniform",
               "H(Q_0)", nan_when=("no_cls", "cls_mass")),
        Metric("cls_entropy_norm", "head", {Need.prefix_rows}, NORMALISED_ENTROPY, "normalised cls entropy",
               "cls attention more uniform", "H(Q_0) / ln P (1 = uniform, 0 = one patch)", default=True, summary=True,
               nan_when=("no_cls", "cls_mass", "one_patch")),
        Metric("cls_top10_mass", "head", {Need.prefix_rows}, CLS_SHARE, "cls mass on the top 10% patches",
               "cls attention more concentrated", "sum of the ceil(0.1 P) largest values of Q_0", default=True, summary=True,
               nan_when=("no_cls", "cls_mass")),
        Metric("cls_eff_frac", "head", {Need.prefix_rows}, "share of patches", "patches cls effectively attends",
               "cls attention spread over more patches", "exp(H(Q_0)) / P, the effective fraction of patches attended",
               nan_when=("no_cls", "cls_mass")),
        Metric("cls_gini", "head", {Need.prefix_rows}, "Gini coefficient", "cls attention inequality",
               "cls attention more concentrated",
               "Gini coefficient of Q_0: values sorted ascending s_1..s_P, sum_i (2i - P - 1) s_i / (P sum s)",
               nan_when=("no_cls", "cls_mass")),
        Metric("cls_fg_mass", "head", {Need.prefix_rows, Need.masks}, CLS_SHARE, "cls mass on the object",
               "cls attention puts more mass on the object", "sum_{j in S} Q_0(j) fg_j", default=True, summary=True,
               nan_when=("no_cls", "cls_mass", "no_mask")),
    ),
)


def patch_metrics(attn: torch.Tensor, layout: TokenLayout) -> dict[str, torch.Tensor]:
    """Metrics of the patch queries' rows of full maps ``attn`` (..., T, T).

    Returns (...) tensors: ``patch_to_cls`` (NaN without cls), ``patch_self``, ``patch_entropy``,
    ``patch_entropy_norm`` and ``attn_distance`` (pixels).
    """
    # These touch all P x P entries, so they run in the input's precision (at least float32; torch sums
    # a row pairwise, about 1e-7 relative) and go to float64 once each row is reduced to one number. Q is
    # never materialised: with s_i = sum_{k in S} A[i, k],
    # H(Q_i) = ln s_i - (1 / s_i) sum_j A[i, j] ln A[i, j] and sum_j Q_i(j) d_ij = (sum_j A[i, j] d_ij) / s_i.
    a = attn if attn.dtype == torch.float64 else attn.float()
    p = layout.num_prefix_tokens
    patch_rows = a[..., p:, :]  # (..., P, T)
    to_patches = patch_rows[..., p:]  # (..., P, P)
    mass = to_patches.sum(-1).double()
    plogp = torch.special.xlogy(to_patches, to_patches).sum(-1).double()
    h = (mass.log() - plogp / mass).mean(-1)
    distances = patch_distances(layout, a.device).to(a.dtype)
    reach = (to_patches * distances).sum(-1).double() / mass
    return {
        "patch_to_cls": patch_rows[..., 0].double().mean(-1) if layout.has_cls else torch.full_like(h, math.nan),
        "patch_self": torch.diagonal(to_patches, dim1=-2, dim2=-1).double().mean(-1),
        "patch_entropy": h,
        "patch_entropy_norm": _normalised_entropy(h, layout.num_patches),
        "attn_distance": reach.mean(-1),
    }


PATCH_ROWS = MetricGroup(
    "patch rows",
    compute=lambda batch, maps: patch_metrics(maps, batch.layout),
    per_layer=True,
    metrics=(
        Metric("patch_to_cls", "head", {Need.full_maps}, ROW_SHARE, "patches → cls attention", "patches attend more to cls",
               "mean_{i in S} A[i, 0]", default=True, summary=True, nan_when=("no_cls",)),
        Metric("patch_self", "head", {Need.full_maps}, ROW_SHARE, "patch → itself attention",
               "patches attend more to themselves", "mean_{i in S} A[i, i]"),
        Metric("patch_entropy", "head", {Need.full_maps}, "nats", "patch attention entropy", "patch attention more uniform",
               "mean_{i in S} H(Q_i)", nan_when=("undefined",)),
        Metric("patch_entropy_norm", "head", {Need.full_maps}, NORMALISED_ENTROPY, "normalised patch entropy",
               "patch attention more uniform", "mean_{i in S} H(Q_i) / ln P", summary=True, nan_when=("undefined",)),
        Metric("attn_distance", "head", {Need.full_maps}, "input pixels", "mean attention distance",
               "attention reaches farther",
               "mean_{i in S} sum_{j in S} Q_i(j) ‖pos_i - pos_j‖, pos = (row · patch_h, col · patch_w) "
               "(the ViT paper's mean attention distance, over patches)", default=True, summary=True,
               nan_when=("undefined",)),
    ),
)


def magnitude_metrics(magnitude: torch.Tensor, layout: TokenLayout) -> dict[str, torch.Tensor]:
    """(..., T) per-token magnitude ratios -> ``magnitude_cls`` (NaN without cls) and ``magnitude_patch``."""
    m = magnitude.double()
    patch = m[..., layout.num_prefix_tokens:].mean(-1)
    return {
        "magnitude_cls": m[..., 0] if layout.has_cls else torch.full_like(patch, math.nan),
        "magnitude_patch": patch,
    }


MAGNITUDES = MetricGroup(
    "magnitudes",
    compute=lambda batch: magnitude_metrics(batch.magnitude, batch.layout),
    metrics=(
        Metric("magnitude_cls", "layer", {Need.magnitude}, "update norm / residual norm", "cls attention update",
               "cls attention update larger",
               "the cls token's ‖update the attention branch adds‖ / ‖residual entering the block‖", default=True,
               summary=True, nan_when=("no_cls",)),
        Metric("magnitude_patch", "layer", {Need.magnitude}, "update norm / residual norm", "patch attention update",
               "patch attention updates larger", "mean_{i in S} of the patches' magnitude ratios", summary=True),
    ),
)


def reduce_heads(values: torch.Tensor, how: Fusion = "mean", dim: int = -1) -> torch.Tensor:
    """Mean, max or min over the head dimension ``dim``, in the input's dtype."""
    if how == "mean":
        return values.mean(dim)
    if how == "max":
        return values.amax(dim)
    if how == "min":
        return values.amin(dim)
    raise ValueError(f"unknown head reduction '{how}' (choose from {', '.join(FUSIONS)})")


def fuse_heads(attn: torch.Tensor, fusion: Fusion = "mean") -> torch.Tensor:
    """(..., H, T, T) -> (..., T, T) by mean, max or min over heads, in the input's dtype."""
    return reduce_heads(attn, fusion, dim=-3)


def discard_lowest(fused: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the lowest ``floor(ratio * T * (T - 1))`` off-diagonal entries of each (T, T) map separately."""
    if not 0 <= ratio < 1:
        raise ValueError(f"discard ratio must be in [0, 1), got {ratio}")
    T = fused.shape[-1]
    off_diagonal = ~torch.eye(T, dtype=torch.bool, device=fused.device)
    k = math.floor(ratio * T * (T - 1) + 1e-9)
    if k == 0:
        return fused
    values = fused[..., off_diagonal]  # (..., T*(T-1)), one row per map
    lowest = values.topk(k, dim=-1, largest=False).indices
    out = fused.clone()
    out[..., off_diagonal] = values.scatter(-1, lowest, 0.0)
    return out


def rollout(
    attn: torch.Tensor, layout: TokenLayout, fusion: Fusion = "mean", discard_ratio: float = 0.0
) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) read out after every layer.

    Args:
        attn: (B, L, H, T, T) attention of all layers.
    Returns:
        (B, L, P): after layer l, the readout row of ``R_l = M_l R_{l-1}`` restricted to patches and
        renormalised, where ``M_l`` is the head-fused map (with ``discard_ratio`` of its off-diagonal entries
        zeroed per image) plus the identity, halved and row-normalised. The readout row is the cls token's
        for models with one, else the mean of the patch rows (what global average pooling reads).
    """
    B, L, _, T, _ = attn.shape
    p = layout.num_prefix_tokens
    work = attn.dtype if attn.dtype == torch.float64 else torch.float32
    eye = torch.eye(T, dtype=work, device=attn.device)
    # Only the readout row of each R_l = M_l ... M_1 is needed: start from the readout vector at every
    # layer and multiply downwards, so a layer costs one (B, L, T) x (B, T, T) product instead of a T^3
    # matrix product, and no (B, L, T, T) stack is ever held. float32 keeps about 1e-6 relative here: the
    # products are of row-stochastic matrices and every row sum runs pairwise.
    start = torch.zeros(T, dtype=work, device=attn.device)
    if layout.has_cls:
        start[0] = 1.0
    else:
        start[p:] = 1.0 / (T - p)
    readout = start.expand(B, L, T).clone()  # row l becomes start^T M_l M_{l-1} ... M_1
    for k in reversed(range(L)):
        fused = discard_lowest(fuse_heads(attn[:, k].to(work), fusion), discard_ratio)  # (B, T, T)
        mixed = 0.5 * fused + 0.5 * eye
        mixed = mixed / mixed.sum(-1, keepdim=True)  # rows, not columns
        readout[:, k:] = readout[:, k:] @ mixed
    return renormalise_over_patches(readout, layout)


def rollout_metrics(maps: torch.Tensor, fg: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """(B, L, P) rollout maps -> ``rollout_entropy_norm``, ``rollout_top10_mass`` and, with fg (B, P),
    ``rollout_fg_mass``, each (B, L)."""
    stats = distribution_stats(maps)
    out = {"rollout_entropy_norm": stats["entropy_norm"], "rollout_top10_mass": stats["top10_mass"]}
    if fg is not None:
        out["rollout_fg_mass"] = (maps.double() * fg.double()[:, None, :]).sum(-1)
    return out


ROLLOUT = MetricGroup(
    "rollout",
    compute=lambda batch: rollout_metrics(batch.rollout_maps, batch.fg),
    metrics=(
        Metric("rollout_entropy_norm", "layer", {Need.full_maps}, NORMALISED_ENTROPY, "normalised rollout entropy",
               "rollout more uniform", "H(r_l) / ln P of the rollout readout r_l after layer l (see Rollout)",
               default=True, summary=True, nan_when=("undefined",)),
        Metric("rollout_top10_mass", "layer", {Need.full_maps}, ROLLOUT_SHARE, "rollout mass on the top 10% patches",
               "rollout more concentrated", "sum of the ceil(0.1 P) largest values of r_l", nan_when=("undefined",)),
        Metric("rollout_fg_mass", "layer", {Need.full_maps, Need.masks}, ROLLOUT_SHARE, "rollout mass on the object",
               "rollout puts more mass on the object", "sum_{j in S} r_l(j) fg_j", summary=True, nan_when=("undefined",)),
    ),
)


def mask_metrics(fg: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, P) object fractions -> ``fg_frac`` (B,): the image's object fraction, what uniform attention
    scores as ``cls_fg_mass``."""
    return {"fg_frac": fg.double().mean(-1)}


MASKS = MetricGroup(
    "masks",
    compute=lambda batch: mask_metrics(batch.fg),
    metrics=(
        Metric("fg_frac", "image", {Need.masks}, "share of the patch area", "object fraction of the image",
               "objects cover more of the image", "mean_{j in S} fg_j, what uniform attention scores as `cls_fg_mass`",
               nan_when=("no_mask",)),
    ),
)

# Every metric, in the order tables, files and the README list them.
REGISTRY = Registry((CLS_ROW, PATCH_ROWS, ROLLOUT, MAGNITUDES, MASKS))
HEAD_METRICS = REGISTRY.names("head")
LAYER_METRICS = REGISTRY.names("layer")
IMAGE_METRICS = REGISTRY.names("image")


def available_metrics(layout: TokenLayout, *, full_maps: bool, has_fg: bool) -> dict[str, Level]:
    """Name -> level (``head``, ``layer`` or ``image``) of every metric computable for this layout from full
    maps or only from cls/register rows, with or without object masks."""
    return REGISTRY.available(layout, full_maps=full_maps, has_fg=has_fg)


def batch_metrics(
    layout: TokenLayout,
    magnitude: torch.Tensor,
    *,
    attn: torch.Tensor | None = None,
    attn_rows: torch.Tensor | None = None,
    fg: torch.Tensor | None = None,
    fusion: Fusion = "mean",
    discard_ratio: float = 0.0,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Every available metric for a batch of images, as a metrics file stores them.

    Args:
        magnitude: (B, L, T).
        attn: (B, L, H, T, T) full maps; or ``attn_rows`` (B, L, H, p, T), the prefix rows only.
        fg: (B, P) fraction of each patch that is object.
    Returns:
        ``{name: (B, L, H) | (B, L) | (B,)}`` float64 as listed by :func:`available_metrics`, and the
        rollout maps (B, L, P) (``None`` without full maps).
    """
    if (attn is None) == (attn_rows is None):
        raise ValueError("pass exactly one of attn and attn_rows")
    batch = Batch(layout, attn if attn is not None else attn_rows, attn is not None, magnitude, fg, fusion, discard_ratio)
    wanted = available_metrics(layout, full_maps=batch.full_maps, has_fg=fg is not None)
    groups = [g for g in REGISTRY.groups if any(m.name in wanted for m in g.metrics)]
    out: dict[str, torch.Tensor] = {}
    per_layer = [g for g in groups if g.per_layer]
    if per_layer:
        # one layer at a time: the full-map groups convert (B, H, T, T), never (B, L, H, T, T), to float32
        layers: list[dict[str, torch.Tensor]] = []
        for layer in range(batch.maps.shape[1]):
            maps = batch.maps[:, layer]  # (B, H, T or p, T)
            values: dict[str, torch.Tensor] = {}
            for group in per_layer:
                computed = group.compute(batch, maps)
                check_group_output(group, computed, wanted)
                values.update(computed)
            layers.append(values)
        out.update({name: torch.stack([values[name] for values in layers], dim=1) for name in layers[0]})
    for group in groups:
        if not group.per_layer:
            computed = group.compute(batch)
            check_group_output(group, computed, wanted)
            out.update(computed)
    return {name: out[name] for name in wanted}, batch.rollout_maps if batch.full_maps else None


def main(argv: list[str] | None = None) -> None:
    """``python -m attnflow.metrics --markdown``: print the README's metrics table from :data:`REGISTRY`."""
    parser = argparse.ArgumentParser(prog="python -m attnflow.metrics", description=main.__doc__)
    parser.add_argument("--markdown", action="store_true", help="print the metrics table of the README")
    args = parser.parse_args(argv)
    if not args.markdown:
        parser.error("nothing to do: pass --markdown")
    sys.stdout.write(REGISTRY.markdown())


if __name__ == "__main__":
    main()
