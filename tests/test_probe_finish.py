"""Issue 14, finished: streamed and in-memory trained pools train alike (the same batches from the same seed, also
on a cache stored class by class), --ep-with-cls rows are named ep+cls, a saved head is the whole probe (pool,
batch norm, classifier) and reproduces the reported accuracy, and a CUDA device this machine lacks is one line."""
from __future__ import annotations

import csv
import importlib.util
import io
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from attnflow.errors import AttnflowError
from attnflow.probe import (EP_WITH_CLS, LinearHead, TokenSource, _epoch_batches, load_head, load_probe_set,
                            pool_tokens, probe_caches)

_spec = importlib.util.spec_from_file_location("probe_memory", Path(__file__).parents[1] / "benchmarks" / "probe_memory.py")
probe_memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe_memory)

DIM, CLASSES, GRID = 8, 4, (2, 3)


def by_class_cache(path: Path, n: int, seed: int = 0) -> Path:
    """Labels in class blocks, as caches of class folders store them: the case that broke the old streaming."""
    return probe_memory.write_synthetic_cache(path, n, grid=GRID, dim=DIM, classes=CLASSES, seed=seed, batch=64,
                                              by_class=True, signal=0.7)


def normed_tokens(path: Path) -> np.ndarray:
    """(n, T, D) float64: the stored tokens through the final LayerNorm, by hand."""
    with h5py.File(path, "r") as f:
        x = f["tokens"][:].astype(np.float64)
        w, b, eps = f["final_norm_weight"][()], f["final_norm_bias"][()], float(f.attrs["final_norm_eps"])
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * w + b


def test_streamed_and_held_epochs_draw_the_same_batches_of_the_right_tokens(tmp_path):
    path = by_class_cache(tmp_path / "c.h5", 150)
    data, _, _ = load_probe_set(path, ["ep"])
    held = pool_tokens(data, memory_budget=1 << 30)
    streamed = pool_tokens(data, memory_budget=0)  # the threshold lowered through the parameter
    assert isinstance(streamed, TokenSource) and isinstance(held, torch.Tensor)
    want = normed_tokens(path)[:, 1:]  # (n, P, D) patches
    np.testing.assert_allclose(held.numpy(), want, rtol=1e-5, atol=1e-5)
    members = torch.arange(3, 150, 2)  # a sparse subset, as the 90% fit split is
    labels = np.arange(150) * CLASSES // 150
    for epoch_seed in (0, 1):
        a = list(_epoch_batches(held, members, 16, torch.Generator().manual_seed(epoch_seed)))
        b = list(_epoch_batches(streamed, members, 16, torch.Generator().manual_seed(epoch_seed), buffer=40))
        assert len(a) == len(b) == math.ceil(len(members) / 16)  # steps an epoch: the same, last batch short
        assert [len(i) for i, _ in b] == [16] * 4 + [len(members) - 64]
        for (ia, ta), (ib, tb) in zip(a, b):
            assert torch.equal(ia, ib)
            np.testing.assert_allclose(tb.numpy(), want[ib.numpy()], rtol=1e-5, atol=1e-5)
        seen = torch.cat([i for i, _ in b])
        assert sorted(seen.tolist()) == members.tolist()
        # every batch mixes the classes, though the cache holds them in blocks (the old streaming did not)
        assert all(len(set(labels[i.numpy()])) >= CLASSES - 1 for i, _ in b[:-1])
    # read() in any order returns the tokens in that order
    shuffled = torch.tensor([140, 3, 77, 78, 79, 0])
    np.testing.assert_allclose(streamed.read(shuffled, chunk=2).numpy(), want[shuffled.numpy()], rtol=1e-5, atol=1e-5)


def test_streamed_probe_equals_the_in_memory_probe(tmp_path):
    """Same seed, same batches: the accuracies and the trained batch norms agree (tolerance: one test image)."""
    path = by_class_cache(tmp_path / "c.h5", 120)
    got = {}
    for name, budget in (("held", 1 << 30), ("streamed", 0)):
        heads = tmp_path / name
        heads.mkdir()
        records, _ = probe_caches([(path, None)], split=0.75, pools=("ep",), evaluators=("linear",), epochs=3,
                                  ep_queries=4, n_bootstrap=20, memory_budget=budget, save_heads=heads)
        got[name] = ({r["pool"]: r["accuracy"] for r in records}, records[0]["n_test"],
                     {p: load_head(heads / f"synthetic.{p}.pt")[0] for p in ("ep",)})
    (held, n_test, held_heads), (streamed, _, streamed_heads) = got["held"], got["streamed"]
    assert set(held) == set(streamed) == {"ep"}
    for pool in held:
        assert abs(held[pool] - streamed[pool]) <= 1 / n_test + 1e-9, (pool, held[pool], streamed[pool])
        a, b = held_heads[pool].norm, streamed_heads[pool].norm
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked)  # the same number of steps
        np.testing.assert_allclose(a.running_mean.numpy(), b.running_mean.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(a.running_var.numpy(), b.running_var.numpy(), rtol=1e-4, atol=1e-5)


def test_a_saved_head_reproduces_the_reported_accuracy_and_ep_with_cls_is_named(tmp_path):
    train = by_class_cache(tmp_path / "train.h5", 96, seed=1)
    test = by_class_cache(tmp_path / "test.h5", 40, seed=2)
    heads = tmp_path / "heads"
    heads.mkdir()
    records, _ = probe_caches([(train, test)], pools=("abmilp", "ep"), evaluators=("linear",), epochs=5, ep_queries=4,
                              ep_with_cls=True, n_bootstrap=20, save_heads=heads)
    assert [r["pool"] for r in records] == ["abmilp", EP_WITH_CLS] == ["abmilp", "ep+cls"]
    assert sorted(p.name for p in heads.iterdir()) == ["synthetic.abmilp.pt", "synthetic.ep+cls.pt"]
    tokens = normed_tokens(test)  # float64 by hand, (n, 1 + P, D), cls first
    labels = np.arange(40) * CLASSES // 40
    for r in records:
        head, config = load_head(heads / f"synthetic.{r['pool']}.pt")
        assert isinstance(head, LinearHead) and config["pool"] == r["pool"] and config["classes"] == CLASSES
        assert config["with_cls"] == (r["pool"] == "ep+cls")
        seen = tokens if config["with_cls"] else tokens[:, 1:]
        with torch.no_grad():
            predictions = head(torch.tensor(seen, dtype=torch.float32)).argmax(1).numpy()
        assert abs((predictions == labels).mean() - r["accuracy"]) <= 1 / 40 + 1e-9
        assert head.attention(torch.tensor(seen, dtype=torch.float32)).shape[-1] == seen.shape[1]


def test_ep_with_cls_rows_through_the_cli_and_a_missing_cuda_device_is_one_line(tmp_path, run_cli):
    path = by_class_cache(tmp_path / "c.h5", 48)
    common = ("probe", path, "--split", "0.75", "--epochs", "2", "--bootstrap", "10", "--pool", "ep", "--ep-queries", "4",
              "--evaluator", "linear")
    both = run_cli(*common, "--format", "json")
    with_cls = run_cli(*common, "--ep-with-cls", "--format", "csv")
    assert both.exit_code == with_cls.exit_code == 0, both.stderr + with_cls.stderr
    assert '"pool": "ep"' in both.stdout.replace('":"', '": "') and "ep+cls" not in both.stdout
    assert [r["pool"] for r in csv.DictReader(io.StringIO(with_cls.stdout))] == ["ep+cls"]
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    cli = run_cli(*common, "--device", "cuda")
    assert cli.exit_code == 1 and len(cli.stderr.strip().splitlines()) == 1 and "--device cuda" in cli.stderr
    with pytest.raises(AttnflowError, match="--device cuda") as e:
        probe_caches([(path, None)], split=0.75, pools=("mean",), device="cuda")
    assert "\n" not in str(e.value)
