"""Cost of every metric including rollout against the forward pass that produced the maps.

    python benchmarks/metrics_cost.py --model vit_small_patch16_224 --batch-size 16 --device cpu
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import attnflow
from attnflow.metrics import batch_metrics


def timed(fn, device, repeats: int = 3) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = attnflow.load_model(args.model, random_init=True).to(device)
    layout = attnflow.TokenLayout.from_model(model)
    x = torch.randn(args.batch_size, 3, *layout.img_size, device=device)
    with attnflow.AttentionCapture(model) as capture, torch.inference_mode():
        def forward():
            model.forward_features(x)
            return capture.pop()

        captured = forward()
        forward_s = timed(forward, device)
        fg = torch.rand(args.batch_size, layout.num_patches, device=device)
        metrics_s = timed(lambda: batch_metrics(layout, captured.magnitude, attn=captured.attn, fg=fg), device)
        rollout_only = timed(lambda: attnflow.metrics.rollout(captured.attn, layout), device)
    print(json.dumps({
        "model": args.model, "device": str(device), "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "forward_with_capture_ms_per_image": round(1000 * forward_s / args.batch_size, 2),
        "all_metrics_ms_per_image": round(1000 * metrics_s / args.batch_size, 2),
        "rollout_ms_per_image": round(1000 * rollout_only / args.batch_size, 2),
        "metrics_over_forward": round(metrics_s / forward_s, 3),
    }))


if __name__ == "__main__":
    main()
