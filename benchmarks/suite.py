"""The benchmark suite: attnflow's overhead over the forward pass, against what a user would write instead,
peak memory in streaming mode, metrics throughput and cache size per image.

    python benchmarks/suite.py --model vit_small_patch16_224 --n 200 --batch-size 16
    python benchmarks/suite.py --model vit_base_patch16_224 --n 4096 --batch-size 128 --workers 14 --device cuda --amp \
        --memory-n 1000,10000

Prints JSON lines. Weights are random (throughput and memory do not depend on them; compressed sizes do). On a
GPU every step runs there (bfloat16 autocast with ``--amp``); peak device memory is reported beside host RSS.
The end-of-run assembly of the segment files is timed on its own, as a share of each extraction.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch

import attnflow
from attnflow.store.write import RowFileWriter
from attnflow.extract import extract
from attnflow.images import ImageDataset, collate_images, list_images, resolve_preprocessing
from attnflow.measure import compute_metrics

ROOT = Path(__file__).resolve().parents[1]


def write_jpegs(folder: Path, n: int, size: int = 256) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size * 2, size * 2, 3), dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        y, x = rng.integers(0, size, 2)
        Image.fromarray(base[y:y + size, x:x + size]).save(folder / f"{i:06d}.jpg", quality=90)


def loader(paths, model, batch_size, workers, device=torch.device("cpu")):
    return torch.utils.data.DataLoader(
        ImageDataset(paths, resolve_preprocessing(model)), batch_size=batch_size, num_workers=workers,
        collate_fn=collate_images, pin_memory=device.type == "cuda",
    )


def autocast(device: torch.device, amp: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_forward(model, paths, batch_size, workers, device=torch.device("cpu"), amp=False) -> float:
    """Decode, preprocess and run forward_features with fused attention off: the loop with nothing added."""
    pre = resolve_preprocessing(model)
    for block in model.blocks:
        block.attn.fused_attn = False
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast(device, amp):
        for batch in loader(paths, model, batch_size, workers, device):
            model.forward_features(pre.normalize(batch.pixels.to(device, non_blocking=True)))
        sync(device)
    for block in model.blocks:
        block.attn.fused_attn = True
    return len(paths) / (time.perf_counter() - t0)


def numpy_metrics(attn: np.ndarray, p: int, distances: np.ndarray) -> dict:
    """What a user would write per image: the cls and patch metrics and mean-fused rollout in numpy."""
    L, H, T, _ = attn.shape
    out = {}
    q = attn[:, :, :, p:] / attn[:, :, :, p:].sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        logq = np.where(q > 0, np.log(q), 0.0)
    out["cls_self"] = attn[:, :, 0, 0]
    out["cls_entropy"] = -(q[:, :, 0] * logq[:, :, 0]).sum(-1)
    out["patch_entropy"] = -(q[:, :, p:] * logq[:, :, p:]).sum(-1).mean(-1)
    k = math.ceil(0.1 * (T - p))
    out["cls_top10_mass"] = np.sort(q[:, :, 0], -1)[..., -k:].sum(-1)
    out["attn_distance"] = (q[:, :, p:] * distances).sum(-1).mean(-1)
    rolled = np.eye(T)
    maps = []
    for layer in range(L):
        m = 0.5 * attn[layer].mean(0) + 0.5 * np.eye(T)
        m = m / m.sum(-1, keepdims=True)
        rolled = m @ rolled
        maps.append(rolled[0, p:] / rolled[0, p:].sum())
    out["rollout"] = np.stack(maps)
    return out


def attention_extract_loop(model, paths, batch_size, workers, device=torch.device("cpu"), amp=False) -> float:
    """timm's AttentionExtract (fused attention must be switched off by hand, or it returns nothing) plus
    a per-image numpy loop for the metrics."""
    from timm.utils import AttentionExtract

    pre = resolve_preprocessing(model)
    for block in model.blocks:
        block.attn.fused_attn = False
    extractor = AttentionExtract(model, method="hook")
    layout = attnflow.TokenLayout.from_model(model)
    distances = attnflow.metrics.patch_distances(layout).numpy()
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast(device, amp):
        for batch in loader(paths, model, batch_size, workers, device):
            maps = extractor(pre.normalize(batch.pixels.to(device, non_blocking=True)))
            stacked = torch.stack(list(maps.values()), dim=1).float().cpu().numpy().astype(np.float64)  # (B, L, H, T, T)
            for image in stacked:
                numpy_metrics(image, layout.num_prefix_tokens, distances)
    for block in model.blocks:
        block.attn.fused_attn = True
    return len(paths) / (time.perf_counter() - t0)


def peak_memory(images: Path, n: int, out: Path, model: str, batch_size: int, workers: int, device: torch.device,
                amp: bool) -> dict:
    """Peak resident host memory and peak device memory (MiB) of a separate streaming run over the first n
    images, and its images/s."""
    code = (
        "import json, torch, attnflow\n"
        "from attnflow.extract import extract\nfrom attnflow.images import list_images\n"
        f"paths = list_images([{str(images)!r}])[:{n}]\n"
        f"r = extract(attnflow.build_model({model!r}, random_init=True), paths, {str(out)!r}, store='none', "
        f"metrics={str(out) + '.m.h5'!r}, batch_size={batch_size}, workers={workers}, device={str(device)!r}, "
        f"amp={amp}, overwrite=True)\n"
        "cuda = torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0\n"
        "from memory import peak_rss_mib\n"
        "print(json.dumps({'rss': peak_rss_mib(), "
        "'device': torch.cuda.max_memory_allocated() / 2**20 if cuda else None, 'rate': r.n_new / r.seconds}))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


class AssemblyClock:
    """Seconds spent assembling segment files into the final files (RowFileWriter.assemble), per run."""

    def __init__(self):
        self.seconds = 0.0
        original = RowFileWriter.assemble

        def timed(writer):
            t0 = time.perf_counter()
            try:
                return original(writer)
            finally:
                self.seconds += time.perf_counter() - t0

        RowFileWriter.assemble = timed

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--stores", default="none,rows,full-float16,full-float32",
                   help="extractions to time: none (with --metrics), rows, full-float16, full-float32")
    p.add_argument("--full-n", type=int, default=None, help="images of the --store full runs (default --n)")
    p.add_argument("--loop-n", type=int, default=None, help="images of the AttentionExtract + numpy loop (default --n)")
    p.add_argument("--memory-n", default="100,1000")
    p.add_argument("--memory-model", default=None, help="model of the memory runs (default --model)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast on a GPU")
    args = p.parse_args()
    device = torch.device(args.device)
    print(json.dumps({
        "machine": torch.cuda.get_device_name(0) if device.type == "cuda" else (platform.processor() or platform.machine()),
        "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__,
        "model": args.model, "n": args.n, "batch_size": args.batch_size, "workers": args.workers, "amp": args.amp,
    }), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_jpegs(tmp / "img", max(args.n, *map(int, args.memory_n.split(","))))
        paths = list_images([str(tmp / "img")])[: args.n]
        loaded = attnflow.build_model(args.model, random_init=True)
        loaded.model.to(device)
        assembly = AssemblyClock()
        floor = bare_forward(loaded.model, paths, args.batch_size, args.workers, device, args.amp)
        print(json.dumps({"what": "bare forward, fused attention off (floor)", "images_per_s": round(floor, 2)}), flush=True)
        runs = {"none": ("none", "float16", True), "rows": ("rows", "float16", False), "full-float16": ("full", "float16", False),
                "full-float32": ("full", "float32", False)}
        for store, dtype, metrics in (runs[name] for name in args.stores.split(",")):
            out = tmp / f"{store}_{dtype}.h5"
            # --store full writes 11 MB of maps per ViT-B image: at most --full-n images of it
            run_paths = paths if store != "full" else paths[: args.full_n]
            result = extract(loaded, run_paths, out, store=store, dtype=dtype, batch_size=args.batch_size, workers=args.workers,
                             metrics=tmp / "m.h5" if metrics else None, device=str(device), amp=args.amp, overwrite=True)
            rate = result.n_new / result.seconds
            print(json.dumps({
                "what": f"extract --store {store} --dtype {dtype}" + (" --metrics" if metrics else ""),
                "images_per_s": round(rate, 2), "ratio_to_floor": round(floor / rate, 3),
                "assembly_share": round(assembly.take() / result.seconds, 4),
                "cache_bytes_per_image": round(out.stat().st_size / result.n_images),
            }), flush=True)
        if (tmp / "full_float16.h5").exists():
            t0 = time.perf_counter()
            compute_metrics(tmp / "full_float16.h5", tmp / "from_cache.h5", batch_size=args.batch_size, device=str(device), overwrite=True)
            print(json.dumps({"what": "attnflow metrics from the float16 full cache",
                              "images_per_s": round(len(paths[: args.full_n]) / (time.perf_counter() - t0), 2)}), flush=True)
        # the per-image numpy loop takes about 50 ms per ViT-B image: at most --loop-n images of it
        loop_paths = paths[: args.loop_n]
        rate = attention_extract_loop(loaded.model, loop_paths, args.batch_size, args.workers, device, args.amp)
        print(json.dumps({"what": "timm AttentionExtract + per-image numpy metrics and rollout",
                          "images_per_s": round(rate, 2), "ratio_to_floor": round(floor / rate, 3)}), flush=True)
        for n in map(int, args.memory_n.split(",")):
            peak = peak_memory(tmp / "img", n, tmp / f"mem{n}.h5", args.memory_model or args.model, args.batch_size,
                               args.workers, device, args.amp)
            print(json.dumps({
                "what": f"peak memory, extract --store none --metrics, {n} images", "rss_MiB": round(peak["rss"]),
                "device_MiB": None if peak["device"] is None else round(peak["device"]), "images_per_s": round(peak["rate"], 1),
            }), flush=True)


if __name__ == "__main__":
    main()
