"""A checkpoint's family comes from its own layout or the pretrained tag written, never from the architecture's
name: an MAE checkpoint in a DINOv2-named architecture is MIM, a bare state dict is unknown with a note."""
from __future__ import annotations

import warnings

import pytest
import timm
import torch

from attnflow import build_model
from attnflow.errors import AttnflowNote
from attnflow.families import checkpoint_family, infer_family
from test_models import ARCH, IMG, layouts, save

DINOV2_ARCH = "vit_small_patch14_dinov2"  # "dinov2" in the architecture's name: JEA when timm's weights are used


@pytest.fixture(scope="module")
def tiny_weights():
    torch.manual_seed(0)
    sd = timm.create_model(ARCH, img_size=IMG, num_classes=0).state_dict()
    torch.manual_seed(1)
    return sd, timm.create_model(ARCH, img_size=IMG, num_classes=0).state_dict()


@pytest.mark.parametrize("filename, family", [
    ("raw.pth", None), ("raw.safetensors", None), ("encoder_prefix.bin", None),
    ("mae.pth", "mim"), ("ijepa.pth", "mim"), ("mocov3.pth.tar", "jea"), ("dino.pth", "jea"),
])
def test_layout_identifies_the_objective(tmp_path, tiny_weights, filename, family):
    path = save(layouts(*tiny_weights)[filename], tmp_path / filename)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = build_model(ARCH, path, img_size=IMG)
    notes = [str(w.message) for w in caught if issubclass(w.category, AttnflowNote)]
    assert loaded.family == (family or "unknown")
    assert bool(notes) == (family is None)  # an unknown family always says how to set it
    if family is None:
        assert "--family" in notes[0] and path.name in notes[0]


def test_beit_and_simmim_heads_are_mim():
    assert checkpoint_family({"model": {"lm_head.weight": 0, "blocks.0.attn.qkv.weight": 0}})[0] == "mim"
    assert checkpoint_family({"model": {"encoder.blocks.0.attn.qkv.weight": 0, "decoder.0.weight": 0}})[0] == "mim"
    assert checkpoint_family({"blocks.0.attn.qkv.weight": 0}) is None


@pytest.fixture(scope="module")
def dinov2_sized(tmp_path_factory):
    """A DINOv2-named architecture's encoder weights, once as a bare state dict and once inside an MAE layout."""
    torch.manual_seed(0)
    sd = timm.create_model(DINOV2_ARCH, img_size=28, num_classes=0).state_dict()
    folder = tmp_path_factory.mktemp("dinov2")
    bare = save(sd, folder / "bare.pth")
    mae = save({"model": {**sd, "decoder_embed.weight": torch.zeros(2, 384), "mask_token": torch.zeros(1, 1, 384)}},
               folder / "mae_in_dinov2.pth")
    return bare, mae


def test_architecture_name_never_decides_for_a_checkpoint(dinov2_sized):
    bare, mae = dinov2_sized
    assert infer_family(DINOV2_ARCH) == "jea"  # timm's own DINOv2 weights
    assert infer_family(DINOV2_ARCH, architecture=False) == "unknown"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert build_model(DINOV2_ARCH, mae, img_size=28).family == "mim"
        assert build_model(DINOV2_ARCH, bare, img_size=28).family == "unknown"
        assert build_model(DINOV2_ARCH, bare, img_size=28, family="jea").family == "jea"
        # a tag the user writes still names the weights: the tag's words count, the architecture's do not
        assert build_model(ARCH + ".augreg_in21k", save(timm.create_model(ARCH, img_size=IMG, num_classes=0).state_dict(),
                                                         bare.parent / "tiny.pth"), img_size=IMG).family == "supervised"


def test_cli_says_unknown_and_asks_for_family(run_cli, image_dir, tmp_path, dinov2_sized):
    bare, _ = dinov2_sized
    result = run_cli("extract", DINOV2_ARCH, image_dir, "-o", tmp_path / "c.h5", "--checkpoint", bare, "--img-size", "28",
                     "--store", "none", "--workers", "0", "--limit", "2")
    assert result.exit_code == 0, result.stderr
    assert "note: the family of bare.pth is unknown" in result.stderr and "--family" in result.stderr
    from attnflow import open_cache

    with open_cache(tmp_path / "c.h5") as cache:
        assert cache.attrs["family"] == "unknown"
