"""Metrics against hand-computed cases and a plain float64 numpy loop implementation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnflow.layout import TokenLayout
from attnflow.metrics import (
    available_metrics, batch_metrics, cls_metrics, discard_lowest, distribution_stats, patch_metrics, rollout,
)

CLS_4x4 = TokenLayout(has_cls=True, num_prefix_tokens=1, grid_size=(4, 4), patch_size=(16, 16))


# ---------------------------------------------------------------- hand-built cases with known answers


def test_uniform_rows():
    T = CLS_4x4.num_tokens
    attn = torch.full((1, 1, T, T), 1.0 / T, dtype=torch.float64)
    m = cls_metrics(attn[..., 0, :], CLS_4x4)
    assert m["cls_entropy_norm"].item() == pytest.approx(1.0, abs=1e-12)
    assert m["cls_eff_frac"].item() == pytest.approx(1.0, abs=1e-12)
    assert m["cls_gini"].item() == pytest.approx(0.0, abs=1e-12)
    assert m["cls_top10_mass"].item() == pytest.approx(2 / 16)  # ceil(0.1 * 16) = 2 patches
    assert m["cls_self"].item() == pytest.approx(1 / 17) and m["cls_to_patch"].item() == pytest.approx(16 / 17)
    pm = patch_metrics(attn, CLS_4x4)
    assert pm["patch_entropy_norm"].item() == pytest.approx(1.0, abs=1e-12)
    assert pm["patch_to_cls"].item() == pytest.approx(1 / 17) and pm["patch_self"].item() == pytest.approx(1 / 17)


def test_one_hot_cls_row():
    row = torch.zeros(1, 17)
    row[0, 5] = 1.0
    m = cls_metrics(row, CLS_4x4)
    assert m["cls_entropy"].item() == 0.0 and m["cls_entropy_norm"].item() == 0.0
    assert m["cls_top10_mass"].item() == 1.0
    assert m["cls_eff_frac"].item() == pytest.approx(1 / 16)
    assert m["cls_gini"].item() == pytest.approx(15 / 16)  # (P - 1) / P for one-hot


def test_known_gini_and_entropy():
    stats = distribution_stats(torch.tensor([0.0, 0.5, 0.0, 0.5]))
    assert stats["gini"].item() == pytest.approx(0.5)  # sorted [0, 0, .5, .5]: (1 * .5 + 3 * .5) / (4 * 1)
    assert stats["entropy"].item() == pytest.approx(math.log(2))
    assert stats["entropy_norm"].item() == pytest.approx(0.5)
    assert stats["top10_mass"].item() == pytest.approx(0.5)


def test_attention_distance_on_a_2x2_grid():
    layout = TokenLayout(has_cls=True, num_prefix_tokens=1, grid_size=(2, 2), patch_size=(16, 16))
    uniform = torch.full((1, 5, 5), 0.2)
    expected = (0 + 16 + 16 + 16 * math.sqrt(2)) / 4  # every patch sees the same set of distances
    assert patch_metrics(uniform, layout)["attn_distance"].item() == pytest.approx(expected)
    # every patch attends only to the patch diagonally opposite it: distance 16 * sqrt(2)
    attn = torch.zeros(1, 5, 5)
    attn[0, 0, 0] = 1
    for i, j in ((1, 4), (2, 3), (3, 2), (4, 1)):
        attn[0, i, j] = 1
    assert patch_metrics(attn, layout)["attn_distance"].item() == pytest.approx(16 * math.sqrt(2))
    # non-square patches: rows 10 px apart, columns 30 px apart
    wide = TokenLayout(has_cls=True, num_prefix_tokens=1, grid_size=(2, 2), patch_size=(10, 30))
    attn = torch.zeros(1, 5, 5)
    attn[0, 0, 0] = 1
    for i, j in ((1, 2), (2, 1), (3, 4), (4, 3)):  # horizontal neighbours
        attn[0, i, j] = 1
    assert patch_metrics(attn, wide)["attn_distance"].item() == pytest.approx(30.0)


def test_two_layer_rollout_by_hand():
    layout = TokenLayout(has_cls=True, num_prefix_tokens=1, grid_size=(1, 2), patch_size=(16, 16))
    a1 = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    a2 = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    attn = torch.stack([a1, a2])[None, :, None]  # (B=1, L=2, H=1, 3, 3)
    maps = rollout(attn, layout)
    # M1 = [[.5,.5,0],[0,1,0],[0,0,1]], M2 = [[.5,0,.5],[.5,.5,0],[0,0,1]]
    # R1[0] = [.5, .5, 0] -> patches [1, 0];  R2[0] = (M2 @ M1)[0] = [.25, .25, .5] -> patches [1/3, 2/3]
    torch.testing.assert_close(maps[0, 0], torch.tensor([1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(maps[0, 1], torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))


def test_rollout_without_cls_reads_the_mean_patch_row():
    layout = TokenLayout(has_cls=False, num_prefix_tokens=0, grid_size=(1, 2), patch_size=(16, 16))
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # both patches look at patch 0
    maps = rollout(a[None, None, None], layout)
    # M = [[1, 0], [.5, .5]]; mean of rows = [.75, .25]
    torch.testing.assert_close(maps[0, 0], torch.tensor([0.75, 0.25], dtype=torch.float64))


def test_discard_is_per_image():
    torch.manual_seed(0)
    fused = torch.rand(2, 4, 4)
    out = discard_lowest(fused, 0.5)  # 6 of the 12 off-diagonal entries of each map
    for b in range(2):
        off = ~torch.eye(4, dtype=torch.bool)
        values = fused[b][off]
        keep = values >= values.sort().values[6]
        assert torch.equal(out[b][off] != 0, keep)
        assert torch.equal(torch.diagonal(out[b]), torch.diagonal(fused[b]))
    assert (out[1] == 0).sum() == 6  # the second image is processed too


def test_no_cls_and_register_layouts():
    layout = TokenLayout(has_cls=False, num_prefix_tokens=4, grid_size=(2, 2), patch_size=(8, 8))
    attn = torch.softmax(torch.randn(2, 3, 8, 8), -1)
    m = cls_metrics(attn[..., 0, :], layout)
    assert set(m) >= {"cls_self", "cls_entropy_norm", "cls_to_registers"}
    assert all(torch.isnan(v).all() for v in m.values())
    pm = patch_metrics(attn, layout)
    assert torch.isnan(pm["patch_to_cls"]).all() and not torch.isnan(pm["patch_entropy"]).any()
    regs = TokenLayout(has_cls=True, num_prefix_tokens=5, grid_size=(2, 2), patch_size=(8, 8))
    attn = torch.softmax(torch.randn(2, 3, 9, 9), -1)
    m = cls_metrics(attn[..., 0, :], regs)
    torch.testing.assert_close(m["cls_to_registers"], attn[..., 0, 1:5].double().sum(-1))
    torch.testing.assert_close(m["cls_self"] + m["cls_to_registers"] + m["cls_to_patch"], torch.ones(2, 3, dtype=torch.float64))


# ---------------------------------------------------------------- float64 numpy loop reference


def np_entropy(q):
    return -sum(v * math.log(v) for v in q if v > 0)


def np_gini(q):
    s = sorted(q)
    P = len(s)
    return sum((2 * (i + 1) - P - 1) * v for i, v in enumerate(s)) / (P * sum(s))


def reference_metrics(A, layout, fg=None, fusion="mean", discard=0.0):
    """Straightforward loops over images, layers, heads and tokens. A: float64 (B, L, H, T, T)."""
    B, L, H, T, _ = A.shape
    p, P = layout.num_prefix_tokens, layout.num_patches
    gh, gw = layout.grid_size
    ph, pw = layout.patch_size
    pos = [(r * ph, c * pw) for r in range(gh) for c in range(gw)]
    k = math.ceil(0.1 * P)
    out = {name: np.full((B, L, H), np.nan) for name in (
        "cls_self", "cls_to_patch", "cls_to_registers", "patch_to_cls", "patch_self", "cls_entropy", "cls_entropy_norm",
        "patch_entropy", "patch_entropy_norm", "cls_top10_mass", "cls_eff_frac", "cls_gini", "attn_distance", "cls_fg_mass")}
    maps = np.zeros((B, L, P))
    for b in range(B):
        for l in range(L):
            for h in range(H):
                a = A[b, l, h]
                Q = [[a[i, j] / sum(a[i, p:]) for j in range(p, T)] for i in range(T)]
                if layout.has_cls:
                    q0 = Q[0]
                    out["cls_self"][b, l, h] = a[0, 0]
                    out["cls_to_patch"][b, l, h] = sum(a[0, p:])
                    out["cls_to_registers"][b, l, h] = sum(a[0, 1:p])
                    out["patch_to_cls"][b, l, h] = np.mean([a[i, 0] for i in range(p, T)])
                    e = np_entropy(q0)
                    out["cls_entropy"][b, l, h] = e
                    out["cls_entropy_norm"][b, l, h] = e / math.log(P)
                    out["cls_top10_mass"][b, l, h] = sum(sorted(q0, reverse=True)[:k])
                    out["cls_eff_frac"][b, l, h] = math.exp(e) / P
                    out["cls_gini"][b, l, h] = np_gini(q0)
                    if fg is not None:
                        out["cls_fg_mass"][b, l, h] = sum(q0[j] * fg[b, j] for j in range(P))
                out["patch_self"][b, l, h] = np.mean([a[i, i] for i in range(p, T)])
                pe = np.mean([np_entropy(Q[i]) for i in range(p, T)])
                out["patch_entropy"][b, l, h] = pe
                out["patch_entropy_norm"][b, l, h] = pe / math.log(P)
                out["attn_distance"][b, l, h] = np.mean([
                    sum(Q[i][j] * math.dist(pos[i - p], pos[j]) for j in range(P)) for i in range(p, T)
                ])
        # rollout, one image at a time
        R = None
        for l in range(L):
            heads = A[b, l]
            F = {"mean": heads.mean(0), "max": heads.max(0), "min": heads.min(0)}[fusion].copy()
            if discard:
                off = [(i, j) for i in range(T) for j in range(T) if i != j]
                n_drop = math.floor(discard * len(off) + 1e-9)
                for i, j in sorted(off, key=lambda ij: F[ij])[:n_drop]:
                    F[i, j] = 0.0
            M = 0.5 * F + 0.5 * np.eye(T)
            M = M / M.sum(axis=1, keepdims=True)
            R = M if R is None else M @ R
            row = R[0] if layout.has_cls else R[p:].mean(axis=0)
            maps[b, l] = row[p:] / row[p:].sum()
    return out, maps


LAYOUTS = {
    "cls": TokenLayout(has_cls=True, num_prefix_tokens=1, grid_size=(3, 4), patch_size=(16, 8)),
    "cls_registers": TokenLayout(has_cls=True, num_prefix_tokens=3, grid_size=(3, 3), patch_size=(14, 14)),
    "no_cls": TokenLayout(has_cls=False, num_prefix_tokens=0, grid_size=(3, 3), patch_size=(16, 16)),
    "registers_no_cls": TokenLayout(has_cls=False, num_prefix_tokens=2, grid_size=(2, 3), patch_size=(16, 16)),
}


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
@pytest.mark.parametrize("fusion, discard", [("mean", 0.0), ("max", 0.3), ("min", 0.0)])
def test_batch_metrics_equal_the_float64_loop_reference(kind, fusion, discard):
    layout = LAYOUTS[kind]
    B, L, H, T = 2, 3, 2, layout.num_tokens
    gen = torch.Generator().manual_seed(0)
    A = torch.softmax(3 * torch.randn(B, L, H, T, T, generator=gen, dtype=torch.float64), -1)
    fg = torch.rand(B, layout.num_patches, generator=gen, dtype=torch.float64)
    magnitude = torch.rand(B, L, T, generator=gen, dtype=torch.float64)
    ref, ref_maps = reference_metrics(A.numpy(), layout, fg.numpy(), fusion, discard)
    # float32 input, as a cache or a capture provides it
    got, maps = batch_metrics(layout, magnitude.float(), attn=A.float(), fg=fg.float(), fusion=fusion, discard_ratio=discard)
    assert set(got) == set(available_metrics(layout, full_maps=True, has_fg=True))
    for name, value in got.items():
        if name in ref:
            want = ref[name]
        elif name == "magnitude_cls":
            want = magnitude[:, :, 0].numpy() if layout.has_cls else np.full((B, L), np.nan)
        elif name == "magnitude_patch":
            want = magnitude[:, :, layout.num_prefix_tokens:].mean(-1).numpy()
        elif name == "rollout_entropy_norm":
            want = np.array([[np_entropy(m) / math.log(layout.num_patches) for m in mb] for mb in ref_maps])
        elif name == "rollout_top10_mass":
            k = math.ceil(0.1 * layout.num_patches)
            want = np.array([[sum(sorted(m, reverse=True)[:k]) for m in mb] for mb in ref_maps])
        elif name == "rollout_fg_mass":
            want = (ref_maps * fg.numpy()[:, None, :]).sum(-1)
        elif name == "fg_frac":
            want = fg.numpy().mean(-1)
        elif name == "patch_nmi":
            from test_nmi import loop_nmi  # its plain float64 loop reference

            want = np.array([[[loop_nmi(A[b, l, h].numpy(), layout.num_prefix_tokens) for h in range(H)]
                              for l in range(L)] for b in range(B)])
        else:
            raise AssertionError(f"no reference for {name}")
        np.testing.assert_allclose(value.numpy(), want, rtol=1e-4, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(maps.numpy(), ref_maps, rtol=1e-4, atol=1e-7)


def test_rows_only_gives_the_cls_metrics_of_full_maps():
    layout = LAYOUTS["cls_registers"]
    A = torch.softmax(torch.randn(2, 3, 2, layout.num_tokens, layout.num_tokens), -1)
    magnitude = torch.rand(2, 3, layout.num_tokens)
    full, _ = batch_metrics(layout, magnitude, attn=A)
    rows, maps = batch_metrics(layout, magnitude, attn_rows=A[:, :, :, : layout.num_prefix_tokens])
    assert maps is None
    assert set(rows) == set(available_metrics(layout, full_maps=False, has_fg=False))
    assert "patch_entropy" not in rows and "rollout_entropy_norm" not in rows and "cls_gini" in rows
    for name, value in rows.items():
        torch.testing.assert_close(value, full[name])
