"""The shipped demo: its checkpoints, its images, `attnflow demo`, and the training scripts."""
from __future__ import annotations

import csv
import gzip
import io
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from attnflow import AttentionCapture, build_model, load_model, open_cache
from attnflow.demo import demo_images
from attnflow.demo_models import DEMO_MODELS, TRAINED_DEMO_MODELS, demo_data_dir

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
from demo_data import CLASS_NAMES, read_idx  # noqa: E402  (the data recipe lives with the training scripts)


def test_demo_data_is_complete_and_balanced():
    data = demo_data_dir()
    images = demo_images()
    assert len(images) == 200
    assert sorted({p.parent.name for p in images}) == sorted(CLASS_NAMES)
    assert all(sum(p.parent.name == c for p in images) == 20 for c in CLASS_NAMES)
    assert all((data / "masks" / p.name).is_file() for p in images)
    for name in TRAINED_DEMO_MODELS:
        assert (data / DEMO_MODELS[name].checkpoint).stat().st_size <= 4_000_000
    with np.load(data / "probe_images.npz") as probe:
        assert probe["images"].shape == (5000, 48, 48) and probe["images"].dtype == np.uint8
        assert np.bincount(probe["labels"]).tolist() == [500] * 10
        assert [str(n) for n in probe["class_names"]] == list(CLASS_NAMES)
    picked = demo_images(20)
    assert len(picked) == 20 and len({p.parent.name for p in picked}) == 10


@pytest.mark.parametrize("name, layout_key", [("demo:mae", "model"), ("demo:dino", "teacher")])
def test_shipped_checkpoints_load_in_their_native_layout(name, layout_key):
    loaded = build_model(name)
    assert loaded.family == DEMO_MODELS[name].family and loaded.label == name
    raw = torch.load(loaded.checkpoint, map_location="cpu", weights_only=True)
    assert layout_key in raw
    if name == "demo:mae":
        assert any(k.startswith("decoder_") for k in raw["model"])
    else:
        assert any(k.startswith("backbone.") for k in raw["teacher"]) and any(k.startswith("module.backbone.") for k in raw["student"])
        student = load_model(name, loaded.checkpoint, checkpoint_key="student")
        assert not torch.equal(student.blocks[0].attn.qkv.weight, loaded.model.blocks[0].attn.qkv.weight)
    same = load_model(name, loaded.checkpoint)  # the file path gives the same model as the name
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), loaded.model.state_dict().values()))
    with AttentionCapture(loaded.model) as capture, torch.no_grad():
        loaded.model.forward_features(torch.randn(3, 1, 48, 48))
        attn = capture.pop().attn
    assert attn.shape == (3, 6, 4, 65, 65)


def test_demo_command_end_to_end(tmp_path, run_cli):
    out = tmp_path / "demo"
    result = run_cli("demo", "--out", out, "--limit", 20, "--probe-images", 300, "--format", "csv")
    assert result.exit_code == 0, result.stderr
    for name in ("mae.h5", "dino.h5", "random.h5", "mae_metrics.h5", "dino_metrics.h5", "random_metrics.h5", "compare.csv",
                 "curves.png", "maps.png", "mae_probe.h5", "dino_probe.h5", "random_probe.h5", "probe.csv",
                 "mae_perturb.h5", "dino_perturb.h5", "perturb.csv", "perturb.png"):
        assert (out / name).is_file(), name
    compare_part, rest = result.stdout.split("\nmodel,family,relevance,auc_positive,", 1)
    perturb_part, probe_part = rest.split("\nmodel,family,pool,", 1)
    areas = list(csv.DictReader(io.StringIO("model,family,relevance,auc_positive," + perturb_part)))
    assert [(a["model"], a["relevance"]) for a in areas] == [
        (m, r) for m in ("demo:mae", "demo:dino") for r in ("cls-attn", "rollout", "random")]
    assert all(a["n_images"] == "20" for a in areas)
    curves = list(csv.DictReader(io.StringIO((out / "perturb.csv").read_text())))
    assert len(curves) == 2 * 3 * 2 * 10  # models x maps x orders x (0 and the 9 fractions)
    rows = list(csv.DictReader(io.StringIO(compare_part + "\n")))
    assert rows == list(csv.DictReader(io.StringIO((out / "compare.csv").read_text())))
    probes = list(csv.DictReader(io.StringIO("model,family,pool," + probe_part)))
    assert probes == list(csv.DictReader(io.StringIO((out / "probe.csv").read_text())))
    assert {(p["model"], p["pool"]) for p in probes} >= {("demo:mae", "abmilp"), ("demo:dino", "cls-attn")}
    assert all(p["n_train"] == "240" and p["n_test"] == "60" for p in probes)
    assert {r["model"] for r in rows} == {"demo:mae", "demo:dino", "demo:random"}
    assert {r["family"] for r in rows} == {"mim", "jea", "untrained"}
    assert {p["model"] for p in probes} == {"demo:mae", "demo:dino", "demo:random"}
    gains = [p for p in probes if p["pool"] != "cls" and p["gain_p"] != "nan"]
    assert gains and all(float(p["gain_p"]) <= float(p["gain_p_holm"]) <= 1 for p in gains)
    assert all(float(p["gain_ci_low"]) <= float(p["gain_over_cls"]) <= float(p["gain_ci_high"]) for p in gains)
    # the command the demo prints for its probe numbers gives them, Holm-adjusted p-values included
    command = result.stderr.split("the same numbers: attnflow ", 1)[1].split()
    assert command[0] == "probe" and [Path(c).name for c in command[1:4]] == ["mae_probe.h5", "dino_probe.h5", "random_probe.h5"]
    again = run_cli(*command, "-f", "csv")
    assert again.exit_code == 0, again.stderr
    key = ("model", "pool", "evaluator", "accuracy", "gain_over_cls", "gain_p_holm")
    assert [tuple(p[k] for k in key) for p in csv.DictReader(io.StringIO(again.stdout))] == \
        [tuple(p[k] for k in key) for p in probes]
    assert "cls_fg_mass" in {r["metric"] for r in rows} and all(r["n_images"] == "20" for r in rows)
    with open_cache(out / "mae.h5") as cache:
        a = cache.attrs
        assert a["model"] == "demo:mae" and a["has_masks"] and a["has_labels"] and len(cache) == 20
        rebuilt = load_model(a["model"], a["checkpoint"] or None, img_size=a["img_size"][0])
    assert isinstance(rebuilt, torch.nn.Module)
    again = run_cli("demo", "--out", out, "--limit", 20, "--no-probe")
    assert again.exit_code == 1 and "--overwrite" in again.stderr
    # the table, on fewer images and without the stages checked above
    table = run_cli("demo", "--out", out, "--limit", 10, "--overwrite", "--no-probe", "--no-perturb")
    assert table.exit_code == 0 and "MIM vs JEA" in table.stdout and "compare.csv" in table.stderr
    assert "JEA vs untrained" in table.stdout and "MIM cls" not in table.stdout  # two networks: verdicts name them
    assert "one network per group (demo:mae, demo:dino)" in table.stderr


def fake_fashion_mnist(root: Path, n: int = 64) -> Path:
    """idx files in Fashion-MNIST's format with random items, so the training scripts can run anywhere."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in images.shape) + images.tobytes())
        with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + labels.tobytes())
    assert read_idx(root / "train-images-idx3-ubyte.gz").shape == (n, 28, 28)
    return root


@pytest.mark.parametrize("script, family", [("train_mae.py", "mim"), ("train_dino.py", "jea")])
def test_training_scripts_run_a_few_steps(tmp_path, monkeypatch, script, family):
    root = fake_fashion_mnist(tmp_path / "fm")
    out = tmp_path / f"{family}.pth"
    monkeypatch.setattr(sys, "argv", [script, "--images-seen", "32", "--batch-size", "16", "--device", "cpu",
                                      "--data-root", str(root), "--out", str(out)])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    name = "demo:mae" if family == "mim" else "demo:dino"
    loaded = build_model(name, out)
    assert loaded.family == family
    record = torch.load(out, map_location="cpu", weights_only=True)["training"]
    assert record["images_seen"] == 32 and record["steps"] == 2
