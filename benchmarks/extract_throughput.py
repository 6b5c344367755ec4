"""Images/s of `attnflow extract` against a bare forward pass of the same model, on one device.

Also checks, on a GPU, that under bfloat16 autocast the captured maps are float32 softmax outputs whose rows
sum to 1, and how far they are from the float32 run's maps.

    python benchmarks/extract_throughput.py --model vit_base_patch16_224 --n 2000 --batch-size 128 --amp

Weights are random (no hub access is assumed); the throughput does not depend on them. Results go to
stdout as JSON lines.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import attnflow
from attnflow.extract import extract
from attnflow.images import list_images
from attnflow.measure import compute_metrics


def write_jpegs(folder: Path, n: int, size: int = 256) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size * 2, size * 2, 3), dtype=np.uint8)
    for i in range(n):
        y, x = rng.integers(0, size, 2)
        Image.fromarray(base[y : y + size, x : x + size]).save(folder / f"{i:06d}.jpg", quality=90)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_forward(model, device, n: int, batch_size: int, amp: bool, fused: bool) -> float:
    """Images/s of forward_features on resident batches: the floor nothing can beat."""
    for block in model.blocks:
        block.attn.fused_attn = fused
    x = torch.randn(batch_size, 3, *model.patch_embed.img_size, device=device)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else torch.autocast("cpu", enabled=False)
    with torch.inference_mode(), ctx:
        for _ in range(3):
            model.forward_features(x)
        sync(device)
        steps = max(1, n // batch_size)
        t0 = time.perf_counter()
        for _ in range(steps):
            model.forward_features(x)
        sync(device)
    return steps * batch_size / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--stores", default="none,rows,full")
    p.add_argument("--metrics", action="store_true", help="also time --metrics streaming and attnflow metrics from each cache")
    args = p.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else (args.device if args.device != "auto" else "cpu"))
    info = {
        "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor(),
        "model": args.model, "batch_size": args.batch_size, "amp": args.amp, "n": args.n,
    }
    import timm

    info["timm"] = timm.__version__
    print(json.dumps(info), flush=True)
    loaded = attnflow.build_model(args.model, random_init=True)
    model = loaded.model.to(device)

    for fused in (True, False):
        rate = bare_forward(model, device, args.n, args.batch_size, args.amp, fused)
        print(json.dumps({"what": "bare_forward", "fused_attn": fused, "images_per_s": round(rate, 1)}), flush=True)

    if device.type == "cuda":
        x = torch.randn(8, 3, *model.patch_embed.img_size, device=device)
        with attnflow.AttentionCapture(model) as capture, torch.inference_mode():
            model.forward_features(x)
            exact = capture.pop()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                model.forward_features(x)
                mixed = capture.pop()
        print(json.dumps({
            "what": "amp_capture", "dtype": str(mixed.attn.dtype),
            "max_row_sum_error": float((mixed.attn.sum(-1) - 1).abs().max()),
            "max_abs_diff_vs_fp32": float((mixed.attn - exact.attn).abs().max()),
            "max_abs_fp32_value": float(exact.attn.max()),
        }), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "img").mkdir()
        t0 = time.perf_counter()
        write_jpegs(tmp / "img", args.n)
        paths = list_images([str(tmp / "img")])
        print(json.dumps({"what": "wrote_jpegs", "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
        for store in args.stores.split(","):
            for streaming in (False, True) if args.metrics else (False,):
                out, metrics_out = tmp / f"{store}.h5", tmp / f"{store}_metrics.h5"
                result = extract(
                    loaded, paths, out, store=store, batch_size=args.batch_size, workers=args.workers,
                    device=str(device), amp=args.amp, metrics=metrics_out if streaming else None, overwrite=True,
                )
                print(json.dumps({
                    "what": "extract", "store": store, "streaming_metrics": streaming, "images": result.n_images,
                    "images_per_s": round(result.n_new / result.seconds, 1),
                    "bytes_per_image": round(out.stat().st_size / result.n_images),
                }), flush=True)
                if args.metrics and not streaming and store != "none":
                    t0 = time.perf_counter()
                    compute_metrics(out, metrics_out, batch_size=args.batch_size, device=str(device), overwrite=True)
                    print(json.dumps({
                        "what": "metrics_from_cache", "store": store,
                        "images_per_s": round(result.n_images / (time.perf_counter() - t0), 1),
                    }), flush=True)
                out.unlink()
                metrics_out.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
