"""The metric registry (every metric declared once, computed wherever its needs are met, documented in the
README) and model families and groups (tag rules, the CLI's choices, compare's summary of any two groups)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from scipy import stats

from attnflow.compare import LEGACY_SUMMARY_KEYS
from attnflow.errors import AttnflowError
from attnflow.families import FAMILIES, infer_family
from attnflow.layout import TokenLayout
from attnflow.measure import SUMMARY_METRICS
from attnflow.flow import attention_flow
from attnflow.metrics import REGISTRY, batch_metrics, main
from attnflow.plot import plot_curves
from attnflow.registry import LEVEL_SHAPES, Metric, MetricGroup, Need, Registry, check_group_output
from conftest import TINY_VITS, make_tiny_vit, synthetic, write_metrics

README = Path(__file__).resolve().parents[1] / "README.md"
SHAPES = {"head": lambda B, L, H: (B, L, H), "layer": lambda B, L, H: (B, L), "image": lambda B, L, H: (B,)}


# ---------------------------------------------------------------- the registry


@pytest.fixture(scope="module")
def layouts() -> dict[str, TokenLayout]:
    return {kind: TokenLayout.from_model(make_tiny_vit(kind)) for kind in TINY_VITS}


def expected_names(layout: TokenLayout, *, full_maps: bool, masks: bool) -> set[str]:
    """The metrics whose needs are met, by the README's rules: full maps only from --store full, masks only
    with --masks, registers only for models that have them; the cls row and magnitudes always."""
    names = set()
    for metric in REGISTRY:
        if Need.full_maps in metric.needs and not full_maps:
            continue
        if Need.masks in metric.needs and not masks:
            continue
        if Need.registers in metric.needs and not layout.num_registers:
            continue
        if Need.flow in metric.needs and not full_maps:  # the test computes flow wherever it can: full maps
            continue
        names.add(metric.name)
    return names


@pytest.mark.parametrize("masks", [True, False], ids=["masks", "no-masks"])
@pytest.mark.parametrize("store", ["full", "rows"])
@pytest.mark.parametrize("kind", sorted(TINY_VITS))
def test_every_metric_is_computed_wherever_its_needs_are_met(layouts, kind, store, masks):
    layout = layouts[kind]
    B, L, H, T, p = 3, 2, 3, layout.num_tokens, layout.num_prefix_tokens
    if store == "rows" and p == 0:
        pytest.skip("no prefix rows to keep: --store rows refuses a model without cls and registers")
    gen = torch.Generator().manual_seed(1)
    attn = torch.softmax(2 * torch.randn(B, L, H, T, T, generator=gen), -1)
    magnitude = torch.rand(B, L, T, generator=gen) + 0.1
    fg = torch.rand(B, layout.num_patches, generator=gen) if masks else None
    maps = {"attn": attn} if store == "full" else {"attn_rows": attn[:, :, :, :p]}
    token_norm = torch.rand(B, L, T, generator=gen) + 1.0
    token_norm[..., p] = 100.0  # one high-norm artifact patch in every image and layer
    flow = {}
    if store == "full":  # every layer's flow, so that no flow metric is NaN for want of a chosen layer
        flow = dict(flow_maps=attention_flow(attn, layout, range(L)), flow_layers=range(L))
    values, rollout_maps = batch_metrics(layout, magnitude, fg=fg, token_norm=token_norm, **maps, **flow)
    assert set(values) == expected_names(layout, full_maps=store == "full", masks=masks)
    assert (rollout_maps is not None) == (store == "full")
    for name, value in values.items():
        metric = REGISTRY[name]
        assert value.dtype == torch.float64 and tuple(value.shape) == SHAPES[metric.level](B, L, H), name
        # strictly positive maps and fractions: a value is NaN exactly where its declaration says a model
        # without a cls token makes it so
        undefined = "no_cls" in metric.nan_when and not layout.has_cls
        assert bool(torch.isnan(value).all()) if undefined else bool(torch.isfinite(value).all()), name


def test_every_metric_is_fully_declared():
    assert len(REGISTRY) == 27 and len(set(REGISTRY.names())) == len(REGISTRY)
    for metric in REGISTRY:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", metric.name)
        assert metric.level in LEVEL_SHAPES and metric.needs
        for text in (metric.unit, metric.axis_label, metric.meaning, metric.definition):
            assert text.strip() and "|" not in text and "\n" not in text, metric.name
        assert metric.unit in metric.y_label and metric.axis_label in metric.y_label
    assert REGISTRY.defaults and set(REGISTRY.defaults) <= set(REGISTRY.names())
    # attnflow metrics' per-layer table: the columns users read (and the README shows), in this order
    assert SUMMARY_METRICS == (
        "cls_self", "cls_entropy_norm", "cls_top10_mass", "cls_fg_mass", "patch_to_cls", "patch_entropy_norm",
        "attn_distance", "rollout_entropy_norm", "rollout_fg_mass", "magnitude_cls", "magnitude_patch",
        "artifact_frac", "cls_artifact_mass",
    )
    # the head metrics are the ones a metrics file stores per head
    assert {m.name for m in REGISTRY if m.level == "head"} == set(REGISTRY.names("head"))


def test_the_readme_table_is_generated_from_the_registry(capsys):
    main(["--markdown"])
    generated = capsys.readouterr().out
    text = README.read_text()
    start = text.index("\n", text.index("<!-- metrics table:")) + 1
    end = text.index("<!-- end of metrics table -->")
    assert text[start:end] == generated, "README's metrics table is stale: python -m attnflow.metrics --markdown"
    rows = [line for line in generated.splitlines() if line.startswith("| `")]
    assert [re.match(r"\| `(\w+)`", row).group(1) for row in rows] == list(REGISTRY.names())
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2


def test_a_group_must_return_what_it_declares():
    metric = Metric("toy", "head", {Need.prefix_rows}, "nats", "toy", "toy more", "a toy")
    group = MetricGroup("toy group", compute=lambda batch, maps: {}, metrics=(metric,), per_layer=True)
    check_group_output(group, {"toy": torch.zeros(1)}, ["toy"])
    check_group_output(group, {}, [])  # not wanted, not computed
    with pytest.raises(RuntimeError, match=r"lacks \['toy'\]"):
        check_group_output(group, {}, ["toy"])
    with pytest.raises(RuntimeError, match=r"returned \['other'\]"):
        check_group_output(group, {"toy": torch.zeros(1), "other": torch.zeros(1)}, ["toy"])
    with pytest.raises(ValueError, match="declared twice"):
        Registry((group, group))
    with pytest.raises(ValueError, match="level"):
        Metric("bad", "pixel", {Need.prefix_rows}, "u", "a", "m", "d")


def test_cli_help_lists_the_default_set_and_the_families(run_cli):
    help_text = " ".join(run_cli("compare", "--help").stdout.split())
    for name in REGISTRY.defaults:
        assert name in help_text
    for family in FAMILIES:
        assert family in help_text


# ---------------------------------------------------------------- families


@pytest.mark.parametrize(
    "name, family",
    [
        ("vit_base_patch16_clip_224.openai", "language-supervised"),
        ("vit_base_patch16_clip_224.laion2b", "language-supervised"),
        ("vit_base_patch16_clip_224.datacompxl", "language-supervised"),
        ("vit_base_patch16_clip_224.metaclip_2pt5b", "language-supervised"),
        ("vit_huge_patch14_clip_224.dfn5b", "language-supervised"),
        ("vit_base_patch16_siglip_224.webli", "language-supervised"),
        ("vit_so400m_patch16_siglip_256.v2_webli", "language-supervised"),
        ("eva02_base_patch16_clip_224.merged2b", "language-supervised"),
        ("vit_pe_core_base_patch16_224.fb", "language-supervised"),
        ("aimv2_large_patch14_224.apple_pt", "autoregressive"),
        ("vit_base_patch16_clip_224.openai_ft_in1k", "supervised"),  # fine-tuned: the classifier's attention
        ("vit_so400m_patch14_siglip_378.webli_ft_in1k", "supervised"),
        ("vit_base_patch16_224.mae", "mim"),
        ("eva02_base_patch14_224.mim_in22k", "mim"),
        ("vit_small_patch16_224.dino", "jea"),
        ("vit_base_patch16_224.augreg_in21k_ft_in1k", "supervised"),
        ("vit_base_patch16_radio_v3.c_radio", "unknown"),  # distilled from several teachers
    ],
)
def test_family_of_real_timm_tags(name, family):
    assert name in timm.list_pretrained(name)  # the tag is timm's, not invented here
    assert infer_family(name) == family


def test_models_lists_a_new_family(run_cli):
    result = run_cli("models", "--family", "language-supervised", "--format", "json")  # the CLI's choices
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert {"model": "vit_base_patch16_clip_224.openai", "family": "language-supervised"} in rows
    assert all(r["family"] == "language-supervised" for r in rows)


# ---------------------------------------------------------------- compare: any two groups


def head_mean(values: dict, metric: str, layer: int = -1) -> np.ndarray:
    """Head-mean values of ``metric`` at ``layer`` of every image, as stored (float32)."""
    stored = values[metric].astype(np.float32).astype(np.float64)
    return stored[:, layer].mean(-1) if stored.ndim == 3 else stored[:, layer]


def loop_crossed_ci(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, n: int) -> tuple[float, float]:
    """The documented paired stream, as a plain loop: ``a`` (images, networks of A) and ``b`` (images,
    networks of B) over the same images; all image resamples first, then A's network draws, then B's."""
    images = rng.integers(0, a.shape[0], size=(n, a.shape[0]))
    draws_a = rng.integers(0, a.shape[1], size=(n, a.shape[1]))
    draws_b = rng.integers(0, b.shape[1], size=(n, b.shape[1]))
    diffs = [np.mean([a[images[r], k].mean() for k in draws_a[r]]) - np.mean([b[images[r], k].mean() for k in draws_b[r]])
             for r in range(n)]
    return tuple(np.percentile(diffs, [2.5, 97.5]))


def exact_permutation_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided exact permutation p of the difference of means, by enumerating every relabeling."""
    import itertools

    values, observed = np.concatenate([a, b]), a.mean() - b.mean()
    null = [values[list(c)].mean() - np.delete(values, list(c)).mean() for c in itertools.combinations(range(values.size), a.size)]
    null = np.array(null)
    tol = 1e-12 * abs(observed)
    return min(1.0, 2 * min(np.mean(null >= observed - tol), np.mean(null <= observed + tol)))


def test_groups_compare_any_two_families(tmp_path, run_cli):
    rng = np.random.default_rng(10)
    dino, dinov2, clip = synthetic(rng), synthetic(rng, n=30), synthetic(rng, shift=0.2)
    files = [write_metrics(tmp_path / "dino.h5", dino, family="jea"), write_metrics(tmp_path / "dinov2.h5", dinov2, family="jea"),
             write_metrics(tmp_path / "clip.h5", clip)]
    result = run_cli("compare", *files, "--family", "jea", "--family", "jea", "--family", "language-supervised",
                     "--groups", "jea,language-supervised", "-m", "cls_entropy_norm", "-m", "cls_self",
                     "-f", "json", "--bootstrap", 200, "--seed", 3)
    assert result.exit_code == 0, result.stderr
    # the 30 images all three hold (ids img0..img29) are paired; the networks are the replicates
    assert "30 images are held by all 3 models (dino 40, clip 40); the summary pairs those" in result.stderr
    assert "JEA vs language-supervised: 2 vs 1 networks are the replicates" in result.stderr
    summary = json.loads(result.stdout)["summary"]
    assert [s["metric"] for s in summary] == ["cls_entropy_norm", "cls_self"]
    for j, s in enumerate(summary):
        a = np.stack([head_mean(v, s["metric"])[:30] for v in (dino, dinov2)], axis=1)
        b = head_mean(clip, s["metric"])[:30, None]
        assert (s["a_group"], s["b_group"], s["unit"], s["design"]) == ("jea", "language-supervised", "models", "paired")
        assert (s["n_models_a"], s["n_models_b"], s["n_a"], s["n_b"]) == (2, 1, 30, 30)
        assert (s["a_models"], s["b_models"]) == ("dino, dinov2", "clip")
        assert s["a_mean"] == pytest.approx(a.mean(), rel=1e-9) and s["b_mean"] == pytest.approx(b.mean(), rel=1e-9)
        assert s["diff"] == pytest.approx(a.mean() - b.mean(), rel=1e-9)
        assert s["p_value"] == pytest.approx(exact_permutation_p(a.mean(0), b.mean(0)))
        assert s["min_p"] == pytest.approx(2 / 3) and s["effect_size"] == ""  # Hedges' g needs two per group
        low, high = loop_crossed_ci(a, b, np.random.default_rng([3, 1000 + j]), 200)
        assert (s["ci_low"], s["ci_high"]) == (pytest.approx(low, rel=1e-9), pytest.approx(high, rel=1e-9))
        assert not set(LEGACY_SUMMARY_KEYS.values()) & set(s)  # the 0.1 aliases are for mim,jea only
        assert s["verdict"] == "no verdict: too few models for this design"  # 3 relabelings: p >= 2/3
    one = json.loads(run_cli("compare", files[0], files[2], "--family", "jea", "--family", "language-supervised",
                             "--groups", "jea,language-supervised", "-m", "cls_entropy_norm", "-f", "json").stdout)
    assert one["summary"][0]["verdict"] == "clip cls attention more uniform than dino"  # two networks: named


def test_groups_all_summarises_every_pair_present(tmp_path, run_cli):
    rng = np.random.default_rng(11)
    values = {"mae": synthetic(rng, shift=0.2), "dino": synthetic(rng), "aim": synthetic(rng, shift=0.1), "vit": synthetic(rng)}
    families = {"mae": "mim", "dino": "jea", "aim": "autoregressive", "vit": "mim"}
    files = [write_metrics(tmp_path / f"{name}.h5", v, family=families[name]) for name, v in values.items()]
    args = ["compare", *files, "--groups", "all", "-m", "cls_entropy_norm", "--bootstrap", 100, "--seed", 2]
    out = json.loads(run_cli(*args, "-f", "json").stdout)["summary"]
    pairs = [(s["a_group"], s["b_group"]) for s in out]
    assert pairs == [("mim", "jea"), ("mim", "autoregressive"), ("jea", "autoregressive")]  # family order
    groups = {"mim": [values["mae"], values["vit"]], "jea": [values["dino"]], "autoregressive": [values["aim"]]}
    for j, s in enumerate(out):  # row j draws from [seed, 1000 + j], counted over all pairs
        a, b = (np.stack([head_mean(v, "cls_entropy_norm") for v in groups[s[k]]], axis=1) for k in ("a_group", "b_group"))
        low, high = loop_crossed_ci(a, b, np.random.default_rng([2, 1000 + j]), 100)
        assert (s["ci_low"], s["ci_high"]) == (pytest.approx(low, rel=1e-9), pytest.approx(high, rel=1e-9))
        assert s["diff"] == pytest.approx(a.mean() - b.mean(), rel=1e-9)
    assert [s["n_tests"] for s in out] == [3, 3, 3]  # one family over every pair
    assert [s["unit"] for s in out] == ["models", "models", "images"]
    assert out[2]["p_value"] == pytest.approx(stats.wilcoxon(head_mean(values["dino"], "cls_entropy_norm")
                                                             - head_mean(values["aim"], "cls_entropy_norm")).pvalue)
    assert set(LEGACY_SUMMARY_KEYS.values()) <= set(out[0]) and not set(LEGACY_SUMMARY_KEYS.values()) & set(out[1])
    markdown = run_cli(*args, "-f", "markdown").stdout
    tables = [block.strip().splitlines() for block in markdown.split("\n\n") if block.lstrip().startswith(("|", "**"))]
    headers = [line for table in tables for line in table if line.startswith("| metric |")]
    assert headers == [
        "| metric | layer | MIM | JEA | diff | 95% CI | effect [95% CI] | p | p holm | n | verdict |",
        "| metric | layer | MIM | autoregressive | diff | 95% CI | effect [95% CI] | p | p holm | n | verdict |",
        "| metric | layer | dino | aim | diff | 95% CI | effect [95% CI] | p | p holm | n | verdict |",
    ]
    for title in ("MIM vs JEA", "MIM vs autoregressive", "JEA vs autoregressive"):
        assert title in markdown
    figure, curves, _ = plot_curves(files, tmp_path / "curves.png", metrics=["cls_entropy_norm"], n_bootstrap=20)
    assert figure.is_file() and {c.family for c in curves["cls_entropy_norm"]} == {"mim", "jea", "autoregressive"}


def test_mim_jea_json_keeps_the_old_keys_as_aliases(tmp_path, run_cli):
    rng = np.random.default_rng(12)
    files = [write_metrics(tmp_path / "m.h5", synthetic(rng), family="mim"), write_metrics(tmp_path / "j.h5", synthetic(rng), family="jea")]
    summary = json.loads(run_cli("compare", *files, "-f", "json", "--bootstrap", 20).stdout)["summary"]
    for s in summary:
        assert (s["a_group"], s["b_group"]) == ("mim", "jea")
        for new, old in LEGACY_SUMMARY_KEYS.items():
            assert s[old] == s[new]
    table = run_cli("compare", *files, "--bootstrap", 20).stdout
    assert "MIM vs JEA" in table


def test_group_errors_and_notes(tmp_path, run_cli):
    rng = np.random.default_rng(13)
    files = [write_metrics(tmp_path / "a.h5", synthetic(rng), family="jea"), write_metrics(tmp_path / "b.h5", synthetic(rng), family="jea")]
    for groups, needle in (("mim", "takes two families A,B or all, not 'mim'"), ("mim,clip", "unknown family 'clip'"),
                           ("jea,jea", "names 'jea' twice")):
        result = run_cli("compare", *files, "--groups", groups)
        assert result.exit_code == 2 and needle in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    missing = run_cli("compare", *files, "--groups", "jea,language-supervised", "-f", "json", "--bootstrap", 20)
    assert missing.exit_code == 0 and json.loads(missing.stdout)["summary"] == []
    assert "no JEA-vs-language-supervised summary: no language-supervised model among the files" in missing.stderr
    alone = run_cli("compare", *files, "--groups", "all", "-f", "json", "--bootstrap", 20)
    assert json.loads(alone.stdout)["summary"] == [] and "every model is JEA" in alone.stderr
    from attnflow.compare import compare_files

    with pytest.raises(AttnflowError, match="unknown family 'clip'"):
        compare_files(files, groups=("jea", "clip"))
