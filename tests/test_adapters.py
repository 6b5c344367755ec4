"""Model adapters: BEiT/BEiT-v2 and parallel blocks against float64 recomputations, every listed architecture
class captured at a small size, refusals, and BEiT's official pre-training checkpoint layouts."""
from __future__ import annotations

import warnings

import h5py
import numpy as np
import pytest
import timm
import torch
from timm.layers import Attention, AttentionRope
from timm.models import beit, eva, get_arch_name, register_model, vision_transformer
from timm.models.deit import VisionTransformerDistilled

from attnflow import AttentionCapture, AttnflowError, TokenLayout, load_model
from attnflow.architectures import Signature, adapter_for, timm_signature
from attnflow.images import list_images
from attnflow.models import load_state_dict_strict, supported_pretrained
from conftest import make_tiny
from test_capture import (
    assert_capture_matches_reference, capture_unchanged_forward, softmax_attention, timm_attention_map, vit_embed,
)
from conftest import direct_capture

SMALL = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)

# BEiT (v1 layer scale 0.1) and BEiT-v2 (1e-5) with a relative position bias table per block, as timm builds
# them; BEiT's pre-training layout with one table shared by all blocks (and absolute position embeddings);
# and a model with both, whose biases add up.
BEITS = {
    "beit": ("beit_base_patch16_224", SMALL),
    "beitv2": ("beitv2_base_patch16_224", SMALL),
    "shared_bias": ("beit_base_patch16_224", dict(SMALL, use_rel_pos_bias=False, use_shared_rel_pos_bias=True, use_abs_pos_emb=True)),
    "shared_and_own_bias": ("beitv2_base_patch16_224", dict(SMALL, use_shared_rel_pos_bias=True)),
}


def relative_position_bias(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """BEiT's relative position bias (H, T, T) from a table (num_relative_distance, H), T = 1 + gh * gw.

    Written from the paper's definition: patch i attends to patch j with the entry of their offset
    (dy, dx), rows (dy + gh - 1) * (2 gw - 1) + dx + gw - 1; the table's last three rows are cls -> patch,
    patch -> cls and cls -> cls.
    """
    gh, gw = grid
    n = table.shape[0]
    assert n == (2 * gh - 1) * (2 * gw - 1) + 3
    cells = [(r, c) for r in range(gh) for c in range(gw)]
    index = torch.empty(len(cells) + 1, len(cells) + 1, dtype=torch.long)
    for i, (ri, ci) in enumerate(cells, start=1):
        for j, (rj, cj) in enumerate(cells, start=1):
            index[i, j] = (ri - rj + gh - 1) * (2 * gw - 1) + (ci - cj + gw - 1)
    index[0, :], index[:, 0], index[0, 0] = n - 3, n - 2, n - 1
    return table[index].permute(2, 0, 1)


def beit_embed(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = m.patch_embed(x)
    h = torch.cat([m.cls_token.expand(len(h), -1, -1), h], dim=1)
    return h if m.pos_embed is None else h + m.pos_embed


def beit_block(m: torch.nn.Module, blk: torch.nn.Module, h: torch.Tensor):
    """BEiT's block by hand: q and k with their biases (k has none), softmax with the relative position biases,
    the update gamma_1 * proj(attn v)."""
    a = blk.attn
    y = blk.norm1(h)
    B, N, D = y.shape
    qkv = y @ a.qkv.weight.T
    if a.q_bias is not None:
        qkv = qkv + torch.cat([a.q_bias, torch.zeros_like(a.q_bias), a.v_bias])
    q, k, v = qkv.reshape(B, N, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    bias = torch.zeros(())
    if a.relative_position_bias_table is not None:
        bias = bias + relative_position_bias(a.relative_position_bias_table, m.patch_embed.grid_size)
    shared = None
    if m.rel_pos_bias is not None:
        bias = bias + relative_position_bias(m.rel_pos_bias.relative_position_bias_table, m.patch_embed.grid_size)
        shared = m.rel_pos_bias()
    attn = softmax_attention(q, k, bias)
    update = a.proj((attn @ v).transpose(1, 2).reshape(B, N, D))
    if blk.gamma_1 is not None:
        update = blk.gamma_1 * update
    return attn, update, blk(h, shared_rel_pos_bias=shared)


def parallel_block(m: torch.nn.Module, blk: torch.nn.Module, h: torch.Tensor):
    """timm's ParallelScalingBlock by hand: attention and MLP read one projection; the attention share of
    the update is ls(attn_out_proj(attn v))."""
    B, N, D = h.shape
    _mlp, q, k, v = torch.split(blk.in_proj(blk.in_norm(h)), blk.in_split, dim=-1)
    q, k, v = (t.view(B, N, blk.num_heads, blk.head_dim).transpose(1, 2) for t in (q, k, v))
    attn = softmax_attention(blk.q_norm(q), blk.k_norm(k))
    update = blk.ls(blk.attn_out_proj((attn @ v).transpose(1, 2).reshape(B, N, D)))
    return attn, update, blk(h)


def respost_block(m: torch.nn.Module, blk: torch.nn.Module, h: torch.Tensor):
    """timm's ResPostBlock: attention on the raw residual, update norm1(attn(x))."""
    return timm_attention_map(blk.attn, h), blk.norm1(blk.attn(h)), blk(h)


@pytest.mark.parametrize("kind", sorted(BEITS))
def test_beit_capture_matches_float64_recomputation(kind):
    arch, kwargs = BEITS[kind]
    assert_capture_matches_reference(make_tiny(arch, **kwargs), kwargs["num_heads"], beit_embed, beit_block)


@pytest.mark.parametrize("arch, block", [("vit_pwee_patch16_reg1_gap_256", parallel_block), ("vit_base_patch16_rpn_224", respost_block)])
def test_parallel_and_post_norm_blocks_match_float64_recomputation(arch, block):
    assert_capture_matches_reference(make_tiny(arch, **SMALL), SMALL["num_heads"], vit_embed, block)


# One small build per (model, block, attention) class combination attnflow captures, with the layout
# (has cls, prefix tokens) its constructor asks for.
SMALL_BUILDS = {
    Signature(vision_transformer.VisionTransformer, vision_transformer.Block, Attention): ("vit_tiny_patch16_224", SMALL, (True, 1)),
    Signature(vision_transformer.VisionTransformer, vision_transformer.ResPostBlock, Attention): ("vit_base_patch16_rpn_224", SMALL, (False, 0)),
    Signature(vision_transformer.VisionTransformer, vision_transformer.ParallelScalingBlock, vision_transformer.ParallelScalingBlock): (
        "vit_pwee_patch16_reg1_gap_256", SMALL, (False, 1)),
    Signature(VisionTransformerDistilled, vision_transformer.Block, Attention): ("deit_tiny_distilled_patch16_224", SMALL, (True, 2)),
    Signature(eva.Eva, eva.EvaBlock, eva.EvaAttention): ("vit_small_patch16_dinov3", SMALL, (True, 5)),
    Signature(eva.Eva, eva.EvaBlockPostNorm, eva.EvaAttention): ("eva02_enormous_patch14_clip_224", dict(SMALL, patch_size=14, img_size=28), (True, 1)),
    Signature(eva.Eva, eva.EvaBlock, AttentionRope): ("vit_base_patch16_rope_224", SMALL, (True, 1)),
    Signature(beit.Beit, beit.Block, beit.Attention): ("beitv2_base_patch16_224", SMALL, (True, 1)),
}


def test_every_listed_architecture_class_has_a_small_build():
    listed = {timm_signature(get_arch_name(name)) for name, _ in supported_pretrained()}
    missing = listed - set(SMALL_BUILDS)
    assert not missing, f"classes `attnflow models` lists without a small build here: {missing}"


@pytest.mark.parametrize("signature", list(SMALL_BUILDS), ids=lambda s: "-".join(t.__name__ for t in s))
def test_every_architecture_class_captures_at_small_size(signature):
    arch, kwargs, (has_cls, prefix) = SMALL_BUILDS[signature]
    model = make_tiny(arch, **kwargs)
    assert adapter_for(model).signature == signature
    layout = TokenLayout.from_model(model)
    side = kwargs["img_size"] // kwargs["patch_size"]
    assert (layout.has_cls, layout.num_prefix_tokens, layout.grid_size) == (has_cls, prefix, (side, side))
    T, L, H = prefix + side * side, kwargs["depth"], kwargs["num_heads"]
    x = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"], generator=torch.Generator().manual_seed(0))
    captured = capture_unchanged_forward(model, x)
    assert captured.attn.shape == (2, L, H, T, T) and captured.magnitude.shape == (2, L, T)
    assert captured.tokens.shape == (2, T, kwargs["embed_dim"])
    torch.testing.assert_close(captured.attn.sum(-1), torch.ones(2, L, H, T), rtol=0, atol=1e-5)
    assert captured.attn.std() > 1e-3 and bool(torch.isfinite(captured.magnitude).all()) and captured.magnitude.min() > 0


@pytest.mark.parametrize(
    "arch, kwargs, named",
    [
        ("naflexvit_base_patch16_gap", dict(depth=1), "NaFlexVit"),
        ("vit_dwee_patch16_reg1_gap_256", dict(SMALL, depth=1), "Block with DiffAttention"),
        ("vit_dpwee_patch16_reg1_gap_256", dict(SMALL, depth=1), "DiffParallelScalingBlock"),
        ("vit_small_r26_s32_224", dict(depth=1, img_size=64), "HybridEmbed"),
        ("vit_relpos_small_patch16_224", dict(SMALL, depth=1), "VisionTransformerRelPos"),
    ],
)
def test_unsupported_architectures_are_refused_in_one_line(arch, kwargs, named):
    with torch.device("meta"):  # refused before any weight is read
        model = timm.create_model(arch, num_classes=0, **kwargs)
    for attempt in (lambda: AttentionCapture(model), lambda: TokenLayout.from_model(model)):
        with pytest.raises(AttnflowError) as err:
            attempt()
        assert named in str(err.value) and "Beit, VisionTransformer and Eva" in str(err.value)
        assert "\n" not in str(err.value)
    assert arch not in {get_arch_name(n) for n, _ in supported_pretrained()}


def test_listing_follows_the_adapters():
    names = dict(supported_pretrained())
    assert "beitv2_base_patch16_224.in1k_ft_in1k" in names and "deit_tiny_distilled_patch16_224.fb_in1k" in names
    assert "eva02_base_patch14_224.mim_in22k" in names and "vit_base_patch16_rope_224.naver_in1k" in names
    for arch in {get_arch_name(n) for n in names}:
        assert not arch.startswith(("naflexvit", "vit_dwee", "vit_dpwee", "vit_base_r50", "vit_relpos", "samvit"))


# --- BEiT's official pre-training checkpoints ---------------------------------------------------------------

TINY_BEITV2 = "beitv2_tiny_patch8_attnflow_test"


@register_model
def beitv2_tiny_patch8_attnflow_test(pretrained: bool = False, **kwargs) -> beit.Beit:
    """beitv2_base_patch16_224 (timm's Beit: a relative position bias table per block, layer scale, no absolute
    position embedding, its data config) at test size, so that the CLI can name it."""
    small = {k: v for k, v in SMALL.items() if k != "img_size"}
    return beit.beitv2_base_patch16_224(pretrained=pretrained, **{**small, **kwargs})


def beit_reference(img_size: int = 32, seed: int = 0, **kwargs) -> torch.nn.Module:
    return make_tiny(TINY_BEITV2, seed, img_size=img_size, **kwargs)


def official_checkpoint(model: torch.nn.Module, shared: bool) -> dict:
    """``model``'s weights as BEiT / BEiT-v2's pre-training code saves them: ``{'model': state_dict}`` with the
    masked-image-modelling head, the mask token, the final norm (no fc_norm), BEiT-v2's two cls pre-training
    blocks and its head, every relative position index buffer, and the bias tables per block or, ``shared``,
    once at the top level (the model's blocks must then hold one table in common)."""
    sd = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("fc_norm.")}
    D, depth = model.embed_dim, len(model.blocks)
    index = beit.gen_relative_position_index(model.patch_embed.grid_size)
    if shared:
        tables = [sd.pop(f"blocks.{i}.attn.relative_position_bias_table") for i in range(depth)]
        assert all(torch.equal(t, tables[0]) for t in tables)
        sd["rel_pos_bias.relative_position_bias_table"] = tables[0]
        sd["rel_pos_bias.relative_position_index"] = index
    else:
        sd.update({f"blocks.{i}.attn.relative_position_index": index for i in range(depth)})
    block_keys = {k.split(".", 2)[2]: v for k, v in sd.items() if k.startswith("blocks.0.")}
    sd.update({f"cls_pt_layers.{j}.{k}": torch.randn_like(v) if v.is_floating_point() else v for j in range(2) for k, v in block_keys.items()})
    sd.update({
        "mask_token": torch.randn(1, 1, D), "norm.weight": torch.rand(D) + 0.5, "norm.bias": torch.randn(D),
        "lm_head.weight": torch.randn(64, D), "lm_head.bias": torch.randn(64),
        "cls_pt_norm.weight": torch.ones(D), "cls_pt_norm.bias": torch.zeros(D),
        "cls_pt_lm_head.weight": torch.randn(64, D), "cls_pt_lm_head.bias": torch.randn(64),
    })
    return {"model": sd}


def one_shared_table(model: torch.nn.Module) -> torch.nn.Module:
    """Give every block the first block's table, as a model pre-trained with a shared table is."""
    with torch.no_grad():
        for block in model.blocks[1:]:
            block.attn.relative_position_bias_table.copy_(model.blocks[0].attn.relative_position_bias_table)
    return model


def attention_of(model: torch.nn.Module, img_size: int = 32) -> torch.Tensor:
    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(7))
    with AttentionCapture(model) as capture, torch.no_grad():
        model.forward_features(x)
        return capture.pop().attn


def loaded_quietly_about_pretraining_keys(path, **kwargs) -> torch.nn.Module:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(TINY_BEITV2, path, **kwargs)
    said = " ".join(str(w.message) for w in caught)
    for dropped in ("lm_head", "cls_pt", "mask_token", "rel_pos_bias", "relative_position_index"):
        assert dropped not in said, said
    return model


@pytest.mark.parametrize("shared", [True, False], ids=["shared_bias", "bias_per_block"])
def test_official_pretraining_checkpoint_loads(tmp_path, shared):
    reference = beit_reference()
    if shared:
        one_shared_table(reference)
    path = tmp_path / "beitv2_base_patch16_224_pt1k.pth"
    torch.save(official_checkpoint(reference, shared), path)
    model = loaded_quietly_about_pretraining_keys(path, img_size=32)
    want = reference.state_dict()
    got = model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want if not k.startswith("fc_norm."))
    assert torch.equal(attention_of(model), attention_of(reference))


def test_shared_and_own_tables_add_up(tmp_path):
    # a checkpoint of a model with both biases, loaded into timm's per-block layout, computes the same maps
    both = make_tiny("beitv2_base_patch16_224", **dict(SMALL, use_shared_rel_pos_bias=True))
    path = tmp_path / "both.pth"
    torch.save({"model": both.state_dict()}, path)
    model = load_model(TINY_BEITV2, path, img_size=32)
    torch.testing.assert_close(attention_of(model), attention_of(both), rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")  # inside timm's table resampling
def test_shared_table_is_resampled_to_the_models_grid(tmp_path):
    from timm.layers import resize_rel_pos_bias_table

    reference = one_shared_table(beit_reference(img_size=64))  # an 8 x 8 grid: 15 x 15 + 3 table rows
    path = tmp_path / "pt.pth"
    torch.save(official_checkpoint(reference, shared=True), path)
    model = loaded_quietly_about_pretraining_keys(path, img_size=32)  # a 4 x 4 grid: 7 x 7 + 3 rows
    want = resize_rel_pos_bias_table(
        reference.blocks[0].attn.relative_position_bias_table.detach(), new_window_size=(4, 4), new_bias_shape=(52, 3)
    )
    for block in model.blocks:
        torch.testing.assert_close(block.attn.relative_position_bias_table.detach(), want)
    assert attention_of(model).shape[-1] == 17


def test_per_block_tables_do_not_fit_a_shared_bias_model():
    per_block = official_checkpoint(beit_reference(), shared=False)["model"]
    shared_model = make_tiny("beitv2_base_patch16_224", **dict(SMALL, use_rel_pos_bias=False, use_shared_rel_pos_bias=True))
    with pytest.raises(AttnflowError, match=r"per_block.pth does not fit Beit: .*per block \(blocks\.0\.attn\.relative_position_bias_table\)"):
        load_state_dict_strict(shared_model, per_block, source="per_block.pth")


def test_extract_loads_the_official_layout(tmp_path, image_dir, run_cli):
    reference = one_shared_table(beit_reference())
    path = tmp_path / "beitv2_base_patch16_224_pt1k.pth"
    torch.save(official_checkpoint(reference, shared=True), path)
    out = tmp_path / "beitv2.h5"
    result = run_cli("extract", TINY_BEITV2, image_dir, "-o", out, "--checkpoint", path, "--img-size", 32,
                     "--dtype", "float32", "--workers", 0, "--quiet")
    assert result.exit_code == 0, result.stderr
    with h5py.File(out, "r") as f:
        attn = f["attn"][()]
    direct = direct_capture(reference, list_images([str(image_dir)]))
    np.testing.assert_allclose(attn, np.concatenate([c.attn.numpy() for c in direct]), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_extract_loads_a_full_size_beitv2_pretraining_checkpoint(tmp_path, image_dir, run_cli):
    # The issue's own command, at full size: beitv2_base_patch16_224's 86 M weights in the official layout at
    # 224 px (shared 27 x 27 + 3 row table), extracted at 32 px.
    torch.manual_seed(0)
    reference = timm.create_model("beitv2_base_patch16_224", num_classes=0).eval()
    with torch.no_grad():
        table = torch.randn_like(reference.blocks[0].attn.relative_position_bias_table)
        for block in reference.blocks:
            block.attn.relative_position_bias_table.copy_(table)
    path = tmp_path / "beitv2_base_patch16_224_pt1k.pth"
    torch.save(official_checkpoint(reference, shared=True), path)
    del reference
    out = tmp_path / "beitv2.h5"
    result = run_cli("extract", "beitv2_base_patch16_224", image_dir, "-o", out, "--checkpoint", path,
                     "--img-size", 32, "--workers", 0, "--quiet")
    assert result.exit_code == 0, result.stderr
    with h5py.File(out, "r") as f:
        assert f["attn"].shape == (10, 12, 12, 5, 5)
