"""Every long step reports its progress (probe epochs, the demo's stages), drawn on stderr only on a terminal
and never under --quiet; torch's threads follow one policy that --threads and OMP_NUM_THREADS override."""
from __future__ import annotations

import pytest
import torch

from attnflow.demo import demo_images, run_demo
from attnflow.extract import extract
from attnflow.models import build_model
from attnflow.probe import probe_caches
from attnflow.threads import SMALL_HEAD_THREADS, available_cores, policy_threads, set_threads, threads_for

EPOCHS = 3


@pytest.fixture(scope="module")
def probe_cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("progress")
    return extract(build_model("demo:mae"), demo_images(40), folder / "mae.h5", store="rows", save_tokens=True,
                   labels_from_dirs=True, workers=0).path


@pytest.fixture
def restore_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_probe_reports_every_pool_and_epoch(probe_cache):
    heard = []
    probe_caches([(probe_cache, None)], split=0.5, pools=["cls", "abmilp"], epochs=EPOCHS, n_bootstrap=10,
                 on_progress=lambda step, done, total: heard.append((step, done, total)))
    steps = list(dict.fromkeys(step for step, _, _ in heard))
    assert steps == ["demo:mae: reading attention", "demo:mae: cls knn", "demo:mae: cls linear", "demo:mae: abmilp linear"]
    for step in ("demo:mae: cls linear", "demo:mae: abmilp linear"):  # a linear probe: epoch by epoch, to the end
        assert [(done, total) for s, done, total in heard if s == step] == [(e, EPOCHS) for e in range(EPOCHS + 1)]
    assert [(done, total) for s, done, total in heard if s == "demo:mae: cls knn"] == [(0, 1), (1, 1)]


def test_probe_bar_on_a_terminal_only_and_never_quiet(probe_cache, run_cli, monkeypatch, restore_threads):
    args = ("probe", probe_cache, "--split", "0.5", "--pool", "abmilp", "--evaluator", "linear", "--epochs", EPOCHS,
            "--bootstrap", 10, "-f", "csv")
    piped = run_cli(*args)  # stderr captured: not a terminal
    assert piped.exit_code == 0 and "abmilp linear" not in piped.stderr
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich then treats stderr as a terminal
    shown = run_cli(*args)
    assert shown.exit_code == 0 and "demo:mae: abmilp linear" in shown.stderr and f"{EPOCHS}/{EPOCHS}" in shown.stderr
    assert shown.stdout == piped.stdout  # data alone on stdout
    quiet = run_cli(*args, "--quiet")
    assert quiet.exit_code == 0 and "abmilp linear" not in quiet.stderr


def test_thread_policy(restore_threads, monkeypatch):
    assert policy_threads("heads") == SMALL_HEAD_THREADS == 1
    # a forward pass keeps every core whatever the workers: its sums' order, and so its bits, stay the same
    assert policy_threads("model", workers=1) == policy_threads("model", workers=available_cores() + 3) == torch.get_num_threads()
    assert set_threads(None, "heads") == 1 and torch.get_num_threads() == 1
    assert set_threads(2, "heads") == 2 and torch.get_num_threads() == 2  # --threads overrides
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert set_threads(None, "heads") == 2  # as does OMP_NUM_THREADS
    torch.set_num_threads(2)
    with threads_for(1, "model"):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2  # a library call leaves the caller's setting as it was


def test_probe_cli_trains_heads_on_one_thread(probe_cache, run_cli, restore_threads):
    args = ("probe", probe_cache, "--split", "0.5", "--pool", "cls", "--epochs", 1, "--bootstrap", 10, "-f", "csv")
    torch.set_num_threads(2)
    assert run_cli(*args).exit_code == 0 and torch.get_num_threads() == 1
    assert run_cli(*args, "--threads", "2").exit_code == 0 and torch.get_num_threads() == 2
    assert run_cli(*args, "--threads", "0").exit_code == 2


def test_demo_names_each_stage(tmp_path, restore_threads):
    stages, steps = [], set()
    run_demo(tmp_path / "demo", limit=10, probe=False, perturb=False, n_bootstrap=20, on_stage=stages.append,
             on_progress=lambda step, done, total: steps.add((step, done == total)))
    assert [s.split(" (")[0] for s in stages] == ["extracting demo:mae", "extracting demo:dino", "extracting demo:random",
                                                  "comparing", "drawing figures"]
    assert ("extract demo:mae", True) in steps and ("extract demo:dino", True) in steps


def test_demo_cli_says_what_each_stage_cost_and_what_it_left(tmp_path, run_cli, restore_threads):
    result = run_cli("demo", "--out", tmp_path / "d", "--limit", 10, "--no-probe", "--no-perturb", "-f", "csv")
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    assert "attnflow: demo: extracting demo:mae (10 images, metrics in the same pass)" in lines
    [costs] = [line for line in lines if line.startswith("attnflow: demo: seconds per stage: ")]
    for stage in ("extracting demo:mae", "extracting demo:dino", "comparing", "drawing figures", "total"):
        assert stage in costs
    [disk] = [line for line in lines if " holds " in line]
    assert disk.endswith(" MB") and str(tmp_path / "d") in disk
    quiet = run_cli("demo", "--out", tmp_path / "q", "--limit", 10, "--no-probe", "-f", "csv", "--quiet")
    assert quiet.exit_code == 0 and "extracting" not in quiet.stderr and "seconds per stage" not in quiet.stderr
