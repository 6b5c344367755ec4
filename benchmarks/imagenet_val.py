"""End to end at ImageNet-val scale: N synthetic JPEGs with ImageNet's sizes, read from local disk, through
``extract --store none --metrics``, against the bare forward pass of the same model on the same device.

    python benchmarks/imagenet_val.py --n 50000 --model vit_base_patch16_224 --batch-size 128 --amp --device cuda
    python benchmarks/imagenet_val.py --n 200 --model vit_small_patch16_224 --batch-size 16      # CPU smoke run

The JPEGs are written once into ``--images`` (kept, so a second run skips it): smooth random colour fields
with fine texture, most 500x375 or 375x500 like ImageNet's validation images, saved at quality 90 (about
85 KB each). Prints JSON lines: the machine, the bare forward's images/s (fused attention
off, resident batch), and extract's images/s, seconds and peak host/device memory for each ``--decode`` mode.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from extract_throughput import bare_forward  # the floor: resident batches, fused attention off
from memory import peak_rss_mib

# ImageNet validation's most common shapes (width, height) and roughly how often they occur
SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 500))
SIZE_SHARES = (0.62, 0.18, 0.10, 0.05, 0.05)


def _write_one(args: tuple[Path, int]) -> int:
    from PIL import Image

    path, seed = args
    rng = np.random.default_rng(seed)
    w, h = SIZES[rng.choice(len(SIZES), p=SIZE_SHARES)]
    # a low-frequency colour field upsampled (objects, sky) plus fine luminance texture: at quality 90 about
    # 85 KB a file (ImageNet-val's average is about 130 KB: 6.4 GB for 50,000)
    coarse = rng.integers(0, 256, (h // 40 + 2, w // 40 + 2, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
    pixels = field + rng.normal(0, 12, (h, w, 1))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path.stat().st_size


def write_imagenet_like(folder: Path, n: int, workers: int) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    todo = [(folder / f"{i:06d}.jpg", i) for i in range(n) if not (folder / f"{i:06d}.jpg").exists()]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_one, todo, chunksize=64))
    sizes = [p.stat().st_size for p in folder.glob("*.jpg")]
    return {"what": "wrote_jpegs", "new": len(todo), "seconds": round(time.perf_counter() - t0, 1),
            "mean_kb": round(float(np.mean(sizes)) / 1024, 1)}


def main() -> None:
    import attnflow
    from attnflow.extract import extract
    from attnflow.images import list_images

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50000)
    p.add_argument("--images", type=Path, default=Path(tempfile.gettempdir()) / "attnflow-imagenet-like")
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--decode", default="cpu", help="comma-separated --decode modes to time (cpu, gpu)")
    args = p.parse_args()
    device = torch.device(args.device)
    print(json.dumps({
        "machine": torch.cuda.get_device_name(0) if device.type == "cuda" else (platform.processor() or platform.machine()),
        "cpus": os.cpu_count(), "torch": torch.__version__, "model": args.model, "n": args.n,
        "batch_size": args.batch_size, "workers": args.workers, "amp": args.amp,
    }), flush=True)
    print(json.dumps(write_imagenet_like(args.images, args.n, args.workers or 1)), flush=True)
    paths = list_images([str(args.images)])[: args.n]
    loaded = attnflow.build_model(args.model, random_init=True)
    model = loaded.model.to(device)
    floor = bare_forward(model, device, min(args.n, 20 * args.batch_size), args.batch_size, args.amp, fused=False)
    print(json.dumps({"what": "bare forward, fused attention off (floor)", "images_per_s": round(floor, 1)}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for decode in args.decode.split(","):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            extra = {} if decode == "cpu" else {"decode": decode}
            result = extract(
                loaded, paths, Path(tmp) / "c.h5", store="none", metrics=Path(tmp) / "m.h5", batch_size=args.batch_size,
                workers=args.workers, device=str(device), amp=args.amp, overwrite=True, **extra,
            )
            rate = result.n_new / result.seconds
            print(json.dumps({
                "what": f"extract --store none --metrics --decode {decode}", "images": result.n_images,
                "seconds": round(result.seconds, 1), "images_per_s": round(rate, 1), "share_of_floor": round(rate / floor, 3),
                "peak_rss_mib": round(peak_rss_mib()),
                **({"peak_device_mib": round(torch.cuda.max_memory_allocated() / 2**20)} if device.type == "cuda" else {}),
            }), flush=True)


if __name__ == "__main__":
    main()
