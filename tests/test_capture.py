"""Captured attention and magnitudes against an independent float64 recomputation from q and k."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

from attnflow import AttentionCapture, AttnflowError, TokenLayout
from conftest import TINY_VITS, make_tiny_vit


def reference_forward(model: torch.nn.Module, x: torch.Tensor):
    """Walk a timm VisionTransformer block by block in float64, computing each softmax(q k^T / sqrt(d)) by hand.

    Returns attention (B, L, H, T, T), magnitude (B, L, T) and the last block's output, all float64.
    """
    m = copy.deepcopy(model).double()
    h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x.double()))))
    maps, ratios = [], []
    for blk in m.blocks:
        a = blk.attn
        y = blk.norm1(h)
        B, N, _ = y.shape
        q, k, _v = a.qkv(y).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        maps.append(torch.softmax((q @ k.transpose(-2, -1)) / a.head_dim**0.5, dim=-1))
        update = blk.ls1(a(y))  # the module's own (fused) path: what the block adds to the residual
        ratios.append(update.norm(dim=-1) / h.norm(dim=-1))
        h = blk(h)
    return torch.stack(maps, 1), torch.stack(ratios, 1), h


@pytest.mark.parametrize("kind", sorted(TINY_VITS))
def test_capture_matches_float64_recomputation(kind):
    model = make_tiny_vit(kind)
    layout = TokenLayout.from_model(model)
    x = torch.randn(3, 3, *layout.img_size, generator=torch.Generator().manual_seed(1))
    with AttentionCapture(model) as capture, torch.no_grad():
        model.forward_features(x)
        captured = capture.pop()
    ref_attn, ref_mag, ref_tokens = reference_forward(model, x)
    L, H = len(model.blocks), model.blocks[0].attn.num_heads
    assert captured.attn.shape == (3, L, H, layout.num_tokens, layout.num_tokens)
    assert captured.attn.dtype == torch.float32
    torch.testing.assert_close(captured.attn.double(), ref_attn, rtol=0, atol=2e-6)
    torch.testing.assert_close(captured.magnitude.double(), ref_mag, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(captured.tokens.double(), ref_tokens, rtol=1e-5, atol=1e-5)
    # the maps are not trivially uniform: the comparison above has something to compare
    assert captured.attn.std() > 1e-3


def test_layouts_read_off_the_models():
    expected = {
        "plain": (True, 1, 0),
        "qk_norm_layer_scale": (True, 1, 0),
        "registers": (True, 5, 4),
        "no_cls_gap": (False, 0, 0),
        "registers_no_cls": (False, 4, 4),
    }
    for kind, (has_cls, prefix, registers) in expected.items():
        layout = TokenLayout.from_model(make_tiny_vit(kind))
        assert (layout.has_cls, layout.num_prefix_tokens, layout.num_registers) == (has_cls, prefix, registers), kind
        assert layout.num_tokens == prefix + layout.grid_size[0] * layout.grid_size[1]


def test_capture_leaves_model_as_it_found_it():
    model = make_tiny_vit("plain")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model.forward_features(x)
    fused_before = [b.attn.fused_attn for b in model.blocks]
    with AttentionCapture(model) as capture, torch.no_grad():
        assert not any(b.attn.fused_attn for b in model.blocks)
        during = model.forward_features(x)
        capture.pop()
    torch.testing.assert_close(during, before, rtol=1e-5, atol=1e-5)
    assert [b.attn.fused_attn for b in model.blocks] == fused_before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_eva_rope_model_captures_valid_maps():
    model = timm.create_model("eva02_tiny_patch14_224", img_size=28, depth=2, num_classes=0).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        plain = model.forward_features(x)
    with AttentionCapture(model) as capture, torch.no_grad():
        hooked = model.forward_features(x)
        captured = capture.pop()
    torch.testing.assert_close(hooked, plain, rtol=1e-4, atol=1e-5)
    assert captured.attn.shape == (2, 2, 3, 5, 5)
    torch.testing.assert_close(captured.attn.sum(-1), torch.ones(2, 2, 3, 5), rtol=0, atol=1e-5)


def test_missing_capture_is_an_error_not_an_empty_result():
    model = make_tiny_vit("plain")
    with AttentionCapture(model) as capture:
        with pytest.raises(AttnflowError, match="one attention capture per block"):
            capture.pop()
        # a block that goes back to fused attention mid-run delivers no map: refused, not silently partial
        model.blocks[1].attn.fused_attn = True
        with torch.no_grad():
            model.forward_features(torch.randn(1, 3, 32, 32))
        with pytest.raises(AttnflowError, match=r"blocks \[1\]"):
            capture.pop()


def test_two_forwards_without_pop_are_refused():
    model = make_tiny_vit("plain")
    with AttentionCapture(model) as capture, torch.no_grad():
        model.forward_features(torch.randn(1, 3, 32, 32))
        model.forward_features(torch.randn(1, 3, 32, 32))
        with pytest.raises(AttnflowError, match="one attention capture per block"):
            capture.pop()


def test_half_precision_softmax_is_refused():
    # CPU autocast computes the softmax in bfloat16: upcasting that afterwards would only pretend to be float32.
    model = make_tiny_vit("plain")
    with AttentionCapture(model) as capture, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.forward_features(torch.randn(2, 3, 32, 32))
        with pytest.raises(AttnflowError, match="bfloat16"):
            capture.pop()
