"""Checkpoint layouts, strict loading, refusal of code-running pickles, hub failures and family inference."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from attnflow import AttentionCapture, AttnflowError, build_model, load_model
from attnflow.models import infer_family, supported_pretrained

ARCH = "vit_tiny_patch16_224"
IMG = 32


def reference_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(ARCH, img_size=IMG, num_classes=0).eval()


def attention_of(model: torch.nn.Module) -> torch.Tensor:
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(7))
    with AttentionCapture(model) as capture, torch.no_grad():
        model.forward_features(x)
        return capture.pop().attn


@pytest.fixture(scope="module")
def weights():
    """Two different encoders' state dicts: the one every layout wraps, and a decoy (student, online net)."""
    return reference_model(0).state_dict(), reference_model(1).state_dict()


@pytest.fixture(scope="module")
def expected(weights):
    model = reference_model(0)
    return attention_of(model), model.state_dict()


def prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


def layouts(sd, decoy):
    extra_mae = {
        "mask_token": torch.zeros(1, 1, 192),
        "decoder_embed.weight": torch.randn(128, 192),
        "decoder_blocks.0.attn.qkv.weight": torch.randn(384, 128),
        "decoder_pred.weight": torch.randn(768, 128),
        "decoder_pos_embed": torch.randn(1, 5, 128),
    }
    return {
        "raw.pth": sd,
        "raw.safetensors": sd,
        "mae.pth": {"model": {**sd, **extra_mae}, "epoch": 799},
        "mocov3.pth.tar": {
            "epoch": 300,
            "arch": "vit_small",
            "state_dict": {
                **prefixed(sd, "module.base_encoder."),
                **prefixed(decoy, "module.momentum_encoder."),
                "module.base_encoder.head.0.weight": torch.randn(4096, 192),
                "module.predictor.0.weight": torch.randn(4096, 256),
            },
        },
        "dino.pth": {
            "teacher": {**prefixed(sd, "backbone."), "head.mlp.0.weight": torch.randn(2048, 192)},
            "student": {**prefixed(decoy, "module.backbone."), "module.head.mlp.0.weight": torch.randn(2048, 192)},
            "epoch": 100,
        },
        "encoder_prefix.bin": prefixed(sd, "encoder."),
        "ijepa.pth": {
            "encoder": prefixed(decoy, "module."),
            "target_encoder": prefixed(sd, "module."),
            "predictor": {"module.predictor_embed.weight": torch.randn(8, 192)},
            "epoch": 10,
        },
    }


def save(obj, path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)
    return path


@pytest.mark.parametrize("filename", ["raw.pth", "raw.safetensors", "mae.pth", "mocov3.pth.tar", "dino.pth", "encoder_prefix.bin", "ijepa.pth"])
def test_every_layout_gives_the_raw_state_dict_attention(tmp_path, weights, expected, filename):
    sd, decoy = weights
    path = save(layouts(sd, decoy)[filename], tmp_path / filename)
    loaded = build_model(ARCH, path, img_size=IMG)
    want_attn, want_sd = expected
    got_sd = loaded.model.state_dict()
    assert all(torch.equal(got_sd[k], want_sd[k]) for k in want_sd)
    assert torch.equal(attention_of(loaded.model), want_attn)
    assert loaded.checkpoint == str(path.resolve()) and len(loaded.checkpoint_sha256) == 64
    assert loaded.weights == "checkpoint" and not loaded.model.training


def test_checkpoint_key_selects_the_student(tmp_path, weights):
    sd, decoy = weights
    path = save(layouts(sd, decoy)["dino.pth"], tmp_path / "dino.pth")
    student = load_model(ARCH, path, img_size=IMG, checkpoint_key="student")
    assert torch.equal(attention_of(student), attention_of(reference_model(1)))
    with pytest.raises(AttnflowError, match="no key 'ema'.*student, teacher"):
        load_model(ARCH, path, img_size=IMG, checkpoint_key="ema")


def test_misshaped_checkpoint_names_the_keys(tmp_path):
    torch.manual_seed(0)
    small = timm.create_model("vit_small_patch16_224", img_size=IMG, num_classes=0).state_dict()
    path = save(small, tmp_path / "small.pth")
    with pytest.raises(AttnflowError) as err:
        load_model(ARCH, path, img_size=IMG)
    message = str(err.value)
    assert "mis-shaped" in message and "blocks.0.attn.qkv.weight [1152, 384] vs model [576, 192]" in message
    assert "\n" not in message


def test_missing_block_key_is_an_error_not_a_partial_load(tmp_path, weights):
    sd = dict(weights[0])
    del sd["blocks.3.attn.qkv.weight"]
    path = save(sd, tmp_path / "partial.pth")
    with pytest.raises(AttnflowError, match=r"missing blocks\.3\.attn\.qkv\.weight"):
        load_model(ARCH, path, img_size=IMG)


def test_extra_blocks_are_an_error(tmp_path, weights):
    sd = dict(weights[0])
    sd.update({k.replace("blocks.11.", "blocks.12."): v for k, v in sd.items() if k.startswith("blocks.11.")})
    path = save(sd, tmp_path / "deeper.pth")
    with pytest.raises(AttnflowError, match=r"unexpected blocks\.12\."):
        load_model(ARCH, path, img_size=IMG)


def test_missing_final_norm_only_warns(tmp_path, weights):
    sd = {k: v for k, v in weights[0].items() if not k.startswith("norm.")}
    path = save(sd, tmp_path / "nonorm.pth")
    with pytest.warns(UserWarning, match="norm.weight"):
        load_model(ARCH, path, img_size=IMG)


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_running_pickle_is_refused_and_nothing_runs(tmp_path, image_dir, run_cli):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": RunsCode(marker)}, path)
    with pytest.raises(AttnflowError, match="--trust-checkpoint"):
        load_model(ARCH, path, img_size=IMG)
    assert not marker.exists()
    result = run_cli("extract", ARCH, image_dir, "-o", tmp_path / "out.h5", "--checkpoint", path, "--img-size", IMG)
    assert result.exit_code == 1 and "--trust-checkpoint" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "out.h5").exists()


def test_truncated_checkpoint_is_a_clear_error(tmp_path, weights):
    full = save(weights[0], tmp_path / "full.pth").read_bytes()
    for suffix in (".pth", ".safetensors"):
        path = tmp_path / f"cut{suffix}"
        path.write_bytes(full[: len(full) // 2])
        with pytest.raises(AttnflowError, match="cannot read checkpoint"):
            load_model(ARCH, path, img_size=IMG)


def test_img_size_resamples_position_embeddings(tmp_path, weights):
    from timm.layers import resample_abs_pos_embed

    path = save(weights[0], tmp_path / "raw.pth")
    model = load_model(ARCH, path, img_size=64)
    assert model.patch_embed.grid_size == (4, 4)
    want = resample_abs_pos_embed(weights[0]["pos_embed"], (4, 4), old_size=(2, 2), num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), want)
    assert attention_of_size(model, 64).shape[-1] == 17


def attention_of_size(model, size):
    with AttentionCapture(model) as capture, torch.no_grad():
        model.forward_features(torch.randn(1, 3, size, size))
        return capture.pop().attn


def test_untagged_name_needs_weights_or_random_init():
    with pytest.raises(AttnflowError, match="--random-init"):
        build_model(ARCH)
    loaded = build_model(ARCH, random_init=True, img_size=IMG)
    assert loaded.weights == "random" and loaded.family == "untrained" and loaded.label == ARCH


def test_unknown_model_and_unsupported_architecture():
    with pytest.raises(AttnflowError, match="unknown timm model"):
        build_model("vit_nonexistent_patch3", random_init=True)
    with pytest.raises(AttnflowError, match="VisionTransformer and Eva"):
        build_model("resnet18", random_init=True)


def test_hub_failure_says_how_to_pass_a_local_file():
    # HF_HUB_OFFLINE=1 (conftest) makes the hub client fail at once, as a machine without network would.
    with pytest.raises(AttnflowError, match="could not fetch pretrained weights.*--checkpoint PATH"):
        build_model("vit_tiny_patch16_224.augreg_in21k")


def test_label_and_family_defaults_and_overrides(tmp_path, weights):
    path = save(weights[0], tmp_path / "mae_pretrain.pth")
    loaded = build_model(ARCH + ".augreg_in21k", path, img_size=IMG)
    assert loaded.label == "vit_tiny_patch16_224.augreg_in21k@mae_pretrain" and loaded.family == "supervised"
    loaded = build_model(ARCH, path, img_size=IMG, family="mim", label="my-mae")
    assert (loaded.family, loaded.label) == ("mim", "my-mae")
    with pytest.raises(AttnflowError, match="unknown family"):
        build_model(ARCH, path, family="contrastive")


@pytest.mark.parametrize(
    "name, family",
    [
        ("vit_base_patch16_224.mae", "mim"),
        ("vit_huge_patch14_gap_224.in1k_ijepa", "mim"),
        ("eva02_base_patch14_224.mim_in22k", "mim"),
        ("eva02_base_patch14_448.mim_in22k_ft_in1k", "supervised"),
        ("vit_small_patch16_224.dino", "jea"),
        ("vit_small_patch14_reg4_dinov2.lvd142m", "jea"),
        ("vit_small_patch16_dinov3.lvd1689m", "jea"),
        ("vit_base_patch16_224.augreg_in21k_ft_in1k", "supervised"),
        ("vit_base_patch16_clip_224.openai", "language-supervised"),  # issue 12: its own family now
        ("vit_base_patch16_224", "unknown"),
    ],
)
def test_family_inference(name, family):
    assert infer_family(name) == family


def test_models_listing(run_cli):
    names = dict(supported_pretrained())
    assert names["vit_base_patch16_224.mae"] == "mim" and names["vit_small_patch16_224.dino"] == "jea"
    assert not any(n.startswith(("resnet", "convnext", "hiera")) for n in names)
    result = run_cli("models", "--family", "jea", "--format", "json")
    assert result.exit_code == 0
    import json

    rows = json.loads(result.stdout)
    assert rows and all(r["family"] == "jea" for r in rows)
    assert {"model": "vit_small_patch14_reg4_dinov2.lvd142m", "family": "jea"} in rows
