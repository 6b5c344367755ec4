"""Selective aggregation: how much a representation gains when patch tokens are pooled selectively instead
of read from [cls] (the second half of "Beyond [cls]").

Input is caches extracted with ``--save-tokens --labels-from-dirs``: the last block's tokens (before the
final norm, which the cache also records and this module applies) and the labels. Aggregations of one image's
tokens (T, D) into one vector:

- ``cls``: the cls token after the final norm, as users read it;
- ``mean``: the mean of the patch tokens;
- ``cls-attn``: patch tokens weighted by the last block's head-mean cls attention, renormalised over patches;
- ``min-entropy-head``: weights from the last block's head whose cls attention has the lowest entropy;
- ``rollout``: weights from the attention-rollout readout after the last block;
- ``abmilp``: attention-based MIL pooling trained with the classifier: a linear layer (or, with ``relu``,
  a hidden ReLU layer) scores each patch token, a softmax over patches weighs them;
- ``ep``: efficient probing (Psomas et al. 2025), M learned queries cross-attending over the patch tokens
  (optionally with cls) without query or key projections, trained with the classifier (:class:`EfficientProbe`).

Evaluators: DINO's weighted k-NN (cosine, k = 20, temperature 0.07) and a linear probe (batch norm without
affine parameters, then a linear layer; AdamW, cosine schedule, seeded, the best epoch chosen on a held-out
10% of the training images). Accuracy comes with a 95% bootstrap CI over test images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import open_cache
from .errors import AttnflowError
from .layout import TokenLayout
from .metrics import cls_metrics, renormalise_over_patches, rollout
from .schema import LABELS, TOKENS

POOLS = ("cls", "mean", "cls-attn", "min-entropy-head", "rollout", "abmilp", "ep")
EVALUATORS = ("knn", "linear")
ATTENTION_POOLS = ("cls-attn", "min-entropy-head", "rollout")
TRAINED_POOLS = ("abmilp", "ep")  # trained jointly with the linear classifier: no k-NN row
# What each attention pool needs the cache to store (--store); the other pools need only the tokens.
POOL_STORES = {"cls-attn": ("rows", "full"), "min-entropy-head": ("rows", "full"), "rollout": ("full",)}
EP_QUERIES = 32  # the paper's default number of EP queries

PROBE_COLUMNS = ("model", "family", "pool", "evaluator", "accuracy", "ci_low", "ci_high", "n_train", "n_test")
KNN_K, KNN_TEMPERATURE = 20, 0.07


def pools_for_store(store: str) -> tuple[str, ...]:
    """The pools a cache extracted with ``--store store`` (and ``--save-tokens``) supports, in ``POOLS`` order."""
    return tuple(pool for pool in POOLS if store in POOL_STORES.get(pool, (store,)))


@dataclass
class ProbeSet:
    """One model's images for probing: normed tokens (n, T, D), labels (n,) and attention-based weights."""

    tokens: torch.Tensor
    labels: torch.Tensor
    layout: TokenLayout
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # pool -> (n, P), rows sum to 1
    cls_entropy_norm: float = math.nan  # the probed block's, mean over images and heads
    block: int | None = None  # the 0-based block whose tokens and attention these are (None: not from a cache)

    def subset(self, index: torch.Tensor) -> "ProbeSet":
        return ProbeSet(self.tokens[index], self.labels[index], self.layout, {k: v[index] for k, v in self.weights.items()},
                        self.cls_entropy_norm, self.block)

    def __len__(self) -> int:
        return len(self.labels)


def load_probe_set(path: str | Path, pools: Sequence[str], notes: list[str], *,
                   layer: int | None = None) -> tuple[ProbeSet, dict[str, Any], list[str]]:
    """Read tokens, labels and what the attention pools need from a cache; returns the set, its attributes
    and its class names. ``layer`` is the block (0-based, negative from the last) whose output tokens are
    probed and whose attention weighs them (rollout: up to that block); it must be one the cache stores tokens
    of (:meth:`~attnflow.schema.Cache.token_layer`); None: the deepest stored, the last block by default."""
    with open_cache(path) as cache:
        missing = [(flag, name) for flag, name, there in (("--save-tokens", TOKENS, cache.has_tokens),
                                                         ("--labels-from-dirs", LABELS, LABELS in cache)) if not there]
        if missing:
            raise AttnflowError(f"{cache.path} has no {' or '.join(name for _, name in missing)}; "
                                f"extract it with {' '.join(flag for flag, _ in missing)}")
        layout, attrs = cache.layout, cache.attrs
        block = cache.token_layer(layer)
        if not cache.has_final_norm:
            notes.append(f"{attrs['label']}: the cache records no final LayerNorm; tokens are used as stored")
        # the final norm on an intermediate block's tokens too, as timm's and DINOv2's intermediate features do
        tokens = torch.from_numpy(cache.tokens(layer=block, normalised=cache.has_final_norm))
        data = ProbeSet(tokens, torch.from_numpy(cache.labels()), layout, block=block)
        if layout.has_cls and cache.store != "none":
            rows = torch.from_numpy(cache.prefix_rows(layer=block)[:, :, 0, :])  # (n, H, T): the block's cls rows
            per_head = cls_metrics(rows, layout)
            q = renormalise_over_patches(rows, layout)
            data.weights["cls-attn"] = q.mean(1).float()
            best = per_head["cls_entropy"].argmin(1)
            data.weights["min-entropy-head"] = q[torch.arange(len(q)), best].float()
            data.cls_entropy_norm = float(per_head["cls_entropy_norm"].mean())
        if "rollout" in pools:
            if cache.store == "full":
                maps = []
                for start in range(0, len(cache), 64):
                    maps.append(rollout(torch.from_numpy(cache.attention(start, min(start + 64, len(cache)))), layout)[:, block])
                data.weights["rollout"] = torch.cat(maps).float()
            else:
                notes.append(f"{attrs['label']}: rollout pooling needs full maps (--store full); skipped")
        for pool in ATTENTION_POOLS:
            if pool in pools and pool not in data.weights and pool != "rollout":
                notes.append(f"{attrs['label']}: {pool} pooling needs the cls attention (a cls token and --store rows or full); skipped")
        return data, attrs, cache.class_names or []


def pooled(data: ProbeSet, pool: str) -> torch.Tensor:
    """(n, D) features of a fixed (untrained) aggregation."""
    p = data.layout.num_prefix_tokens
    if pool == "cls":
        return data.tokens[:, 0]
    if pool == "mean":
        return data.tokens[:, p:].mean(1)
    return (data.weights[pool][:, :, None] * data.tokens[:, p:]).sum(1)


def knn_accuracy(train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, test_y: torch.Tensor,
                 k: int = KNN_K, temperature: float = KNN_TEMPERATURE) -> torch.Tensor:
    """Per test image, whether DINO's weighted k-NN is right: cosine similarity, the k most similar training
    images vote with weight exp(similarity / temperature). Returns a (n_test,) bool tensor."""
    train, test = F.normalize(train.float(), dim=1), F.normalize(test.float(), dim=1)
    classes = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(train))
    right = []
    for start in range(0, len(test), 1024):
        sims, idx = (test[start:start + 1024] @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(idx), classes).scatter_add_(1, train_y[idx], (sims / temperature).exp())
        right.append(votes.argmax(1) == test_y[start:start + 1024])
    return torch.cat(right)


class AbMILP(nn.Module):
    """Attention-based MIL pooling over patch tokens: score, softmax over patches, weighted sum."""

    def __init__(self, dim: int, relu: bool = False):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, dim // 2), nn.ReLU(), nn.Linear(dim // 2, 1)) if relu else nn.Linear(dim, 1)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:  # (B, P, D) -> (B, D)
        weights = self.score(patches).squeeze(-1).softmax(-1)
        return (weights[..., None] * patches).sum(1)


def ep_fits(dim: int, queries: int) -> bool:
    """Whether EP's values (width ``dim``) split into ``queries`` equal groups."""
    return queries >= 1 and dim % queries == 0


class EfficientProbe(nn.Module):
    """Efficient probing (EP, Psomas et al. 2025, billpsomas/efficient-probing): a multi-query cross-attention
    without query or key projections.

    With tokens X (N, D), M learned queries Q (M, D) and one value map W_v (D, D, no bias):
    A = softmax over the N tokens of (Q X^T / sqrt(D)), (M, N); V = X W_v split along D into M groups of D / M;
    query m's output is A[m] @ V[:, group m], and the M outputs are concatenated into one (D,) vector.
    Queries start as N(0, 0.02^2), as in the reference; no dropout. Parameters: M * D + D * D."""

    def __init__(self, dim: int, queries: int = EP_QUERIES):
        super().__init__()
        if not ep_fits(dim, queries):
            raise ValueError(f"EP splits the token width {dim} into {queries} value groups: it must be a multiple")
        self.queries = nn.Parameter(torch.randn(queries, dim) * 0.02)
        self.value = nn.Linear(dim, dim, bias=False)

    def attention(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, M, N), rows sum to 1
        """Each query's weights over the tokens: the keys are the tokens themselves."""
        return (self.queries @ tokens.transpose(1, 2) * tokens.shape[-1] ** -0.5).softmax(-1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, D)
        b, _, d = tokens.shape
        m = len(self.queries)
        # The value map is linear: pooling the tokens first, A (X W_v) = (A X) W_v, costs B D^2 instead of B N D^2.
        pooled_tokens = self.attention(tokens) @ tokens  # (B, M, D)
        groups = self.value.weight.view(m, d // m, d)  # (M, D/M, D): the output rows that query m produces
        return torch.einsum("bmd,mgd->bmg", pooled_tokens, groups).reshape(b, d)


class LinearHead(nn.Module):
    def __init__(self, dim: int, classes: int, pool: nn.Module | None = None):
        super().__init__()
        self.pool = pool
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.linear = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(self.pool(x) if self.pool is not None else x))


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(first, rest)``: ``fraction`` of every class in ``first``, chosen by a seeded permutation."""
    generator = torch.Generator().manual_seed(seed)
    first, rest = [], []
    for c in labels.unique():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        cut = int(round(fraction * len(members)))
        first.append(members[:cut])
        rest.append(members[cut:])
    return torch.cat(first).sort().values, torch.cat(rest).sort().values


def train_linear(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, *, classes: int, pool: nn.Module | None = None,
    epochs: int = 100, batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0,
    device: str = "cpu",
) -> torch.Tensor:
    """Train a (pooling +) batch-norm + linear head on frozen inputs; returns test predictions (n_test,).

    The epoch whose held-out 10% of the training images scores best is kept (early stopping)."""
    torch.manual_seed(seed)
    fit, held = stratified_split(train_y, 0.9, seed)
    if len(held) == 0:
        fit, held = torch.arange(len(train_y)), torch.arange(len(train_y))
    dim = train_x.shape[-1]
    head = LinearHead(dim, classes, pool).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(fit) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    x, y = train_x.to(device), train_y.to(device)
    best, best_state = -1.0, None
    for _ in range(epochs):
        head.train()
        order = fit[torch.randperm(len(fit), generator=generator)]
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size].to(device)
            if len(batch) < 2:
                continue  # batch norm needs two samples
            loss = F.cross_entropy(head(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        head.eval()
        with torch.no_grad():
            score = (head(x[held.to(device)]).argmax(1) == y[held.to(device)]).float().mean().item()
        if score > best:
            best, best_state = score, {k: v.detach().clone() for k, v in head.state_dict().items()}
    head.load_state_dict(best_state)
    head.eval()
    with torch.no_grad():
        return torch.cat([head(test_x[i:i + 1024].to(device)).argmax(1).cpu() for i in range(0, len(test_x), 1024)])


def bootstrap_accuracy(right: torch.Tensor, n_bootstrap: int, seed: int) -> tuple[float, float, float]:
    """Accuracy and its 95% percentile bootstrap CI over test images."""
    r = right.numpy().astype(np.float64)
    rng = np.random.default_rng(seed)
    means = np.array([r[rng.integers(0, len(r), len(r))].mean() for _ in range(n_bootstrap)])
    low, high = np.percentile(means, [2.5, 97.5])
    return float(r.mean()), float(low), float(high)


def pool_tokens(data: ProbeSet, with_cls: bool = False) -> torch.Tensor:
    """(n, P, D) patch tokens a trained pool reads, registers left out; with ``with_cls`` and a cls token,
    (n, 1 + P, D) with cls first."""
    p = data.layout.num_prefix_tokens
    if with_cls and data.layout.has_cls:
        return torch.cat([data.tokens[:, :1], data.tokens[:, p:]], 1)
    return data.tokens[:, p:]


def probe(
    train: ProbeSet, test: ProbeSet, *, pools: Sequence[str] = POOLS, evaluators: Sequence[str] = EVALUATORS,
    classes: int, epochs: int = 100, relu: bool = False, ep_queries: int = EP_QUERIES, ep_with_cls: bool = False,
    seed: int = 0, n_bootstrap: int = 1000, device: str = "cpu",
) -> list[dict[str, Any]]:
    """Accuracy of every available pool x evaluator (the trained pools, ``abmilp`` and ``ep``, only with the
    linear evaluator; ``ep`` only where the token width is a multiple of ``ep_queries``)."""
    results = []
    dim = train.tokens.shape[-1]
    for pool in pools:
        if pool in ATTENTION_POOLS and (pool not in train.weights or pool not in test.weights):
            continue
        if pool in ("cls",) and not train.layout.has_cls:
            continue
        if pool == "ep" and not ep_fits(dim, ep_queries):
            continue
        for evaluator in evaluators:
            if pool in TRAINED_POOLS:
                if evaluator != "linear":
                    continue
                with_cls = pool == "ep" and ep_with_cls
                head = AbMILP(dim, relu) if pool == "abmilp" else EfficientProbe(dim, ep_queries)
                predictions = train_linear(pool_tokens(train, with_cls), train.labels, pool_tokens(test, with_cls),
                                           classes=classes, pool=head, epochs=epochs, seed=seed, device=device)
                right = predictions == test.labels
            elif evaluator == "knn":
                right = knn_accuracy(pooled(train, pool), train.labels, pooled(test, pool), test.labels)
            else:
                predictions = train_linear(pooled(train, pool), train.labels, pooled(test, pool), classes=classes,
                                           epochs=epochs, seed=seed, device=device)
                right = predictions == test.labels
            accuracy, low, high = bootstrap_accuracy(right, n_bootstrap, seed)
            results.append({"pool": pool, "evaluator": evaluator, "accuracy": accuracy, "ci_low": low, "ci_high": high,
                            "n_train": len(train), "n_test": len(test)})
    return results


def probe_caches(
    pairs: Sequence[tuple[Path, Path | None]], *, split: float | None = None, pools: Sequence[str] = POOLS,
    evaluators: Sequence[str] = EVALUATORS, epochs: int = 100, relu: bool = False, ep_queries: int = EP_QUERIES,
    ep_with_cls: bool = False, seed: int = 0, n_bootstrap: int = 1000, device: str = "cpu", layer: int | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Probe every model: ``(train cache, test cache)`` pairs, or ``(cache, None)`` split by ``split``.

    Returns long-format records (``PROBE_COLUMNS`` plus ``gain_over_cls`` and the probed block's
    ``cls_entropy_norm``; with ``layer``, also ``layer``: the 0-based block probed, see :func:`load_probe_set`)
    and notes."""
    notes: list[str] = []
    records: list[dict[str, Any]] = []
    labels_seen: dict[str, int] = {}
    for pool in TRAINED_POOLS:
        if pool in pools and "linear" not in evaluators:
            notes.append(f"{pool} pooling is trained with the linear probe; without --evaluator linear it is skipped")
    for train_path, test_path in pairs:
        train, attrs, names = load_probe_set(train_path, pools, notes, layer=layer)
        if "cls" in pools and not train.layout.has_cls:
            notes.append(f"{attrs.get('label', train_path)} has no cls token: cls pooling skipped (gain_over_cls is NaN)")
        if "ep" in pools and ep_with_cls and not train.layout.has_cls:
            notes.append(f"{attrs.get('label', train_path)} has no cls token: --ep-with-cls ignored, ep pools the patch tokens")
        if "ep" in pools and not ep_fits(train.tokens.shape[-1], ep_queries):
            notes.append(f"{attrs.get('label', train_path)}: ep pooling splits the token width {train.tokens.shape[-1]} into "
                         f"--ep-queries {ep_queries} groups, which does not divide it; skipped")
        if test_path is None:
            if split is None:
                raise AttnflowError("give --split to divide one cache into training and test images")
            _need_two_classes(train.labels, names, f"{train_path} has one")
            first, rest = stratified_split(train.labels, split, seed)
            train, test = train.subset(first), train.subset(rest)
        else:
            test, test_attrs, test_names = load_probe_set(test_path, pools, notes, layer=layer)
            if test_names != names:
                raise AttnflowError(f"{train_path} and {test_path} have different classes "
                                    f"({_class_list(names)} vs {_class_list(test_names)})")
            if test.tokens.shape[1:] != train.tokens.shape[1:] or test.layout != train.layout:
                raise AttnflowError(
                    f"{train_path} and {test_path} come from different models ({attrs.get('label')}: "
                    f"{'x'.join(map(str, train.tokens.shape[1:]))} tokens, {test_attrs.get('label')}: "
                    f"{'x'.join(map(str, test.tokens.shape[1:]))}); pair each model's training cache with its own test cache"
                )
            if test_attrs.get("model") != attrs.get("model") or test_attrs.get("checkpoint_sha256") != attrs.get("checkpoint_sha256"):
                notes.append(f"{train_path} and {test_path} come from different models")
        if len(train) < 2 or len(test) < 1:
            raise AttnflowError(f"{train_path}: too few images to probe ({len(train)} for training, {len(test)} for testing)")
        _need_two_classes(train.labels, names, f"the training images of {train_path} hold one"
                          + (f" after --split {split}" if test_path is None else ""))
        _note_untested_classes(attrs.get("label", str(train_path)), train.labels, test.labels, names, notes,
                               "too few images to divide" if test_path is None else "none in the test cache")
        rows = probe(train, test, pools=pools, evaluators=evaluators, classes=max(len(names), int(train.labels.max()) + 1),
                     epochs=epochs, relu=relu, ep_queries=ep_queries, ep_with_cls=ep_with_cls, seed=seed,
                     n_bootstrap=n_bootstrap, device=device)
        base = {(r["evaluator"]): r["accuracy"] for r in rows if r["pool"] == "cls"}
        label = attrs.get("label", str(train_path))
        labels_seen[label] = labels_seen.get(label, 0) + 1
        if labels_seen[label] > 1:  # as compare does: rows of two models must not share a name
            notes.append(f"two models are labelled '{label}'; {train_path} is shown as '{label}#{labels_seen[label]}'")
            label = f"{label}#{labels_seen[label]}"
        for r in rows:
            records.append({
                "model": label, "family": attrs.get("family", "unknown"), **r,
                "gain_over_cls": r["accuracy"] - base[r["evaluator"]] if r["evaluator"] in base else math.nan,
                "cls_entropy_norm": train.cls_entropy_norm,
                **({"layer": train.block} if layer is not None else {}),
            })
    return records, list(dict.fromkeys(notes))


def _classes(n: int) -> str:
    return "1 class has" if n == 1 else f"{n} classes have"


def _class_name(label: int, names: Sequence[str]) -> str:
    return names[label] if 0 <= label < len(names) else f"class {label}"


def _class_list(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return (shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")) or "none"


def _need_two_classes(labels: torch.Tensor, names: Sequence[str], where: str) -> None:
    """Every pool scores 100% on one class: refuse instead of reporting it."""
    present = labels.unique().tolist()
    if len(present) < 2:
        raise AttnflowError(f"probing needs at least two classes; {where}: "
                            + (_class_name(int(present[0]), names) if present else "none"))


def _note_untested_classes(model: str, train_labels: torch.Tensor, test_labels: torch.Tensor, names: Sequence[str],
                           notes: list[str], why: str) -> None:
    """Classes with too few images for a stratified split land on one side only: say which and what it means."""
    train_set, test_set = set(train_labels.tolist()), set(test_labels.tolist())
    only_test = sorted(test_set - train_set)
    only_train = sorted(train_set - test_set)
    if only_test:
        notes.append(f"{model}: {_classes(len(only_test))} test images but no training images "
                     f"({_class_list([_class_name(c, names) for c in only_test])}): their test images can only count as errors")
    if only_train:
        notes.append(f"{model}: {_classes(len(only_train))} no test images "
                     f"({_class_list([_class_name(c, names) for c in only_train])}): {why}, not tested")
