"""Efficient probing (the ``ep`` pool): a hand-computed forward, its pay-off on synthetic tokens, the CLI rows."""
from __future__ import annotations

import csv
import io
import math

import pytest
import torch

from attnflow.probe import GAIN_COLUMNS, PROBE_COLUMNS, EfficientProbe, pools_for_store, probe
from test_probe import CLASSES, synthetic


def test_forward_equals_a_hand_computation():
    """D = 4, M = 2, T = 3 with fixed weights, worked out in plain float64 loops."""
    tokens = [[1.0, 0.0, 2.0, -1.0], [0.5, 1.0, 0.0, 0.0], [-1.0, 2.0, 1.0, 1.0]]  # (T, D)
    queries = [[1.0, 0.0, 0.0, 1.0], [0.0, 2.0, -1.0, 0.0]]  # (M, D)
    w = [[1.0, 0.0, 0.5, 0.0], [0.0, 1.0, 0.0, -1.0], [2.0, 0.0, 0.0, 1.0], [0.0, -1.0, 1.0, 0.0]]  # (out, in)
    expected = []
    for m in range(2):
        logits = [sum(queries[m][d] * tokens[t][d] for d in range(4)) / math.sqrt(4) for t in range(3)]
        top = max(logits)
        weights = [math.exp(x - top) for x in logits]
        weights = [x / sum(weights) for x in weights]
        for j in (2 * m, 2 * m + 1):  # query m reads value group m: output dimensions 2m and 2m + 1
            values = [sum(w[j][d] * tokens[t][d] for d in range(4)) for t in range(3)]
            expected.append(sum(weights[t] * values[t] for t in range(3)))
    ep = EfficientProbe(4, queries=2).double()
    with torch.no_grad():
        ep.queries.copy_(torch.tensor(queries))
        ep.value.weight.copy_(torch.tensor(w))
    got = ep(torch.tensor([tokens], dtype=torch.float64))
    assert got.shape == (1, 4)
    assert torch.allclose(got[0], torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert sum(p.numel() for p in ep.parameters()) == 2 * 4 + 4 * 4  # M * D + D * D


def test_ep_needs_a_width_its_queries_divide():
    with pytest.raises(ValueError, match="multiple"):
        EfficientProbe(48, queries=32)


def test_ep_beats_cls_and_mean_when_the_label_is_in_a_few_patches():
    train, test = synthetic(400, 0, "patches"), synthetic(200, 1, "patches")
    rows = probe(train, test, pools=("cls", "mean", "ep"), evaluators=("linear", "knn"), classes=CLASSES, epochs=100,
                 ep_queries=16, n_bootstrap=100)
    acc = {(r["pool"], r["evaluator"]): r["accuracy"] for r in rows}
    assert ("ep", "knn") not in acc  # trained with the linear classifier only
    assert acc[("ep", "linear")] > 0.75
    assert acc[("ep", "linear")] > acc[("mean", "linear")] + 0.1 and acc[("ep", "linear")] > acc[("cls", "linear")] + 0.3


def test_demo_store_asks_only_for_the_pools_it_supports():
    assert "rollout" not in pools_for_store("rows") and {"cls-attn", "ep"} <= set(pools_for_store("rows"))
    assert pools_for_store("none") == ("cls", "mean", "abmilp", "ep")


def test_ep_through_the_cli(tmp_path, run_cli):
    from attnflow.extract import extract
    from attnflow.images import list_images
    from conftest import write_images, tiny

    write_images(tmp_path / "imgs", 16, classes=("a", "b"))
    paths = list_images([str(tmp_path / "imgs")])
    extract(tiny("plain"), paths, tmp_path / "cls.h5", store="none", save_tokens=True, labels_from_dirs=True, workers=0)
    extract(tiny("no_cls_gap"), paths, tmp_path / "gap.h5", store="none", save_tokens=True, labels_from_dirs=True, workers=0)
    common = ("--split", "0.75", "--epochs", "3", "--bootstrap", "20", "--format", "csv")
    result = run_cli("probe", tmp_path / "cls.h5", *common, "--pool", "mean", "--pool", "ep", "--ep-queries", "16",
                     "--ep-with-cls")
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert tuple(rows[0]) == (*PROBE_COLUMNS, *GAIN_COLUMNS)  # the contract: a new pool is a new row, no new column
    assert {(r["pool"], r["evaluator"]) for r in rows} == {("mean", "knn"), ("mean", "linear"), ("ep+cls", "linear")}
    assert "--ep-with-cls" not in result.stderr
    no_cls = run_cli("probe", tmp_path / "gap.h5", *common, "--pool", "ep", "--ep-queries", "16", "--ep-with-cls")
    assert no_cls.exit_code == 0, no_cls.stderr
    assert [r["pool"] for r in csv.DictReader(io.StringIO(no_cls.stdout))] == ["ep"]
    assert "has no cls token: --ep-with-cls ignored" in no_cls.stderr
    misfit = run_cli("probe", tmp_path / "cls.h5", *common, "--pool", "mean", "--pool", "ep")  # 48 is no multiple of 32
    assert misfit.exit_code == 0 and "ep pooling splits the token width 48" in misfit.stderr
    assert {r["pool"] for r in csv.DictReader(io.StringIO(misfit.stdout))} == {"mean"}
    assert run_cli("probe", tmp_path / "cls.h5", *common, "--ep-queries", "0").exit_code == 2
