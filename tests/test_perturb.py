"""attnflow perturb: every number against an independent computation.

Drop mode against a float64 forward written out by hand from timm's modules on the kept tokens; pixel mode
against patches zeroed by hand; orders against numpy's argsort; the areas against the trapezoid by hand;
a hand-built model whose answer is known; the demo models; resume after SIGKILL; one-line errors.
"""
from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from PIL import Image

from conftest import make_tiny, make_tiny_vit, write_images, read_all
from attnflow.demo import demo_images
from attnflow.errors import AttnflowError, OptionError
from attnflow.images import ImageDataset, list_images, resolve_preprocessing
from attnflow.layout import TokenLayout
from attnflow.models import LoadedModel, build_model
from attnflow.perturb import (
    auc, drop_problem, embed, forward_kept, perturb, removal_order, removed_count, summarize, zero_patches,
)
from attnflow.probe import AbMILP, LinearHead, head_path, save_head
from attnflow.store.names import ROOT_ATTRS
from attnflow.store.read import open_perturbation

ROOT = Path(__file__).resolve().parents[1]
FRACTIONS = (0.25, 0.5, 0.75)


def loaded_model(model: nn.Module, name: str) -> LoadedModel:
    return LoadedModel(model=model, name=name, checkpoint="", checkpoint_sha256="", weights="random", family="unknown", label=name)


def normalised_pixels(model: nn.Module, paths) -> torch.Tensor:
    """(n, C, H, W) the images as the model sees them (timm's eval transform, then normalised)."""
    preprocessing = resolve_preprocessing(model)
    dataset = ImageDataset(paths, preprocessing)
    return preprocessing.normalize(torch.stack([dataset[i][1] for i in range(len(paths))]))


def reference_forward(model: nn.Module, pixels: torch.Tensor, keep: torch.Tensor | None = None):
    """float64, written out from timm's modules: patch embedding, prefix tokens, position embeddings, then only
    the prefix and the ``keep`` (B, K) patches through every block (attention by hand) and the final norm.
    Returns the (B, p + K, D) tokens and the last block's (B, H, N, N) attention."""
    m = copy.deepcopy(model).double()
    B = pixels.shape[0]
    patches = m.patch_embed.norm(m.patch_embed.proj(pixels.double()).flatten(2).transpose(1, 2))  # (B, P, D)
    prefix = [t.expand(B, -1, -1) for t in (m.cls_token, m.reg_token) if t is not None]
    prefix = torch.cat(prefix, 1) if prefix else patches[:, :0]
    p = prefix.shape[1]
    if m.pos_embed is not None:
        if m.no_embed_class:
            patches = patches + m.pos_embed
        else:
            prefix, patches = prefix + m.pos_embed[:, :p], patches + m.pos_embed[:, p:]
    if keep is not None:
        patches = torch.stack([patches[b, keep[b]] for b in range(B)])
    x = m.norm_pre(torch.cat([prefix, patches], 1))
    for block in m.blocks:
        attention, h = block.attn, block.norm1(x)
        n, N, C = h.shape
        heads = attention.num_heads
        qkv = attention.qkv(h).reshape(n, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        q, k, v = attention.q_norm(qkv[0]), attention.k_norm(qkv[1]), qkv[2]
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C // heads), -1)
        x = x + block.ls1(attention.proj(attention.norm((weights @ v).transpose(1, 2).reshape(n, N, C))))
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return m.norm(x), weights


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# -- the pieces -----------------------------------------------------------------------------------------


def test_removed_count_rounds_half_up():
    assert [removed_count(f, 64) for f in (0.1, 0.5, 0.9)] == [6, 32, 58]  # 6.4, 32, 57.6
    assert removed_count(0.5, 5) == 3  # 2.5: Python's round() would give 2
    assert removed_count(0.02, 16) == 0


def test_removal_orders_against_argsort():
    rng = np.random.default_rng(0)
    relevance = rng.random((3, 2, 20))
    relevance[0, 0, [3, 7, 11]] = relevance[0, 0, 5]  # ties stay in patch order
    for order, key in (("positive", -relevance), ("negative", relevance)):
        got = removal_order(torch.from_numpy(relevance), order).numpy()
        np.testing.assert_array_equal(got, np.argsort(key, axis=-1, kind="stable"))
    with pytest.raises(ValueError):
        removal_order(torch.from_numpy(relevance), "sideways")


def test_auc_is_the_trapezoid_from_similarity_one_at_zero():
    # points (0, 1), (0.25, 0.8), (0.5, 0.5), (0.75, 0.1): 0.25 * (0.9 + 0.65 + 0.3)
    assert auc(FRACTIONS, np.array([0.8, 0.5, 0.1])) == pytest.approx(0.25 * (0.9 + 0.65 + 0.3), abs=1e-15)
    uneven = auc((0.1, 0.9), np.array([[1.0, 1.0], [0.0, 0.0]]))
    np.testing.assert_allclose(uneven, [0.9, 0.05], atol=1e-15)


@pytest.mark.parametrize("kind", ["plain", "qk_norm_layer_scale", "registers", "no_cls_gap"])
def test_drop_forward_matches_a_hand_written_forward_on_the_kept_tokens(kind):
    model = make_tiny_vit(kind)
    layout = TokenLayout.from_model(model)
    assert drop_problem(model) is None
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, *layout.img_size)
    K = (layout.num_patches + 1) // 2
    keep = torch.stack([torch.randperm(layout.num_patches)[:K].sort().values for _ in range(3)])  # a different subset each
    with torch.no_grad():
        got = forward_kept(model, embed(model, pixels), keep, layout.num_prefix_tokens)
        want, _ = reference_forward(model, pixels, keep)
    assert got.shape == (3, layout.num_prefix_tokens + K, model.embed_dim)
    np.testing.assert_allclose(got.double().numpy(), want.numpy(), atol=1e-5, rtol=0)


def test_zero_patches_against_patches_zeroed_by_hand():
    layout = TokenLayout(has_cls=True, num_prefix_tokens=1, grid_size=(3, 4), patch_size=(2, 3))
    pixels = torch.randn(2, 3, 6, 12)
    removed = torch.zeros(2, 12, dtype=torch.bool)
    removed[0, [0, 5, 11]] = True
    removed[1, 7] = True
    want = pixels.clone()
    for b, j in zip(*np.nonzero(removed.numpy())):
        row, col = divmod(int(j), 4)
        want[b, :, row * 2:(row + 1) * 2, col * 3:(col + 1) * 3] = 0
    assert torch.equal(zero_patches(pixels, removed, layout), want)


# -- the whole run, against independent recomputations ----------------------------------------------------


def test_drop_mode_against_an_independent_recomputation(tmp_path, image_dir, one_thread):
    model = make_tiny_vit("registers")
    layout = TokenLayout.from_model(model)
    paths = list_images([str(image_dir)])[:4]
    out = tmp_path / "drop.h5"
    result = perturb(loaded_model(model, "tiny"), paths, out, relevance=("cls-attn", "random"), fractions=FRACTIONS,
                     batch_size=3, workers=0)
    assert (result.mode, result.readout, result.n_images) == ("drop", "cls", 4)
    with open_perturbation(out) as f:
        similarity, maps = f.similarity(), f.relevance_maps()
        assert f.relevance == ["cls-attn", "random"] and f.orders == ["positive", "negative"] and f.fractions == list(FRACTIONS)
        assert [d.label for d in f.file["perturb/similarity"].dims] == ["image", "relevance", "order", "fraction"]
        written = set(f.attrs)
    assert written <= set(ROOT_ATTRS), written - set(ROOT_ATTRS)  # every attribute declared once, in the schema
    assert {key for key, attr in ROOT_ATTRS.items() if "perturb" in attr.required} <= written
    pixels = normalised_pixels(model, paths)
    p, P = layout.num_prefix_tokens, layout.num_patches
    with torch.no_grad():
        clean, attention = reference_forward(model, pixels)
    cls_attention = attention[:, :, 0, p:] / attention[:, :, 0, p:].sum(-1, keepdim=True)
    by_hand = cls_attention.mean(1).numpy()
    np.testing.assert_allclose(maps[:, 0], by_hand, atol=1e-6)
    for i in range(4):
        values = np.random.default_rng([0, i]).random(P)
        np.testing.assert_allclose(maps[i, 1], values / values.sum(), rtol=1e-6)
    for r, relevance in enumerate([by_hand, maps[:, 1].astype(np.float64)]):
        for o, key in enumerate([-relevance, relevance]):
            order = np.argsort(key, axis=-1, kind="stable")
            for f, fraction in enumerate(FRACTIONS):
                k = math.floor(fraction * P + 0.5)
                keep = torch.from_numpy(np.sort(order[:, k:], axis=-1))
                with torch.no_grad():
                    tokens, _ = reference_forward(model, pixels, keep)
                for i in range(4):
                    want = cosine(tokens[i, 0].numpy(), clean[i, 0].numpy())
                    assert similarity[i, r, o, f] == pytest.approx(want, abs=1e-5), (r, o, f, i)


@pytest.mark.parametrize("kind,readout", [("plain", "cls"), ("no_cls_gap", "mean")])
def test_pixel_mode_against_an_independent_masked_forward(tmp_path, image_dir, one_thread, kind, readout):
    model = make_tiny_vit(kind)
    layout = TokenLayout.from_model(model)
    paths = list_images([str(image_dir)])[:3]
    out = tmp_path / "pixels.h5"
    result = perturb(loaded_model(model, "tiny"), paths, out, relevance=("random",), fractions=FRACTIONS, seed=7,
                     mode="pixels", batch_size=2, workers=0)
    assert result.readout == readout  # cls where there is one, else the mean of the patch tokens
    with open_perturbation(out) as f:
        similarity = f.similarity()
    pixels = normalised_pixels(model, paths)
    p, P = layout.num_prefix_tokens, layout.num_patches
    (gh, gw), (ph, pw) = layout.grid_size, layout.patch_size
    read = (lambda t: t[0]) if readout == "cls" else (lambda t: t[p:].mean(0))
    with torch.no_grad():
        clean = model.forward_features(pixels)
    for i in range(3):
        relevance = np.random.default_rng([7, i]).random(P)
        for o, key in enumerate([-relevance, relevance]):
            order = np.argsort(key, kind="stable")
            for f, fraction in enumerate(FRACTIONS):
                masked = pixels[i].clone()
                for j in order[: math.floor(fraction * P + 0.5)]:
                    row, col = divmod(int(j), gw)
                    masked[:, row * ph:(row + 1) * ph, col * pw:(col + 1) * pw] = 0.0
                with torch.no_grad():
                    tokens = model.forward_features(masked[None])[0]
                want = cosine(read(tokens).double().numpy(), read(clean[i]).double().numpy())
                assert similarity[i, 0, o, f] == pytest.approx(want, abs=1e-5), (i, o, f)


def hand_built_model(key_patch: int) -> nn.Module:
    """One block, one head, width 8, 4 x 4 patches of 8 px, built so the answer is known: the cls query (dim 0)
    matches only the key of patch ``key_patch`` (its position embedding sets dim 1), values carry the patch
    content (channel 0 -> dim 2, channel 1 -> dim 3) x 100, the MLP adds nothing, no norms on the way.
    So cls attends (almost) only to that patch, and the cls representation is e0 + 100 x its content."""
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=8, depth=1, num_heads=1, mlp_ratio=1.0, num_classes=0,
        pretrained_cfg_overlay=dict(input_size=(3, 32, 32), crop_pct=1.0, mean=(0, 0, 0), std=(1, 1, 1), interpolation="bilinear"),
    ).eval()
    block = model.blocks[0]
    block.norm1, model.norm = nn.Identity(), nn.Identity()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.patch_embed.proj.weight[2, 0] = 1 / 64  # the mean of channel 0 over the patch
        model.patch_embed.proj.weight[3, 1] = 1 / 64
        model.cls_token[0, 0, 0] = 1.0
        model.pos_embed[0, 1 + key_patch, 1] = 1.0
        qkv = block.attn.qkv.weight  # rows: q (0-7), k (8-15), v (16-23)
        qkv[0, 0] = 200.0  # q_0 = 200 x dim 0: only cls has it
        qkv[8, 1] = 1.0  # k_0 = dim 1: only the key patch has it
        qkv[16 + 2, 2] = qkv[16 + 3, 3] = 100.0
        block.attn.proj.weight.copy_(torch.eye(8))
    return model


@pytest.mark.parametrize("mode", ["drop", "pixels"])
def test_a_hand_built_model_whose_answer_is_known(tmp_path, mode):
    key_patch = 5  # row 1, column 1
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[..., 1] = 255
    image[8:16, 8:16] = (255, 0, 0)
    (tmp_path / "images").mkdir()
    Image.fromarray(image).save(tmp_path / "images" / "a.png")
    fractions = (0.02, 0.1, 0.5, 0.9)  # removes 0, 2, 8 and 14 of the 16 patches
    out = tmp_path / "hand.h5"
    perturb(loaded_model(hand_built_model(key_patch), "hand"), [tmp_path / "images" / "a.png"], out,
            relevance=("cls-attn", "rollout"), fractions=fractions, mode=mode, workers=0)
    with open_perturbation(out) as f:
        similarity, maps = f.similarity()[0], f.relevance_maps()[0]
    assert maps[0].argmax() == key_patch and maps[0, key_patch] > 0.999
    assert maps[1].argmax() == key_patch
    for r in range(2):
        positive, negative = similarity[r]
        assert positive[0] == pytest.approx(1.0, abs=1e-6)  # nothing removed yet
        # once the patch is gone: drop leaves e0 + 100 x (the others' mean content) ⟂ e2, pixels leave e0
        assert np.all(np.abs(positive[1:]) < (1e-3 if mode == "drop" else 0.011)), positive
        assert np.all(negative > 1 - 1e-6), negative  # the patch is never among the 14 least relevant


def test_random_relevance_is_reproducible_by_seed(tmp_path, image_dir):
    model = loaded_model(make_tiny_vit("plain"), "tiny")
    paths = list_images([str(image_dir)])[:4]
    maps = {}
    for name, seed, batch in (("a", 3, 4), ("b", 3, 1), ("c", 4, 4)):
        perturb(model, paths, tmp_path / f"{name}.h5", relevance=("random",), fractions=(0.5,), seed=seed, batch_size=batch, workers=0)
        with open_perturbation(tmp_path / f"{name}.h5") as f:
            maps[name] = f.relevance_maps()
    np.testing.assert_array_equal(maps["a"], maps["b"])  # per image, whatever the batches
    assert not np.allclose(maps["a"], maps["c"])


# -- the summary -------------------------------------------------------------------------------------------


def test_summary_against_the_stored_values(tmp_path, image_dir):
    model = loaded_model(make_tiny_vit("plain"), "tiny")
    paths = list_images([str(image_dir)])
    out = tmp_path / "s.h5"
    perturb(model, paths, out, relevance=("cls-attn", "random"), fractions=FRACTIONS, workers=0)
    with open_perturbation(out) as f:
        similarity = f.similarity().astype(np.float64)
    summary = summarize([out], n_bootstrap=500, seed=0)
    points = {(r["relevance"], r["order"], r["fraction"]): r for r in summary.curves}
    assert len(points) == 2 * 2 * 4
    for r, name in enumerate(["cls-attn", "random"]):
        for o, order in enumerate(["positive", "negative"]):
            assert points[(name, order, 0.0)]["similarity"] == 1.0
            for f, fraction in enumerate(FRACTIONS):
                point = points[(name, order, fraction)]
                assert point["similarity"] == pytest.approx(similarity[:, r, o, f].mean(), abs=1e-12)
                assert point["ci_low"] <= point["similarity"] <= point["ci_high"]
    areas = {r["relevance"]: r for r in summary.aucs}
    by_hand = 0.25 * ((1 + similarity[..., 0]) / 2 + (similarity[..., 0] + similarity[..., 1]) / 2
                      + (similarity[..., 1] + similarity[..., 2]) / 2)  # (n, R, O)
    cls_attn = areas["cls-attn"]
    assert cls_attn["auc_positive"] == pytest.approx(by_hand[:, 0, 0].mean(), abs=1e-12)
    assert cls_attn["auc_negative"] == pytest.approx(by_hand[:, 0, 1].mean(), abs=1e-12)
    assert cls_attn["gap"] == pytest.approx((by_hand[:, 0, 1] - by_hand[:, 0, 0]).mean(), abs=1e-12)
    assert cls_attn["positive_vs_random"] == pytest.approx((by_hand[:, 0, 0] - by_hand[:, 1, 0]).mean(), abs=1e-12)
    assert cls_attn["gap_ci_low"] <= cls_attn["gap"] <= cls_attn["gap_ci_high"]
    assert math.isnan(areas["random"]["positive_vs_random"])


def test_on_the_demo_models_random_lies_between_positive_and_negative(tmp_path):
    """Measured on 20 demo images: true of both models for the positive order; the negative order of the tiny
    MAE stays below random's (the README reports it), so only the DINO model is held to both sides."""
    paths = demo_images(20)
    areas = {}
    for name in ("demo:mae", "demo:dino"):
        out = tmp_path / f"{name[5:]}.h5"
        perturb(build_model(name), paths, out, relevance=("cls-attn", "random"), batch_size=20, workers=0)
        areas[name] = {r["relevance"]: r for r in summarize([out], n_bootstrap=200).aucs}
    for name, by_map in areas.items():
        assert by_map["cls-attn"]["auc_positive"] < by_map["random"]["auc_positive"], name
        assert by_map["cls-attn"]["positive_vs_random_ci_high"] < 0, name
    dino = areas["demo:dino"]
    assert dino["random"]["auc_negative"] < dino["cls-attn"]["auc_negative"]
    assert dino["cls-attn"]["gap"] > areas["demo:mae"]["cls-attn"]["gap"]


def test_cli_prints_the_summary_and_plots_it(tmp_path, run_cli):
    out = tmp_path / "dino.h5"
    result = run_cli("perturb", "demo:dino", *map(str, demo_images(4)), "-o", out, "-r", "cls-attn", "-r", "random",
                     "--fractions", "0.5", "--workers", "0", "--bootstrap", "50", "-f", "json")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.startswith(f"attnflow: wrote {out}: 4 images, 0 skipped, demo:dino (jea), mode drop, readout cls")
    printed = json.loads(result.stdout)
    assert [(r["relevance"], r["order"], r["fraction"]) for r in printed["curves"]] == [
        (m, o, f) for m in ("cls-attn", "random") for o in ("positive", "negative") for f in (0.0, 0.5)]
    assert set(printed["curves"][0]) == {"model", "family", "relevance", "order", "fraction", "similarity", "ci_low",
                                         "ci_high", "n_images"}
    assert [r["relevance"] for r in printed["auc"]] == ["cls-attn", "random"]
    assert printed["auc"] == json.loads(json.dumps(summarize([out], n_bootstrap=50).aucs, default=str).replace("NaN", "null"))
    csv = run_cli("perturb", "demo:dino", *map(str, demo_images(4)), "-o", out, "-r", "cls-attn", "-r", "random",
                  "--fractions", "0.5", "--workers", "0", "--bootstrap", "50", "-f", "csv", "--resume")
    assert csv.exit_code == 0 and "already complete" in csv.stderr
    assert csv.stdout.splitlines()[0] == "model,family,relevance,order,fraction,similarity,ci_low,ci_high,n_images"
    assert len(csv.stdout.splitlines()) == 1 + 8
    figure = tmp_path / "curves.png"
    drawn = run_cli("plot", "perturb", out, "-o", figure, "--bootstrap", "50")
    assert drawn.exit_code == 0, drawn.stderr
    assert Image.open(figure).size[0] > 0
    bad = run_cli("plot", "perturb", tmp_path / "missing.h5", "-o", figure)
    assert bad.exit_code == 1 and bad.stderr.splitlines() == [f"attnflow: error: no such file: {tmp_path / 'missing.h5'}"]


# -- probe heads -------------------------------------------------------------------------------------------


def test_probe_head_relevance_and_accuracy_against_the_head_run_by_hand(tmp_path, image_dir, one_thread):
    model = make_tiny_vit("plain")
    layout = TokenLayout.from_model(model)
    loaded = loaded_model(model, "tiny")
    torch.manual_seed(3)
    head = LinearHead(model.embed_dim, 2, AbMILP(model.embed_dim)).eval()
    heads = tmp_path / "heads"
    heads.mkdir()
    save_head(head_path(heads, "tiny", "abmilp"), head, {
        "pool": "abmilp", "dim": model.embed_dim, "relu": False, "queries": 32, "with_cls": False, "classes": 2,
        "block": len(model.blocks) - 1, "model": "tiny", "checkpoint_sha256": "", "label": "tiny",
        "num_prefix_tokens": layout.num_prefix_tokens, "has_cls": True, "grid_size": list(layout.grid_size)})
    paths = list_images([str(image_dir)])[3:7]  # two of each class: the folders' classes are the head's
    out = tmp_path / "probe.h5"
    perturb(loaded, paths, out, relevance=(f"probe:{heads}",), probe=heads, labels_from_dirs=True,
            fractions=(0.5,), mode="pixels", workers=0)
    with open_perturbation(out) as f:
        assert f.relevance == ["probe:abmilp"]
        maps, (correct, clean_correct), labels = f.relevance_maps(), f.correct(), f.labels()
    pixels = normalised_pixels(model, paths)
    with torch.no_grad():
        tokens = model.forward_features(pixels)
        weights = head.pool.attention(tokens[:, 1:]).numpy()
        np.testing.assert_allclose(maps[:, 0], weights, atol=1e-6)
        np.testing.assert_array_equal(clean_correct, head(tokens[:, 1:]).argmax(-1).numpy() == labels)
        for i in range(4):
            for o, key in enumerate([-weights[i], weights[i]]):
                masked = zero_patches(pixels[i:i + 1], torch.zeros(1, 16, dtype=torch.bool).index_fill_(
                    1, torch.from_numpy(np.argsort(key, kind="stable")[:8]), True), layout)
                predicted = head(model.forward_features(masked)[:, 1:]).argmax(-1).item()
                assert correct[i, 0, o, 0] == (predicted == labels[i])
    summary = summarize([out], n_bootstrap=100)
    clean_point = next(r for r in summary.curves if r["fraction"] == 0.0)
    assert clean_point["accuracy"] == pytest.approx(clean_correct.mean())


# -- resume, errors ----------------------------------------------------------------------------------------





def test_sigkill_mid_run_then_resume_gives_the_same_file(tmp_path, run_cli, one_thread):
    images = tmp_path / "images"
    for path in demo_images(12):
        (images / path.parent.name).mkdir(parents=True, exist_ok=True)
        (images / path.parent.name / path.name).write_bytes(path.read_bytes())
    args = ["perturb", "demo:dino", str(images), "-b", "2", "--workers", "0", "-r", "cls-attn", "-r", "random",
            "--fractions", "0.3,0.6", "-q"]
    reference = run_cli(*args, "-o", tmp_path / "whole.h5")
    assert reference.exit_code == 0, reference.stderr
    out = tmp_path / "killed.h5"
    partial = Path(str(out) + ".partial")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "attnflow", *args, "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    while proc.poll() is None and len(list(partial.glob("seg-*.h5"))) < 2:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not out.exists() and partial.is_dir()
    refused = run_cli(*args, "-o", out, "--seed", "1", "--resume")
    assert refused.exit_code == 1 and "seed" in refused.stderr and len(refused.stderr.splitlines()) == 1
    resumed = run_cli(*args, "-o", out, "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    want, got = read_all(tmp_path / "whole.h5"), read_all(out)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    again = run_cli(*args, "-o", out, "--resume")
    assert again.exit_code == 0 and not partial.exists()


@pytest.mark.parametrize("args,exit_code,words", [
    (["--fractions", "0.5,1"], 2, "--fractions: 1 is not in (0, 1)"),
    (["--fractions", "0"], 2, "--fractions: 0 is not in (0, 1)"),
    (["--fractions", "half"], 2, "--fractions: takes comma-separated numbers"),
    (["-r", "probe:{tmp}/no-such-dir"], 1, "--relevance probe:{tmp}/no-such-dir: no such file or directory"),
    (["--probe", "{tmp}/no-such-dir", "--labels-from-dirs"], 1, "--probe {tmp}/no-such-dir: no such file or directory"),
    (["-r", "saliency"], 2, "--relevance: choose from cls-attn, rollout, flow, random or probe:DIR, not 'saliency'"),
    (["--readout", "mean", "--layer", "6"], 2, "--layer: block 6 is out of range"),
])
def test_bad_inputs_are_one_line_errors(tmp_path, run_cli, args, exit_code, words):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = run_cli("perturb", "demo:dino", str(demo_images(2)[0]), "-o", tmp_path / "x.h5", *args)
    assert result.exit_code == exit_code, result.stderr
    assert result.stderr.splitlines() == [f"attnflow: error: {words.replace('{tmp}', str(tmp_path))}"] or \
        (len(result.stderr.splitlines()) == 1 and words.replace("{tmp}", str(tmp_path)) in result.stderr), result.stderr
    assert result.stdout == "" and not (tmp_path / "x.h5").exists()


def test_drop_mode_on_beit_names_pixels(tmp_path, run_cli, monkeypatch):
    beit = make_tiny("beit_base_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=48, num_heads=3)
    assert "relative position bias" in drop_problem(beit)
    monkeypatch.setattr("attnflow.models.build_model", lambda *a, **k: loaded_model(beit, "beit_base_patch16_224"))
    image = write_images(tmp_path / "images", 1)[0]
    result = run_cli("perturb", "beit_base_patch16_224", image, "-o", tmp_path / "x.h5", "--mode", "drop", "--random-init")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "attnflow: error: --mode: drop: 'beit_base_patch16_224' is a Beit, whose attention adds a relative position "
        "bias over the full patch grid, so its tokens cannot be dropped; use --mode pixels"]
    with pytest.raises(OptionError, match="^mode: "):  # the library refuses what the CLI refuses
        perturb(loaded_model(beit, "beit"), [image], tmp_path / "y.h5", mode="drop", workers=0)
    result = perturb(loaded_model(beit, "beit"), [image], tmp_path / "y.h5", fractions=(0.5,), workers=0)
    assert result.mode == "pixels"  # the default where tokens cannot be dropped


def test_the_library_checks_its_options(tmp_path, image_dir):
    model = loaded_model(make_tiny_vit("no_cls_gap"), "gap")
    paths = list_images([str(image_dir)])[:1]
    for values, parameter in (({"fractions": (0.5, 0.5)}, "fractions"), ({"relevance": ()}, "relevance"),
                              ({"relevance": ("random", "random")}, "relevance"), ({"mode": "blur"}, "mode"),
                              ({"readout": "cls"}, "readout")):
        with pytest.raises(OptionError, match=f"^{parameter}: "):
            perturb(model, paths, tmp_path / "x.h5", workers=0, **values)
    with pytest.raises(AttnflowError, match="no probe head for gap there"):
        perturb(model, paths, tmp_path / "x.h5", workers=0, probe=tmp_path)
    assert not (tmp_path / "x.h5").exists()


def test_a_file_whose_axes_disagree_with_its_attributes_is_refused(tmp_path, image_dir):
    out = tmp_path / "p.h5"
    perturb(loaded_model(make_tiny_vit("plain"), "tiny"), list_images([str(image_dir)])[:2], out, fractions=(0.5,), workers=0)
    with h5py.File(out, "r+") as f:
        f.attrs["fractions"] = [0.25, 0.5]
    with pytest.raises(AttnflowError, match="the attributes name 3 relevance maps, 2 orders and 2 fractions"):
        open_perturbation(out)
