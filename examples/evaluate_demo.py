"""Measure the demo models' representations: k-NN and linear-probe top-1 accuracy on Fashion-MNIST items
composed with the demo recipe, from cls features and from mean-pooled patch features, each with a 95%
percentile-bootstrap interval over the test images.

The same measurement for every checkpoint given (both after the final norm, as users read them), and for
``demo:random``, the same architecture with random weights (seeded by ``--random-seed``). One JSON line per
model as it is measured, then the table in markdown:

    python examples/evaluate_demo.py demo:mae demo:dino demo:random
    python examples/evaluate_demo.py demo:mae=path/to/mae.pth demo:dino=path/to/dino.pth demo:random --train 10000 --test 10000
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import attnflow
from demo_data import FASHION_MNIST, compose, load_fashion_mnist, missing_fashion_mnist, normalize
from attnflow.probe import bootstrap_accuracy, knn_accuracy  # DINO's weighted k-NN, as attnflow probe uses it

RANDOM = "demo:random"  # the demo architecture with random weights: the baseline every trained model must beat
# The table's columns: (feature, evaluator) and their headings, as the issue and the model card print them.
COLUMNS = {("cls", "knn"): "k-NN, cls", ("cls", "linear"): "linear, cls",
           ("mean", "knn"): "k-NN, mean patch", ("mean", "linear"): "linear, mean patch"}


def composed_split(split: str, n: int, seed: int, root) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_fashion_mnist(split, root)
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(images), generator=generator)[:n]
    items = torch.from_numpy(images.copy()).float().div(255)
    composed, _ = compose(items[pick], items, generator)
    return composed, torch.from_numpy(labels.astype("int64"))[pick]


@torch.no_grad()
def features(model, images: torch.Tensor, batch: int = 500, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """(N, 48, 48) images -> {"cls": (N, D), "mean": (N, D)} float32 on the CPU; the model runs on ``device``."""
    cls, mean = [], []
    for start in range(0, len(images), batch):
        tokens = model.forward_features(normalize(images[start:start + batch].to(device))).float().cpu()
        cls.append(tokens[:, 0])
        mean.append(tokens[:, model.num_prefix_tokens:].mean(1))
    return {"cls": torch.cat(cls), "mean": torch.cat(mean)}


def linear_probe_right(train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, test_y: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Standardised features, a linear classifier trained to convergence with L-BFGS and a small L2.
    Returns a (n_test,) bool tensor: whether each test image is classified right."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    train, test = (train - mean) / std, (test - mean) / std
    torch.manual_seed(seed)
    classes = int(train_y.max()) + 1
    layer = torch.nn.Linear(train.shape[1], classes)
    optimizer = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=200, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(layer(train), train_y) + 1e-4 * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return layer(test).argmax(1) == test_y


def load_spec(spec: str, random_seed: int) -> tuple[str, torch.nn.Module]:
    """``demo:mae``, ``NAME=CHECKPOINT`` or ``demo:random`` -> (the table's label, the model)."""
    if spec == RANDOM:
        torch.manual_seed(random_seed)  # the baseline's weights do not depend on the models measured before it
        return "random weights, same architecture", attnflow.load_model("demo:mae", random_init=True)
    name, checkpoint = spec.split("=", 1) if "=" in spec else (spec, None)
    label = f"`{name}`" if checkpoint is None else f"`{name}` ({checkpoint})"
    return label, attnflow.load_model(name, checkpoint)


def markdown_table(rows: list[dict]) -> str:
    """The issue's table: one row per model, accuracy and 95% CI per (feature, evaluator) column."""
    lines = ["| model | " + " | ".join(COLUMNS.values()) + " |", "| --- |" + " --- |" * len(COLUMNS)]
    for row in rows:
        cells = []
        for feature, evaluator in COLUMNS:
            acc, low, high = (row[f"{evaluator}_{feature}{suffix}"] for suffix in ("", "_ci_low", "_ci_high"))
            cells.append(f"{100 * acc:.1f}% [{100 * low:.1f}, {100 * high:.1f}]")
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help=f"demo:mae, demo:dino, NAME=CHECKPOINT, or {RANDOM}")
    p.add_argument("--train", type=int, default=10000, help="composed training images for the probes")
    p.add_argument("--test", type=int, default=10000, help="composed test images")
    p.add_argument("--data-root", default=str(FASHION_MNIST))
    p.add_argument("--random-init", action="store_true", help=f"also measure {RANDOM} (the same as naming it)")
    p.add_argument("--random-seed", type=int, default=0, help=f"torch seed of the {RANDOM} weights")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the test images for the 95%% CIs")
    p.add_argument("--device", default="cpu", help="where the models compute features (the probes run on the CPU)")
    p.add_argument("--table", type=Path, help="also write the markdown table to this file")
    args = p.parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is available here; use --device cpu")
    missing = missing_fashion_mnist(("train", "test"), args.data_root)
    if missing is not None:
        p.error(f"--data-root: {missing}")
    specs = list(args.models) + ([RANDOM] if args.random_init and RANDOM not in args.models else [])
    models = []  # all loaded before any is measured: a checkpoint that cannot be read ends the run at once
    for spec in specs:
        try:
            models.append((spec, *load_spec(spec, args.random_seed)))
        except attnflow.AttnflowError as e:
            p.error(f"{spec}: {e}")
    train_x, train_y = composed_split("train", args.train, 1, args.data_root)
    test_x, test_y = composed_split("test", args.test, 2, args.data_root)
    rows = []
    for spec, label, model in models:
        model = model.to(args.device).eval()
        tr, te = features(model, train_x, device=args.device), features(model, test_x, device=args.device)
        row = {"model": spec, "label": label, "train": args.train, "test": args.test}
        for feature, evaluator in COLUMNS:
            if evaluator == "knn":
                right = knn_accuracy(tr[feature], train_y, te[feature], test_y)
            else:
                right = linear_probe_right(tr[feature], train_y, te[feature], test_y)
            acc, low, high = bootstrap_accuracy(right, args.bootstrap, seed=0)
            key = f"{evaluator}_{feature}"
            row.update({key: round(acc, 4), f"{key}_ci_low": round(low, 4), f"{key}_ci_high": round(high, 4)})
        rows.append(row)
        print(json.dumps(row), flush=True)
    table = markdown_table(rows)
    print(f"\n{args.train} + {args.test} composed images; 95% percentile-bootstrap CIs over the test images\n")
    print(table, end="", flush=True)
    if args.table is not None:
        args.table.write_text(table)


if __name__ == "__main__":
    main()
