"""Write the demo images shipped in attnflow/demo_data: held-out Fashion-MNIST test items composed with the
demo recipe, balanced over the ten classes, with their object masks.

    python examples/make_demo_images.py --per-class 20 --out attnflow/demo_data
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from demo_data import CLASS_NAMES, FASHION_MNIST, compose, load_fashion_mnist


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--probe-per-class", type=int, default=500)
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--data-root", default=str(FASHION_MNIST))
    p.add_argument("--out", default="attnflow/demo_data")
    args = p.parse_args()
    images, labels = load_fashion_mnist("test", args.data_root)
    rng = np.random.default_rng(args.seed)
    chosen = np.concatenate([rng.choice(np.flatnonzero(labels == c), args.per_class, replace=False) for c in range(len(CLASS_NAMES))])
    items = torch.from_numpy(images.copy()).float().div(255)
    composed, masks = compose(items[torch.from_numpy(chosen)], items, torch.Generator().manual_seed(args.seed))
    out = Path(args.out)
    for index, image, mask in zip(chosen, composed, masks):
        name = f"test_{index:05d}.png"
        folder = out / "images" / CLASS_NAMES[labels[index]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image.numpy() * 255).round().astype(np.uint8), mode="L").save(folder / name)
        (out / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.numpy().astype(np.uint8) * 255, mode="L").save(out / "masks" / name)
    print(f"wrote {len(chosen)} images and masks under {out}")

    # the probe set: more held-out test items (none of the above), composed the same way, as one array file
    rest = np.setdiff1d(np.arange(len(labels)), chosen)
    probe = np.concatenate([rng.choice(rest[labels[rest] == c], args.probe_per_class, replace=False) for c in range(len(CLASS_NAMES))])
    composed, _ = compose(items[torch.from_numpy(probe)], items, torch.Generator().manual_seed(args.seed + 1))
    np.savez_compressed(out / "probe_images.npz", images=(composed.numpy() * 255).round().astype(np.uint8),
                        labels=labels[probe].astype(np.uint8), class_names=np.array(CLASS_NAMES))
    print(f"wrote {len(probe)} probe images to {out / 'probe_images.npz'}")


if __name__ == "__main__":
    main()
