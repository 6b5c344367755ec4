"""Captured attention and magnitudes against an independent float64 recomputation from q and k."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

from attnflow import AttentionCapture, AttnflowError, TokenLayout
from attnflow.capture import Captured
from conftest import TINY_VITS, make_tiny_vit


def softmax_attention(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) over keys: q, k (B, H, T, d) -> (B, H, T, T)."""
    return torch.softmax((q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5 + bias, dim=-1)


def vit_embed(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A timm VisionTransformer's tokens entering block 0, (B, T, D)."""
    return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))


def timm_attention_map(a: torch.nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The map of timm's ``Attention`` module ``a`` on its input y (B, T, D), by hand: (B, H, T, T)."""
    B, N, _ = y.shape
    q, k, _v = a.qkv(y).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return softmax_attention(a.q_norm(q), a.k_norm(k))


def vit_block(m: torch.nn.Module, blk: torch.nn.Module, h: torch.Tensor):
    """A timm ``Block``: (attention (B, H, T, T) computed by hand, attention-branch update (B, T, D), block output)."""
    y = blk.norm1(h)
    update = blk.ls1(blk.attn(y))  # the module's own (fused) path: what the block adds to the residual
    return timm_attention_map(blk.attn, y), update, blk(h)


def reference_forward(model: torch.nn.Module, x: torch.Tensor, embed=vit_embed, block=vit_block):
    """Walk a model block by block in float64, computing each softmax(q k^T / sqrt(d) + bias) by hand.

    ``embed(model, images)`` gives the tokens entering block 0; ``block(model, block, tokens)`` gives the
    block's attention, its attention-branch update and its output (timm VisionTransformer by default).
    Returns attention (B, L, H, T, T), magnitude (B, L, T) and the last block's output, all float64.
    """
    m = copy.deepcopy(model).double()
    h = embed(m, x.double())
    maps, ratios = [], []
    for blk in m.blocks:
        attn, update, out = block(m, blk, h)
        maps.append(attn)
        ratios.append(update.norm(dim=-1) / h.norm(dim=-1))
        h = out
    return torch.stack(maps, 1), torch.stack(ratios, 1), h


def assert_capture_matches_reference(model: torch.nn.Module, num_heads: int, embed=vit_embed, block=vit_block) -> None:
    """Capture three random images and compare with :func:`reference_forward` (same ``embed`` and ``block``)."""
    layout = TokenLayout.from_model(model)
    x = torch.randn(3, 3, *layout.img_size, generator=torch.Generator().manual_seed(1))
    with AttentionCapture(model) as capture, torch.no_grad():
        model.forward_features(x)
        captured = capture.pop()
    ref_attn, ref_mag, ref_tokens = reference_forward(model, x, embed, block)
    L, H = len(model.blocks), num_heads
    assert captured.attn.shape == (3, L, H, layout.num_tokens, layout.num_tokens)
    assert captured.attn.dtype == torch.float32
    torch.testing.assert_close(captured.attn.double(), ref_attn, rtol=0, atol=2e-6)
    torch.testing.assert_close(captured.magnitude.double(), ref_mag, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(captured.tokens.double(), ref_tokens, rtol=1e-5, atol=1e-5)
    # the maps are not trivially uniform: the comparison above has something to compare
    assert captured.attn.std() > 1e-3


@pytest.mark.parametrize("kind", sorted(TINY_VITS))
def test_capture_matches_float64_recomputation(kind):
    model = make_tiny_vit(kind)
    assert_capture_matches_reference(model, model.blocks[0].attn.num_heads)


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


def capture_unchanged_forward(model: torch.nn.Module, x: torch.Tensor) -> Captured:
    """Capture one forward of ``x`` (B, C, H, W), checking that the hooked model computes what it did unhooked."""
    with torch.no_grad():
        plain = model.forward_features(x)
    with AttentionCapture(model) as capture, torch.no_grad():
        hooked = model.forward_features(x)
        captured = capture.pop()
    torch.testing.assert_close(hooked, plain, rtol=1e-4, atol=1e-5)
    return captured


def test_eva_rope_model_captures_valid_maps():
    model = timm.create_model("eva02_tiny_patch14_224", img_size=28, depth=2, num_classes=0).eval()
    x = torch.randn(2, 3, 28, 28)
    captured = capture_unchanged_forward(model, x)
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
