"""Probing streams tokens from the cache (issue 14, item 2): results equal plain in-memory references."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import h5py
import numpy as np
import torch

from attnflow.probe import AbMILP, TokenSource, knn_accuracy, load_probe_set, pooled, train_linear

_spec = importlib.util.spec_from_file_location("probe_memory", Path(__file__).parents[1] / "benchmarks" / "probe_memory.py")
probe_memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe_memory)


def _cache(tmp_path: Path, n: int = 70) -> Path:
    return probe_memory.write_synthetic_cache(tmp_path / "c.h5", n, grid=(2, 3), dim=8, classes=3, batch=16)


def test_streamed_mean_equals_numpy_mean_of_stored_tokens(tmp_path):
    path = _cache(tmp_path)
    data, _, _ = load_probe_set(path, ["mean"])
    assert isinstance(data.tokens, TokenSource)
    with h5py.File(path, "r") as f:
        stored = f["tokens"][:].astype(np.float64)  # the final norm is the identity up to eps
    mu, var = stored.mean(-1, keepdims=True), stored.var(-1, keepdims=True)
    normed = (stored - mu) / np.sqrt(var + 1e-6)
    np.testing.assert_allclose(pooled(data, "mean", chunk=9).numpy(), normed[:, 1:].mean(1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pooled(data, "cls", chunk=9).numpy(), normed[:, 0], rtol=1e-5, atol=1e-5)


def test_reads_never_exceed_the_chunk(tmp_path, monkeypatch):
    """Every read of the cache, also of a sparse subset, is at most ``chunk`` images."""
    from attnflow.store.read import Cache

    path = _cache(tmp_path)
    data, _, _ = load_probe_set(path, ["mean"])
    sizes, read = [], Cache.tokens

    def spy(self, start=0, stop=None, **kw):  # records the size of each read; the read itself is the real one
        sizes.append((stop if stop is not None else len(self)) - start)
        return read(self, start, stop, **kw)

    monkeypatch.setattr(Cache, "tokens", spy)
    subset = data.tokens[torch.arange(0, 70, 3)]
    seen = torch.cat([at for at, _ in subset.chunks(chunk=5)])
    assert sorted(seen.tolist()) == list(range(len(subset)))
    assert sizes and max(sizes) <= 5
    sizes.clear()
    train_linear(data.tokens, data.labels, data.tokens[torch.arange(5)], classes=3, pool=AbMILP(8), epochs=1,
                 batch_size=8)
    assert max(sizes) <= 256


def test_blocked_knn_equals_float64_weighted_knn():
    rng = np.random.default_rng(1)
    train, test = rng.standard_normal((2500, 6)), rng.standard_normal((1100, 6))
    train_y, test_y = rng.integers(0, 4, 2500), rng.integers(0, 4, 1100)
    k, temperature = 20, 0.07
    a = train / np.linalg.norm(train, axis=1, keepdims=True)
    b = test / np.linalg.norm(test, axis=1, keepdims=True)
    want = []
    for i in range(len(b)):  # plain float64 loop: DINO's weighted vote of the k most similar
        sims = a @ b[i]
        near = np.argsort(-sims, kind="stable")[:k]
        votes = np.zeros(4)
        for j in near:
            votes[train_y[j]] += np.exp(sims[j] / temperature)
        want.append(votes.argmax() == test_y[i])
    got = knn_accuracy(torch.tensor(train, dtype=torch.float32), torch.from_numpy(train_y),
                       torch.tensor(test, dtype=torch.float32), torch.from_numpy(test_y), k=k, temperature=temperature)
    assert got.tolist() == want
