"""Capture the attention of every block for one image and print where the [cls] token looks.

Runs offline: with no arguments it builds a randomly initialised ViT-Tiny and a synthetic image, so the
map it prints is near-uniform. Point it at a real model and picture to see a trained one:

    python examples/capture_one_image.py vit_small_patch16_224.dino photo.jpg
    python examples/capture_one_image.py vit_base_patch16_224 photo.jpg --checkpoint mae_pretrain_vit_base.pth
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

import attnflow
from attnflow.images import decode_image, resolve_preprocessing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="vit_tiny_patch16_224")
    parser.add_argument("image", nargs="?")
    parser.add_argument("--checkpoint")
    args = parser.parse_args()

    random_init = args.checkpoint is None and "." not in args.model
    model = attnflow.load_model(args.model, args.checkpoint, random_init=random_init)
    layout = attnflow.TokenLayout.from_model(model)
    preprocessing = resolve_preprocessing(model)
    if args.image:
        image = decode_image(args.image, preprocessing.input_size[0])
    else:
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    pixels = preprocessing.transform()(image)[None]

    with attnflow.AttentionCapture(model) as capture, torch.no_grad():
        model.forward_features(pixels)
        captured = capture.pop()

    print(f"{args.model}: {layout}")
    print(f"attention {tuple(captured.attn.shape)}  magnitude {tuple(captured.magnitude.shape)}")
    if not layout.has_cls:
        print("no [cls] token: nothing to print")
        return
    # last block, mean over heads, the cls row restricted to patches and renormalised
    cls_row = captured.attn[0, -1, :, 0, layout.num_prefix_tokens:].mean(0)
    grid = (cls_row / cls_row.sum()).reshape(layout.grid_size).numpy()
    print(f"last-block [cls] attention over the {layout.grid_size[0]}x{layout.grid_size[1]} patch grid (x{grid.size}, 1 = uniform):")
    for row in grid * grid.size:
        print(" ".join(f"{v:4.1f}" for v in row))


if __name__ == "__main__":
    main()
