"""The demo models' training scripts as resumable runs, their loss log and its plot, and the evaluation table."""
from __future__ import annotations

import json
import os
import re
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_demo import EXAMPLES, fake_fashion_mnist  # the fake data set and the examples folder on sys.path

from plot_training_loss import flatness  # noqa: E402  (examples/, put on sys.path by test_demo)

# (script, batch size, planned images, images of the first part of a split run): a few steps each on the CPU
PLANS = {"train_mae.py": (16, 128, 48), "train_dino.py": (8, 48, 16)}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return fake_fashion_mnist(tmp_path_factory.mktemp("fm"))


def train(monkeypatch, script: str, *flags) -> int:
    """Run a training script in this process; its exit status (0 when it returns)."""
    monkeypatch.setattr(sys, "argv", [script, *map(str, flags)])
    try:
        runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("script", sorted(PLANS))
def test_a_run_split_in_two_ends_with_the_weights_of_an_unsplit_run(tmp_path, monkeypatch, data_root, one_thread, script):
    batch, images, first_part = PLANS[script]
    common = ["--images-seen", images, "--batch-size", batch, "--device", "cpu", "--data-root", data_root,
              "--log-every", 2 * batch]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert train(monkeypatch, script, *common, "--checkpoint-dir", whole, "--out", tmp_path / "whole.pth") == 0
    assert train(monkeypatch, script, *common, "--checkpoint-dir", split, "--out", tmp_path / "split.pth",
                 "--stop-after-images", first_part) == 0
    paused = load(split / "state.pt")
    assert paused["step"] == first_part // batch and not paused["complete"] and not (tmp_path / "split.pth").exists()
    assert train(monkeypatch, script, *common, "--checkpoint-dir", split, "--out", tmp_path / "split.pth", "--resume") == 0

    a, b = load(whole / "state.pt"), load(split / "state.pt")
    assert a["complete"] and b["complete"] and b["runs"] == 2 and a["step"] == b["step"] == images // batch
    # Bit-identical on one device and thread count: every float32 weight, the optimiser's moments, DINO's centre.
    moved = False
    for name, module in a["modules"].items():
        assert module.keys() == b["modules"][name].keys()
        for key, value in module.items():
            assert torch.equal(value, b["modules"][name][key]), (name, key)
            # the resumed part really trained: the weights moved after the pause
            if "weight" in key:
                moved |= not torch.equal(value, paused["modules"][name][key])
    assert moved
    for key, value in a["tensors"].items():
        assert torch.equal(value, b["tensors"][key])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert a["losses"] == b["losses"] and len(a["losses"]) == images // batch
    # The exported float16 checkpoints, in MAE's / DINO's layout, are the same too.
    ea, eb = load(tmp_path / "whole.pth"), load(tmp_path / "split.pth")
    layouts = ("model",) if script == "train_mae.py" else ("teacher", "student")
    for layout in layouts:
        assert ea[layout].keys() == eb[layout].keys()
        assert all(v.dtype == torch.float16 and torch.equal(v, eb[layout][k]) for k, v in ea[layout].items())
    assert ea["training"]["images_seen"] == eb["training"]["images_seen"] == images

    # The loss log: one entry per 2 steps, each the float64 mean of its steps' losses, the same in both runs.
    logs = [[json.loads(line) for line in (d / "loss.jsonl").read_text().splitlines()] for d in (whole, split)]
    for log in logs:
        assert [e["images_seen"] for e in log] == list(range(2 * batch, images + 1, 2 * batch))
        for e in log:
            losses = a["losses"][e["step"] - 2:e["step"]]
            assert e["loss"] == pytest.approx(sum(losses) / 2, rel=1e-12) and e["lr"] > 0 and e["seconds"] > 0
    assert [e["loss"] for e in logs[0]] == [e["loss"] for e in logs[1]]


def test_resume_refuses_a_different_plan_and_a_fresh_run_refuses_to_overwrite(tmp_path, monkeypatch, data_root, capsys):
    flags = ["--batch-size", 16, "--device", "cpu", "--data-root", data_root, "--checkpoint-dir", tmp_path / "ck",
             "--out", tmp_path / "mae.pth"]
    assert train(monkeypatch, "train_mae.py", "--images-seen", 64, *flags, "--stop-after-images", 16) == 0
    with pytest.raises(SystemExit, match=r"--images-seen 64; resume it with the same value, not 128"):
        monkeypatch.setattr(sys, "argv", ["train_mae.py", "--images-seen", "128", *map(str, flags), "--resume"])
        runpy.run_path(str(EXAMPLES / "train_mae.py"), run_name="__main__")
    with pytest.raises(SystemExit, match=r"state.pt already holds a training state: pass --resume"):
        monkeypatch.setattr(sys, "argv", ["train_mae.py", "--images-seen", "64", *map(str, flags)])
        runpy.run_path(str(EXAMPLES / "train_mae.py"), run_name="__main__")
    assert train(monkeypatch, "train_mae.py", "--images-seen", 64, "--resume") == 2  # --resume needs --checkpoint-dir
    assert "--resume needs --checkpoint-dir" in capsys.readouterr().err


def test_sigterm_saves_the_state_and_the_resumed_run_finishes(tmp_path, data_root):
    # 50 steps of 4 images: after the first save (step 1) the run is busy far longer than the 20 ms poll takes
    PLANNED = 4 * 50  # noqa: N806
    ck, out = tmp_path / "ck", tmp_path / "mae.pth"
    command = [sys.executable, str(EXAMPLES / "train_mae.py"), "--images-seen", PLANNED, "--batch-size", 4,
               "--device", "cpu", "--data-root", data_root, "--checkpoint-dir", ck, "--checkpoint-every", 4, "--out", out]
    command = list(map(str, command))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not (ck / "state.pt").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGTERM)
    stdout, stderr = first.communicate(timeout=60)
    assert first.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and not out.exists()
    stopped = json.loads(stdout.strip().splitlines()[-1])
    assert stopped["stopped"] == "SIGTERM" and 0 < stopped["images_seen"] < PLANNED
    state = load(ck / "state.pt")
    assert state["step"] * 4 == stopped["images_seen"] and not state["complete"]
    assert not (ck / "state.pt.tmp").exists()

    second = subprocess.run(command + ["--resume"], capture_output=True, text=True, env=env, timeout=120)
    assert second.returncode == 0, second.stderr
    record = load(out)["training"]
    assert record["images_seen"] == PLANNED and record["runs"] == 2
    assert load(ck / "state.pt")["complete"]


def test_flatness_is_the_relative_drop_between_the_last_two_tenths(tmp_path):
    # loss = 2 - x / 1000 at x = 100, 200, ..., 1000 images: the window (800, 900] holds x = 900 (loss 1.1),
    # the window (900, 1000] holds x = 1000 (loss 1.0): drop (1.1 - 1.0) / 1.1.
    entries = [{"images_seen": x, "loss": 2 - x / 1000} for x in range(100, 1001, 100)]
    figure = flatness(entries)
    assert figure["loss_before"] == pytest.approx(1.1) and figure["loss_last"] == pytest.approx(1.0)
    assert figure["relative_drop"] == pytest.approx(0.1 / 1.1)
    # entries averaging more steps weigh more: (3 * 1.2 + 1 * 1.0) / 4 over (60, 80]; (40, 60] is empty -> None
    weighted = [{"images_seen": 70, "loss": 1.2, "steps_in_interval": 3}, {"images_seen": 80, "loss": 1.0}]
    assert flatness(weighted, last=0.25)["loss_last"] == pytest.approx(1.15)
    assert flatness(weighted, last=0.25)["relative_drop"] is None
    assert flatness(weighted, last=0.1)["relative_drop"] == pytest.approx((1.2 - 1.0) / 1.2)  # (64, 72] vs (72, 80]


def run_example(monkeypatch, capsys, script: str, *args) -> str:
    """Run an example script's main in this process; its stdout."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    return capsys.readouterr().out


def test_plot_script_writes_the_png_and_prints_the_flatness(tmp_path, monkeypatch, capsys):
    log = tmp_path / "mae" / "loss.jsonl"
    log.parent.mkdir()
    log.write_text("".join(json.dumps({"images_seen": x, "loss": 1.0 + 1.0 / x}) + "\n" for x in range(10, 1001, 10)))
    stdout = run_example(monkeypatch, capsys, "plot_training_loss.py", log.parent, "--out", tmp_path / "curves.png", "--log-x")
    line = json.loads(stdout.splitlines()[0])
    # windows (800, 900] and (900, 1000]: means of 1 + 1/x over ten x each, computed here in float64
    before = sum(1 + 1 / x for x in range(810, 901, 10)) / 10
    last = sum(1 + 1 / x for x in range(910, 1001, 10)) / 10
    assert line["run"] == "mae" and line["relative_drop"] == pytest.approx((before - last) / before)
    assert line["verdict"] == "flattened"
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluation_prints_the_markdown_table_with_intervals_for_the_random_baseline(tmp_path, data_root, monkeypatch, capsys):
    table = tmp_path / "table.md"
    stdout = run_example(monkeypatch, capsys, "evaluate_demo.py", "demo:random", "--train", 48, "--test", 32,
                         "--data-root", data_root, "--bootstrap", 200, "--table", table)
    row = json.loads(stdout.splitlines()[0])
    lines = table.read_text().splitlines()
    assert lines[0] == "| model | k-NN, cls | linear, cls | k-NN, mean patch | linear, mean patch |"
    assert lines[2].startswith("| random weights, same architecture |") and len(lines) == 3
    cells = re.findall(r"(\d+\.\d)% \[(\d+\.\d), (\d+\.\d)\]", lines[2])
    assert len(cells) == 4
    for (acc, low, high), key in zip(cells, ("knn_cls", "linear_cls", "knn_mean", "linear_mean")):
        assert float(low) <= float(acc) <= float(high)
        # 32 test images: an accuracy is a multiple of 1/32 (the JSON line rounds to 4 decimals), as the table shows
        assert abs(row[key] * 32 - round(row[key] * 32)) < 32 * 5e-5
        assert float(acc) == pytest.approx(100 * row[key], abs=0.051)
    assert lines[2] in stdout


@pytest.mark.parametrize("target, expected", [("raw", 0.25), ("normalised", 0.0)])
def test_the_mae_loss_reconstructs_the_chosen_pixel_target(target, expected):
    """With a decoder that predicts 0 everywhere, the loss is the masked patches' mean squared target: a flat
    image of 0.5 has raw pixels 0.5 (0.25) and per-patch normalised pixels 0 (its patches have no variance)."""
    from train_mae import MaskedAutoencoder

    torch.manual_seed(0)
    model = MaskedAutoencoder(decoder_dim=16, decoder_depth=1, pixel_target=target)
    torch.nn.init.zeros_(model.decoder_pred.weight)
    torch.nn.init.zeros_(model.decoder_pred.bias)
    with torch.no_grad():
        loss = model(torch.full((3, 1, 48, 48), 0.5))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_the_mae_refuses_a_mask_ratio_that_masks_nothing_or_everything():
    from train_mae import MaskedAutoencoder

    for ratio in (0.0, 0.999):
        with pytest.raises(ValueError, match="mask ratio"):
            MaskedAutoencoder(mask_ratio=ratio)


def test_evaluation_refuses_a_checkpoint_it_cannot_read_before_measuring_anything(tmp_path, data_root, monkeypatch, capsys):
    foreign = tmp_path / "notes.pth"
    foreign.write_text("not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        run_example(monkeypatch, capsys, "evaluate_demo.py", "demo:random", f"demo:mae={foreign}", "--train", 48,
                    "--test", 32, "--data-root", data_root)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing measured: demo:random, named first, printed no row
    assert captured.err.splitlines()[-1].startswith(f"evaluate_demo.py: error: demo:mae={foreign}: checkpoint {foreign}")
    assert "Traceback" not in captured.err
