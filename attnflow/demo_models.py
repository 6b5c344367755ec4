"""The tiny models shipped with attnflow: names, architecture and weights (``demo:mae``, ``demo:dino``), and
the untrained reference every trained one is read against (``demo:random``: the same architecture with
seeded random weights).

Both are one timm VisionTransformer trained on composed Fashion-MNIST images (see
``examples/demo_data.py`` for the data recipe and ``examples/train_*.py`` for the training). This module is
what :mod:`attnflow.models` needs to build them; :mod:`attnflow.demo` runs the whole analysis on them.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import timm
import torch

__all__ = [
    "CANVAS", "NORMALIZE_MEAN", "NORMALIZE_STD", "DEMO_ARCH", "DEMO_KWARGS", "DemoModel", "DEMO_MODELS",
    "TRAINED_DEMO_MODELS", "demo_data_dir", "create_demo_vit",
]

CANVAS = 48  # the demo images' side, in pixels: the models' input size
NORMALIZE_MEAN, NORMALIZE_STD = 0.5, 0.5  # one grey channel around 0.5

# The one architecture both demo models share: a timm VisionTransformer with a cls token, 64 patches.
DEMO_ARCH = "vit_tiny_patch16_224"
DEMO_KWARGS = dict(
    img_size=CANVAS, patch_size=6, in_chans=1, embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0,
    # what the demo images need: no resize, no crop
    pretrained_cfg_overlay=dict(
        input_size=(1, CANVAS, CANVAS), crop_pct=1.0, interpolation="bilinear", mean=(NORMALIZE_MEAN,),
        std=(NORMALIZE_STD,),
    ),
)


@dataclass(frozen=True)
class DemoModel:
    checkpoint: str | None  # file name inside attnflow/demo_data; None: random weights drawn with ``seed``
    family: str
    seed: int = 0


DEMO_MODELS = {
    "demo:mae": DemoModel("mae.pth", "mim"),
    "demo:dino": DemoModel("dino.pth", "jea"),
    "demo:random": DemoModel(None, "untrained", seed=0),
}
TRAINED_DEMO_MODELS = tuple(name for name, demo in DEMO_MODELS.items() if demo.checkpoint is not None)


def demo_data_dir() -> Path:
    return Path(str(resources.files("attnflow") / "demo_data"))


def create_demo_vit(**overrides) -> torch.nn.Module:
    """The demo encoder, randomly initialised (training scripts pass ``dynamic_img_size`` for local crops)."""
    return timm.create_model(DEMO_ARCH, pretrained=False, num_classes=0, **{**DEMO_KWARGS, **overrides})
