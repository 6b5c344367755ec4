"""Help texts print as written (no word lost to markup), and wrong flags are usage errors (exit 2)."""
from __future__ import annotations

import re

import numpy as np
import typer

from attnflow.cli import app
from conftest import synthetic, write_metrics


def commands():
    """(argv prefix, click command) of every attnflow command, plot's subcommands included."""
    root = typer.main.get_command(app)
    for name, command in root.commands.items():
        if hasattr(command, "commands"):
            for sub, subcommand in command.commands.items():
                yield [name, sub], subcommand
        else:
            yield [name], command


def test_every_bracketed_word_of_a_help_text_is_shown(run_cli):
    checked = 0
    for argv, command in commands():
        texts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
        brackets = {b for text in texts for b in re.findall(r"\[[^\]\s]+\]", text)}
        if not brackets:
            continue
        shown = " ".join(run_cli(*argv, "--help").stdout.split())
        for bracket in brackets:
            assert bracket in shown, f"attnflow {' '.join(argv)} --help lost {bracket}"
            checked += 1
    assert checked >= 1  # "Beyond [cls]" in extract's --magnitude and --preprocess at least


def test_figure_format_and_unknown_metric_are_usage_errors(run_cli, tmp_path):
    metrics = write_metrics(tmp_path / "m.h5", synthetic(np.random.default_rng(0)))
    jpg = run_cli("plot", "curves", metrics, "-o", tmp_path / "x.jpg")
    assert jpg.exit_code == 2 and "-o" in jpg.stderr and ".png, .svg, .pdf" in jpg.stderr
    assert len(jpg.stderr.strip().splitlines()) == 1
    for argv in (("plot", "curves", metrics, "-o", tmp_path / "c.png"), ("compare", metrics)):
        unknown = run_cli(*argv, "-m", "nosuch_metric")
        assert unknown.exit_code == 2 and "unknown metric 'nosuch_metric'" in unknown.stderr, unknown.stderr
        assert "Traceback" not in unknown.stderr


def test_save_heads_folder_is_created(tmp_path, run_cli):
    from attnflow.demo import demo_images
    from attnflow.extract import extract
    from attnflow.models import build_model

    cache = extract(build_model("demo:mae"), demo_images(20), tmp_path / "c.h5", store="none", save_tokens=True,
                    labels_from_dirs=True, workers=0).path
    heads = tmp_path / "new" / "heads"
    result = run_cli("probe", cache, "--split", "0.5", "--pool", "abmilp", "--evaluator", "linear", "--epochs", "1",
                     "--bootstrap", "10", "--save-heads", heads, "-f", "csv")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in heads.iterdir()) == ["demo_mae.abmilp.pt"]  # the README's naming rule
    (tmp_path / "file").write_text("")
    refused = run_cli("probe", cache, "--split", "0.5", "--pool", "abmilp", "--save-heads", tmp_path / "file")
    assert refused.exit_code == 1 and "is a file" in refused.stderr
