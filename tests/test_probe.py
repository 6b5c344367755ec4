"""Selective aggregation probes on synthetic tokens with known answers, k-NN against brute force, the CLI."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import torch

from attnflow.layout import TokenLayout
from attnflow.probe import GAIN_COLUMNS, PROBE_COLUMNS, ProbeSet, knn_accuracy, probe, stratified_split

LAYOUT = TokenLayout(has_cls=True, num_prefix_tokens=1, grid_size=(4, 4), patch_size=(8, 8))
CLASSES, DIM = 4, 16


def synthetic(n: int, seed: int, label_in: str) -> ProbeSet:
    """Tokens where the label lives in three 'object' patches among distractor patches that carry other
    classes' prototypes (cls is noise), or where the cls token carries it."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % CLASSES
    prototypes = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(99)) * 2
    prototypes[:, 0] = 0  # dimension 0 is reserved for "objectness"
    tokens = torch.randn(n, LAYOUT.num_tokens, DIM, generator=g)
    weights = torch.zeros(n, 16)
    if label_in == "patches":
        for i in range(n):
            objects = torch.randperm(16, generator=g)[:3]
            tokens[i, 1:] += prototypes[torch.randint(0, CLASSES, (16,), generator=g)]  # distractors everywhere
            tokens[i, 1 + objects] = torch.randn(3, DIM, generator=g) + prototypes[labels[i]]
            tokens[i, 1 + objects, 0] += 4.0  # what makes an object patch recognisable as one
            weights[i, objects] = 1 / 3  # attention that points at the object
    else:
        tokens[:, 0] += 2 * prototypes[labels]
        weights[:] = 1 / 16
    return ProbeSet(tokens, labels, LAYOUT, {"cls-attn": weights, "min-entropy-head": weights, "rollout": weights})


def accuracies(label_in: str) -> dict[tuple[str, str], float]:
    train, test = synthetic(400, 0, label_in), synthetic(200, 1, label_in)
    rows = probe(train, test, classes=CLASSES, epochs=100, n_bootstrap=200)
    return {(r["pool"], r["evaluator"]): r["accuracy"] for r in rows}


def test_selective_pooling_wins_when_the_label_is_in_a_few_patches():
    acc = accuracies("patches")
    for evaluator in ("knn", "linear"):
        assert acc[("cls", evaluator)] < 0.4  # chance is 0.25
        assert acc[("cls-attn", evaluator)] > 0.9
        assert acc[("cls-attn", evaluator)] > acc[("mean", evaluator)] + 0.1
    assert acc[("abmilp", "linear")] > 0.75 and acc[("abmilp", "linear")] > acc[("mean", "linear")] + 0.1
    assert ("abmilp", "knn") not in acc


def test_cls_wins_when_it_carries_the_label():
    acc = accuracies("cls")
    for evaluator in ("knn", "linear"):
        assert acc[("cls", evaluator)] > 0.9
        assert acc[("cls", evaluator)] > acc[("mean", evaluator)] + 0.3


def test_knn_against_brute_force():
    g = torch.Generator().manual_seed(3)
    train, test = torch.randn(60, 5, generator=g), torch.randn(25, 5, generator=g)
    train_y, test_y = torch.randint(0, 3, (60,), generator=g), torch.randint(0, 3, (25,), generator=g)
    got = knn_accuracy(train, train_y, test, test_y, k=7, temperature=0.1)
    train, test = train.numpy().astype(np.float64), test.numpy().astype(np.float64)
    for i in range(25):
        sims = [float(np.dot(test[i], t) / (np.linalg.norm(test[i]) * np.linalg.norm(t))) for t in train]
        nearest = sorted(range(60), key=lambda j: -sims[j])[:7]
        votes = [0.0] * 3
        for j in nearest:
            votes[int(train_y[j])] += np.exp(sims[j] / 0.1)
        assert bool(got[i]) == (int(np.argmax(votes)) == int(test_y[i]))


def test_stratified_split_keeps_class_proportions():
    labels = torch.tensor([0] * 10 + [1] * 30)
    first, rest = stratified_split(labels, 0.8, seed=0)
    assert (labels[first] == 0).sum() == 8 and (labels[first] == 1).sum() == 24
    assert len(set(first.tolist()) | set(rest.tolist())) == 40 and not set(first.tolist()) & set(rest.tolist())
    assert torch.equal(stratified_split(labels, 0.8, seed=0)[0], first)


def test_probe_cli_on_real_caches(tmp_path, run_cli):
    from attnflow.extract import extract
    from attnflow.images import list_images
    from conftest import write_images, tiny

    write_images(tmp_path / "imgs", 24, classes=("a", "b", "c"))
    paths = list_images([str(tmp_path / "imgs")])
    extract(tiny("plain"), paths, tmp_path / "full.h5", save_tokens=True, labels_from_dirs=True, workers=0)
    extract(tiny("registers"), paths, tmp_path / "rows.h5", store="rows", save_tokens=True, labels_from_dirs=True, workers=0)
    result = run_cli("probe", tmp_path / "full.h5", tmp_path / "rows.h5", "--split", "0.75", "--epochs", "5",
                     "--bootstrap", "50", "--format", "csv", "--with-attention")
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert tuple(rows[0]) == (*PROBE_COLUMNS, "cls_entropy_norm", *GAIN_COLUMNS)
    assert {r["n_test"] for r in rows} == {"6"} and {r["n_train"] for r in rows} == {"18"}
    pools = {(r["model"], r["pool"]) for r in rows}
    assert ("tiny-plain", "rollout") in pools and ("tiny-registers", "rollout") not in pools  # rows cache: no rollout
    assert "rollout pooling needs full maps" in result.stderr
    for r in rows:
        assert 0 <= float(r["ci_low"]) <= float(r["accuracy"]) <= float(r["ci_high"]) <= 1
    as_json = json.loads(run_cli("probe", "--train", tmp_path / "full.h5", "--test", tmp_path / "full.h5", "--epochs", "3",
                                 "--bootstrap", "20", "--pool", "cls", "--pool", "mean", "--format", "json", "--allow-overlap").stdout)
    assert {r["pool"] for r in as_json} == {"cls", "mean"} and all(r["n_train"] == 24 for r in as_json)
    assert all(r["n_overlap"] == 24 for r in as_json)  # the test images are the training images: said in every row


def test_probe_errors(tmp_path, run_cli, image_dir):
    from attnflow.extract import extract
    from attnflow.images import list_images
    from conftest import tiny

    extract(tiny("plain"), list_images([str(image_dir)]), tmp_path / "bare.h5", workers=0)
    result = run_cli("probe", tmp_path / "bare.h5", "--split", "0.8")
    assert result.exit_code == 1 and "--save-tokens --labels-from-dirs" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert run_cli("probe", tmp_path / "bare.h5").exit_code == 2  # neither --split nor --train/--test
    assert run_cli("probe", "--train", tmp_path / "bare.h5").exit_code == 2  # a --train without its --test
