"""The README's Python example runs as written: against a checkpoint saved here and images written here,
without network."""
from __future__ import annotations

import re
from pathlib import Path

import timm
import torch

from conftest import write_images

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example() -> str:
    [block] = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return block


def test_readme_python_example_runs(tmp_path, monkeypatch):
    code = python_example()
    checkpoint = re.search(r'checkpoint="([^"]+)"', code).group(1)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    torch.save(timm.create_model("vit_small_patch16_224", num_classes=0).state_dict(), tmp_path / checkpoint)
    write_images(tmp_path / "images", 8, size=(240, 260), classes=("cat", "dog"))
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert namespace["captured"].attn.shape == (8, 12, 6, 197, 197)
    assert (tmp_path / "dino.h5").is_file() and (tmp_path / "dino_metrics.h5").is_file()
