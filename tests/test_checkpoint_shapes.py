"""A checkpoint whose tensors have another shape than the named model's is one line naming the file, the tensor and
both shapes, in every checkpoint layout attnflow reads; timm's own resampling of the position embeddings to another
--img-size keeps working."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from attnflow import AttnflowError, build_model
from conftest import one_line_error, write_images

ARCH = "test_vit"  # timm's own test ViT: 6 blocks of width 64, 0.3 M parameters
IMG = 32


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return timm.create_model(ARCH, img_size=IMG, num_classes=0).state_dict()


def prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


def wrapped(sd: dict, layout: str):
    """``sd`` in one of the layouts attnflow reads, with a decoy network where the layout has one."""
    decoy = {k: torch.zeros_like(v) for k, v in sd.items() if k in ("cls_token", "pos_embed")}
    return {
        "raw.pth": sd,
        "raw.safetensors": sd,
        "model.pth": {"model": {**sd, "mask_token": torch.zeros(1, 1, 64), "decoder_embed.weight": torch.randn(32, 64)}, "epoch": 1},
        "state_dict.pth": {"state_dict": sd, "epoch": 1},
        "mocov3.pth.tar": {"state_dict": {**prefixed(sd, "module.base_encoder."), **prefixed(decoy, "module.momentum_encoder.")}},
        "dino.pth": {"teacher": prefixed(sd, "backbone."), "student": prefixed(decoy, "module.backbone."), "epoch": 1},
        "ijepa.pth": {"encoder": prefixed(decoy, "module."), "target_encoder": prefixed(sd, "module."), "epoch": 1},
    }[layout]


LAYOUTS = ("raw.pth", "raw.safetensors", "model.pth", "state_dict.pth", "mocov3.pth.tar", "dino.pth", "ijepa.pth")


def save(obj, path: Path) -> Path:
    if path.name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)
    return path


# tensor -> a shape the model does not have: a wrong width, a patch kernel of another patch size, tensors of
# another rank (which timm's checkpoint filter itself cannot reshape), a position table of another width
BAD = {
    "blocks.0.attn.qkv.weight": (192, 48),
    "patch_embed.proj.weight": (64, 3, 8, 8),
    "pos_embed": (5, 64),
    "cls_token": (1, 1, 48),
}
SHAPE_OF_MODEL = {
    "blocks.0.attn.qkv.weight": "[192, 64]",
    "patch_embed.proj.weight": "[64, 3, 16, 16]",
    "pos_embed": "[1, 5, 64]",
    "cls_token": "[1, 1, 64]",
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_misshaped_tensor_is_named_with_both_shapes_in_every_layout(tmp_path, state_dict, layout):
    for key, shape in BAD.items():
        bad = {**state_dict, key: torch.randn(shape)}
        path = save(wrapped(bad, layout), tmp_path / f"{key}-{layout}")
        with pytest.raises(AttnflowError) as err:
            build_model(ARCH, path, img_size=IMG)
        message = str(err.value)
        assert "\n" not in message
        assert str(path) in message and f"{key} {list(shape)} vs model {SHAPE_OF_MODEL[key]}" in message, message


def test_the_file_shape_is_named_not_the_resampled_one(tmp_path, state_dict):
    # at another --img-size timm resamples pos_embed's tokens: a wrong width is still reported as stored
    path = save({**state_dict, "pos_embed": torch.randn(1, 5, 48)}, tmp_path / "narrow.pth")
    with pytest.raises(AttnflowError, match=r"pos_embed \[1, 5, 48\] vs model \[1, 17, 64\]"):
        build_model(ARCH, path, img_size=64)


@pytest.mark.parametrize("layout", ("raw.safetensors", "dino.pth", "ijepa.pth"))
def test_img_size_still_resamples_the_position_embeddings(tmp_path, state_dict, layout):
    from timm.layers import resample_abs_pos_embed

    path = save(wrapped(state_dict, layout), tmp_path / layout)
    model = build_model(ARCH, path, img_size=64).model
    assert model.patch_embed.grid_size == (4, 4)
    want = resample_abs_pos_embed(state_dict["pos_embed"], (4, 4), old_size=(2, 2), num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), want)
    # and a checkpoint trained at another resolution (a 3 x 3 grid) comes to the model's
    path = save({**state_dict, "pos_embed": torch.randn(1, 10, 64)}, tmp_path / "at48.pth")
    assert build_model(ARCH, path, img_size=IMG).model.pos_embed.shape == (1, 5, 64)


def test_the_cli_says_it_in_one_line(tmp_path, state_dict, run_cli):
    images = tmp_path / "images"
    write_images(images, 2, size=(32, 32))
    for layout in ("mocov3.pth.tar", "raw.safetensors"):
        path = save(wrapped({**state_dict, "patch_embed.proj.weight": torch.randn(64, 700)}, layout), tmp_path / layout)
        result = run_cli("extract", ARCH, images, "-o", tmp_path / "out.h5", "--checkpoint", path, "--img-size", IMG, "--quiet")
        one_line_error(result, str(path), "patch_embed.proj.weight [64, 700] vs model [64, 3, 16, 16]")
        assert not (tmp_path / "out.h5").exists()
