"""Measure the demo models' representations: k-NN and linear-probe top-1 accuracy on Fashion-MNIST items
composed with the demo recipe, from cls features and from mean-pooled patch features.

The same measurement for every checkpoint given (both after the final norm, as users read them):

    python examples/evaluate_demo.py demo:mae demo:dino
    python examples/evaluate_demo.py demo:mae=path/to/mae.pth demo:dino=path/to/dino.pth --train 10000 --test 10000
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

import attnflow
from demo_data import FASHION_MNIST, compose, load_fashion_mnist, normalize
from attnflow.probe import knn_accuracy  # DINO's weighted k-NN, as attnflow probe uses it


def composed_split(split: str, n: int, seed: int, root) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_fashion_mnist(split, root)
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(images), generator=generator)[:n]
    items = torch.from_numpy(images.copy()).float().div(255)
    composed, _ = compose(items[pick], items, generator)
    return composed, torch.from_numpy(labels.astype("int64"))[pick]


@torch.no_grad()
def features(model, images: torch.Tensor, batch: int = 500) -> dict[str, torch.Tensor]:
    cls, mean = [], []
    for start in range(0, len(images), batch):
        tokens = model.forward_features(normalize(images[start:start + batch]))
        cls.append(tokens[:, 0])
        mean.append(tokens[:, model.num_prefix_tokens:].mean(1))
    return {"cls": torch.cat(cls), "mean": torch.cat(mean)}


def linear_probe_accuracy(train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, test_y: torch.Tensor, seed: int = 0) -> float:
    """Standardised features, a linear classifier trained to convergence with L-BFGS and a small L2."""
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
        return (layer(test).argmax(1) == test_y).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="demo:mae, demo:dino, or NAME=CHECKPOINT")
    p.add_argument("--train", type=int, default=10000, help="composed training images for the probes")
    p.add_argument("--test", type=int, default=10000, help="composed test images")
    p.add_argument("--data-root", default=str(FASHION_MNIST))
    p.add_argument("--random-init", action="store_true", help="also measure the randomly initialised demo ViT")
    args = p.parse_args()
    torch.manual_seed(0)
    train_x, train_y = composed_split("train", args.train, 1, args.data_root)
    test_x, test_y = composed_split("test", args.test, 2, args.data_root)
    specs = [m.split("=", 1) if "=" in m else (m, None) for m in args.models]
    if args.random_init:
        specs.append(("random", None))
    for name, checkpoint in specs:
        if name == "random":
            model = attnflow.load_model("demo:mae", random_init=True)
        else:
            model = attnflow.load_model(name, checkpoint)
        tr, te = features(model, train_x), features(model, test_x)
        result = {"model": name if checkpoint is None else f"{name}={checkpoint}", "train": args.train, "test": args.test}
        for kind in ("cls", "mean"):
            result[f"knn_{kind}"] = round(knn_accuracy(tr[kind], train_y, te[kind], test_y).float().mean().item(), 4)
            result[f"linear_{kind}"] = round(linear_probe_accuracy(tr[kind], train_y, te[kind], test_y), 4)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
