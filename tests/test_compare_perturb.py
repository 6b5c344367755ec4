"""attnflow compare on perturbation files: the per-image areas of attnflow perturb under compare's statistics.

Every number is recomputed here from the raw datasets (h5py, not attnflow's reader): areas by numpy's
trapezoid over (0, 1), (f_i, s_i), images matched by id by hand, tests by scipy, Holm by hand.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from scipy import stats

from conftest import make_tiny_vit, one_line_error, synthetic, write_metrics
from test_perturb import hand_built_model, loaded_model
from attnflow.compare import compare_files
from attnflow.perturb import perturb

FRACTIONS = (0.25, 0.5, 0.75)
KEY_PATCH = 5


def key_patch_images(folder: Path, n: int) -> list[Path]:
    """32 px images, green with noise, whose patch KEY_PATCH (row 1, column 1) is red with noise: the hand-built
    model's cls reads that patch, so its representation lives there."""
    rng = np.random.default_rng(11)
    folder.mkdir()
    paths = []
    for i in range(n):
        image = rng.integers(0, 40, (32, 32, 3)).astype(np.uint8)
        image[..., 1] += 200
        image[8:16, 8:16] = rng.integers(0, 40, (8, 8, 3)) + np.array([200, 0, 0])
        paths.append(folder / f"k{i}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def as_model(model, label, family):
    loaded = loaded_model(model, label)
    loaded.family = family
    return loaded


def areas_by_hand(path: Path) -> tuple[dict[str, int], list[str], np.ndarray, np.ndarray]:
    """The raw file: image id -> row, relevance names, and per image and map the positive and negative areas."""
    with h5py.File(path, "r") as f:
        ids = [v.decode() if isinstance(v, bytes) else str(v) for v in f["image_ids"][()]]
        relevance = [str(v) for v in f.attrs["relevance"]]
        orders = [str(v) for v in f.attrs["orders"]]
        x = np.concatenate([[0.0], np.asarray(f.attrs["fractions"], dtype=np.float64)])
        similarity = f["perturb/similarity"][()].astype(np.float64)  # (n, R, O, F)
    n, R = similarity.shape[:2]
    y = np.concatenate([np.ones((n, R, 2, 1)), similarity], -1)
    areas = np.trapezoid(y, x, axis=-1)
    return {image: k for k, image in enumerate(ids)}, relevance, areas[:, :, orders.index("positive")], \
        areas[:, :, orders.index("negative")]


def rank_biserial_by_hand(d: np.ndarray) -> float:
    d = d[d != 0]
    ranks = stats.rankdata(np.abs(d))
    return float((ranks[d > 0].sum() - ranks[d < 0].sum()) / ranks.sum())


def holm_by_hand(p: list[float]) -> list[float]:
    order = np.argsort(p)
    out, running = [0.0] * len(p), 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - k) * p[i]))
        out[i] = running
    return out


@pytest.fixture
def two_networks(tmp_path, one_thread):
    """A tiny random ViT (mim) and the hand-built model (jea) on the same 10 images, the tiny one's file in the
    reverse image order, so that only matching by id pairs them."""
    paths = key_patch_images(tmp_path / "images", 10)
    tiny, hand = tmp_path / "tiny.h5", tmp_path / "hand.h5"
    relevance = ("cls-attn", "rollout", "random")
    perturb(as_model(make_tiny_vit("plain"), "tiny", "mim"), paths[::-1], tiny, relevance=relevance, fractions=FRACTIONS, workers=0)
    perturb(as_model(hand_built_model(KEY_PATCH), "hand", "jea"), paths, hand, relevance=relevance, fractions=FRACTIONS, workers=0)
    return tiny, hand


def test_one_network_per_group_pairs_images_by_id_against_scipy(two_networks, run_cli):
    tiny, hand = two_networks
    result = run_cli("compare", tiny, hand, "-m", "gap", "-m", "auc_positive", "-f", "json", "--bootstrap", 400, "--seed", 3)
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert "the summary leaves out random" in result.stderr
    rows_a, names, pos_a, neg_a = areas_by_hand(tiny)
    rows_b, _, pos_b, neg_b = areas_by_hand(hand)
    order = sorted(rows_a, key=rows_a.get)  # the pairs in the first model's (tiny's) image order
    ia, ib = [rows_a[i] for i in order], [rows_b[i] for i in order]
    quantity = {"gap": (neg_a - pos_a, neg_b - pos_b), "auc_positive": (pos_a, pos_b)}

    # per model, quantity and map: mean, std over images; every map, random too
    assert [(r["model"], r["metric"], r["relevance"]) for r in out["rows"]] == [
        (m, q, r) for m in ("tiny", "hand") for q in ("gap", "auc_positive") for r in names]
    for record in out["rows"]:
        values = quantity[record["metric"]][record["model"] == "hand"][:, names.index(record["relevance"])]
        assert record["mean"] == pytest.approx(values.mean(), rel=1e-12, abs=1e-15)
        assert record["std"] == pytest.approx(values.std(ddof=1), rel=1e-9, abs=1e-15)
        assert record["n_images"] == 10 and "layer" not in record

    # the summary: every quantity x map but random, one family of 4 tests, in output order j = 0..3
    summary = out["summary"]
    assert [(s["metric"], s["relevance"]) for s in summary] == [
        ("gap", "cls-attn"), ("gap", "rollout"), ("auc_positive", "cls-attn"), ("auc_positive", "rollout")]
    p_raw = []
    for j, s in enumerate(summary):
        a, b = quantity[s["metric"]]
        r = names.index(s["relevance"])
        d = a[ia, r] - b[ib, r]  # mim - jea, image by image
        assert (s["unit"], s["design"], s["test"], s["effect_size"]) == ("images", "paired", "wilcoxon", "rank_biserial")
        assert (s["a_models"], s["b_models"], s["n_a"], s["n_tests"]) == ("tiny", "hand", 10, 4)
        assert s["diff"] == pytest.approx(d.mean(), rel=1e-12)
        assert s["a_mean"] == pytest.approx(a[:, r].mean(), rel=1e-12)
        assert s["p_value"] == pytest.approx(stats.wilcoxon(d).pvalue, rel=1e-12)
        assert s["effect"] == pytest.approx(rank_biserial_by_hand(d), rel=1e-12)
        rng = np.random.default_rng([3, 1000 + j])  # the paired bootstrap of the per-image differences
        means = d[rng.integers(0, 10, (400, 10))].mean(1)
        assert (s["ci_low"], s["ci_high"]) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])), rel=1e-9)
        p_raw.append(stats.wilcoxon(d).pvalue)
    for s, p in zip(summary, holm_by_hand(p_raw)):
        assert s["p_adjusted"] == pytest.approx(p, rel=1e-12)
    # the hand-built model's representation is the key patch, which both maps rank first: a known answer
    gap = summary[0]
    assert gap["diff"] < -0.5 and gap["p_adjusted"] < 0.01 and gap["ci_high"] < 0
    assert gap["verdict"] == "hand representation depends more on the patches cls-attn ranks first than tiny"

    # the library gives the same, and table, markdown and csv name the rows by relevance map
    api = compare_files([tiny, hand], metrics=["gap", "auc_positive"], n_bootstrap=400, seed=3)
    assert api.kind == "perturbation" and [r["verdict"] for r in api.summary] == [s["verdict"] for s in summary]
    table = run_cli("compare", tiny, hand, "--bootstrap", 100, "-r", "cls-attn")
    assert table.exit_code == 0, table.stderr
    assert "gap (negative AUC - positive AUC of the perturbation curves; mean over images)" in table.stdout
    assert "MIM vs JEA: two networks, tiny - hand, unit images (paired images, wilcoxon); holm over 1 tests" in table.stdout
    assert "hand representation depends more on the patches cls-attn ranks first than tiny" in table.stdout
    markdown = run_cli("compare", tiny, hand, "--bootstrap", 100, "-f", "markdown")
    assert "| metric | relevance | tiny | hand | diff |" in markdown.stdout
    rows = list(csv.DictReader(io.StringIO(run_cli("compare", tiny, hand, "--bootstrap", 100, "-f", "csv").stdout)))
    assert list(rows[0]) == ["model", "family", "metric", "relevance", "mean", "std", "ci_low", "ci_high", "n_images"]
    assert [(r["model"], r["relevance"]) for r in rows] == [(m, r) for m in ("tiny", "hand") for r in names]


def test_several_networks_per_group_are_the_replicates(tmp_path, run_cli, one_thread):
    paths = key_patch_images(tmp_path / "images", 6)
    files = []
    for k, family in enumerate(["mim", "mim", "mim", "jea", "jea", "jea"]):
        files.append(tmp_path / f"n{k}.h5")
        perturb(as_model(make_tiny_vit("plain", seed=k), f"n{k}", family), paths, files[-1], relevance=("cls-attn",),
                fractions=FRACTIONS, workers=0)
    result = run_cli("compare", *files, "-f", "json", "--bootstrap", 200, "-r", "cls-attn")
    assert result.exit_code == 0, result.stderr
    [s] = json.loads(result.stdout)["summary"]
    network_means = []
    for path in files:
        _, _, pos, neg = areas_by_hand(path)
        network_means.append((neg - pos)[:, 0].mean())
    a, b = np.array(network_means[:3]), np.array(network_means[3:])
    assert (s["unit"], s["test"], s["effect_size"], s["n_models_a"], s["n_models_b"]) == ("models", "permutation", "hedges_g", 3, 3)
    assert s["diff"] == pytest.approx(a.mean() - b.mean(), rel=1e-12)
    exact = stats.permutation_test((a, b), lambda x, y: x.mean() - y.mean(), permutation_type="independent",
                                   alternative="two-sided", n_resamples=np.inf)
    assert s["p_value"] == pytest.approx(exact.pvalue, rel=1e-12)
    assert s["min_p"] == pytest.approx(0.1)  # 2 / C(6, 3)
    assert s["verdict"] == "no verdict: too few models for this design"
    assert "3 vs 3 networks are the replicates" in result.stderr


def test_bad_inputs_are_one_line_errors(two_networks, tmp_path, run_cli):
    tiny, hand = two_networks
    metrics = write_metrics(tmp_path / "m.h5", synthetic(np.random.default_rng(0), n=4), family="mim")
    mixed = f"is a perturbation file and {metrics} is not: compare takes metrics files or perturbation files"
    one_line_error(run_cli("compare", tiny, metrics), str(tiny), mixed)
    one_line_error(run_cli("compare", metrics, hand), str(hand), "not both in one comparison")
    one_line_error(run_cli("compare", tiny, hand, "--layers", "0"), "--layers applies to metrics files")
    one_line_error(run_cli("compare", tiny, hand, "--heads", "max"), "--heads applies to metrics files")
    one_line_error(run_cli("compare", metrics, "-r", "cls-attn"), "--relevance applies to perturbation files")
    one_line_error(run_cli("compare", tiny, hand, "-m", "cls_self"), "--metric cls_self: a metric of metrics files")
    one_line_error(run_cli("compare", metrics, "-m", "gap"), "--metric gap: a quantity of perturbation files")
    one_line_error(run_cli("compare", tiny, hand, "-r", "flow"), "--relevance flow: no file has that relevance map")
    other = tmp_path / "other.h5"
    perturb(as_model(make_tiny_vit("plain", seed=1), "other", "jea"), [tmp_path / "images" / "k0.png"], other,
            relevance=("random",), fractions=(0.5,), workers=0)
    one_line_error(run_cli("compare", tiny, other), f"{other} at 0.5", "span different ranges", "--fractions")
    with h5py.File(other, "r+") as f:  # read through perturb's validated reader
        f.attrs["orders"] = ["positive", "positive"]
    one_line_error(run_cli("compare", tiny, other), f"{other}: attribute 'orders'")
    assert run_cli("compare", tiny, hand, "-m", "nonsense").exit_code == 2  # a usage error, whatever the files
    (tmp_path / "broken.png").write_bytes(b"not an image")
    empty = tmp_path / "empty.h5"
    perturb(as_model(make_tiny_vit("plain"), "empty", "mim"), [tmp_path / "broken.png"], empty, fractions=FRACTIONS, workers=0)
    result = run_cli("compare", empty, hand, "-f", "json")
    assert result.exit_code == 0 and f"attnflow: note: {empty} holds no images" in result.stderr
    assert all(s["verdict"] == "not available" for s in json.loads(result.stdout)["summary"])
