"""Shared fixtures: tiny timm ViTs of every token layout, real image files, and an in-process CLI runner."""
from __future__ import annotations

import os
import re

# Tests never touch the network: the hub client reads this at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

# Under pytest-xdist the two cores are shared by the workers: one thread each, so that they do not fight.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

# name -> (timm architecture, constructor overrides): one of each token layout attnflow must handle.
TINY_VITS = {
    "plain": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)),
    "qk_norm_layer_scale": (
        "vit_tiny_patch16_224",
        dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, qk_norm=True, init_values=0.5),
    ),
    "registers": ("vit_small_patch14_reg4_dinov2", dict(img_size=28, depth=2, embed_dim=48, num_heads=3)),
    "no_cls_gap": ("vit_medium_patch16_gap_256", dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, init_values=None)),
    "registers_no_cls": ("vit_little_patch16_reg4_gap_256", dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)),
}


# timm initialises some tokens, layer scales and BEiT's attention biases to zeros or tiny values: redrawn, so
# that every layout's maps and magnitudes are non-trivial; query-key projections are scaled up.
REDRAWN_PARAMETERS = re.compile(
    r"^(cls_token|reg_token|dist_token|pos_embed)$|(ls1\.gamma|ls2\.gamma|ls\.gamma|gamma_1|gamma_2|q_bias|v_bias|relative_position_bias_table)$"
)
SHARPENED_PARAMETERS = re.compile(r"(attn\.qkv\.weight|in_proj\.weight)$")


def make_tiny(arch: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """timm ``arch`` built headless with ``kwargs``, in eval mode, with non-trivial attention."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, num_classes=0, **kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if REDRAWN_PARAMETERS.search(name):
                p.copy_(torch.randn_like(p) * 0.5)
            elif SHARPENED_PARAMETERS.search(name):
                p.mul_(6.0)  # sharper than init's near-uniform softmax
    return model


def make_tiny_vit(kind: str, seed: int = 0) -> torch.nn.Module:
    arch, kwargs = TINY_VITS[kind]
    return make_tiny(arch, seed, **kwargs)


def write_images(folder: Path, n: int, size=(40, 52), classes=("cat", "dog"), seed: int = 0) -> list[Path]:
    """Write ``n`` random RGB PNGs spread over class sub-folders; returns them in sorted order."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        cls = classes[i % len(classes)]
        path = folder / cls / f"img_{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return sorted(paths)


def one_line_error(result, *needles: str) -> str:
    """A user error: exit 1, no traceback, one line on stderr that holds every needle."""
    assert result.exit_code == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnflow: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    write_images(folder, 10)
    return folder


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run ``attnflow ARGS`` in-process through the real console entry point."""
    from attnflow.cli import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["attnflow", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out = capsys.readouterr()
        return CliResult(code, out.out, out.err)

    return run


@pytest.fixture
def one_thread():
    """Runs in separate processes use one thread; in-process runs compared bit for bit must compute alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
