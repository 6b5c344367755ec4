"""What `attnflow perturb` costs per image against the clean forward pass (not part of the tests).

    python benchmarks/perturb_cost.py --model vit_small_patch16_224 --n 8 --batch-size 8 [--device cuda]

Random weights (the cost does not depend on them), a resident batch of random normalised images, so that
decoding is not measured. Prints JSON lines: seconds per image of the bare ``forward_features`` (fused
attention), of the clean pass with capture, and of :func:`attnflow.perturb.measure` for each mode with the
demo's relevance maps (cls-attn, rollout, random: R = 3, so 2 x 9 x 3 = 54 perturbed copies per image) and
the default fractions; ``ratio`` is the time over the bare forward's.
"""
from __future__ import annotations

import argparse
import json
import time

import timm
import torch

from attnflow.capture import AttentionCapture
from attnflow.layout import TokenLayout
from attnflow.perturb import DEFAULT_FRACTIONS, DEFAULT_RELEVANCE, measure


def timed(run, device: torch.device, repeats: int) -> float:
    run()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--n", type=int, default=8, help="images")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per perturbed forward pass")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=0).eval().to(device)
    layout = TokenLayout.from_model(model)
    pixels = torch.randn(args.n, 3, *layout.img_size, device=device)
    common = dict(model=args.model, n=args.n, device=str(device), threads=torch.get_num_threads(), torch=torch.__version__)

    def clean_with_capture():
        with AttentionCapture(model) as capture:
            model.forward_features(pixels)
            capture.pop()

    with torch.inference_mode():
        bare = timed(lambda: model.forward_features(pixels), device, args.repeats) / args.n
        print(json.dumps({**common, "what": "bare forward_features (fused attention)", "s_per_image": bare, "ratio": 1.0}), flush=True)
        capture = timed(clean_with_capture, device, args.repeats) / args.n
        print(json.dumps({**common, "what": "clean forward with capture", "s_per_image": capture, "ratio": capture / bare}), flush=True)
        for mode in ("drop", "pixels"):
            seconds = timed(lambda: measure(model, pixels, layout, DEFAULT_RELEVANCE, DEFAULT_FRACTIONS, mode=mode, readout="cls",
                                            chunk=args.batch_size), device, args.repeats) / args.n
            print(json.dumps({**common, "what": f"perturb --mode {mode}, {len(DEFAULT_RELEVANCE)} maps x 2 orders x "
                              f"{len(DEFAULT_FRACTIONS)} fractions", "s_per_image": seconds, "ratio": seconds / bare}), flush=True)


if __name__ == "__main__":
    main()
