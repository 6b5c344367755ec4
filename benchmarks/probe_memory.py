"""Peak memory of `attnflow probe` against the number of images: tokens are streamed from the cache, so peak RSS
should stay flat (issue 14). Writes synthetic caches with attnflow's own writer, then probes each in a fresh
subprocess and reports its peak RSS (``VmHWM``, see memory.py).

    python benchmarks/probe_memory.py [--sizes 2000 20000] [--dir DIR]

``--time-pools N`` instead times a probe of N synthetic images shaped like the demo's caches (T = 65, D = 128,
10 classes, 80/20 split, 50 epochs) per pool and evaluator, in one process, pool after pool, ``--repeats`` times;
on a GPU, the issue's figure (50,000 ViT-B/16 images):

    python benchmarks/probe_memory.py --time-pools 50000 --grid 14 14 --dim 768 --tokens-dtype float16 --device cuda
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GRID, DIM, CLASSES = (7, 7), 64, 10  # 50 tokens of width 64: 12.8 kB an image in float32


def write_synthetic_cache(path: Path, n: int, *, grid: tuple[int, int] = GRID, dim: int = DIM, classes: int = CLASSES,
                          seed: int = 0, batch: int = 500, by_class: bool = False, signal: float = 2.0,
                          tokens_dtype: str = "float32") -> Path:
    """A cache of ``n`` images with cls + grid patch tokens (n, 1 + gh * gw, dim), labels i % classes (with
    ``by_class``, in class blocks, i * classes // n, as caches of class folders store them) and an identity final
    norm; ``signal`` is added to the label's channel of every token so probes can learn it. Image ids name the
    seed: caches of other seeds hold other images."""
    from attnflow.store.write import CacheSpec
    from attnflow.layout import TokenLayout

    layout = TokenLayout(has_cls=True, num_prefix_tokens=1, grid_size=grid, patch_size=(16, 16))
    T = layout.num_tokens
    spec = CacheSpec(layout=layout, num_layers=2, num_heads=2, store="none", compression="none", token_dim=dim,
                     tokens_dtype=tokens_dtype,
                     class_names=[f"c{i}" for i in range(classes)],
                     final_norm=(np.ones(dim, np.float32), np.zeros(dim, np.float32), 1e-6),
                     attrs={"n_inputs": n, "label": "synthetic", "model": "synthetic", "family": "synthetic",
                            "preprocessing": json.dumps({"input_size": [3, 16 * grid[0], 16 * grid[1]], "interpolation": "bicubic",
                                                         "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0, "crop_mode": "center"})})
    writer = spec.writer(path)
    rng = np.random.default_rng(seed)
    for start in range(0, n, batch):
        b = min(batch, n - start)
        labels = [(start + i) * classes // n if by_class else (start + i) % classes for i in range(b)]
        tokens = rng.standard_normal((b, T, dim), dtype=np.float32)
        tokens[np.arange(b), :, labels] += signal
        norms = rng.random((b, 2, T), dtype=np.float32)  # per-layer rows every cache carries
        writer.append({"tokens": tokens.astype(tokens_dtype), "magnitude": norms, "token_norm": norms}, image_ids=[f"seed{seed}/img_{start + i:06d}.png" for i in range(b)],
                      n_inputs_done=start + b, labels=labels, skipped=[])
    return writer.finish()


def _probe(path: Path) -> dict:
    """Run in a fresh process: probe one cache and report peak RSS."""
    from attnflow.probe import probe_caches
    from memory import peak_rss_mib  # beside this script, which the fresh process runs

    began = time.perf_counter()
    records, _ = probe_caches([(path, None)], split=0.5, pools=("cls", "mean", "abmilp"), evaluators=("knn", "linear"),
                              epochs=2, n_bootstrap=100, memory_budget=0)  # stream at any size
    return {"seconds": round(time.perf_counter() - began, 1),
            "peak_rss_mib": round(peak_rss_mib(), 1),
            "accuracy": {f"{r['pool']}/{r['evaluator']}": round(r["accuracy"], 3) for r in records}}


def time_pools(n: int, directory: Path, repeats: int = 2, epochs: int = 50, *, grid: tuple[int, int] = (8, 8), dim: int = 128,
               device: str = "cpu", tokens_dtype: str = "float32") -> list[dict]:
    """Seconds to probe ``n`` synthetic images (by default shaped like the demo's caches; ``grid=(14, 14), dim=768``
    like a ViT-B/16's) for each fixed and trained pool and each evaluator on ``device``; every (pool, evaluator)
    is timed once per repeat, in turn."""
    from attnflow.probe import probe_caches

    path = directory / f"synthetic-{grid[0]}x{grid[1]}x{dim}-{tokens_dtype}-{n}.h5"
    if not path.exists():
        write_synthetic_cache(path, n, grid=grid, dim=dim, classes=10, by_class=True, signal=0.3, tokens_dtype=tokens_dtype)
    runs = [(pool, evaluator) for pool in ("cls", "mean") for evaluator in ("knn", "linear")] + [("abmilp", "linear"), ("ep", "linear")]
    rows = []
    for repeat in range(repeats):
        for pool, evaluator in runs:
            began = time.perf_counter()
            records, _ = probe_caches([(path, None)], split=0.8, pools=(pool,), evaluators=(evaluator,), epochs=epochs, n_bootstrap=1000,
                                      device=device)
            rows.append({"n_images": n, "pool": pool, "evaluator": evaluator, "repeat": repeat,
                         "seconds": round(time.perf_counter() - began, 2), "accuracy": round(records[0]["accuracy"], 3)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--time-pools", type=int, metavar="N", help="time a probe of N demo-shaped images per pool instead")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=50, help="with --time-pools: epochs of the trained pools")
    parser.add_argument("--grid", type=int, nargs=2, default=(8, 8), help="with --time-pools: patch grid (14 14 for ViT-B/16)")
    parser.add_argument("--dim", type=int, default=128, help="with --time-pools: token width (768 for ViT-B)")
    parser.add_argument("--device", default="cpu", help="with --time-pools: where the probes run")
    parser.add_argument("--tokens-dtype", default="float32", choices=("float32", "float16"))
    parser.add_argument("--write", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        write_synthetic_cache(args.write, args.sizes[0])
        return
    if args.probe:
        print(json.dumps(_probe(args.probe)))
        return
    root = args.dir or Path(tempfile.mkdtemp(prefix="attnflow-probe-memory-"))
    root.mkdir(parents=True, exist_ok=True)
    if args.time_pools:
        time_pools(args.time_pools, root, args.repeats, args.epochs, grid=tuple(args.grid), dim=args.dim, device=args.device,
                   tokens_dtype=args.tokens_dtype)
        return
    rows = []
    for n in args.sizes:
        path = root / f"synthetic-{n}.h5"
        if not path.exists():  # written in its own process, so the writer's memory is not counted
            subprocess.run([sys.executable, __file__, "--write", str(path), "--sizes", str(n)], check=True)
        out = subprocess.run([sys.executable, __file__, "--probe", str(path)], check=True, capture_output=True, text=True)
        result = {"n_images": n, "tokens_mib": round(n * (1 + GRID[0] * GRID[1]) * DIM * 4 / 2**20, 1),
                  **json.loads(out.stdout.strip().splitlines()[-1])}
        rows.append(result)
        print(json.dumps(result), flush=True)
    low, high = min(r["peak_rss_mib"] for r in rows), max(r["peak_rss_mib"] for r in rows)
    print(f"peak RSS spread: {100 * (high - low) / low:.1f}%")


if __name__ == "__main__":
    main()
