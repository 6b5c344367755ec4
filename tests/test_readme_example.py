"""The README's Python examples run as written (every ```python block, each with what it needs made here,
without network), its links lead somewhere, and its Architecture table lists every module."""
from __future__ import annotations

import re
from pathlib import Path

import timm
import torch

from conftest import write_images

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def python_examples() -> dict[str, str]:
    """Every ```python block of the README, by the ### or ## heading it is under."""
    examples, heading, block = {}, "", None
    for line in README.read_text().splitlines(keepends=True):
        if block is not None:
            if line.startswith("```"):
                assert heading not in examples, f"two Python examples under '{heading}': give each its heading"
                examples[heading], block = "".join(block), None
            else:
                block.append(line)
        elif line.startswith("```python"):
            block = []
        elif line.startswith("## ") or line.startswith("### "):
            heading = line.lstrip("#").strip()
    return examples


def run_example(heading: str, tmp_path, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(python_examples()[heading], f"{README} ({heading})", "exec"), namespace)
    return namespace


def test_every_python_example_is_run_here():
    # A new ```python block needs a test below that makes what it reads (files, checkpoints) and runs it.
    assert set(python_examples()) == {"A pipeline in Python", "Capture in your own code", "Notes and errors"}


def test_readme_pipeline_example_runs(tmp_path, monkeypatch, capsys):
    namespace = run_example("A pipeline in Python", tmp_path, monkeypatch)
    out = capsys.readouterr().out
    assert "(8, 6, 2)" in out and "| last |" in out and "tiny-0 (untrained)" in out
    assert [r["pool"] for r in namespace["records"]] == ["cls", "mean"]
    for name in ("tiny0.h5", "tiny1.h5", "tiny0_metrics.h5", "tiny1_metrics.h5"):
        assert (tmp_path / name).is_file(), name


def test_readme_capture_example_runs(tmp_path, monkeypatch):
    code = python_examples()["Capture in your own code"]
    checkpoint = re.search(r'checkpoint="([^"]+)"', code).group(1)
    torch.manual_seed(0)
    torch.save(timm.create_model("vit_small_patch16_224", num_classes=0).state_dict(), tmp_path / checkpoint)
    write_images(tmp_path / "images", 8, size=(240, 260), classes=("cat", "dog"))
    namespace = run_example("Capture in your own code", tmp_path, monkeypatch)
    assert namespace["captured"].attn.shape == (8, 12, 6, 197, 197)
    assert (tmp_path / "dino.h5").is_file() and (tmp_path / "dino_metrics.h5").is_file()


def test_readme_notes_example_runs(tmp_path, monkeypatch):
    torch.manual_seed(0)
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=0).state_dict(), tmp_path / "weights.pth")
    namespace = run_example("Notes and errors", tmp_path, monkeypatch)
    [text] = namespace["notes"]
    assert text.startswith("the family of weights.pth is unknown")


def github_anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of ``text``: lower case, punctuation other than - and _ dropped,
    spaces as hyphens; a repeated heading gets -1, -2, ..."""
    anchors: set[str] = set()
    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        match = None if in_code else re.match(r"#{1,6} (.*)", line)
        if match:
            base = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            anchor, k = base, 0
            while anchor in anchors:
                k += 1
                anchor = f"{base}-{k}"
            anchors.add(anchor)
    return anchors


def test_readme_links_lead_somewhere():
    for document in (README, ROOT / "docs" / "cli.md", ROOT / "CHANGELOG.md"):
        text = document.read_text()
        anchors = github_anchors(text)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            if path:
                assert (document.parent / path).exists(), f"{document.name} links to a missing {path}"
            elif anchor:
                assert anchor in anchors, f"{document.name} links to #{anchor}, which no heading has"


def test_architecture_table_lists_every_module():
    text = README.read_text()
    section = text[text.index("\n## Architecture\n"):]
    section = section[: section.index("\n## ", 1)]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    listed = {name for row in rows for name in re.findall(r"`([\w/]+\.py)`", row)}
    modules = {p.relative_to(ROOT / "attnflow").as_posix() for p in (ROOT / "attnflow").rglob("*.py")}
    assert modules - listed == set(), f"README's Architecture table lacks {sorted(modules - listed)}"
    assert listed - modules == set(), f"README's Architecture table lists missing modules {sorted(listed - modules)}"
