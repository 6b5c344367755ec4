"""The statistics behind every difference attnflow reports: one estimand per row, its interval, its test and
its effect size, all about the same comparison, and the adjustment of a family of tests.

A difference is a claim about what varied. With one network per group the rows compare two networks and
generalise over images only (``unit = "images"``); with several networks per group the unit of replication
is the network (``unit = "models"``) and images are nested in it. When the networks saw the same images
(matched by image id) the design is ``paired``: every network's values are taken on the shared images,
and the image resample is shared by all networks (images are a crossed factor); otherwise ``unpaired``.

================  =====================================  ==================================  ===========================
design            interval of the difference A - B        test (two-sided)                    effect size, with interval
================  =====================================  ==================================  ===========================
1 vs 1, paired    bootstrap of the mean per-image diff.   Wilcoxon signed-rank (zeros out)    matched-pairs rank-biserial
1 vs 1, unpaired  bootstrap of the difference of means    Mann-Whitney U                      Cliff's delta
models (>= 1+2)   bootstrap over models, then images      exact permutation of the labels     Hedges' g (>= 2 per group)
                                                          over the network means
================  =====================================  ==================================  ===========================

Bootstrap streams, so that every interval can be recomputed by hand (``rng`` is the caller's generator,
drawn from in this order):

- paired: ``B`` image resamples, resample ``r`` being row ``r`` of ``rng.integers(0, n, (b, n))`` drawn in
  blocks of ``b = max(1, min(B, 5_000_000 // n))`` rows; then group A's network draws
  ``rng.integers(0, n_a, (B, n_a))``, then group B's ``rng.integers(0, n_b, (B, n_b))``. Iteration ``r``
  takes every network's mean over image resample ``r``, and averages the drawn networks of each group.
- unpaired: per group (A, then B), the network draws ``rng.integers(0, n_g, (B, n_g))``; then per network
  ``k`` of that group, in order, as many image resamples of its own images (blocks as above) as there are
  draws of ``k``, handed out to those draws in row-major order.

With one network per group these are the paired bootstrap of per-image differences and the unpaired
bootstrap of the difference of means. Effect-size intervals of rank effects use the same resamples;
Hedges' g uses the normal approximation of Hedges & Olkin (1985), ``g +/- 1.96 se``. Intervals are the
2.5 and 97.5 percentiles (numpy's linear interpolation).
"""
from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Sequence

import numpy as np

__all__ = [
    "ALPHA", "MAX_EXACT_RELABELINGS", "Correction", "Difference", "bootstrap_means", "percentile_ci",
    "rank_biserial", "cliffs_delta", "paired_images", "unpaired_images", "between_models", "permutation_p",
    "hedges_g", "adjust", "smallest_adjusted", "paired_accuracy_difference",
]

ALPHA = 0.05
MAX_EXACT_RELABELINGS = 20_000  # above this the permutation test draws this many seeded relabelings
_BLOCK_ELEMENTS = 5_000_000



def _scipy_stats():
    """scipy.stats, imported when a test first needs it: it costs a second at start-up, which every
    ``attnflow`` command would otherwise pay."""
    from scipy import stats

    return stats


class Correction(str, Enum):
    """How the p-values of one summary (a family of tests) are adjusted: Holm (family-wise error),
    Benjamini-Hochberg (false discovery rate, q-values) or not at all."""

    holm = "holm"
    bh = "bh"
    none = "none"


@dataclass(frozen=True)
class Difference:
    """One comparison A - B: its estimate, interval, test and effect size (all NaN where undefined)."""

    unit: str  # "images" (two networks) or "models" (networks are the replicates)
    design: str  # "paired" (shared images) or "unpaired"
    test: str  # "wilcoxon", "mann-whitney" or "permutation"
    a_mean: float
    b_mean: float
    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    min_p: float  # the smallest p-value the design can give (0 where it is not bounded away from 0)
    effect_size: str  # "rank_biserial", "cliffs_delta" or "hedges_g" ("" where there is none)
    effect: float
    effect_low: float
    effect_high: float
    n_models_a: int
    n_models_b: int
    n_images_a: int  # paired: the shared images used; unpaired: all finite values of the group's networks
    n_images_b: int

    def as_dict(self) -> dict:
        return asdict(self)


def bootstrap_means(x: np.ndarray, rng: np.random.Generator, n_resamples: int) -> np.ndarray:
    """(n, K) values -> (n_resamples, K) means over the finite values of bootstrap resamples of the rows.

    Resample r is ``rng.integers(0, n, n)`` (drawn in blocks, see the module docstring); rows are counted
    with bincount and the means taken as one matrix product per block, all K columns sharing the resamples.
    """
    n, K = x.shape
    finite = np.isfinite(x)
    x0, f = np.where(finite, x, 0.0), finite.astype(np.float64)
    out = np.empty((n_resamples, K))
    for start, counts in _resample_counts(n, rng, n_resamples):
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start:start + len(counts)] = (counts @ x0) / (counts @ f)
    return out


def _resample_counts(n: int, rng: np.random.Generator, n_resamples: int):
    """Yield ``(start, counts)``: counts (b, n) of each row in resamples ``start .. start + b``."""
    block = max(1, min(n_resamples, _BLOCK_ELEMENTS // max(n, 1)))
    for start in range(0, n_resamples, block):
        b = min(block, n_resamples - start)
        idx = rng.integers(0, n, size=(b, n))
        yield start, np.bincount((idx + n * np.arange(b)[:, None]).ravel(), minlength=b * n).reshape(b, n).astype(np.float64)


def percentile_ci(samples: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The 2.5 and 97.5 percentiles of bootstrap samples, ignoring NaN resamples."""
    percentile = np.nanpercentile if np.isnan(samples).any() else np.percentile  # the same numbers; nan* is slow
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = percentile(samples, [2.5, 97.5], axis=axis)
    return low, high


def _nan_difference(unit: str, design: str, test: str, effect_size: str, n_models: tuple[int, int],
                    n_images: tuple[int, int]) -> Difference:
    nan = math.nan
    return Difference(unit, design, test, nan, nan, nan, nan, nan, nan, nan, effect_size, nan, nan, nan,
                      *n_models, *n_images)


# ---------------------------------------------------------------------------------------------- rank effects
def rank_biserial(d: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """Matched-pairs rank-biserial correlation ``(R+ - R-) / (R+ + R-)`` of per-image differences ``d`` (n,),
    ranks of ``|d|`` with ties averaged and zero differences left out (Wilcoxon's ``zero_method='wilcox'``);
    0 when every difference is zero.

    With ``counts`` (B, n), the correlation of each bootstrap resample that holds item i ``counts[:, i]``
    times, computed from the counts without re-sorting: returns (B,); without, a 0-d array.
    """
    d = np.asarray(d, dtype=np.float64)
    keep = d != 0
    d = d[keep]
    c = np.ones((1, d.size)) if counts is None else np.asarray(counts, dtype=np.float64)[:, keep]
    if d.size == 0:  # every pair tied: neither network ranks above the other
        return np.zeros(c.shape[0]) if counts is not None else np.array(0.0)
    order = np.argsort(np.abs(d), kind="stable")
    d, c = d[order], c[:, order]
    magnitude = np.abs(d)
    starts = np.flatnonzero(np.r_[True, magnitude[1:] != magnitude[:-1]])  # tie groups of |d|
    group_counts = np.add.reduceat(c, starts, axis=1)  # (B, G)
    below = np.cumsum(group_counts, axis=1) - group_counts  # copies ranked before each group
    group_rank = below + (group_counts + 1) / 2  # the average rank of a group's copies
    rank = np.repeat(group_rank, np.diff(np.r_[starts, d.size]), axis=1)  # (B, n)
    weighted = c * rank
    positive = weighted[:, d > 0].sum(1)
    total = weighted.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(total > 0, (2 * positive - total) / np.where(total > 0, total, 1), 0.0)  # no untied pair drawn: 0
    return r if counts is not None else r[0]


def cliffs_delta(a: np.ndarray, b: np.ndarray, counts_a: np.ndarray | None = None,
                 counts_b: np.ndarray | None = None) -> np.ndarray:
    """Cliff's delta ``P(A > B) - P(A < B)`` of two samples; with resample counts (B, n_a) and (B, n_b),
    the delta of every bootstrap resample (B,), computed from the counts without re-sorting."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    single = counts_a is None
    ca = np.ones((1, a.size)) if single else np.asarray(counts_a, dtype=np.float64)
    cb = np.ones((1, b.size)) if single else np.asarray(counts_b, dtype=np.float64)
    order = np.argsort(b, kind="stable")
    b_sorted, cb = b[order], cb[:, order]
    cumulative = np.concatenate([np.zeros((cb.shape[0], 1)), np.cumsum(cb, axis=1)], axis=1)  # (B, n_b + 1)
    below = cumulative[:, np.searchsorted(b_sorted, a, side="left")]  # weight of b strictly below each a
    above = cumulative[:, -1:] - cumulative[:, np.searchsorted(b_sorted, a, side="right")]
    with np.errstate(invalid="ignore", divide="ignore"):
        delta = (ca * (below - above)).sum(1) / (ca.sum(1) * cb.sum(1))
    return delta[0] if single else delta


# ---------------------------------------------------------------------------------------------- two networks
def paired_images(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, n_bootstrap: int) -> Difference:
    """Two networks over the same images, ``a[i]`` and ``b[i]`` of image i (pairs with a non-finite value
    are left out): the mean per-image difference, its bootstrap CI, Wilcoxon's signed-rank test and the
    matched-pairs rank-biserial correlation with its bootstrap CI."""
    return between_models([np.asarray(a)[:, None]], [np.asarray(b)[:, None]], rng, n_bootstrap, paired=True)


def unpaired_images(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, n_bootstrap: int) -> Difference:
    """Two networks over different images: the difference of means, its bootstrap CI, Mann-Whitney U and
    Cliff's delta with its bootstrap CI."""
    return between_models([np.asarray(a)], [np.asarray(b)], rng, n_bootstrap, paired=False)


# ---------------------------------------------------------------------------------------------- groups of networks
def between_models(group_a: Sequence[np.ndarray], group_b: Sequence[np.ndarray], rng: np.random.Generator,
                   n_bootstrap: int, *, paired: bool) -> Difference:
    """Group A's networks against group B's.

    ``paired``: ``group_a`` and ``group_b`` each hold one (n, M_g) array, column k the values of network k
    on the n shared images (row i the same image in both groups); images where any network is not finite
    are left out. Unpaired: one (n_k,) array of values per network. With one network per group this is
    :func:`paired_images` / :func:`unpaired_images`; with more, the networks are the replicates.
    """
    if paired:
        x = np.concatenate([np.asarray(group_a[0], np.float64), np.asarray(group_b[0], np.float64)], axis=1)
        n_a = np.asarray(group_a[0]).shape[1]
        n_b = x.shape[1] - n_a
        x = x[np.isfinite(x).all(axis=1)]
        a_values, b_values = [x[:, k] for k in range(n_a)], [x[:, n_a + k] for k in range(n_b)]
        n_images = (x.shape[0], x.shape[0])
    else:
        a_values = [np.asarray(v, np.float64)[np.isfinite(v)] for v in group_a]
        b_values = [np.asarray(v, np.float64)[np.isfinite(v)] for v in group_b]
        n_a, n_b = len(a_values), len(b_values)
        n_images = (sum(v.size for v in a_values), sum(v.size for v in b_values))
    unit = "images" if n_a == 1 and n_b == 1 else "models"
    design = "paired" if paired else "unpaired"
    test = ("wilcoxon" if paired else "mann-whitney") if unit == "images" else "permutation"
    effect_size = ("rank_biserial" if paired else "cliffs_delta") if unit == "images" else (
        "hedges_g" if n_a >= 2 and n_b >= 2 else "")
    if n_a == 0 or n_b == 0 or any(v.size == 0 for v in (*a_values, *b_values)):
        return _nan_difference(unit, design, test, effect_size, (n_a, n_b), n_images)

    means_a = np.array([v.mean() for v in a_values])
    means_b = np.array([v.mean() for v in b_values])
    a_mean, b_mean = float(means_a.mean()), float(means_b.mean())
    diff = a_mean - b_mean
    if paired:
        samples, image_counts = _crossed_bootstrap(x, n_a, rng, n_bootstrap)
    else:
        samples, image_counts = _nested_bootstrap(a_values, b_values, rng, n_bootstrap)
    ci_low, ci_high = (float(v) for v in percentile_ci(samples))

    effect = effect_low = effect_high = math.nan
    min_p = 0.0
    if unit == "images" and paired:
        d = x[:, 0] - x[:, 1]
        p_value = _wilcoxon(d)
        effect = float(rank_biserial(d))
        effect_low, effect_high = (float(v) for v in percentile_ci(rank_biserial(d, image_counts)))
    elif unit == "images":
        a, b = a_values[0], b_values[0]
        p_value = float(_scipy_stats().mannwhitneyu(a, b, alternative="two-sided").pvalue)
        effect = float(cliffs_delta(a, b))
        effect_low, effect_high = (float(v) for v in percentile_ci(cliffs_delta(a, b, *image_counts)))
    else:
        p_value, min_p = permutation_p(means_a, means_b, rng)
        if effect_size:
            effect, effect_low, effect_high = hedges_g(means_a, means_b)
    return Difference(unit, design, test, a_mean, b_mean, diff, ci_low, ci_high, p_value, min_p, effect_size,
                      effect, effect_low, effect_high, n_a, n_b, *n_images)


def _wilcoxon(d: np.ndarray) -> float:
    if not np.any(d != 0):  # every pair tied: no evidence of a difference
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # scipy's note on ties and the normal approximation
        return float(_scipy_stats().wilcoxon(d).pvalue)


def _crossed_bootstrap(x: np.ndarray, n_a: int, rng: np.random.Generator, n_bootstrap: int) -> tuple[np.ndarray, np.ndarray]:
    """Shared images: returns the (B,) differences and the (B, n) image counts of the resamples."""
    n = x.shape[0]
    model_means = np.empty((n_bootstrap, x.shape[1]))
    counts = np.empty((n_bootstrap, n)) if x.shape[1] == 2 else None  # the rank effect of two networks needs them
    for start, block in _resample_counts(n, rng, n_bootstrap):
        model_means[start:start + len(block)] = (block @ x) / n
        if counts is not None:
            counts[start:start + len(block)] = block
    rows = np.arange(n_bootstrap)[:, None]
    draws_a = rng.integers(0, n_a, size=(n_bootstrap, n_a))
    draws_b = rng.integers(0, x.shape[1] - n_a, size=(n_bootstrap, x.shape[1] - n_a))
    diff = model_means[rows, draws_a].mean(1) - model_means[rows, n_a + draws_b].mean(1)
    return diff, counts


def _nested_bootstrap(a_values: list[np.ndarray], b_values: list[np.ndarray], rng: np.random.Generator,
                      n_bootstrap: int) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """Disjoint images: returns the (B,) differences and, for one network per group, both networks' (B, n_k)
    image counts of the resamples."""
    group_means, single_counts = [], []
    for values in (a_values, b_values):
        draws = rng.integers(0, len(values), size=(n_bootstrap, len(values)))
        slot_means = np.empty(draws.shape)
        for k, v in enumerate(values):
            where = draws == k  # row-major: the draws of network k in order
            taken = int(where.sum())
            means = np.empty(taken)
            counts = np.empty((taken, v.size)) if len(a_values) == len(b_values) == 1 else None
            for start, block in _resample_counts(v.size, rng, taken):
                means[start:start + len(block)] = block @ v / v.size
                if counts is not None:
                    counts[start:start + len(block)] = block
            slot_means[where] = means
            single_counts.append(counts)
        group_means.append(slot_means.mean(1))
    counts = (single_counts[0], single_counts[1]) if len(a_values) == len(b_values) == 1 else None
    return group_means[0] - group_means[1], counts


def permutation_p(means_a: np.ndarray, means_b: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """Two-sided permutation test of the family labels over the network means, statistic the difference of
    group means: every relabeling when there are at most :data:`MAX_EXACT_RELABELINGS` (then equal to
    scipy's ``permutation_test``), otherwise that many relabelings drawn from ``rng`` (p counted with the
    observed one, ``(k + 1) / (N + 1)``). Returns the p-value and the smallest p-value this design can give
    (2 / the number of relabelings, or 2 / (N + 1) when sampled; at most 1)."""
    values = np.concatenate([means_a, means_b])
    n, n_a = values.size, means_a.size
    relabelings = math.comb(n, n_a)
    if relabelings <= MAX_EXACT_RELABELINGS:
        members = np.array(list(itertools.combinations(range(n), n_a)), dtype=np.intp).reshape(relabelings, n_a)
        adjustment, count = 0, relabelings
    else:
        members = np.argsort(rng.random((MAX_EXACT_RELABELINGS, n)), axis=1)[:, :n_a]
        adjustment, count = 1, MAX_EXACT_RELABELINGS
    sum_a = values[members].sum(1)
    null = sum_a / n_a - (values.sum() - sum_a) / (n - n_a)
    observed = means_a.mean() - means_b.mean()
    tolerance = abs(np.finfo(np.float64).eps * 100 * observed)  # as scipy: equal statistics up to rounding count as ties
    greater = (np.count_nonzero(null >= observed - tolerance) + adjustment) / (count + adjustment)
    less = (np.count_nonzero(null <= observed + tolerance) + adjustment) / (count + adjustment)
    return float(min(1.0, 2 * min(greater, less))), min(1.0, 2 / (count + adjustment))


def hedges_g(means_a: np.ndarray, means_b: np.ndarray) -> tuple[float, float, float]:
    """The difference of group means in units of the pooled between-network standard deviation, with the
    small-sample correction J = 1 - 3 / (4 (n_a + n_b) - 9), and its normal-approximation 95% CI."""
    n_a, n_b = means_a.size, means_b.size
    pooled = math.sqrt(((n_a - 1) * means_a.var(ddof=1) + (n_b - 1) * means_b.var(ddof=1)) / (n_a + n_b - 2))
    if pooled == 0:
        return math.nan, math.nan, math.nan
    g = (1 - 3 / (4 * (n_a + n_b) - 9)) * (means_a.mean() - means_b.mean()) / pooled
    se = math.sqrt((n_a + n_b) / (n_a * n_b) + g * g / (2 * (n_a + n_b)))
    z = float(_scipy_stats().norm.ppf(0.975))
    return float(g), float(g - z * se), float(g + z * se)


# ---------------------------------------------------------------------------------------------- families of tests
def adjust(p_values: Sequence[float], correction: Correction | str) -> np.ndarray:
    """Adjusted p-values of one family of tests; NaN entries are not tests and stay NaN.

    Holm: ``max over j <= i of min(1, (m - j + 1) p_(j))`` in ascending order; Benjamini-Hochberg: scipy's
    ``false_discovery_control`` (q-values); none: the raw values."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, math.nan)
    tested = np.isfinite(p)
    m = int(tested.sum())
    if m == 0:
        return out
    correction = Correction(correction)
    raw = p[tested]
    if correction is Correction.none:
        adjusted = raw
    elif correction is Correction.bh:
        adjusted = _scipy_stats().false_discovery_control(raw, method="bh")
    else:
        order = np.argsort(raw, kind="stable")
        stepped = np.minimum(1.0, (m - np.arange(m)) * raw[order])
        adjusted = np.empty(m)
        adjusted[order] = np.maximum.accumulate(stepped)
    out[tested] = adjusted
    return out


def smallest_adjusted(min_p: float, n_tests: int, correction: Correction | str) -> float:
    """The smallest adjusted p-value a test whose own p cannot fall below ``min_p`` can reach in a family of
    ``n_tests``: Holm multiplies the smallest p by the number of tests; BH and none leave it."""
    return min(1.0, min_p * n_tests) if Correction(correction) is Correction.holm else min_p


# ---------------------------------------------------------------------------------------------- accuracies
def paired_accuracy_difference(right_a: np.ndarray, right_b: np.ndarray, n_bootstrap: int,
                               rng: np.random.Generator) -> tuple[float, float, float, float]:
    """Two classifiers on the same test images (``right_*`` (n,) booleans): the accuracy difference A - B,
    its paired bootstrap 95% CI (resample r is row r of the blocked ``rng.integers(0, n, (b, n))``), and
    the exact McNemar p-value (two-sided binomial test of the discordant pairs; 1 when there are none)."""
    a, b = np.asarray(right_a, np.float64), np.asarray(right_b, np.float64)
    d = (a - b)[:, None]
    samples = bootstrap_means(d, rng, n_bootstrap)[:, 0]
    low, high = percentile_ci(samples)
    only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    p = float(_scipy_stats().binomtest(only_a, only_a + only_b, 0.5).pvalue) if only_a + only_b else 1.0
    return float(d.mean()), float(low), float(high), p
