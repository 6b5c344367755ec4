"""Sound inference: every interval, test, effect size and adjustment against scipy or a hand computation, and
compare's verdicts on real extractions of several networks per group (a null design and a real effect)."""
from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch
from scipy import stats

from attnflow.extract import extract
from attnflow.inference import (
    adjust, between_models, cliffs_delta, hedges_g, paired_accuracy_difference, paired_images, permutation_p,
    rank_biserial, smallest_adjusted, unpaired_images,
)
from attnflow.models import LoadedModel
from conftest import make_tiny_vit, write_images


def loop_paired_ci(d: np.ndarray, rng: np.random.Generator, n: int) -> tuple[float, float]:
    """Percentile CI of the mean per-image difference, one resample at a time."""
    idx = rng.integers(0, d.size, size=(n, d.size))  # one block: the documented stream for n * size <= 5e6
    return tuple(np.percentile([d[i].mean() for i in idx], [2.5, 97.5]))


# ------------------------------------------------------------------------------------------ two networks


def test_paired_two_networks_equal_a_paired_bootstrap_and_wilcoxon():
    rng = np.random.default_rng(0)
    a = rng.normal(size=60)
    b = a + rng.normal(0.25, 1.0, size=60)
    result = paired_images(a, b, np.random.default_rng(7), 1000)
    d = a - b
    assert (result.unit, result.design, result.test) == ("images", "paired", "wilcoxon")
    assert result.diff == pytest.approx(d.mean(), rel=1e-12)
    assert result.p_value == pytest.approx(stats.wilcoxon(d).pvalue, rel=1e-12)
    low, high = loop_paired_ci(d, np.random.default_rng(7), 1000)
    assert (result.ci_low, result.ci_high) == (pytest.approx(low, rel=1e-12), pytest.approx(high, rel=1e-12))
    ranks = stats.rankdata(np.abs(d))
    assert result.effect == pytest.approx((ranks[d > 0].sum() - ranks[d < 0].sum()) / ranks.sum())


def test_rank_biserial_by_hand_with_ties_and_zeros():
    # d = [1, -2, 2, 0, 3]: the zero is left out; |d| ranks 1, 2.5, 2.5, 4 -> R+ = 1 + 2.5 + 4, R- = 2.5
    assert rank_biserial(np.array([1.0, -2.0, 2.0, 0.0, 3.0])) == pytest.approx((7.5 - 2.5) / 10)
    assert rank_biserial(np.zeros(4)) == 0
    # a resample holding the first item twice and the second once: |d| 1, 1, 2 -> ranks 1.5, 1.5, 3; R+ 3, R- 3
    assert rank_biserial(np.array([1.0, -2.0]), np.array([[2, 1]]))[0] == pytest.approx(0.0)


def test_unpaired_two_networks_equal_mann_whitney_and_cliffs_delta():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.4, 1, 35), rng.normal(0, 1, 28)
    result = unpaired_images(a, b, np.random.default_rng(3), 500)
    assert (result.unit, result.design, result.effect_size) == ("images", "unpaired", "cliffs_delta")
    assert result.p_value == pytest.approx(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue, rel=1e-12)
    assert result.effect == pytest.approx(np.mean(np.sign(a[:, None] - b[None, :])))
    assert cliffs_delta(np.array([1.0, 2.0]), np.array([1.0, 0.0, 3.0])) == pytest.approx((1 + 0 - 1 + 2 - 1) / 6)
    # the documented stream: group A draws its network (always 0), then its resamples; then group B
    rng = np.random.default_rng(3)
    rng.integers(0, 1, size=(500, 1))
    a_means = a[rng.integers(0, a.size, size=(500, a.size))].mean(1)
    rng.integers(0, 1, size=(500, 1))
    b_means = b[rng.integers(0, b.size, size=(500, b.size))].mean(1)
    low, high = np.percentile(a_means - b_means, [2.5, 97.5])
    assert (result.ci_low, result.ci_high) == (pytest.approx(low, rel=1e-12), pytest.approx(high, rel=1e-12))


# ------------------------------------------------------------------------------------------ networks as replicates


@pytest.mark.parametrize("n_a, n_b", [(2, 2), (3, 3), (4, 4), (3, 5)])
def test_permutation_p_equals_scipy_and_the_smallest_p_of_the_design(n_a, n_b):
    rng = np.random.default_rng(n_a * 10 + n_b)
    a, b = rng.normal(1.0, 1, n_a), rng.normal(0, 1, n_b)
    p, min_p = permutation_p(a, b, rng)
    reference = stats.permutation_test((a, b), lambda x, y, axis: x.mean(axis) - y.mean(axis), vectorized=True,
                                       permutation_type="independent", n_resamples=100_000).pvalue
    assert p == pytest.approx(reference, rel=1e-12)
    assert min_p == pytest.approx(min(1.0, 2 / math.comb(n_a + n_b, n_a)))
    # a perfect separation reaches the design's floor: 1/3 for 2 vs 2, 1/10 for 3 vs 3
    assert permutation_p(np.arange(n_a) + 100.0, np.arange(n_b) * 1.0, rng)[0] == pytest.approx(min_p)
    assert permutation_p(np.array([5.0]), np.array([1.0, 2.0, 3.0]), rng) == (pytest.approx(0.5), pytest.approx(0.5))


def test_hedges_g_by_hand():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([0.0, 1.0])
    pooled = math.sqrt((2 * 1.0 + 1 * 0.5) / 3)
    g = (1 - 3 / (4 * 5 - 9)) * (2.0 - 0.5) / pooled
    se = math.sqrt(5 / 6 + g * g / 10)
    assert hedges_g(a, b) == (pytest.approx(g), pytest.approx(g - 1.959963984540054 * se), pytest.approx(g + 1.959963984540054 * se))


def test_crossed_bootstrap_follows_the_documented_stream():
    rng = np.random.default_rng(2)
    x_a, x_b = rng.normal(1, 1, (30, 3)), rng.normal(0, 1, (30, 2))
    result = between_models([x_a], [x_b], np.random.default_rng(9), 300, paired=True)
    stream = np.random.default_rng(9)
    images = stream.integers(0, 30, size=(300, 30))
    draws_a, draws_b = stream.integers(0, 3, size=(300, 3)), stream.integers(0, 2, size=(300, 2))
    diffs = [np.mean([x_a[images[r], k].mean() for k in draws_a[r]]) - np.mean([x_b[images[r], k].mean() for k in draws_b[r]])
             for r in range(300)]
    low, high = np.percentile(diffs, [2.5, 97.5])
    assert (result.ci_low, result.ci_high) == (pytest.approx(low, rel=1e-12), pytest.approx(high, rel=1e-12))
    assert result.diff == pytest.approx(x_a.mean() - x_b.mean())
    assert (result.unit, result.test, result.n_models_a, result.n_models_b) == ("models", "permutation", 3, 2)


# ------------------------------------------------------------------------------------------ families of tests


def test_holm_and_bh_by_hand():
    p = [0.01, 0.04, 0.03, 0.005, math.nan]
    # Holm, ascending 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> running max
    np.testing.assert_allclose(adjust(p, "holm"), [0.03, 0.06, 0.06, 0.02, math.nan])
    # BH: p_(i) * m / i = 0.02, 0.02, 0.04, 0.04 -> running min from the top
    np.testing.assert_allclose(adjust(p, "bh"), [0.02, 0.04, 0.04, 0.02, math.nan])
    np.testing.assert_allclose(adjust(p, "none"), p)
    assert smallest_adjusted(0.0286, 9, "holm") == pytest.approx(0.2574) and smallest_adjusted(0.0286, 9, "bh") == 0.0286


def test_mcnemar_and_the_paired_accuracy_interval_by_hand():
    a = np.array([1] * 8 + [0] * 2 + [1] * 30 + [0] * 10, bool)  # 8 right only by A, 2 only by B
    b = np.array([0] * 8 + [1] * 2 + [1] * 30 + [0] * 10, bool)
    diff, low, high, p = paired_accuracy_difference(a, b, 400, np.random.default_rng(4))
    assert diff == pytest.approx(6 / 50)
    assert p == pytest.approx(2 * (1 + 10 + 45) / 1024)  # two-sided binomial of 2 of 10 discordant pairs
    ref_low, ref_high = loop_paired_ci(a.astype(float) - b.astype(float), np.random.default_rng(4), 400)
    assert (low, high) == (pytest.approx(ref_low), pytest.approx(ref_high))
    assert paired_accuracy_difference(a, a, 10, np.random.default_rng(0))[3] == 1.0


# ------------------------------------------------------------------------------------------ real extractions


def sharpened(seed: int, factor: float) -> LoadedModel:
    """A tiny random-init ViT whose query projections are scaled by ``factor``: sharper attention."""
    model = make_tiny_vit("plain", seed)
    with torch.no_grad():
        for block in model.blocks:
            width = block.attn.qkv.weight.shape[1]
            block.attn.qkv.weight[:width] *= factor
    return LoadedModel(model=model, name="tiny-plain", checkpoint="", checkpoint_sha256="", weights="random",
                       family="unknown", label=f"seed{seed}-x{factor:g}")


@pytest.fixture(scope="module")
def networks(tmp_path_factory):
    """Metrics files of 12 tiny networks over the same 10 images: factor -> path."""
    root = tmp_path_factory.mktemp("networks")
    paths = write_images(root / "images", 10, size=(32, 32))
    files = {}
    for seed, factor in enumerate([0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 2.0, 2.2, 2.4, 2.6]):
        loaded = sharpened(seed, factor)
        result = extract(loaded, paths, root / f"c{seed}.h5", store="none", metrics=root / f"m{seed}.h5", workers=0,
                         batch_size=10)
        files[factor] = result.metrics_path
    return files


def head_mean_last(path, metric: str) -> np.ndarray:
    """Read a metric straight from the file with h5py: head mean at the last layer, per image."""
    with h5py.File(path, "r") as f:
        data = np.asarray(f[f"metrics/{metric}"], dtype=np.float64)
    return data[:, -1].mean(-1)


def test_null_design_of_interleaved_networks_gives_no_verdict_in_any_format(networks, run_cli):
    mim = [networks[f] for f in (0.3, 0.4, 0.5, 0.6)]  # sharpness interleaved: nothing separates the groups
    jea = [networks[f] for f in (0.35, 0.45, 0.55, 0.65)]
    args = ["compare", *sum((["--mim", p] for p in mim), []), *sum((["--jea", p] for p in jea), []), "--bootstrap", 100]
    out = json.loads(run_cli(*args, "-f", "json").stdout)
    assert {s["verdict"] for s in out["summary"]} <= {"no clear difference", "no verdict: too few models for this design"}
    assert all(s["unit"] == "models" and (s["n_models_a"], s["n_models_b"]) == (4, 4) for s in out["summary"])
    for fmt in ("table", "markdown", "csv"):
        text = run_cli(*args, "-f", fmt).stdout
        assert "MIM cls" not in text and "JEA cls" not in text and "more uniform" not in text
    single = run_cli(*args, "-m", "cls_entropy_norm", "-f", "json")  # one test: a verdict would be reachable
    row = json.loads(single.stdout)["summary"][0]
    assert row["n_tests"] == 1 and row["min_p_adjusted"] < 0.05
    assert row["p_value"] > 0.05 and row["verdict"] == "no clear difference"


def test_a_real_effect_with_four_networks_per_group_is_detected(networks, run_cli):
    mim = [networks[f] for f in (0.3, 0.35, 0.4, 0.45)]  # near-uniform attention
    jea = [networks[f] for f in (2.0, 2.2, 2.4, 2.6)]  # sharp attention
    result = run_cli("compare", *sum((["--mim", p] for p in mim), []), *sum((["--jea", p] for p in jea), []),
                     "-m", "cls_entropy_norm", "--bootstrap", 300, "-f", "json")
    assert result.exit_code == 0, result.stderr
    row = json.loads(result.stdout)["summary"][0]
    means_a = np.array([head_mean_last(p, "cls_entropy_norm").mean() for p in mim])
    means_b = np.array([head_mean_last(p, "cls_entropy_norm").mean() for p in jea])
    reference = stats.permutation_test((means_a, means_b), lambda x, y, axis: x.mean(axis) - y.mean(axis),
                                       vectorized=True, n_resamples=100_000).pvalue
    assert row["p_value"] == pytest.approx(reference, rel=1e-9) == pytest.approx(2 / 70)
    assert row["diff"] == pytest.approx(means_a.mean() - means_b.mean(), rel=1e-5)
    assert row["ci_low"] > 0 and row["effect_size"] == "hedges_g" and row["effect"] > 0
    assert row["verdict"] == "MIM cls attention more uniform"
    # with all nine default metrics Holm makes 2/70 unreachable, and says so
    wide = run_cli("compare", *sum((["--mim", p] for p in mim), []), *sum((["--jea", p] for p in jea), []), "--bootstrap", 50)
    assert "the smallest adjusted p this design can give" in wide.stderr
    assert "MIM cls attention more uniform" not in wide.stdout


def test_one_network_against_another_names_the_networks(networks, run_cli):
    a, b = networks[0.3], networks[2.0]
    result = run_cli("compare", "--mim", a, "--jea", b, "-m", "cls_entropy_norm", "--bootstrap", 400, "--seed", 4, "-f", "json")
    row = json.loads(result.stdout)["summary"][0]
    d = head_mean_last(a, "cls_entropy_norm") - head_mean_last(b, "cls_entropy_norm")
    assert (row["unit"], row["design"], row["n_a"]) == ("images", "paired", 10)
    assert row["p_value"] == pytest.approx(stats.wilcoxon(d).pvalue, rel=1e-6)
    low, high = loop_paired_ci(d, np.random.default_rng([4, 1000]), 400)
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(low, rel=1e-5), pytest.approx(high, rel=1e-5))
    assert row["verdict"] == "seed0-x0.3 cls attention more uniform than seed8-x2"
    assert "one network per group (seed0-x0.3, seed8-x2)" in result.stderr and "do not generalise" in result.stderr


def test_corrections_in_the_output_equal_holm_and_bh_of_its_raw_p_values(networks, run_cli):
    files = ["--mim", networks[0.3], "--jea", networks[2.0]]
    for correction in ("holm", "bh"):
        summary = json.loads(run_cli("compare", *files, "--correction", correction, "--summary-layers", "all",
                                     "--bootstrap", 50, "-f", "json").stdout)["summary"]
        raw = np.array([s["p_value"] for s in summary])
        tested = np.isfinite(raw)
        m = int(tested.sum())
        assert {s["n_tests"] for s in summary} == {m} and m > 10
        expected = np.full(raw.shape, np.nan)
        if correction == "holm":  # step-down, written from the definition
            order = np.argsort(raw[tested])
            running, values = 0.0, np.empty(m)
            for rank, i in enumerate(order):
                running = max(running, min(1.0, (m - rank) * raw[tested][i]))
                values[i] = running
        else:
            values = stats.false_discovery_control(raw[tested])
        expected[tested] = values
        np.testing.assert_allclose([s["p_adjusted"] for s in summary], expected, rtol=1e-12)


def test_images_are_matched_by_id_not_position(networks, tmp_path, run_cli):
    """A second extraction of the same network over the images in another order pairs the same images."""
    root = tmp_path
    paths = write_images(root / "images", 6, size=(32, 32))
    for name, order in (("fwd", paths), ("rev", paths[::-1])):
        extract(sharpened(1 if name == "fwd" else 2, 1.0), order, root / f"{name}.h5", store="none",
                metrics=root / f"{name}_m.h5", workers=0, batch_size=6)
    row = json.loads(run_cli("compare", "--mim", root / "fwd_m.h5", "--jea", root / "rev_m.h5", "-m", "cls_entropy_norm",
                             "-f", "json", "--bootstrap", 20).stdout)["summary"][0]
    with h5py.File(root / "fwd_m.h5") as f, h5py.File(root / "rev_m.h5") as g:
        ids_f = [i.decode() for i in f["image_ids"][()]]
        ids_g = [i.decode() for i in g["image_ids"][()]]
    a = head_mean_last(root / "fwd_m.h5", "cls_entropy_norm")
    b = head_mean_last(root / "rev_m.h5", "cls_entropy_norm")[[ids_g.index(i) for i in ids_f]]
    assert ids_g == ids_f[::-1] and row["design"] == "paired"
    assert row["p_value"] == pytest.approx(stats.wilcoxon(a - b).pvalue, rel=1e-6)
