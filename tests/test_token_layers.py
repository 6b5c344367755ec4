"""Tokens of several blocks (--token-layers), float16 tokens (--tokens-dtype) and probing one block (--layer).

References are independent of the code under test: block outputs from forward hooks written here on a float64
copy of the model, LayerNorm, pooling, attention weights and k-NN as plain float64 computations.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attnflow.store.read import open_cache
from attnflow.errors import AttnflowError
from attnflow.extract import extract
from attnflow.images import list_images, resolve_preprocessing
from attnflow.probe import load_probe_set, pooled
from conftest import write_images, tiny

FIXTURES = Path(__file__).parent / "fixtures"


def layer_norm64(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight.astype(np.float64) + bias.astype(np.float64)


def hooked_block_outputs(model: torch.nn.Module, paths: list[Path]) -> np.ndarray:
    """(n, L, T, D) float64: every block's output on a float64 copy of ``model``, taken by forward hooks."""
    model64 = copy.deepcopy(model).double()
    transform = resolve_preprocessing(model).transform()
    outputs: dict[int, torch.Tensor] = {}
    handles = [block.register_forward_hook(lambda m, i, o, b=b: outputs.__setitem__(b, o.detach()))
               for b, block in enumerate(model64.blocks)]
    rows = []
    with torch.no_grad():
        for path in paths:
            model64.forward_features(transform(Image.open(path).convert("RGB"))[None].double())
            rows.append(torch.stack([outputs[b][0] for b in range(len(model64.blocks))]).numpy())
    for handle in handles:
        handle.remove()
    return np.stack(rows)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Two caches (train: 12 images, test: 8) of a 2-block model storing the tokens of both blocks as float32,
    one as float16, and one of block 0 alone; the model and the image paths."""
    root = tmp_path_factory.mktemp("token_layers")
    write_images(root / "train", 12, classes=("a", "b"))
    write_images(root / "test", 8, classes=("a", "b"), seed=1)
    train, test = list_images([str(root / "train")]), list_images([str(root / "test")])
    loaded = tiny("plain")
    opts = dict(save_tokens=True, labels_from_dirs=True, workers=0, batch_size=4, compression="none")
    extract(loaded, train, root / "train.h5", token_layers=(0, -1), **opts)
    extract(loaded, test, root / "test.h5", token_layers=(-1, 0), **opts)
    extract(loaded, train, root / "half.h5", token_layers=(0, 1), tokens_dtype="float16", **opts)
    extract(loaded, train, root / "first.h5", token_layers=(-2,), **opts)
    return root, loaded.model, train


def test_stored_tokens_of_each_block_equal_a_float64_rerun(caches):
    root, model, paths = caches
    reference = hooked_block_outputs(model, paths)  # (n, 2, T, D)
    norm = model.norm
    weight, bias = norm.weight.detach().double().numpy(), norm.bias.detach().double().numpy()
    with open_cache(root / "train.h5") as cache:
        assert cache.token_layers == (0, 1) and cache.attrs["token_layers"] == [0, 1]
        assert cache.file["layer_tokens"].shape == (12, 2, 17, 48) and "tokens" not in cache.file
        for block in (0, 1):
            np.testing.assert_allclose(cache.tokens(layer=block, normalised=False), reference[:, block], rtol=1e-4, atol=1e-5)
            # the final norm applies to an intermediate block's tokens too
            np.testing.assert_allclose(cache.tokens(layer=block), layer_norm64(reference[:, block], weight, bias, norm.eps),
                                       rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(cache.tokens(layer=-1), cache.tokens(layer=1))
        np.testing.assert_array_equal(cache.tokens(), cache.tokens(layer=1))  # default: the deepest stored
    with open_cache(root / "first.h5") as cache:  # one block other than the last: (n, T, D) and the attribute
        assert cache.attrs["token_layers"] == [0] and cache.file["tokens"].shape == (12, 17, 48)
        np.testing.assert_allclose(cache.tokens(normalised=False), reference[:, 0], rtol=1e-4, atol=1e-5)


def test_float16_tokens_equal_float32_ones_within_rounding(caches):
    root, _, _ = caches
    with open_cache(root / "train.h5") as full, open_cache(root / "half.h5") as half:
        assert half.attrs["tokens_dtype"] == "float16" and "tokens_dtype" not in full.attrs
        assert half.file["layer_tokens"].dtype == np.float16
        # uncompressed: exactly half the bytes
        assert half.file["layer_tokens"].id.get_storage_size() * 2 == full.file["layer_tokens"].id.get_storage_size()
        for block in (0, 1):
            exact, rounded = full.tokens(layer=block, normalised=False), half.tokens(layer=block, normalised=False)
            assert rounded.dtype == np.float32
            # round to nearest: half an ulp, 2^-11 relative, (2^-25 absolute among float16's subnormals)
            assert np.all(np.abs(rounded - exact) <= np.abs(exact) * 2.0 ** -11 + 2.0 ** -25)
            assert np.any(rounded != exact)


def hand_mean_pool(cache_path: Path, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, D) float64 mean of the final-normed patch tokens of ``block``, read raw with h5py, and the labels."""
    import h5py

    with h5py.File(cache_path, "r") as f:
        raw = f["layer_tokens"][:, list(f.attrs["token_layers"]).index(block)]
        normed = layer_norm64(raw, f["final_norm_weight"][()], f["final_norm_bias"][()], float(f.attrs["final_norm_eps"]))
        p = int(f.attrs["num_prefix_tokens"])
        return normed[:, p:].mean(1), f["labels"][()]


def hand_knn_right(train: np.ndarray, train_y: np.ndarray, test: np.ndarray, test_y: np.ndarray,
                   k: int = 20, temperature: float = 0.07) -> list[bool]:
    """DINO's weighted k-NN, one test image at a time in float64."""
    right = []
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    for x, y in zip(test, test_y):
        sims = np.array([unit(x) @ unit(t) for t in train])
        votes: dict[int, float] = {}
        for j in np.argsort(-sims)[:min(k, len(train))]:
            votes[int(train_y[j])] = votes.get(int(train_y[j]), 0.0) + np.exp(sims[j] / temperature)
        right.append(max(votes, key=votes.get) == int(y))
    return right


def test_probe_layer_uses_the_chosen_blocks_tokens_and_attention(caches, run_cli):
    root, _, _ = caches
    per_block = {}
    for block in (0, 1):
        data, _, _ = load_probe_set(root / "train.h5", ["mean", "cls-attn", "rollout"], layer=block)
        want, _ = hand_mean_pool(root / "train.h5", block)
        np.testing.assert_allclose(pooled(data, "mean").numpy(), want, rtol=1e-4, atol=1e-5)
        per_block[block] = want
        with open_cache(root / "train.h5") as cache:
            attn = cache.attention().astype(np.float64)  # (n, L, H, T, T)
        p = 1
        cls = attn[:, block, :, 0, p:]  # each head's cls row over patches, renormalised, then the head mean
        np.testing.assert_allclose(data.weights["cls-attn"].numpy(), (cls / cls.sum(-1, keepdims=True)).mean(1), rtol=1e-4, atol=1e-6)
        # rollout up to the block: R = prod of 0.5 (head-mean A + I), row-normalised; the cls row over patches
        R = np.eye(attn.shape[-1])[None].repeat(len(attn), 0)
        for b in range(block + 1):
            M = 0.5 * (attn[:, b].mean(1) + np.eye(attn.shape[-1]))
            R = (M / M.sum(-1, keepdims=True)) @ R
        readout = R[:, 0, p:] / R[:, 0, p:].sum(-1, keepdims=True)
        np.testing.assert_allclose(data.weights["rollout"].numpy(), readout, rtol=1e-4, atol=1e-6)
    assert np.abs(per_block[0] - per_block[1]).max() > 1e-2  # the blocks differ: the choice is visible

    train_x, train_y = hand_mean_pool(root / "train.h5", 0)
    test_x, test_y = hand_mean_pool(root / "test.h5", 0)
    expected = float(np.mean(hand_knn_right(train_x, train_y, test_x, test_y)))
    result = run_cli("probe", "--train", root / "train.h5", "--test", root / "test.h5", "--layer", "-2", "--pool", "mean",
                     "--evaluator", "knn", "--bootstrap", "20", "--format", "json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert len(rows) == 1 and rows[0]["layer"] == 0 and list(rows[0])[:2] == ["model", "layer"]
    assert rows[0]["accuracy"] == pytest.approx(expected)
    plain = run_cli("probe", "--train", root / "train.h5", "--test", root / "test.h5", "--pool", "mean",
                    "--evaluator", "knn", "--bootstrap", "20", "--format", "csv")
    assert plain.exit_code == 0 and "layer" not in plain.stdout.splitlines()[0].split(",")  # the contract without --layer


def test_unknown_layers_are_one_line(caches, run_cli, tmp_path):
    root, _, _ = caches
    for layer in ("1", "7"):
        result = run_cli("probe", root / "first.h5", "--split", "0.5", "--layer", layer, "--pool", "mean", "--evaluator", "knn")
        assert result.exit_code == 1
        assert len(result.stderr.strip().splitlines()) == 1 and "stores the tokens of block 0 (0-based, of 2)" in result.stderr
    images = root / "train"
    for flags, flag in ((("--save-tokens", "--token-layers", "-50"), "--token-layers"), (("--save-tokens", "--token-layers", "x"), "--token-layers"),
                        (("--token-layers", "0"), "--token-layers"), (("--tokens-dtype", "float16"), "--tokens-dtype")):
        result = run_cli("extract", "demo:dino", images, "-o", tmp_path / "x.h5", "--workers", "0", "-q", *flags)
        assert result.exit_code == 2 and flag in result.stderr, result.stderr
        assert not (tmp_path / "x.h5").exists()


def test_caches_of_attnflow_0_1_still_read(tmp_path):
    path = shutil.copy(FIXTURES / "v0_1_cache.h5", tmp_path / "old.h5")
    with open_cache(path) as cache:
        assert cache.has_tokens and cache.token_layers == (1,)  # the last of its 2 blocks
        np.testing.assert_array_equal(cache.tokens(layer=-1), cache.tokens())
        np.testing.assert_array_equal(cache.tokens(layer=1, normalised=False), cache["tokens"][:])
        with pytest.raises(AttnflowError, match=r"stores the tokens of block 1 \(0-based, of 2\), not of layer 0"):
            cache.tokens(layer=0)
    data, _, _ = load_probe_set(path, ["mean", "cls-attn"], layer=-1)
    assert data.block == 1 and data.tokens.shape == (6, 9, 48)
