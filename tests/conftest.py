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

import h5py

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from attnflow import AttentionCapture
from attnflow.store.write import MetricsSpec
from attnflow.images import resolve_preprocessing
from attnflow.models import LoadedModel

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


# -- helpers the test modules share -------------------------------------------------------------------------


def tiny(kind: str) -> LoadedModel:
    return LoadedModel(
        model=make_tiny_vit(kind), name=f"tiny-{kind}", checkpoint="", checkpoint_sha256="",
        weights="random", family="unknown", label=f"tiny-{kind}",
    )


def direct_capture(model, paths):
    """What capture gives for these files when run by hand, one image at a time."""
    preprocessing = resolve_preprocessing(model)
    transform = preprocessing.transform()  # the plain float path, not extract's uint8-then-normalise path
    out = []
    with AttentionCapture(model) as capture, torch.no_grad():
        for path in paths:
            model.forward_features(transform(Image.open(path).convert("RGB"))[None])
            out.append(capture.pop())
    return out


def read_all(path: Path) -> dict:
    """Every dataset of an HDF5 file, by its full name."""
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


class Interrupt(Exception):
    pass


HEADS = 3


def write_metrics(path: Path, values: dict[str, np.ndarray], *, family="unknown", label=None, num_layers=4,
                  has_cls=True, img_size=(32, 32)) -> Path:
    """A real metrics file through attnflow's own writer, holding exactly ``values``."""
    n = next(iter(values.values())).shape[0]
    attrs = {
        "model": "synthetic", "label": label or path.stem, "family": family, "num_layers": num_layers,
        "num_heads": HEADS, "num_tokens": 17 if has_cls else 16, "num_prefix_tokens": 1 if has_cls else 0,
        "has_cls": has_cls, "num_registers": 0, "grid_size": [4, 4], "patch_size": [8, 8], "img_size": list(img_size),
    }
    levels = {name: "head" if v.ndim == 3 else "layer" for name, v in values.items()}
    writer = MetricsSpec(attrs, levels, has_rollout=False, fusion="mean", discard_ratio=0.0, source="none").writer(path)
    writer.append({f"metrics/{k}": v.astype(np.float32) for k, v in values.items()},
                  image_ids=[f"img{i}.png" for i in range(n)], n_inputs_done=n)
    writer.finish()
    return path


def synthetic(rng, n=40, L=4, shift=0.0, has_cls=True):
    entropy = np.clip(0.7 + shift + 0.05 * rng.standard_normal((n, L, HEADS)), 0, 1)
    cls_self = 0.1 + 0.02 * rng.random((n, L, HEADS))
    if not has_cls:
        entropy[:] = np.nan
        cls_self[:] = np.nan
    return {
        "cls_entropy_norm": entropy,
        "cls_self": cls_self,
        "attn_distance": 20 + rng.standard_normal((n, L, HEADS)),
        "magnitude_cls": (np.nan if not has_cls else 1.0) * rng.random((n, L)),
    }


def write_mask_case(folder: Path) -> tuple[Path, Path]:
    """A 32x32 image and a mask whose left half is object, in separate trees, matched by stem."""
    images, masks = folder / "images" / "cls", folder / "masks" / "nested"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{name}.jpg")
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:, :16] = 7  # any nonzero value is object
    Image.fromarray(mask).save(masks / "a.png")
    big = np.zeros((64, 64, 3), dtype=np.uint8)  # twice the image's size: resized onto it first
    big[:32, :, 1] = 255  # top half
    Image.fromarray(big).save(masks / "b.png")
    return folder / "images", folder / "masks"


def mount_tmpfs(folder: Path, size: int) -> bool:
    """A real tmpfs of ``size`` bytes (rounded up to 4 KiB pages) at ``folder``, a small disk to fill; False
    where mounting is not allowed (it needs root)."""
    import subprocess

    folder.mkdir()
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={-(-size // 4096) * 4}k", "tmpfs", str(folder)],
                              capture_output=True).returncode == 0
    except OSError:
        return False
