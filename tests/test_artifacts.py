"""High-norm artifact tokens (Darcet et al., ICLR 2024): block output token norms in every cache, the artifact
rule and its metrics, and the magnitude taken before the layer scale (the Beyond [cls] code's)."""
from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from attnflow.store.read import open_cache, open_metrics
from attnflow.capture import AttentionCapture
from attnflow.errors import AttnflowError, AttnflowNote, OptionError
from attnflow.extract import extract
from attnflow.layout import TokenLayout
from attnflow.measure import compute_metrics
from attnflow.metrics import ArtifactRule, artifact_mask, artifact_metrics, batch_metrics
from attnflow.options import ArtifactOptions, ExtractOptions, MetricsOptions, StoreOptions
from conftest import TINY_VITS, make_tiny_vit, write_images, tiny

FIXTURES = Path(__file__).parent / "fixtures"
ARTIFACT_METRICS = {"artifact_frac", "cls_artifact_mass", "artifact_fg_overlap"}





def images_for(model: torch.nn.Module, n: int = 3, seed: int = 0) -> torch.Tensor:
    size = TokenLayout.from_model(model).img_size
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def capture(model: torch.nn.Module, x: torch.Tensor, **kwargs):
    with AttentionCapture(model, **kwargs) as cap, torch.no_grad():
        model.forward_features(x)
        return cap.pop()


def block_inputs_float64(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream entering each block and leaving the last, recomputed in float64 by running the
    model's own modules one after another (timm's forward_features, written out)."""
    m = copy.deepcopy(model).double()
    with torch.no_grad():
        h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x.double()))))
        stream = [h]
        for block in m.blocks:
            h = block(h)
            stream.append(h)
    return stream


# ---------------------------------------------------------------- token norms


@pytest.mark.parametrize("kind", sorted(TINY_VITS))
def test_token_norm_is_the_norm_of_every_block_output(kind):
    model = make_tiny_vit(kind)
    x = images_for(model)
    got = capture(model, x).token_norm
    stream = block_inputs_float64(model, x)
    expected = torch.stack([h.norm(dim=-1) for h in stream[1:]], dim=1)  # (B, L, T)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("kind", sorted(TINY_VITS))
def test_no_artifacts_in_tiny_random_models_at_the_default_factor(kind):
    model = make_tiny_vit(kind)
    layout = TokenLayout.from_model(model)
    token_norm = capture(model, images_for(model, n=8)).token_norm
    assert float(artifact_metrics(token_norm, layout)["artifact_frac"].abs().max()) == 0.0


def test_injected_high_norm_tokens_are_found_exactly():
    model = make_tiny_vit("plain")
    layout = TokenLayout.from_model(model)
    p, P = layout.num_prefix_tokens, layout.num_patches
    injected = {0: [3, 10], 1: [5], 2: []}  # image -> patches whose block 0 output is scaled by 20

    def inject(module, inputs, output):
        output = output.clone()
        for image, patches in injected.items():
            for j in patches:
                output[image, p + j] *= 20.0
        return output

    handle = model.blocks[0].register_forward_hook(inject)  # before capture's hooks: they see its result
    try:
        x = images_for(model)
        captured = capture(model, x)
    finally:
        handle.remove()
    values, _ = batch_metrics(layout, captured.magnitude, attn=captured.attn, token_norm=captured.token_norm)
    found = artifact_mask(captured.token_norm, layout)[:, 0]  # (B, P) at block 0
    for image, patches in injected.items():
        assert sorted(np.flatnonzero(found[image].numpy()).tolist()) == patches
        assert float(values["artifact_frac"][image, 0]) == len(patches) / P
    # the clean model: none
    clean = capture(model, x).token_norm
    assert not bool(artifact_mask(clean, layout).any())


# ---------------------------------------------------------------- the rule and the metrics by hand


def test_artifact_metrics_by_hand():
    layout = TokenLayout(has_cls=True, num_prefix_tokens=1, grid_size=(2, 2), patch_size=(8, 8))
    # image 0: layer 0 patches [1, 1, 1, 10]: median 1, threshold 4, patch 3 is the artifact; layer 1 none;
    # layer 2 [1, 2, 3, 9]: median (2 + 3) / 2 = 2.5, threshold 10, none at factor 4 but patch 3 at factor 3
    token_norm = torch.tensor([[[7.0, 1, 1, 1, 10], [7.0, 1, 1, 1, 1], [7.0, 1, 2, 3, 9]]])
    cls = torch.tensor([0.2, 0.1, 0.2, 0.1, 0.4])  # patch mass 0.8: Q_0 = [0.125, 0.25, 0.125, 0.5]
    cls_rows = cls.expand(1, 3, 2, 5)  # (B, L, H, T)
    fg = torch.tensor([[0.0, 0.0, 1.0, 0.5]])
    out = artifact_metrics(token_norm, layout, ArtifactRule(4.0), cls_rows=cls_rows, fg=fg)
    assert out["artifact_frac"].tolist() == [[0.25, 0.0, 0.0]]
    assert out["cls_artifact_mass"][0, 0].tolist() == [0.5, 0.5] and out["cls_artifact_mass"][0, 1:].abs().max() == 0
    assert out["artifact_fg_overlap"][0, 0] == 0.5 and bool(out["artifact_fg_overlap"][0, 1:].isnan().all())
    three = artifact_metrics(token_norm, layout, ArtifactRule(3.0), cls_rows=cls_rows, fg=fg)
    assert three["artifact_frac"][0, 2] == 0.25 and three["cls_artifact_mass"][0, 2, 0] == 0.5
    absolute = artifact_metrics(token_norm, layout, ArtifactRule(factor=None, norm=2.5), cls_rows=cls_rows)
    assert absolute["artifact_frac"].tolist() == [[0.25, 0.0, 0.5]]  # 10; none; 3 and 9
    assert absolute["cls_artifact_mass"][0, 2, 0] == 0.125 + 0.5
    no_cls = TokenLayout(has_cls=False, num_prefix_tokens=0, grid_size=(2, 2), patch_size=(8, 8))
    out = artifact_metrics(token_norm[..., 1:], no_cls, cls_rows=cls_rows[..., 1:])
    assert bool(out["cls_artifact_mass"].isnan().all()) and out["artifact_frac"].tolist() == [[0.25, 0.0, 0.0]]


def test_options_refuse_what_cannot_work(run_cli, tmp_path):
    assert ArtifactOptions().rule == ArtifactRule(4.0) and ArtifactOptions(artifact_norm=3).rule == ArtifactRule(None, 3.0)
    for kwargs, flag in (
        ({"artifact_factor": 2.0, "artifact_norm": 3.0}, "artifact_norm"),
        ({"artifact_factor": 1.0}, "artifact_factor"),
        ({"artifact_factor": math.nan}, "artifact_factor"),
        ({"artifact_norm": 0.0}, "artifact_norm"),
        ({"artifact_norm": math.inf}, "artifact_norm"),
    ):
        with pytest.raises(OptionError) as error:
            ArtifactOptions(**kwargs)
        assert error.value.parameter == flag
    with pytest.raises(OptionError, match="^magnitude: "):
        StoreOptions(magnitude="before-norm")
    assert ExtractOptions().replace(artifact_factor=6.0).artifacts.rule == ArtifactRule(6.0)
    assert MetricsOptions().replace(artifact_norm=2.0).artifacts.rule == ArtifactRule(None, 2.0)
    result = run_cli("metrics", tmp_path / "none.h5", "-o", tmp_path / "m.h5", "--artifact-factor", "3", "--artifact-norm", "5")
    assert result.exit_code == 2 and "--artifact-norm" in result.stderr
    result = run_cli("extract", "x", tmp_path, "-o", tmp_path / "c.h5", "--artifact-factor", "0.5")
    assert result.exit_code == 2 and "--artifact-factor" in result.stderr


# ---------------------------------------------------------------- files


def test_streamed_and_cached_artifact_metrics_agree_and_record_the_rule(tmp_path):
    paths = write_images(tmp_path / "images", 5)
    loaded = tiny("registers")
    result = extract(loaded, paths, tmp_path / "c.h5", metrics=tmp_path / "streamed.h5", dtype="float32",
                     artifact_factor=1.05, workers=0, batch_size=2)  # a low factor, so that some patches count
    compute_metrics(result.path, tmp_path / "cached.h5", artifact_factor=1.05, batch_size=3, device="cpu")
    with open_cache(result.path) as cache:
        token_norm = cache.token_norm()
        assert token_norm.shape == (5, 2, cache.layout.num_tokens) and cache.magnitude_update == "after-layer-scale"
    with open_metrics(tmp_path / "streamed.h5") as streamed, open_metrics(tmp_path / "cached.h5") as cached:
        assert ARTIFACT_METRICS - {"artifact_fg_overlap"} <= set(streamed.metric_names) == set(cached.metric_names)
        for f in (streamed, cached):
            assert f.attrs["artifact_factor"] == 1.05 and "artifact_norm" not in f.attrs
        frac = streamed.values("artifact_frac")
        assert 0 < frac.mean() < 1
        np.testing.assert_array_equal(frac, cached.values("artifact_frac"))
        np.testing.assert_allclose(streamed.values("cls_artifact_mass"), cached.values("cls_artifact_mass"), rtol=1e-6, atol=1e-7)
    # resuming with another rule is refused, like another fusion
    with pytest.raises(AttnflowError, match="artifact_factor"):
        compute_metrics(result.path, tmp_path / "cached.h5", artifact_norm=10.0, resume=True, device="cpu")


def test_store_none_keeps_token_norms_and_v0_1_caches_leave_artifacts_out(tmp_path):
    paths = write_images(tmp_path / "images", 2)
    result = extract(tiny("plain"), paths, tmp_path / "none.h5", store="none", workers=0)
    with open_cache(result.path) as cache:
        assert cache.has_token_norm and bool((cache.token_norm() > 0).all())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compute_metrics(FIXTURES / "v0_1_cache.h5", tmp_path / "old.h5", device="cpu")
    assert any(issubclass(w.category, AttnflowNote) and "token norms" in str(w.message) for w in caught)
    with open_metrics(tmp_path / "old.h5") as old:
        assert not ARTIFACT_METRICS & set(old.metric_names) and "cls_self" in old.metric_names
    with open_cache(FIXTURES / "v0_1_cache.h5") as cache, pytest.raises(AttnflowError, match="token norms"):
        cache.token_norm()


def test_a_negative_stored_norm_is_refused(tmp_path):
    paths = write_images(tmp_path / "images", 2)
    path = extract(tiny("plain"), paths, tmp_path / "c.h5", store="none", workers=0, compression="none").path
    with h5py.File(path, "r+") as f:
        f["token_norm"][1, 0, 2] = -1.0
    with open_cache(path) as cache, pytest.raises(AttnflowError, match=r"token_norm of image 1 .*layer 0, token 2: holds -1"):
        cache.token_norm()


# ---------------------------------------------------------------- magnitude before the layer scale


def test_magnitude_before_layer_scale_equals_a_hand_recomputation(tmp_path):
    model = make_tiny_vit("qk_norm_layer_scale")
    x = images_for(model)
    before = capture(model, x, magnitude="before-layer-scale").magnitude
    after = capture(model, x).magnitude
    stream = block_inputs_float64(model, x)
    m = copy.deepcopy(model).double()
    with torch.no_grad():
        for i, block in enumerate(m.blocks):
            update = block.attn(block.norm1(stream[i]))  # after the output projection, before ls1
            expected = update.norm(dim=-1) / stream[i].norm(dim=-1)
            torch.testing.assert_close(before[:, i].double(), expected, rtol=1e-5, atol=0)
            scaled = block.ls1(update).norm(dim=-1) / stream[i].norm(dim=-1)
            torch.testing.assert_close(after[:, i].double(), scaled, rtol=1e-5, atol=0)
    assert not torch.allclose(before, after)
    # recorded in the cache (absent: after the layer scale), and part of a run's identity
    paths = write_images(tmp_path / "images", 2)
    loaded = tiny("qk_norm_layer_scale")
    path = extract(loaded, paths, tmp_path / "c.h5", store="none", magnitude="before-layer-scale", workers=0).path
    with open_cache(path) as cache:
        assert cache.magnitude_update == "before-layer-scale" and cache.attrs["magnitude_update"] == "before-layer-scale"
    with pytest.raises(AttnflowError, match="magnitude_update"):
        extract(loaded, paths, tmp_path / "c.h5", store="none", workers=0, resume=True)
