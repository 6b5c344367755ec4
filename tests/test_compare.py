"""attnflow compare on real metrics files with known values: statistics, formats, layouts, errors."""
from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
from scipy import stats

from attnflow.compare import ROW_COLUMNS
from conftest import synthetic, write_metrics

def parse_csv(text: str, delimiter=",") -> list[dict]:
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    assert tuple(reader.fieldnames) == ROW_COLUMNS
    return list(reader)


def loop_bootstrap_ci(x: np.ndarray, rng: np.random.Generator, B: int) -> tuple[float, float]:
    means = []
    for _ in range(B):
        sample = x[rng.integers(0, len(x), len(x))]
        means.append(np.mean(sample[np.isfinite(sample)]) if np.isfinite(sample).any() else np.nan)
    return tuple(np.percentile(means, [2.5, 97.5]))


def test_csv_equals_a_direct_numpy_computation(tmp_path, run_cli):
    rng = np.random.default_rng(0)
    a = synthetic(rng)
    a["cls_entropy_norm"][3, :, :] = np.nan  # a missing value is left out, not propagated
    b = synthetic(rng, n=25, shift=0.1)
    files = [write_metrics(tmp_path / "a.h5", a, family="mim"), write_metrics(tmp_path / "b.h5", b, family="jea")]
    result = run_cli("compare", *files, "--format", "csv", "--bootstrap", 300, "--seed", 5, "--heads", "max")
    assert result.exit_code == 0, result.stderr
    rows = parse_csv(result.stdout)
    assert len(rows) == 2 * 4 * 4  # models x metrics x layers
    for row in rows:
        model_index = 0 if row["model"] == "a" else 1
        data = (a, b)[model_index][row["metric"]]
        layer = int(row["layer"])
        x = data[:, layer].max(-1) if data.ndim == 3 else data[:, layer]
        x = x.astype(np.float32).astype(np.float64)  # as stored
        finite = x[np.isfinite(x)]
        assert int(row["n_images"]) == finite.size
        assert float(row["mean"]) == pytest.approx(finite.mean(), rel=1e-7)
        assert float(row["std"]) == pytest.approx(finite.std(ddof=1), rel=1e-6)
        low, high = loop_bootstrap_ci(x, np.random.default_rng([5, model_index]), 300)
        assert float(row["ci_low"]) == pytest.approx(low, rel=1e-7)
        assert float(row["ci_high"]) == pytest.approx(high, rel=1e-7)
    assert {r["family"] for r in rows} == {"mim", "jea"}
    assert int(next(r for r in rows if r["model"] == "a" and r["metric"] == "cls_entropy_norm")["n_images"]) == 39


def test_identical_inputs_show_no_difference(tmp_path, run_cli):
    values = synthetic(np.random.default_rng(1))
    write_metrics(tmp_path / "x.h5", values)
    write_metrics(tmp_path / "y.h5", values)
    result = run_cli("compare", "--mim", tmp_path / "x.h5", "--jea", tmp_path / "y.h5", "--format", "json", "--bootstrap", 200)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)["summary"]
    assert {s["metric"] for s in summary} == {"cls_self", "cls_entropy_norm", "attn_distance", "magnitude_cls"}
    for s in summary:  # the same images: paired, every per-image difference zero
        assert (s["unit"], s["design"], s["effect_size"]) == ("images", "paired", "rank_biserial")
        assert s["diff"] == 0 and s["p_value"] == pytest.approx(1.0) and s["effect"] == 0
        assert s["ci_low"] <= 0 <= s["ci_high"] and s["verdict"] == "no clear difference"


def test_shifted_inputs_give_a_tiny_p_and_the_right_verdict(tmp_path, run_cli):
    rng = np.random.default_rng(2)
    mim = synthetic(rng, shift=0.2)  # MIM cls attention clearly more uniform
    jea = synthetic(rng)
    write_metrics(tmp_path / "mae.h5", mim, family="mim")
    write_metrics(tmp_path / "dino.h5", jea, family="jea")
    result = run_cli("compare", tmp_path / "mae.h5", tmp_path / "dino.h5", "--format", "json", "--metric", "cls_entropy_norm",
                     "--summary-layers", "0,-1", "--bootstrap", 500)
    out = json.loads(result.stdout)
    assert [s["layer"] for s in out["summary"]] == ["0", "-1"]
    for s in out["summary"]:  # two networks over the same images: paired, and the verdict names them
        layer = -1 if s["layer"] == "-1" else 0
        x = mim["cls_entropy_norm"][:, layer].mean(-1).astype(np.float32).astype(np.float64)
        y = jea["cls_entropy_norm"][:, layer].mean(-1).astype(np.float32).astype(np.float64)
        assert s["p_value"] == pytest.approx(stats.wilcoxon(x - y).pvalue) and s["mim_mean"] == pytest.approx(x.mean())
        assert s["diff"] > 0.15 and s["effect"] == pytest.approx(1.0)
        assert 0 < s["ci_low"] < s["diff"] < s["ci_high"]
        assert s["verdict"] == "mae cls attention more uniform than dino"
    assert {(s["n_tests"], s["correction"]) for s in out["summary"]} == {(2, "holm")}


def test_formats_parse(tmp_path, run_cli):
    rng = np.random.default_rng(3)
    write_metrics(tmp_path / "m.h5", synthetic(rng), family="mim")
    write_metrics(tmp_path / "j.h5", synthetic(rng), family="jea")
    files = [tmp_path / "m.h5", tmp_path / "j.h5"]
    tsv = run_cli("compare", *files, "-f", "tsv", "--bootstrap", 50)
    assert len(parse_csv(tsv.stdout, "\t")) == 32
    markdown = run_cli("compare", *files, "-f", "markdown", "--bootstrap", 50).stdout
    tables = [block for block in markdown.split("\n\n") if block.startswith("|")]
    assert len(tables) == 5  # four metrics and the summary
    for table in tables:
        lines = table.strip().splitlines()
        assert all(line.startswith("| ") and line.endswith(" |") for line in (lines[0], *lines[2:]))
        assert set(lines[1]) <= set("|-") and lines[1].count("|") == lines[0].count(" | ") + 2
    plain = run_cli("compare", *files, "--bootstrap", 50).stdout
    assert "\x1b[" not in plain and not set("┃│━─┏┡") & set(plain)
    assert "m (mim)" in plain and "MIM vs JEA" in plain
    out = tmp_path / "table.csv"
    written = run_cli("compare", *files, "-f", "csv", "-o", out, "--bootstrap", 50)
    assert written.stdout == "" and len(parse_csv(out.read_text())) == 32


def test_relative_depth_aligns_models_of_different_depths(tmp_path, run_cli):
    rng = np.random.default_rng(4)
    write_metrics(tmp_path / "base.h5", synthetic(rng, L=4), family="mim", num_layers=4)
    write_metrics(tmp_path / "large.h5", synthetic(rng, L=8), family="jea", num_layers=8)
    files = [tmp_path / "base.h5", tmp_path / "large.h5"]
    absolute = run_cli("compare", *files, "-f", "csv", "--bootstrap", 20)
    assert absolute.exit_code == 0 and "different depths" in absolute.stderr
    layers = {m: sorted({int(r["layer"]) for r in parse_csv(absolute.stdout) if r["model"] == m}) for m in ("base", "large")}
    assert layers == {"base": [0, 1, 2, 3], "large": list(range(8))}
    relative = run_cli("compare", *files, "-f", "csv", "--depth", "relative", "--bootstrap", 20)
    rows = parse_csv(relative.stdout)
    pairs = sorted({int(r["layer"]) for r in rows if r["model"] == "large"})
    assert pairs == [1, 3, 5, 7]  # depth 1/4, 2/4, 3/4, 4/4 of an 8-block model
    table = run_cli("compare", *files, "--depth", "relative", "--layers", "0.5,1", "--bootstrap", 20).stdout
    first_table = table.split("\n\n")[0].splitlines()
    assert [line.split()[0] for line in first_table[2:]] == ["0.5", "1"]
    summary = json.loads(run_cli("compare", *files, "-f", "json", "--depth", "relative", "--bootstrap", 20).stdout)["summary"]
    assert all(s["n_mim"] == 40 and s["n_jea"] == 40 for s in summary)


def test_no_cls_model_among_others(tmp_path, run_cli):
    rng = np.random.default_rng(5)
    write_metrics(tmp_path / "ijepa.h5", synthetic(rng, has_cls=False), family="mim", has_cls=False, img_size=(48, 48))
    write_metrics(tmp_path / "dino.h5", synthetic(rng), family="jea")
    result = run_cli("compare", tmp_path / "ijepa.h5", tmp_path / "dino.h5", "-f", "json", "--bootstrap", 20)
    assert result.exit_code == 0, result.stderr
    assert "ijepa has no cls token" in result.stderr and "different resolutions" in result.stderr
    out = json.loads(result.stdout)
    nan_rows = [r for r in out["rows"] if r["model"] == "ijepa" and r["metric"] == "cls_entropy_norm"]
    assert nan_rows and all(r["mean"] is None and r["n_images"] == 0 for r in nan_rows)
    by_metric = {s["metric"]: s for s in out["summary"]}
    assert by_metric["cls_entropy_norm"]["verdict"] == "not available"
    distance = by_metric["attn_distance"]  # the metrics a no-cls model does have are still compared
    assert distance["n_mim"] == 40 and distance["n_jea"] == 40 and math.isfinite(distance["diff"])


def test_labels_families_and_pooling(tmp_path, run_cli):
    rng = np.random.default_rng(6)
    for name in ("a", "b", "c"):
        write_metrics(tmp_path / f"{name}.h5", synthetic(rng), label="same")
    files = (tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "c.h5")
    families = ("--family", "mim", "--family", "mim", "--family", "jea")
    refused = run_cli("compare", *files, *families, "-f", "json", "--bootstrap", 20, "-m", "cls_self")
    assert refused.exit_code == 1 and refused.stdout == ""
    assert refused.stderr.strip().splitlines() == [
        f"attnflow: error: {tmp_path / 'a.h5'} and {tmp_path / 'b.h5'} hold the same network (label same): a summary "
        "counts each network once; leave one out, or give --label to tell two different networks apart"]
    result = run_cli("compare", *files, *families, "--label", "x", "--label", "y", "-f", "json", "--bootstrap", 20,
                     "-m", "cls_self")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert sorted({r["model"] for r in out["rows"]}) == ["same", "x", "y"]
    assert "MIM vs JEA: 2 vs 1 networks are the replicates (images paired over 40 shared images)" in result.stderr
    summary = out["summary"][0]
    assert (summary["n_models_a"], summary["n_models_b"], summary["mim_models"]) == (2, 1, "x, y")
    assert summary["min_p"] == pytest.approx(2 / 3) and summary["verdict"] == "no verdict: too few models for this design"
    relabelled = run_cli("compare", tmp_path / "a.h5", "--label", "mae", "-f", "csv", "--bootstrap", 5, "-m", "cls_self")
    assert {r["model"] for r in parse_csv(relabelled.stdout)} == {"mae"}


def test_errors(tmp_path, run_cli, image_dir):
    from attnflow.extract import extract
    from attnflow.images import list_images
    from conftest import tiny

    write_metrics(tmp_path / "ok.h5", synthetic(np.random.default_rng(7)))
    extract(tiny("plain"), list_images([str(image_dir)]), tmp_path / "cache.h5", workers=0)
    (tmp_path / "text.h5").write_text("no")
    for path, needle in ((tmp_path / "cache.h5", "is an attention cache, not a metrics file"),
                         (tmp_path / "text.h5", "not a readable HDF5 file"),
                         (tmp_path / "absent.h5", "no such file")):
        result = run_cli("compare", tmp_path / "ok.h5", path)
        assert result.exit_code == 1 and needle in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert run_cli("compare").exit_code == 2
    assert run_cli("compare", tmp_path / "ok.h5", "--layers", "first").exit_code == 2
    assert run_cli("compare", tmp_path / "ok.h5", "--heads", "median").exit_code == 2
    unknown = run_cli("compare", tmp_path / "ok.h5", "--metric", "cls_vibes")
    assert unknown.exit_code == 2 and "unknown metric 'cls_vibes'" in unknown.stderr  # a usage error
    missing = run_cli("compare", tmp_path / "ok.h5", "--metric", "rollout_entropy_norm", "-f", "csv")
    assert missing.exit_code == 0 and "no file has metric 'rollout_entropy_norm'" in missing.stderr
