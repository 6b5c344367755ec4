"""What extraction does to stay close to the bare forward pass must not change a number: the capture's reused
map buffer, the rows handed to the writer thread, and the patch-row metrics computed a few maps at a time."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

from attnflow import AttentionCapture
from attnflow.extract import _plan, _process
from attnflow.images import ImageDataset, collate_images, list_images
from attnflow.layout import TokenLayout
from attnflow.metrics import patch_metrics
from attnflow.options import ExtractOptions
from conftest import make_tiny_vit, tiny


def test_a_reused_buffer_gives_the_same_maps_and_fresh_ones_are_kept():
    model = make_tiny_vit("plain")
    batches = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    with AttentionCapture(model) as fresh, torch.inference_mode():
        want, held = [], []
        for x in batches:
            model.forward_features(x)
            held.append(fresh.pop().attn)
            want.append(held[-1].clone())
    # without reuse_buffer each pop's maps are the caller's: the next forward pass leaves them as they were
    assert torch.equal(held[0], want[0]) and not torch.equal(want[0], want[1])
    with AttentionCapture(model, reuse_buffer=True) as reused, torch.inference_mode():
        pointers = []
        for x, expected in zip(batches, want):
            model.forward_features(x)
            attn = reused.pop().attn
            assert torch.equal(attn, expected)
            pointers.append(attn.data_ptr())
        assert pointers[0] == pointers[1]  # the second batch went into the first one's memory
        model.forward_features(batches[0][:1])  # another batch size: a buffer of the new shape
        assert torch.equal(reused.pop().attn, want[0][:1])
    assert reused._attn_buffer is None


@pytest.mark.parametrize("store", ["full", "rows"])
def test_rows_handed_to_the_writer_survive_the_next_batch(tmp_path, image_dir, store):
    # The writer thread may still hold batch k while batch k + 1 is captured into the same buffer: every row
    # it receives must be its own copy. Two batches through _process, the first one's rows checked afterwards.
    loaded = tiny("plain")
    paths = list_images([str(image_dir)])[:4]
    plan = _plan(loaded, paths, ExtractOptions().replace(store=store, dtype="float32", batch_size=2, workers=0), None)
    spec = plan.cache_spec(tmp_path / "c.h5")
    dataset = ImageDataset(paths, plan.preprocessing, patch_size=loaded.layout.patch_size)
    batches = [collate_images([dataset[i], dataset[i + 1]]) for i in (0, 2)]
    with AttentionCapture(loaded.model, token_layers=spec.stored_token_layers, reuse_buffer=True) as capture, torch.inference_mode():
        handed = [_process(loaded.model, capture, b, plan, contextlib.nullcontext(), spec, {"cache": None, "metrics": None}).numpy()
                  for b in batches]
    with AttentionCapture(loaded.model) as capture, torch.inference_mode():
        loaded.model.forward_features(plan.preprocessing.normalize(batches[0].pixels))
        first = capture.pop().attn.numpy()
    stored = handed[0]["cache"]["attn" if store == "full" else "attn_rows"]
    np.testing.assert_array_equal(stored, first if store == "full" else first[:, :, :, :1])
    np.testing.assert_array_equal(handed[0]["metrics"]["metrics/cls_self"], first[:, :, :, 0, 0])


def reference_patch_metrics(a: np.ndarray, p: int, grid: tuple[int, int], patch: tuple[int, int]) -> dict[str, float]:
    """One (T, T) map, float64 numpy: entropy, distance, self share and NMI of the renormalised patch rows."""
    Q = a[p:, p:] / a[p:, p:].sum(1, keepdims=True)
    P = Q.shape[0]
    rows, cols = np.divmod(np.arange(P), grid[1])
    d = np.hypot((rows[:, None] - rows[None, :]) * patch[0], (cols[:, None] - cols[None, :]) * patch[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(Q > 0, Q * np.log(Q), 0.0).sum(1)
    pk = Q.mean(0)
    hk = -(pk * np.log(pk)).sum()
    return {
        "patch_entropy": h.mean(), "attn_distance": (Q * d).sum(1).mean(), "patch_self": np.diag(a[p:, p:]).mean(),
        "patch_nmi": (hk - h.mean()) / math.sqrt(math.log(P) * hk),
    }


@pytest.mark.parametrize("grid, n_maps", [((16, 16), 7), ((32, 32), 2)], ids=["4-maps-a-block", "1-map-a-block"])
def test_patch_metrics_across_block_boundaries_equal_a_float64_reference(grid, n_maps):
    # 256 patches: blocks of 4 maps, so 7 maps end in a partial block; 1,024 patches: one map a block
    layout = TokenLayout(has_cls=True, num_prefix_tokens=1, grid_size=grid, patch_size=(16, 16))
    T = layout.num_tokens
    gen = torch.Generator().manual_seed(0)
    attn = torch.softmax(4 * torch.randn(1, n_maps, T, T, generator=gen), -1)  # float32, as captured
    got = patch_metrics(attn, layout)
    for m in range(n_maps):
        want = reference_patch_metrics(attn[0, m].double().numpy(), 1, grid, (16, 16))
        for name, value in want.items():
            assert got[name][0, m].item() == pytest.approx(value, rel=1e-9), (name, m)
