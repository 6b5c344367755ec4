"""patch_nmi (attention collapse, Park et al. 2023) and the precision of the patch-row metrics on
near-one-hot rows, against plain float64 loop implementations and hand-built maps."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnflow.layout import TokenLayout
from attnflow.metrics import REGISTRY, batch_metrics, patch_metrics, query_key_nmi

CLS_8x8 = TokenLayout(has_cls=True, num_prefix_tokens=1, grid_size=(8, 8), patch_size=(16, 16))
LAYOUTS = {
    "cls": TokenLayout(has_cls=True, num_prefix_tokens=1, grid_size=(3, 4), patch_size=(16, 8)),
    "cls_registers": TokenLayout(has_cls=True, num_prefix_tokens=3, grid_size=(3, 3), patch_size=(14, 14)),
    "no_cls": TokenLayout(has_cls=False, num_prefix_tokens=0, grid_size=(3, 3), patch_size=(16, 16)),
}


def loop_nmi(a: np.ndarray, p: int) -> float:
    """The formula as written, one (T, T) map, float64 loops: Q the patch block with rows renormalised,
    p(q) = 1/P, p(k) = mean_q Q(q, k), MI = sum p(q) Q ln(Q / p(k)), NMI = MI / sqrt(ln P · H(p_k))."""
    T = a.shape[0]
    P = T - p
    Q = [[float(a[i, j]) / math.fsum(float(x) for x in a[i, p:]) for j in range(p, T)] for i in range(p, T)]
    pk = [math.fsum(Q[q][k] for q in range(P)) / P for k in range(P)]
    mi = math.fsum((1 / P) * Q[q][k] * math.log(Q[q][k] / pk[k]) for q in range(P) for k in range(P) if Q[q][k] > 0)
    hk = -math.fsum(x * math.log(x) for x in pk if x > 0)
    return mi / math.sqrt(math.log(P) * hk)


def loop_patch_entropy(a: np.ndarray, p: int) -> float:
    """mean_{i in S} H(Q_i) of one (T, T) map, float64 loops."""
    T = a.shape[0]
    hs = []
    for i in range(p, T):
        s = math.fsum(float(x) for x in a[i, p:])
        hs.append(-math.fsum((float(x) / s) * math.log(float(x) / s) for x in a[i, p:] if x > 0))
    return math.fsum(hs) / len(hs)


def with_prefix(block: torch.Tensor, p: int, prefix_share: float = 0.2) -> torch.Tensor:
    """A (P, P) row-stochastic patch block -> a (T, T) map whose patch rows give ``prefix_share`` to the
    prefix tokens (Q is unchanged: it renormalises over patches)."""
    P = block.shape[-1]
    T = P + p
    a = torch.full((T, T), 1.0 / T, dtype=torch.float64)
    if p:
        a[p:, :p] = prefix_share / p
        a[p:, p:] = (1 - prefix_share) * block
    else:
        a[:] = block
    return a


def test_collapsed_map_gives_zero():
    gen = torch.Generator().manual_seed(0)
    row = torch.softmax(torch.randn(CLS_8x8.num_patches, generator=gen, dtype=torch.float64), -1)
    a = with_prefix(row.expand(CLS_8x8.num_patches, -1), 1)  # every query row identical
    assert patch_metrics(a, CLS_8x8)["patch_nmi"].item() == pytest.approx(0.0, abs=1e-12)
    assert loop_nmi(a.numpy(), 1) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_permutation_map_gives_one(kind):
    layout = LAYOUTS[kind]
    P, p = layout.num_patches, layout.num_prefix_tokens
    perm = torch.randperm(P, generator=torch.Generator().manual_seed(1))
    a = with_prefix(torch.eye(P, dtype=torch.float64)[perm], p)  # each query its own key: MI = ln P = H(p_k)
    assert patch_metrics(a, layout)["patch_nmi"].item() == pytest.approx(1.0, abs=1e-12)
    assert patch_metrics(a.float(), layout)["patch_nmi"].item() == pytest.approx(1.0, abs=1e-6)


def test_all_queries_on_one_key_is_zero_and_one_patch_is_nan():
    layout = LAYOUTS["cls"]
    P = layout.num_patches
    block = torch.zeros(P, P, dtype=torch.float64)
    block[:, 3] = 1.0  # H(p_k) = 0: the declared limit, 0
    assert patch_metrics(with_prefix(block, 1), layout)["patch_nmi"].item() == 0.0
    one = TokenLayout(has_cls=True, num_prefix_tokens=1, grid_size=(1, 1), patch_size=(16, 16))
    assert math.isnan(patch_metrics(torch.full((2, 2), 0.5), one)["patch_nmi"].item())
    assert set(REGISTRY["patch_nmi"].nan_when) == {"one_patch", "undefined"}
    assert REGISTRY["patch_nmi"].default and REGISTRY["patch_nmi"].level == "head"


def test_nmi_from_entropies_by_hand():
    # two queries over two keys, Q = [[1, 0], [.5, .5]]: p_k = (.75, .25), mean H(Q_q) = ln(2) / 2
    hk = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    mi = 0.5 * math.log(1 / 0.75) + 0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))
    got = query_key_nmi(torch.tensor(math.log(2) / 2, dtype=torch.float64), torch.tensor(hk, dtype=torch.float64), 2).item()
    assert got == pytest.approx(mi / math.sqrt(math.log(2) * hk), abs=1e-15)


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_random_maps_match_the_loop_formula(kind):
    layout = LAYOUTS[kind]
    B, L, H, T, p = 2, 2, 2, layout.num_tokens, layout.num_prefix_tokens
    gen = torch.Generator().manual_seed(2)
    for scale in (1.0, 4.0, 12.0):  # near-uniform to near-one-hot rows
        A = torch.softmax(scale * torch.randn(B, L, H, T, T, generator=gen, dtype=torch.float64), -1)
        want = np.array([[[loop_nmi(A[b, l, h].numpy(), p) for h in range(H)] for l in range(L)] for b in range(B)])
        got64, _ = batch_metrics(layout, torch.rand(B, L, T, dtype=torch.float64), attn=A)
        np.testing.assert_allclose(got64["patch_nmi"].numpy(), want, rtol=1e-10, atol=0)
        # float32 input, as a cache or a capture provides it: the reference sees the same float32 values
        A32 = A.float()
        want32 = np.array([[[loop_nmi(A32[b, l, h].double().numpy(), p) for h in range(H)] for l in range(L)]
                           for b in range(B)])
        got32, _ = batch_metrics(layout, torch.rand(B, L, T), attn=A32)
        np.testing.assert_allclose(got32["patch_nmi"].numpy(), want32, rtol=1e-4, atol=0)


def near_one_hot(seed: int, layout: TokenLayout = CLS_8x8, prefix_logit: float = -22.0) -> torch.Tensor:
    """The issue's reproduction: every row puts almost all its mass on one random patch."""
    gen = torch.Generator().manual_seed(seed)
    T = layout.num_tokens
    lg = torch.randn(T, T, generator=gen) - 22.0
    lg[:, : layout.num_prefix_tokens] += prefix_logit + 22.0
    lg[torch.arange(T), torch.randint(layout.num_prefix_tokens, T, (T,), generator=gen)] = 0.0
    return lg.softmax(-1)[None]


@pytest.mark.parametrize("prefix_logit", [-22.0, 0.0, 4.0], ids=["little-cls", "cls-like-patch", "mostly-cls"])
@pytest.mark.parametrize("seed", range(4))
def test_near_one_hot_rows_in_float32_within_1e_4_of_float64(seed, prefix_logit):
    # prefix_logit 4: the patch rows put about 98% on cls, so ln s_i is far from 0 while H(Q_i) is ~1e-6
    a = near_one_hot(seed, prefix_logit=prefix_logit)  # float32, (1, T, T)
    got = patch_metrics(a, CLS_8x8)
    ref = a[0].double().numpy()
    want_h = loop_patch_entropy(ref, 1)
    assert want_h < 1e-4  # the rows are near-one-hot: the regime where the float32 form cancelled
    assert got["patch_entropy"].item() == pytest.approx(want_h, rel=1e-4)
    assert got["patch_entropy_norm"].item() == pytest.approx(want_h / math.log(64), rel=1e-4)
    assert got["patch_nmi"].item() == pytest.approx(loop_nmi(ref, 1), rel=1e-4)


def test_issue_reproduction_values():
    torch.manual_seed(0)  # the issue's snippet, as written, on the global generator
    lg = torch.randn(65, 65) - 22.0
    lg[torch.arange(65), torch.randint(1, 65, (65,))] = 0.0
    a = lg.softmax(-1)[None]
    got = patch_metrics(a, CLS_8x8)["patch_entropy"].item()
    assert got == pytest.approx(loop_patch_entropy(a[0].double().numpy(), 1), rel=1e-6)
