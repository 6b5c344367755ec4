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
from dataclasses import dataclass, field
from functools import cached_property
from typing import Sequence

import torch

from .choices import StrEnum
from .layout import TokenLayout
from .registry import Level, Metric, MetricGroup, Need, Registry, check_group_output

__all__ = [
    "Fusion", "TOP_FRACTION", "ROW_SHARE", "CLS_SHARE", "ROLLOUT_SHARE", "NORMALISED_ENTROPY", "entropy", "top_mass",
    "gini", "distribution_stats", "renormalise_over_patches", "patch_distances", "Batch", "cls_metrics", "CLS_ROW",
    "patch_metrics", "query_key_nmi", "PATCH_ROWS", "magnitude_metrics", "MAGNITUDES", "reduce_heads", "fuse_heads",
    "discard_lowest", "readout_vector", "mixing_matrix", "rollout", "rollout_metrics", "ROLLOUT", "mask_metrics",
    "flow_metrics", "FLOW_SHARE", "FLOW", "MASKS", "DEFAULT_ARTIFACT_FACTOR", "ArtifactRule", "artifact_mask",
    "artifact_metrics", "ARTIFACT_SET", "ARTIFACTS", "REGISTRY", "HEAD_METRICS", "LAYER_METRICS", "IMAGE_METRICS",
    "available_metrics", "batch_metrics", "main",
]

class Fusion(StrEnum):
    """How heads are combined: rollout's head fusion, and the head reduction of compare and plots."""

    mean = "mean"
    max = "max"
    min = "min"

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
        token_norm: (B, L, T) every block's output token norms, or None (caches of attnflow 0.1).
        artifact_rule: which patch tokens count as high-norm artifacts (:class:`ArtifactRule`).
    """

    layout: TokenLayout
    maps: torch.Tensor
    full_maps: bool
    magnitude: torch.Tensor
    fg: torch.Tensor | None = None
    fusion: Fusion | str = Fusion.mean
    discard_ratio: float = 0.0
    token_norm: torch.Tensor | None = None
    artifact_rule: "ArtifactRule" = field(default_factory=lambda: ArtifactRule())
    flow_maps: torch.Tensor | None = None  # (B, F, P) attention flow maps (attnflow.flow), read out after flow_layers
    flow_layers: tuple[int, ...] = ()

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
               nan_when=("no_cls", "cls_mass", "one_patch"), uniform=1.0),
        Metric("cls_top10_mass", "head", {Need.prefix_rows}, CLS_SHARE, "cls mass on the top 10% patches",
               "cls attention more concentrated", "sum of the ceil(0.1 P) largest values of Q_0", default=True, summary=True,
               nan_when=("no_cls", "cls_mass")),
        Metric("cls_eff_frac", "head", {Need.prefix_rows}, "share of patches", "patches cls effectively attends",
               "cls attention spread over more patches", "exp(H(Q_0)) / P, the effective fraction of patches attended",
               nan_when=("no_cls", "cls_mass"), uniform=1.0),
        Metric("cls_gini", "head", {Need.prefix_rows}, "Gini coefficient", "cls attention inequality",
               "cls attention more concentrated",
               "Gini coefficient of Q_0: values sorted ascending s_1..s_P, sum_i (2i - P - 1) s_i / (P sum s)",
               nan_when=("no_cls", "cls_mass"), uniform=0.0),
        Metric("cls_fg_mass", "head", {Need.prefix_rows, Need.masks}, CLS_SHARE, "cls mass on the object",
               "cls attention puts more mass on the object", "sum_{j in S} Q_0(j) fg_j", default=True, summary=True,
               nan_when=("no_cls", "cls_mass", "no_mask"), uniform="fg_frac"),
    ),
)


def patch_metrics(attn: torch.Tensor, layout: TokenLayout) -> dict[str, torch.Tensor]:
    """Metrics of the patch queries' rows of full maps ``attn`` (..., T, T).

    Returns (...) tensors: ``patch_to_cls`` (NaN without cls), ``patch_self``, ``patch_entropy``,
    ``patch_entropy_norm``, ``attn_distance`` (pixels) and ``patch_nmi`` (:func:`query_key_nmi`).
    """
    # Everything runs in float64. In float32, H(Q_i) = ln s_i - (1 / s_i) sum_j A[i, j] ln A[i, j] cancels
    # on near-one-hot rows: ln s_i carries an absolute error of about 1e-7 (s_i is a float32 sum), while
    # H(Q_i) may be 1e-6 nats (a trained DINOv2's layer 0); in float64 that error is 1e-16. Q is never
    # materialised: with s_i = sum_{k in S} A[i, k], sum_j Q_i(j) d_ij = (sum_j A[i, j] d_ij) / s_i and
    # patch_nmi's key marginal p(k) = (1 / P) sum_i A[i, k] / s_i is a vector-matrix product.
    p, P = layout.num_prefix_tokens, layout.num_patches
    lead = attn.shape[:-2]
    maps = attn.reshape(-1, *attn.shape[-2:])  # (N, T, T)
    n = maps.shape[0]
    h, reach, self_share = (torch.empty(n, dtype=torch.float64, device=attn.device) for _ in range(3))
    key_marginal = torch.empty(n, P, dtype=torch.float64, device=attn.device)
    distances = patch_distances(layout, attn.device)
    # On a CPU, a few maps at a time: each float64 block then stays in cache through the passes below, which
    # takes a third of the time of whole-stack passes, and no float64 copy of the stack is ever held. On a GPU
    # every pass is a kernel launch and memory is ample: one block.
    step = n if attn.is_cuda else max(1, _CHUNK_ELEMENTS // (P * P))
    for start in range(0, n, step):
        part = slice(start, start + step)
        to_patches = maps[part, p:, p:].double()  # (n', P, P)
        mass = to_patches.sum(-1)  # (n', P)
        # x ln x with 0 ln 0 = 0: clamping zeros to the smallest normal double leaves every float32 input
        # value unchanged and runs torch's vectorised log, a quarter faster than torch.special.xlogy on a CPU
        plogp = (to_patches * to_patches.clamp_min(torch.finfo(torch.float64).tiny).log()).sum(-1)
        h[part] = (mass.log() - plogp / mass).mean(-1)
        key_marginal[part] = (mass.reciprocal()[:, None, :] @ to_patches).squeeze(-2) / P
        reach[part] = ((to_patches * distances).sum(-1) / mass).mean(-1)
        self_share[part] = torch.diagonal(to_patches, dim1=-2, dim2=-1).mean(-1)
    h = h.reshape(lead)
    return {
        "patch_to_cls": attn[..., p:, 0].double().mean(-1) if layout.has_cls else torch.full_like(h, math.nan),
        "patch_self": self_share.reshape(lead),
        "patch_entropy": h,
        "patch_entropy_norm": _normalised_entropy(h, P),
        "attn_distance": reach.reshape(lead),
        "patch_nmi": query_key_nmi(h, entropy(key_marginal.reshape(*lead, P)), P),
    }


# float64 elements per block of patch_metrics: 2 MiB, the order of a core's L2 cache
_CHUNK_ELEMENTS = 2**18


def query_key_nmi(row_entropy: torch.Tensor, key_entropy: torch.Tensor, P: int) -> torch.Tensor:
    """Normalised mutual information between query and key patches (Park et al., ICLR 2023), from entropies.

    With a uniform prior over the P queries, p(q) = 1/P, and the key marginal p(k) = mean_q Q_q(k),
    ``MI = sum_q sum_k p(q) Q_q(k) ln(Q_q(k) / p(k)) = H(p) - mean_q H(Q_q)`` exactly (with 0 ln 0 = 0 on
    both sides), so the patch-rows group gets it from the mean row entropy it already has and one more
    entropy; in float64 the subtraction loses about 1e-15 nats. ``NMI = MI / sqrt(ln P · H(p))``.

    Args:
        row_entropy: (...) mean_q H(Q_q), in nats.
        key_entropy: (...) H(p), in nats.
    Returns:
        (...) float64 in [0, 1]: 0 when every query attends the same way (collapse), 1 for a permutation.
        0 where H(p) = 0 (every query puts all its mass on the same key): the limit, as NMI <= sqrt(H(p) / ln P).
        NaN for P = 1 (ln P = 0) and where the inputs are NaN (a query row without mass on patches).
    """
    row_entropy, key_entropy = row_entropy.double(), key_entropy.double()
    if P < 2:
        return torch.full_like(row_entropy, math.nan)
    # MI >= 0; a negative value is float64 rounding of a collapsed map (torch.where keeps NaN)
    mi = torch.where(key_entropy - row_entropy < 0, 0.0, key_entropy - row_entropy)
    return torch.where(key_entropy == 0, 0.0, mi / torch.sqrt(math.log(P) * key_entropy))


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
               "patch attention more uniform", "mean_{i in S} H(Q_i) / ln P", summary=True, nan_when=("undefined",),
               uniform=1.0),
        Metric("attn_distance", "head", {Need.full_maps}, "input pixels", "mean attention distance",
               "attention reaches farther",
               "mean_{i in S} sum_{j in S} Q_i(j) ‖pos_i - pos_j‖, pos = (row · patch_h, col · patch_w) "
               "(the ViT paper's mean attention distance, over patches)", default=True, summary=True,
               nan_when=("undefined",)),
        Metric("patch_nmi", "head", {Need.full_maps}, "MI / sqrt(ln P · H(p))", "query–key NMI",
               "attention depends more on the query",
               "MI / sqrt(ln P · H(p)), MI = sum_{i in S} sum_{k in S} (1/P) Q_i(k) ln(Q_i(k) / p(k)) = "
               "H(p) - mean_{i in S} H(Q_i), p(k) = mean_{i in S} Q_i(k) (Park et al. 2023; 0 = collapse: every "
               "query attends alike; 1 = a permutation; 0 when H(p) = 0)", default=True,
               nan_when=("undefined", "one_patch")),
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


def reduce_heads(values: torch.Tensor, how: Fusion | str = Fusion.mean, dim: int = -1) -> torch.Tensor:
    """Mean, max or min over the head dimension ``dim``, in the input's dtype."""
    if how == Fusion.mean:
        return values.mean(dim)
    if how == Fusion.max:
        return values.amax(dim)
    if how == Fusion.min:
        return values.amin(dim)
    raise ValueError(f"unknown head reduction '{how}' (choose from {', '.join(Fusion)})")


def fuse_heads(attn: torch.Tensor, fusion: Fusion | str = Fusion.mean) -> torch.Tensor:
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


def readout_vector(layout: TokenLayout, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
    """(T,) what rollout and attention flow read out: the cls token (one-hot) for models with one, else the
    mean of the patch tokens (1 / P on each patch: what global average pooling reads)."""
    start = torch.zeros(layout.num_tokens, dtype=dtype, device=device)
    if layout.has_cls:
        start[0] = 1.0
    else:
        start[layout.num_prefix_tokens:] = 1.0 / layout.num_patches
    return start


def mixing_matrix(attn: torch.Tensor, fusion: Fusion | str = Fusion.mean, discard_ratio: float = 0.0) -> torch.Tensor:
    """(..., H, T, T) one layer's attention -> (..., T, T) ``M = 0.5 F + 0.5 I`` with each row renormalised to
    sum 1 (rows, not columns), F the head-fused map with ``discard_ratio`` of its off-diagonal entries zeroed
    per map: rollout's and attention flow's per-layer matrix, in the input's dtype."""
    fused = discard_lowest(fuse_heads(attn, fusion), discard_ratio)
    mixed = 0.5 * fused + 0.5 * torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
    return mixed / mixed.sum(-1, keepdim=True)


def rollout(
    attn: torch.Tensor, layout: TokenLayout, fusion: Fusion | str = Fusion.mean, discard_ratio: float = 0.0
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
    # Only the readout row of each R_l = M_l ... M_1 is needed: start from the readout vector at every
    # layer and multiply downwards, so a layer costs one (B, L, T) x (B, T, T) product instead of a T^3
    # matrix product, and no (B, L, T, T) stack is ever held. float32 keeps about 1e-6 relative here: the
    # products are of row-stochastic matrices and every row sum runs pairwise.
    start = readout_vector(layout, work, attn.device)
    readout = start.expand(B, L, T).clone()  # row l becomes start^T M_l M_{l-1} ... M_1
    for k in reversed(range(L)):
        readout[:, k:] = readout[:, k:] @ mixing_matrix(attn[:, k].to(work), fusion, discard_ratio)  # (B, T, T)
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
               default=True, summary=True, nan_when=("undefined",), uniform=1.0),
        Metric("rollout_top10_mass", "layer", {Need.full_maps}, ROLLOUT_SHARE, "rollout mass on the top 10% patches",
               "rollout more concentrated", "sum of the ceil(0.1 P) largest values of r_l", nan_when=("undefined",)),
        Metric("rollout_fg_mass", "layer", {Need.full_maps, Need.masks}, ROLLOUT_SHARE, "rollout mass on the object",
               "rollout puts more mass on the object", "sum_{j in S} r_l(j) fg_j", summary=True, nan_when=("undefined",),
               uniform="fg_frac"),
    ),
)


def mask_metrics(fg: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, P) object fractions -> ``fg_frac`` (B,): the image's object fraction, what uniform attention
    scores as ``cls_fg_mass``."""
    return {"fg_frac": fg.double().mean(-1)}


def flow_metrics(
    maps: torch.Tensor, layers: Sequence[int], num_layers: int, fg: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """(B, F, P) attention flow maps read out after ``layers`` (F of the ``num_layers`` blocks, 0-based) ->
    ``flow_entropy_norm``, ``flow_top10_mass`` and, with fg (B, P), ``flow_fg_mass``, each (B, L): NaN at
    the layers not among ``layers``."""
    stats = distribution_stats(maps)
    values = {"flow_entropy_norm": stats["entropy_norm"], "flow_top10_mass": stats["top10_mass"]}
    if fg is not None:
        values["flow_fg_mass"] = (maps.double() * fg.double()[:, None, :]).sum(-1)
    out = {}
    for name, value in values.items():
        full = torch.full((maps.shape[0], num_layers), math.nan, dtype=torch.float64, device=maps.device)
        full[:, list(layers)] = value.to(full.device)
        out[name] = full
    return out


FLOW_SHARE = "share of the flow map"
FLOW = MetricGroup(
    "attention flow",
    compute=lambda batch: flow_metrics(batch.flow_maps, batch.flow_layers, batch.maps.shape[1], batch.fg),
    metrics=(
        Metric("flow_entropy_norm", "layer", {Need.full_maps, Need.flow}, NORMALISED_ENTROPY,
               "normalised flow entropy", "attention flow more uniform",
               "H(f_l) / ln P of the attention flow map f_l after layer l (see Attention flow; NaN at layers "
               "--flow-layers did not choose)", nan_when=("not_flow_layer", "undefined"), uniform=1.0),
        Metric("flow_top10_mass", "layer", {Need.full_maps, Need.flow}, FLOW_SHARE, "flow mass on the top 10% patches",
               "attention flow more concentrated", "sum of the ceil(0.1 P) largest values of f_l",
               nan_when=("not_flow_layer", "undefined")),
        Metric("flow_fg_mass", "layer", {Need.full_maps, Need.flow, Need.masks}, FLOW_SHARE, "flow mass on the object",
               "attention flow puts more mass on the object", "sum_{j in S} f_l(j) fg_j",
               nan_when=("not_flow_layer", "undefined"), uniform="fg_frac"),
    ),
)


MASKS = MetricGroup(
    "masks",
    compute=lambda batch: mask_metrics(batch.fg),
    metrics=(
        Metric("fg_frac", "image", {Need.masks}, "share of the patch area", "object fraction of the image",
               "objects cover more of the image", "mean_{j in S} fg_j, what uniform attention scores as `cls_fg_mass`",
               nan_when=("no_mask",)),
    ),
)

# The default artifact rule's factor: Darcet et al. (2024) find the output norms of a ViT's patch tokens
# bimodal, the artifacts' about 10x the others'; 4x the image's median patch norm lies between the two modes
# (their geometric midpoint is sqrt(10) = 3.2x; see the README's "High-norm artifact tokens").
DEFAULT_ARTIFACT_FACTOR = 4.0


@dataclass(frozen=True)
class ArtifactRule:
    """Which patch tokens of a block's output are high-norm artifacts (Darcet et al., "Vision Transformers Need
    Registers", ICLR 2024): those whose norm exceeds ``factor`` times the median patch norm of the same image at
    the same block, or, with ``norm`` (and ``factor`` None), an absolute norm. Exactly one of the two is set.
    """

    factor: float | None = DEFAULT_ARTIFACT_FACTOR
    norm: float | None = None

    def __post_init__(self) -> None:
        if (self.factor is None) == (self.norm is None):
            raise ValueError("an artifact rule takes exactly one of factor and norm")
        if self.factor is not None and not (math.isfinite(self.factor) and self.factor > 1):
            raise ValueError(f"must be a finite number above 1 (times the median patch norm), not {self.factor}")
        if self.norm is not None and not (math.isfinite(self.norm) and self.norm > 0):
            raise ValueError(f"must be a finite positive norm, not {self.norm}")

    @property
    def attrs(self) -> dict[str, float]:
        """The rule as a metrics file's root attributes: ``artifact_factor`` or ``artifact_norm``."""
        return {"artifact_factor": float(self.factor)} if self.factor is not None else {"artifact_norm": float(self.norm)}

    def threshold(self, patch_norms: torch.Tensor) -> torch.Tensor:
        """(..., P) patch token norms -> (...) float64: the norm above which a patch is an artifact."""
        if self.norm is not None:
            return torch.full(patch_norms.shape[:-1], self.norm, dtype=torch.float64, device=patch_norms.device)
        s = patch_norms.double().sort(dim=-1).values
        P = s.shape[-1]
        median = 0.5 * (s[..., (P - 1) // 2] + s[..., P // 2])  # the middle value, or the mean of the two
        return self.factor * median


def artifact_mask(token_norm: torch.Tensor, layout: TokenLayout, rule: ArtifactRule = ArtifactRule()) -> torch.Tensor:
    """(..., T) token norms of block outputs -> (..., P) bool: which patches are artifacts under ``rule``."""
    patches = token_norm.double()[..., layout.num_prefix_tokens:]
    return patches > rule.threshold(patches)[..., None]


def artifact_metrics(
    token_norm: torch.Tensor,
    layout: TokenLayout,
    rule: ArtifactRule = ArtifactRule(),
    *,
    cls_rows: torch.Tensor | None = None,
    fg: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """High-norm artifact patches and the attention they receive.

    Args:
        token_norm: (B, L, T) the norm of every token of every block's output.
        cls_rows: (B, L, H, T) the cls query's attention of every layer and head.
        fg: (B, P) fraction of each patch that is object.
    Returns ``artifact_frac`` (B, L); with ``cls_rows``, ``cls_artifact_mass`` (B, L, H): the cls row's
    patch-renormalised mass on the artifacts (0 without any, NaN without a cls token); with ``fg``,
    ``artifact_fg_overlap`` (B, L): the mean object fraction of the artifacts (NaN without any).
    """
    mask = artifact_mask(token_norm, layout, rule)  # (B, L, P)
    count = mask.sum(-1).double()
    out = {"artifact_frac": count / layout.num_patches}
    if cls_rows is not None:
        q = renormalise_over_patches(cls_rows, layout)  # (B, L, H, P)
        mass = torch.where(mask[:, :, None, :], q, 0.0).sum(-1)  # an empty sum is 0, whatever q is
        out["cls_artifact_mass"] = mass if layout.has_cls else torch.full_like(mass, math.nan)
    if fg is not None:
        on_object = torch.where(mask, fg.double()[:, None, :], 0.0).sum(-1)
        out["artifact_fg_overlap"] = on_object / count  # 0 / 0 = NaN where no patch is an artifact
    return out


ARTIFACT_SET = "A_l = {j in S : ‖x_lj‖ > f · median_{k in S} ‖x_lk‖}"
ARTIFACTS = MetricGroup(
    "artifacts",
    compute=lambda batch: artifact_metrics(
        batch.token_norm, batch.layout, batch.artifact_rule, cls_rows=batch.maps[:, :, :, 0, :], fg=batch.fg,
    ),
    metrics=(
        Metric("artifact_frac", "layer", {Need.token_norm}, "share of patches", "high-norm artifact patches",
               "more patches are high-norm artifacts",
               f"#A_l / P, {ARTIFACT_SET}, x_l the output of block l, f = {DEFAULT_ARTIFACT_FACTOR:g} "
               "(--artifact-factor; or ‖x_lj‖ > --artifact-norm)", summary=True),
        Metric("cls_artifact_mass", "head", {Need.prefix_rows, Need.token_norm}, CLS_SHARE,
               "cls mass on artifact patches", "cls attention puts more mass on high-norm artifacts",
               "sum_{j in A_l} Q_0(j) (0 when A_l is empty)", default=True, summary=True,
               nan_when=("no_cls", "cls_mass")),
        Metric("artifact_fg_overlap", "layer", {Need.token_norm, Need.masks}, "share of artifact patches",
               "object share of artifact patches", "artifacts lie more on the object",
               "sum_{j in A_l} fg_j / #A_l", nan_when=("no_artifact", "no_mask")),
    ),
)

# Every metric, in the order tables, files and the README list them.
REGISTRY = Registry((CLS_ROW, PATCH_ROWS, ROLLOUT, FLOW, MAGNITUDES, ARTIFACTS, MASKS))
HEAD_METRICS = REGISTRY.names("head")
LAYER_METRICS = REGISTRY.names("layer")
IMAGE_METRICS = REGISTRY.names("image")


def available_metrics(
    layout: TokenLayout, *, full_maps: bool, has_fg: bool, has_token_norm: bool = False, has_flow: bool = False
) -> dict[str, Level]:
    """Name -> level (``head``, ``layer`` or ``image``) of every metric computable for this layout from full
    maps or only from cls/register rows, with or without object masks, block output token norms and flow maps."""
    return REGISTRY.available(layout, full_maps=full_maps, has_fg=has_fg, has_token_norm=has_token_norm, has_flow=has_flow)


def batch_metrics(
    layout: TokenLayout,
    magnitude: torch.Tensor,
    *,
    attn: torch.Tensor | None = None,
    attn_rows: torch.Tensor | None = None,
    fg: torch.Tensor | None = None,
    fusion: Fusion | str = Fusion.mean,
    discard_ratio: float = 0.0,
    token_norm: torch.Tensor | None = None,
    artifact_rule: ArtifactRule = ArtifactRule(),
    flow_maps: torch.Tensor | None = None,
    flow_layers: Sequence[int] = (),
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Every available metric for a batch of images, as a metrics file stores them.

    Args:
        magnitude: (B, L, T).
        attn: (B, L, H, T, T) full maps; or ``attn_rows`` (B, L, H, p, T), the prefix rows only.
        fg: (B, P) fraction of each patch that is object.
        token_norm: (B, L, T) every block's output token norms (the artifact metrics need them).
        artifact_rule: which patches are high-norm artifacts.
        flow_maps: (B, F, P) attention flow maps (:func:`attnflow.flow.attention_flow`) read out after the
            0-based blocks ``flow_layers``; the flow metrics need them (full maps only).
    Returns:
        ``{name: (B, L, H) | (B, L) | (B,)}`` float64 as listed by :func:`available_metrics`, and the
        rollout maps (B, L, P) (``None`` without full maps).
    """
    if (attn is None) == (attn_rows is None):
        raise ValueError("pass exactly one of attn and attn_rows")
    batch = Batch(layout, attn if attn is not None else attn_rows, attn is not None, magnitude, fg, fusion, discard_ratio,
                  token_norm, artifact_rule, flow_maps, tuple(flow_layers))
    wanted = available_metrics(layout, full_maps=batch.full_maps, has_fg=fg is not None, has_token_norm=token_norm is not None,
                               has_flow=flow_maps is not None)
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
