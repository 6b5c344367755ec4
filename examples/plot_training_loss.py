"""Draw the demo models' training loss curves into a PNG and say whether each has flattened.

Reads the loss logs the training scripts write with ``--checkpoint-dir DIR`` (``DIR/loss.jsonl``: one entry
per logging interval with ``images_seen`` and ``loss``, the interval's mean), one panel per run since the
MAE and DINO losses have different scales:

    python examples/plot_training_loss.py mae=runs/mae dino=runs/dino --out attnflow/demo_data/loss_curves.png

and prints, per run, one JSON line with its flatness: the relative drop of the mean loss from the window
(80%, 90%] of the images seen to the window (90%, 100%], ``(before - last) / |before|``. A drop under
``--flat-below`` (1% by default) reads as flattened. Under a cosine schedule the learning rate is small in
the last 10%, which flattens any curve somewhat: read the figure with the curve, not instead of it.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from training_run import LOSS_LOG


def read_loss_log(path: Path) -> list[dict]:
    """The entries of a loss log (a ``loss.jsonl`` file, or a checkpoint directory holding one)."""
    if path.is_dir():
        path = path / LOSS_LOG
    if not path.is_file():
        raise SystemExit(f"error: no loss log {path}")
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            float(entry["images_seen"]), float(entry["loss"])
        except (ValueError, KeyError, TypeError):
            raise SystemExit(f"error: {path}:{number}: not a loss log entry with images_seen and loss") from None
        entries.append(entry)
    if not entries:
        raise SystemExit(f"error: {path} holds no loss log entry")
    return entries


def window_mean(entries: list[dict], low: float, high: float) -> float | None:
    """Mean loss over the entries with ``low < images_seen <= high``, each weighted by the steps it averages."""
    picked = [e for e in entries if low < e["images_seen"] <= high]
    weights = [e.get("steps_in_interval", 1) for e in picked]
    if not picked:
        return None
    return sum(w * e["loss"] for w, e in zip(weights, picked)) / sum(weights)


def flatness(entries: list[dict], last: float = 0.1) -> dict:
    """The relative loss drop over the last ``last`` fraction of the images seen.

    Returns ``{"images_seen", "loss_before", "loss_last", "relative_drop"}``: the mean losses over the
    windows ((1 - 2 last) T, (1 - last) T] and ((1 - last) T, T], T the images seen at the last entry,
    and ``(loss_before - loss_last) / |loss_before|`` (None where a window holds no entry).
    """
    total = entries[-1]["images_seen"]
    before = window_mean(entries, (1 - 2 * last) * total, (1 - last) * total)
    final = window_mean(entries, (1 - last) * total, total)
    drop = None if before is None or final is None or before == 0 else (before - final) / abs(before)
    return {"images_seen": total, "loss_before": before, "loss_last": final, "relative_drop": drop}


def images_per_second(entries: list[dict], skip: float = 0.1) -> float | None:
    """Training speed past start-up: images per second of training wall time between the first entry past
    ``skip`` of the images seen and the last entry (None with fewer than two such entries)."""
    total = entries[-1]["images_seen"]
    steady = [e for e in entries if e["images_seen"] > skip * total and "seconds" in e]
    if len(steady) < 2 or steady[-1]["seconds"] <= steady[0]["seconds"]:
        return None
    return (steady[-1]["images_seen"] - steady[0]["images_seen"]) / (steady[-1]["seconds"] - steady[0]["seconds"])


def verdict(drop: float | None, flat_below: float) -> str:
    if drop is None:
        return "too few log entries to tell"
    if abs(drop) < flat_below:
        return "flattened"
    return "still falling" if drop > 0 else "rising"


def plot(runs: dict[str, list[dict]], out: Path, log_x: bool, last: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), squeeze=False)
    for ax, (name, entries) in zip(axes[0], runs.items()):
        x = [e["images_seen"] for e in entries]
        ax.plot(x, [e["loss"] for e in entries], lw=1.2)
        ax.axvspan((1 - last) * x[-1], x[-1], color="0.9", zorder=0, label=f"last {last:.0%}")
        if log_x:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap the major ones
        ax.set_title(name)
        ax.set_xlabel("images seen")
        ax.set_ylabel("training loss (interval mean)")
        ax.legend(loc="upper right", fontsize="small")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", help="NAME=PATH or PATH: a loss.jsonl file or a --checkpoint-dir holding one")
    p.add_argument("--out", type=Path, default=Path("loss_curves.png"))
    p.add_argument("--log-x", action="store_true", help="images seen on a log scale")
    p.add_argument("--last", type=float, default=0.1, help="the final fraction of training the flatness figure reads")
    p.add_argument("--flat-below", type=float, default=0.01, help="relative drop under which a curve reads as flattened")
    args = p.parse_args()
    if not 0 < args.last <= 0.5 or not math.isfinite(args.last):
        p.error(f"--last must be in (0, 0.5], got {args.last}")
    runs = {}
    for spec in args.logs:
        name, path = spec.split("=", 1) if "=" in spec else (None, spec)
        path = Path(path)
        runs[name or (path.name if path.is_dir() else path.parent.name)] = read_loss_log(path)
    for name, entries in runs.items():
        figure = flatness(entries, args.last)
        print(json.dumps({"run": name, **figure, "last": args.last, "verdict": verdict(figure["relative_drop"], args.flat_below),
                          "images_per_second": images_per_second(entries)}))
    plot(runs, args.out, args.log_x, args.last)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
