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
10% of the training images). Accuracy comes with a 95% bootstrap CI over test images. A pool's gain over cls
(same model, same test images) is paired: its bootstrap CI resamples the test images of both at once (row
``j`` of the records, in output order, draws from ``numpy.random.default_rng([seed, 2000 + j])``), its test
is McNemar's exact test of the images one gets right and the other wrong, and the p-values of all gains of a
run are adjusted together by Holm (``gain_p_holm``).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import AttnflowError, first_line
from .notes import collect, note
from .inference import Correction, adjust, paired_accuracy_difference
from .output import atomic_output
from .layout import TokenLayout
from .metrics import cls_metrics, renormalise_over_patches, rollout
from .options import resolve_device
from .progress import OnProgress
from .choices import StrEnum, choice_values
from .store.names import LABELS, TOKENS, StoreMode
from .store.read import open_cache

__all__ = [
    "Pool", "Evaluator", "POOLS", "EVALUATORS", "ATTENTION_POOLS", "TRAINED_POOLS", "EP_WITH_CLS", "POOL_STORES",
    "EP_QUERIES", "PROBE_COLUMNS", "GAIN_COLUMNS", "KNN_K", "KNN_TEMPERATURE", "STREAM_CHUNK", "STREAM_BUFFER",
    "KNN_BLOCK", "READ_SPARSITY", "IN_MEMORY_BYTES", "pools_for_store", "TokenSource", "Tokens", "token_chunks",
    "ProbeSet", "load_probe_set", "pooled", "knn_accuracy", "AbMILP", "ep_fits", "EfficientProbe", "HEAD_FORMAT",
    "HEAD_CONFIG_KEYS", "make_head", "head_path", "save_head", "load_head", "LinearHead", "stratified_split",
    "predict", "fit_linear", "train_linear", "bootstrap_accuracy", "pool_tokens", "probe", "ProbeResult", "probe_caches",
    "shared_images",
]



class Pool(StrEnum):
    """How a probe turns an image's tokens into one vector (``--pool``; README, Selective aggregation probes)."""

    cls = "cls"
    mean = "mean"
    cls_attn = "cls-attn"
    min_entropy_head = "min-entropy-head"
    rollout = "rollout"
    abmilp = "abmilp"
    ep = "ep"


class Evaluator(StrEnum):
    """How a pooled representation is scored (``--evaluator``): weighted k-NN or a trained linear classifier."""

    knn = "knn"
    linear = "linear"


POOLS = choice_values(Pool)
EVALUATORS = choice_values(Evaluator)
ATTENTION_POOLS = (Pool.cls_attn, Pool.min_entropy_head, Pool.rollout)
TRAINED_POOLS = (Pool.abmilp, Pool.ep)  # trained jointly with the linear classifier: no k-NN row
EP_WITH_CLS = "ep+cls"  # the name (rows, saved head, maps) of the ep pool with --ep-with-cls: cls among its keys
# What each attention pool needs the cache to store (--store); the other pools need only the tokens.
POOL_STORES = {Pool.cls_attn: (StoreMode.rows, StoreMode.full), Pool.min_entropy_head: (StoreMode.rows, StoreMode.full),
               Pool.rollout: (StoreMode.full,)}
EP_QUERIES = 32  # the paper's default number of EP queries

PROBE_COLUMNS = ("model", "family", "pool", "evaluator", "accuracy", "ci_low", "ci_high", "n_train", "n_test")
# A pool against cls of the same model on the same test images: the accuracy difference, its paired bootstrap
# CI, the exact McNemar p-value, and that p adjusted by Holm over every gain of the table.
GAIN_COLUMNS = ("gain_over_cls", "gain_ci_low", "gain_ci_high", "gain_p", "gain_p_holm")
KNN_K, KNN_TEMPERATURE = 20, 0.07
# Streaming: tokens are read from a cache at most this many images a read; a trained pool's epoch reads
# its shuffled images this many at a time (the bounded buffer, see _epoch_batches); k-NN compares this
# many test images with this many training images at a time.
STREAM_CHUNK, STREAM_BUFFER, KNN_BLOCK = 256, 1024, 1024
# A read of scattered images also reads the rows between them while they are at most this many times the
# images wanted: fewer, larger reads, at most this factor more bytes.
READ_SPARSITY = 4
# The tokens a trained pool reads are held in memory up to this many bytes (float32) and streamed from the
# cache at every epoch above it, so peak memory stays bounded whatever the number of images.
IN_MEMORY_BYTES = 1 << 30


def pools_for_store(store: str) -> tuple[str, ...]:
    """The pools a cache extracted with ``--store store`` (and ``--save-tokens``) supports, in ``POOLS`` order."""
    return tuple(pool for pool in POOLS if store in POOL_STORES.get(pool, (store,)))


@dataclass(frozen=True)
class TokenSource:
    """Tokens (n, T, D) of one block of a cache, read in chunks instead of held: the images ``index`` (sorted
    rows of the cache) of block ``layer``, with the final norm when ``normalised``. Stands where a (n, T, D)
    tensor would: ``shape``, ``len`` and indexing by image (a subset, still unread)."""

    path: Path
    layer: int
    normalised: bool
    index: np.ndarray  # (n,) int64, increasing
    token_shape: tuple[int, int]  # (T, D) as stored
    columns: tuple[int, ...] | None = None  # the tokens kept of the T (None: all), as a trained pool reads them

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.index), len(self.columns) if self.columns is not None else self.token_shape[0], self.token_shape[1])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: torch.Tensor) -> "TokenSource":
        chosen = self.index[np.asarray(index, dtype=np.int64)]
        return replace(self, index=np.sort(chosen))

    def read(self, positions: torch.Tensor, chunk: int = STREAM_CHUNK) -> torch.Tensor:
        """(b, T, D) float32 tokens of ``positions`` (b,) into this source, in the order given
        (any order): the cache is read in spans of at most ``chunk`` rows, each at least 1 / ``READ_SPARSITY`` rows
        wanted, so a sparse selection reads little beyond the images it names."""
        with open_cache(self.path) as cache:
            return self._read(cache, positions, chunk)

    def _read(self, cache: Any, positions: torch.Tensor, chunk: int) -> torch.Tensor:
        rows = self.index[np.asarray(positions, dtype=np.int64)]
        order = np.argsort(rows, kind="stable")
        ranked = rows[order]
        out = torch.empty((len(rows), *self.shape[1:]))
        lo = 0
        for hi in range(1, len(ranked) + 1):
            # One read covers wanted rows while it stays within ``chunk`` rows and at most READ_SPARSITY rows a
            # wanted one: a shuffled buffer of most of a cache is read in few calls, a sparse one row by row.
            span = ranked[hi] - ranked[lo] + 1 if hi < len(ranked) else 0
            if hi < len(ranked) and span <= chunk and span <= READ_SPARSITY * (hi - lo + 1):
                continue
            block = cache.tokens(int(ranked[lo]), int(ranked[hi - 1]) + 1, layer=self.layer, normalised=self.normalised)
            block = block[ranked[lo:hi] - ranked[lo]]
            out[torch.from_numpy(order[lo:hi])] = torch.from_numpy(block if self.columns is None else block[:, list(self.columns)])
            lo = hi
        return out

    def chunks(self, chunk: int = STREAM_CHUNK):
        """Yield ``(positions, tokens)`` in image order: positions (b,) into this source, tokens (b, T, D) float32,
        b <= ``chunk``; no read exceeds ``chunk`` rows (see :meth:`read`)."""
        if len(self.index) == 0:
            return
        with open_cache(self.path) as cache:
            for start in range(0, len(self.index), chunk):
                at = torch.arange(start, min(start + chunk, len(self.index)))
                yield at, self._read(cache, at, chunk)


Tokens = torch.Tensor | TokenSource


def token_chunks(tokens: Tokens, chunk: int = STREAM_CHUNK):
    """``(positions, tokens)`` chunks of (b <= chunk, T, D) of held or streamed tokens, in image order."""
    if isinstance(tokens, TokenSource):
        yield from tokens.chunks(chunk)
        return
    for start in range(0, len(tokens), chunk):
        yield torch.arange(start, min(start + chunk, len(tokens))), tokens[start:start + chunk]


@dataclass
class ProbeSet:
    """One model's images for probing: normed tokens (n, T, D), held or streamed from the cache
    (:class:`TokenSource`), labels (n,) and attention-based weights."""

    tokens: Tokens
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


def load_probe_set(path: str | Path, pools: Sequence[str], *, layer: int | None = None,
                   on_progress: OnProgress | None = None) -> tuple[ProbeSet, dict[str, Any], list[str]]:
    """Read tokens, labels and what the attention pools need from a cache; returns the set, its attributes
    and its class names. ``layer`` is the block (0-based, negative from the last) whose output tokens are
    probed and whose attention weighs them (rollout: up to that block); it must be one the cache stores tokens
    of (:meth:`~attnflow.store.read.Cache.token_layer`); None: the deepest stored, the last block by default."""
    with open_cache(path) as cache:
        missing = [(flag, name) for flag, name, there in (("--save-tokens", TOKENS, cache.has_tokens),
                                                         ("--labels-from-dirs", LABELS, LABELS in cache)) if not there]
        if missing:
            raise AttnflowError(f"{cache.path} has no {' or '.join(name for _, name in missing)}; "
                                f"extract it with {' '.join(flag for flag, _ in missing)}")
        layout, attrs = cache.layout, cache.attrs
        block = cache.token_layer(layer)
        if not cache.has_final_norm:
            note(f"{attrs['label']}: the cache records no final LayerNorm; tokens are used as stored")
        # the final norm on an intermediate block's tokens too, as timm's and DINOv2's intermediate features do
        # Tokens stay in the cache and are streamed in chunks: peak memory does not grow with the images.
        first = cache.tokens(0, min(1, len(cache)), layer=block, normalised=cache.has_final_norm)
        tokens = TokenSource(Path(cache.path), block, cache.has_final_norm, np.arange(len(cache), dtype=np.int64),
                             tuple(first.shape[1:]))
        data = ProbeSet(tokens, torch.from_numpy(cache.labels()), layout, block=block)
        if layout.has_cls and cache.store != StoreMode.none:
            mean_w, best_w, entropy = [], [], 0.0
            step = f"{attrs['label']}: reading attention"
            for start in range(0, len(cache), STREAM_CHUNK):  # (b, H, T): the block's cls rows, a chunk at a time
                if on_progress:
                    on_progress(step, start, len(cache))
                rows = torch.from_numpy(cache.prefix_rows(start, min(start + STREAM_CHUNK, len(cache)), layer=block)[:, :, 0, :])
                per_head = cls_metrics(rows, layout)
                q = renormalise_over_patches(rows, layout)
                mean_w.append(q.mean(1).float())
                best = per_head["cls_entropy"].argmin(1)
                best_w.append(q[torch.arange(len(q)), best].float())
                entropy += float(per_head["cls_entropy_norm"].double().mean(1).sum())
            data.weights[Pool.cls_attn] = torch.cat(mean_w)
            data.weights[Pool.min_entropy_head] = torch.cat(best_w)
            data.cls_entropy_norm = entropy / len(cache)
        if "rollout" in pools:
            if cache.store == StoreMode.full:
                maps = []
                for start in range(0, len(cache), 64):
                    if on_progress:
                        on_progress(f"{attrs['label']}: rollout weights", start, len(cache))
                    maps.append(rollout(torch.from_numpy(cache.attention(start, min(start + 64, len(cache)))), layout)[:, block])
                data.weights[Pool.rollout] = torch.cat(maps).float()
            else:
                note(f"{attrs['label']}: rollout pooling needs full maps (--store full); skipped")
        for pool in ATTENTION_POOLS:
            if pool in pools and pool not in data.weights and pool != Pool.rollout:
                note(f"{attrs['label']}: {pool} pooling needs the cls attention (a cls token and --store rows or full); skipped")
        return data, attrs, cache.class_names or []


def pooled(data: ProbeSet, pool: str, chunk: int = STREAM_CHUNK, device: str = "cpu") -> torch.Tensor:
    """(n, D) features of a fixed (untrained) aggregation on ``device``, each chunk of (b, T, D) tokens reduced
    there as it is read."""
    p = data.layout.num_prefix_tokens
    out = torch.empty(len(data), data.tokens.shape[-1], device=device)
    for at, tokens in token_chunks(data.tokens, chunk):
        at, tokens = at.to(device), tokens.to(device)
        if pool == Pool.cls:
            out[at] = tokens[:, 0]
        elif pool == Pool.mean:
            out[at] = tokens[:, p:].mean(1)
        else:
            out[at] = (data.weights[pool].to(device)[at][:, :, None] * tokens[:, p:]).sum(1)
    return out


def knn_accuracy(train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, test_y: torch.Tensor,
                 k: int = KNN_K, temperature: float = KNN_TEMPERATURE, device: str = "cpu") -> torch.Tensor:
    """Per test image, whether DINO's weighted k-NN is right: cosine similarity, the k most similar training
    images (n_train, D) vote with weight exp(similarity / temperature), computed on ``device``. Returns a
    (n_test,) bool tensor on the CPU."""
    train, test = F.normalize(train.float().to(device), dim=1), F.normalize(test.float().to(device), dim=1)
    train_y, test_y = train_y.to(device), test_y.to(device)
    classes = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(train))
    right = []
    for start in range(0, len(test), KNN_BLOCK):
        queries = test[start:start + KNN_BLOCK]
        # The k nearest so far, merged block by block: never a (n_test, n_train) similarity matrix.
        sims = torch.empty(len(queries), 0, device=device)
        idx = torch.empty(len(queries), 0, dtype=torch.long, device=device)
        for t in range(0, len(train), KNN_BLOCK):
            block_sims = queries @ train[t:t + KNN_BLOCK].T
            sims, pick = torch.cat([sims, block_sims], 1).topk(min(k, sims.shape[1] + block_sims.shape[1]), dim=1)
            near = torch.arange(t, t + block_sims.shape[1], device=device).expand(len(queries), -1)
            idx = torch.cat([idx, near], 1).gather(1, pick)
        votes = torch.zeros(len(idx), classes, device=device).scatter_add_(1, train_y[idx], (sims / temperature).exp())
        right.append(votes.argmax(1) == test_y[start:start + KNN_BLOCK])
    return torch.cat(right).cpu()


class AbMILP(nn.Module):
    """Attention-based MIL pooling over patch tokens: score, softmax over patches, weighted sum."""

    def __init__(self, dim: int, relu: bool = False):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, dim // 2), nn.ReLU(), nn.Linear(dim // 2, 1)) if relu else nn.Linear(dim, 1)

    def attention(self, patches: torch.Tensor) -> torch.Tensor:  # (B, P, D) -> (B, P), rows sum to 1
        """The pooling weights over the patches: the softmax of the scores."""
        return self.score(patches).squeeze(-1).softmax(-1)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:  # (B, P, D) -> (B, D)
        return (self.attention(patches)[..., None] * patches).sum(1)


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


HEAD_FORMAT = "attnflow-probe-head/1"  # the saved head file's format, checked when loading
# What readers of a whole probe's config (plot maps --heads-dir) rely on, checked when it is loaded.
HEAD_CONFIG_KEYS = ("pool", "dim", "with_cls", "block", "model", "checkpoint_sha256", "label", "num_prefix_tokens", "grid_size")


def make_head(config: dict[str, Any]) -> nn.Module:
    """An untrained pooling head from its config (``pool``, ``dim``; ``relu`` for abmilp, ``queries`` for ep
    and ep+cls)."""
    if config["pool"] == Pool.abmilp:
        return AbMILP(int(config["dim"]), bool(config["relu"]))
    if config["pool"] in (Pool.ep, EP_WITH_CLS):
        return EfficientProbe(int(config["dim"]), int(config["queries"]))
    raise AttnflowError(f"no trained pool '{config['pool']}' (have {', '.join(TRAINED_POOLS)})")


def head_path(directory: str | Path, label: str, pool: str) -> Path:
    """Where ``probe --save-heads`` puts a model's trained head: ``DIR/<label>.<pool>.pt``, ``pool`` the row's
    name (``abmilp``, ``ep``, ``ep+cls``; label made file-safe)."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in label)
    return Path(directory) / f"{safe}.{pool}.pt"


def save_head(path: str | Path, head: nn.Module, config: dict[str, Any], *, reads: Sequence[str | Path] = ()) -> Path:
    """Write a trained head: a plain dict of its tensors (on the CPU) and its JSON-able ``config`` (what
    :func:`make_head` needs, plus the model and block it was trained on); read it with :func:`load_head`.
    ``head`` is a whole probe (:class:`LinearHead` with a pool; ``config`` then also gives ``classes``),
    stored as the pool's tensors (``state``) and the batch norm's and classifier's (``classifier``), or a
    pooling module alone. The file is committed whole (:func:`attnflow.output.atomic_output`) and is never one
    of ``reads``."""
    path = Path(path)
    json.dumps(config)  # refuse what a plain reader could not load
    saved: dict[str, Any] = {"format": HEAD_FORMAT, "config": config}
    if isinstance(head, LinearHead):
        if head.pool is None or "classes" not in config:
            raise ValueError("a whole probe head is saved with its pool and its config's 'classes'")
        saved["classifier"] = {k: v.detach().cpu().clone() for k, v in head.state_dict().items() if not k.startswith("pool.")}
        head = head.pool
    saved["state"] = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
    # through a Python file: a failed write is then an OSError with its errno, not torch's bare "iostream error"
    with atomic_output(path, reads=reads, flag="--save-heads") as tmp, open(tmp, "wb") as handle:
        torch.save(saved, handle)
    return path


def load_head(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A head saved by :func:`save_head` (``probe --save-heads``), in eval mode, float32 on the CPU, and its
    config (``pool``, ``dim``, ``relu``/``queries``, ``with_cls``, ``classes``, ``block``, ``model``, ``label``,
    ...). A whole probe (what ``--save-heads`` writes) loads as a :class:`LinearHead`: ``head(tokens)`` gives
    (B, classes) logits whose argmax are the probe's predictions, ``head.attention(tokens)`` the pool's
    weights; a pooling module saved alone loads as that module."""
    path = Path(path)
    if not path.is_file():
        raise AttnflowError(f"cannot read probe head {path}: no such file")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or not a torch file; torch's own message runs to many lines
        raise AttnflowError(f"cannot read probe head {path}: not a file torch.save wrote ({type(e).__name__})") from None
    if not isinstance(saved, dict) or saved.get("format") != HEAD_FORMAT:
        raise AttnflowError(f"{path} is not a probe head saved by attnflow probe --save-heads")
    try:
        config = saved["config"]
        head = make_head(config)
        head.load_state_dict(saved["state"])
        if "classifier" in saved:
            head = LinearHead(int(config["dim"]), int(config["classes"]), head)
            head.load_state_dict({**saved["classifier"], **{f"pool.{k}": v for k, v in saved["state"].items()}})
            for key in HEAD_CONFIG_KEYS:
                config[key]
    except KeyError as e:
        raise AttnflowError(f"probe head {path} lacks '{e.args[0]}'; save it again with probe --save-heads") from None
    except (TypeError, ValueError, RuntimeError) as e:  # torch lists every mismatched tensor over many lines
        raise AttnflowError(f"probe head {path} does not fit its own config: {first_line(e)}") from None
    return head.eval(), config


class LinearHead(nn.Module):
    """The probe: an optional pool of (B, N, D) tokens to (B, D), batch norm without affine parameters, and a
    linear classifier to (B, classes) logits."""

    def __init__(self, dim: int, classes: int, pool: nn.Module | None = None):
        super().__init__()
        self.pool = pool
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.linear = nn.Linear(dim, classes)

    def attention(self, tokens: torch.Tensor) -> torch.Tensor:
        """The pool's weights over the tokens: (B, N) for abmilp, (B, M, N) for ep."""
        return self.pool.attention(tokens)

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


def _epoch_batches(x: Tokens, members: torch.Tensor, batch_size: int, generator: torch.Generator,
                   buffer: int = STREAM_BUFFER):
    """One epoch's ``(images, tokens)`` batches of ``members`` (positions into ``x``): one seeded permutation of
    all of them, cut into batches of ``batch_size`` (the last may be short), whether ``x`` is held or streamed.
    Streamed tokens are read (:meth:`TokenSource.read`) ``buffer`` images of the permutation at a time, rounded
    down to whole batches: that bounds memory without changing the batches, so both paths draw the same batches
    from the same seed.
    (A shuffle within a buffer of consecutive cache rows would not do: caches of class folders store their
    images class by class, so such batches hold a few classes and the batch norm learns their statistics.)"""
    order = members[torch.randperm(len(members), generator=generator)]
    streamed = isinstance(x, TokenSource)
    span = max(1, buffer // batch_size) * batch_size if streamed else max(1, len(order))
    for start in range(0, len(order), span):
        part = order[start:start + span]
        tokens = x.read(part) if streamed else x[part.to(x.device)]
        for b in range(0, len(part), batch_size):
            yield part[b:b + batch_size], tokens[b:b + batch_size]


def predict(head: nn.Module, x: Tokens, device: str = "cpu") -> torch.Tensor:
    """(n,) predicted classes (on the CPU) of held or streamed inputs (n, ...), a chunk at a time on ``device``."""
    with torch.no_grad():
        out = torch.empty(len(x), dtype=torch.long)
        for at, chunk in token_chunks(x, KNN_BLOCK if not isinstance(x, TokenSource) else STREAM_CHUNK):
            out[at] = head(chunk.to(device)).argmax(1).cpu()
        return out


def fit_linear(
    train_x: Tokens, train_y: torch.Tensor, *, classes: int, pool: nn.Module | None = None, epochs: int = 100,
    batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0, device: str = "cpu",
    on_epoch: Callable[[int, int], None] | None = None,
) -> "LinearHead":
    """Train a (pooling +) batch-norm + linear head on frozen inputs (n, D), or tokens (n, N, D) with ``pool``;
    returns the head in eval mode on ``device``, with the weights of the epoch whose held-out 10% of the training
    images scores best (early stopping). Held and streamed inputs (:class:`TokenSource`) train alike: the same
    batches from the same seed (:func:`_epoch_batches`), ``ceil(0.9 n / batch_size)`` steps an epoch (a final
    batch of one image is skipped: batch norm needs two), one cosine schedule over all epochs."""
    torch.manual_seed(seed)
    fit, held = stratified_split(train_y, 0.9, seed)
    if len(held) == 0:
        fit, held = torch.arange(len(train_y)), torch.arange(len(train_y))
    head = LinearHead(train_x.shape[-1], classes, pool).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(fit) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    streamed = isinstance(train_x, TokenSource)
    x, y = (train_x if streamed else train_x.to(device)), train_y.to(device)
    held_x = x[held] if streamed else x[held.to(device)]
    best, best_state = -1.0, None
    for epoch in range(epochs):
        head.train()
        for batch, inputs in _epoch_batches(x, fit, batch_size, generator):
            if len(batch) < 2:
                continue  # batch norm needs two samples
            loss = F.cross_entropy(head(inputs.to(device)), y[batch.to(device)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        head.eval()
        score = (predict(head, held_x, device) == train_y[held]).float().mean().item()
        if score > best:
            best, best_state = score, {k: v.detach().clone() for k, v in head.state_dict().items()}
        if on_epoch is not None:
            on_epoch(epoch + 1, epochs)
    head.load_state_dict(best_state)
    return head.eval()


def train_linear(train_x: Tokens, train_y: torch.Tensor, test_x: Tokens, *, classes: int, device: str = "cpu",
                 **options: Any) -> torch.Tensor:
    """:func:`fit_linear` on the training inputs, then the (n_test,) predicted classes of ``test_x``."""
    return predict(fit_linear(train_x, train_y, classes=classes, device=device, **options), test_x, device)


def bootstrap_accuracy(right: torch.Tensor, n_bootstrap: int, seed: int) -> tuple[float, float, float]:
    """Accuracy and its 95% percentile bootstrap CI over test images."""
    r = right.numpy().astype(np.float64)
    rng = np.random.default_rng(seed)
    means = np.array([r[rng.integers(0, len(r), len(r))].mean() for _ in range(n_bootstrap)])
    low, high = np.percentile(means, [2.5, 97.5])
    return float(r.mean()), float(low), float(high)


def pool_tokens(data: ProbeSet, with_cls: bool = False, memory_budget: int = IN_MEMORY_BYTES) -> torch.Tensor | TokenSource:
    """(n, P, D) patch tokens a trained pool reads, registers left out; with ``with_cls`` and a cls token,
    (n, 1 + P, D) with cls first. Tokens still in their cache are read whole when they fit in
    ``memory_budget`` bytes (float32), and streamed chunk by chunk at every epoch otherwise."""
    p = data.layout.num_prefix_tokens
    if isinstance(data.tokens, TokenSource):  # still unread: the columns are picked as each chunk is read
        keep = ([0] if with_cls and data.layout.has_cls else []) + list(range(p, data.tokens.token_shape[0]))
        source = replace(data.tokens, columns=tuple(keep))
        n, t, d = source.shape
        if n * t * d * 4 > memory_budget:
            return source
        return torch.cat([tokens for _, tokens in source.chunks()]) if n else torch.empty(0, t, d)
    if with_cls and data.layout.has_cls:
        return torch.cat([data.tokens[:, :1], data.tokens[:, p:]], 1)
    return data.tokens[:, p:]


def probe(
    train: ProbeSet, test: ProbeSet, *, pools: Sequence[str] = POOLS, evaluators: Sequence[str] = EVALUATORS,
    classes: int, epochs: int = 100, relu: bool = False, ep_queries: int = EP_QUERIES, ep_with_cls: bool = False,
    seed: int = 0, n_bootstrap: int = 1000, device: str = "cpu",
    trained: dict[str, tuple[nn.Module, dict[str, Any]]] | None = None, memory_budget: int = IN_MEMORY_BYTES,
    correct: dict[tuple[str, str], np.ndarray] | None = None, on_progress: OnProgress | None = None, model: str = "",
) -> list[dict[str, Any]]:
    """Accuracy of every available pool x evaluator (the trained pools, ``abmilp`` and ``ep``, only with the
    linear evaluator; ``ep`` only where the token width is a multiple of ``ep_queries``; with ``ep_with_cls``
    and a cls token its rows are named ``ep+cls``), every evaluator on ``device``. With ``trained``, each
    trained pool's whole head (:class:`LinearHead`: pool, batch norm and classifier, its best epoch's weights)
    and config are put there by row name; with ``correct``, each row's (n_test,) booleans, whether it got
    each test image right, by ``(pool, evaluator)``. ``on_progress`` hears of every pool x evaluator as a step
    named after ``model``, the pool and the evaluator: a linear probe epoch by epoch, a k-NN once done."""
    results = []
    dim = train.tokens.shape[-1]
    for pool in pools:
        if pool in ATTENTION_POOLS and (pool not in train.weights or pool not in test.weights):
            continue
        if pool == Pool.cls and not train.layout.has_cls:
            continue
        if pool == Pool.ep and not ep_fits(dim, ep_queries):
            continue
        with_cls = pool == Pool.ep and ep_with_cls and train.layout.has_cls
        name = EP_WITH_CLS if with_cls else pool
        for evaluator in evaluators:
            if pool in TRAINED_POOLS and evaluator != Evaluator.linear:
                continue
            step = f"{model + ': ' if model else ''}{name} {evaluator}"
            on_epoch = (lambda done, total, step=step: on_progress(step, done, total)) if on_progress else None
            if on_progress:
                on_progress(step, 0, epochs if evaluator == Evaluator.linear else 1)
            if pool in TRAINED_POOLS:
                config = {"pool": name, "dim": dim, "relu": relu, "queries": ep_queries, "with_cls": with_cls, "classes": classes}
                torch.manual_seed(_pool_seed(seed))  # the pool's first weights from the seed, not from what ran before
                head = fit_linear(pool_tokens(train, with_cls, memory_budget), train.labels, classes=classes,
                                  pool=make_head(config), epochs=epochs, seed=seed, device=device, on_epoch=on_epoch)
                predictions = predict(head, pool_tokens(test, with_cls, memory_budget), device)
                if trained is not None:
                    trained[name] = (head, {**config, "block": train.block})
                right = predictions == test.labels
            elif evaluator == Evaluator.knn:
                right = knn_accuracy(pooled(train, pool, device=device), train.labels, pooled(test, pool, device=device),
                                     test.labels, device=device)
                if on_progress:
                    on_progress(step, 1, 1)
            else:
                predictions = train_linear(pooled(train, pool, device=device), train.labels, pooled(test, pool, device=device),
                                           classes=classes, epochs=epochs, seed=seed, device=device, on_epoch=on_epoch)
                right = predictions == test.labels
            accuracy, low, high = bootstrap_accuracy(right, n_bootstrap, seed)
            results.append({"pool": name, "evaluator": evaluator, "accuracy": accuracy, "ci_low": low, "ci_high": high,
                            "n_train": len(train), "n_test": len(test)})
            if correct is not None:
                correct[(name, evaluator)] = right.numpy().astype(bool)
    return results


def _pool_seed(seed: int) -> int:
    """The seed of a trained pool's initial weights: derived from ``seed`` as a stream of its own, since the
    classifier is seeded with ``seed`` itself and one stream would give both the same first numbers."""
    return int(np.random.SeedSequence(seed, spawn_key=(1,)).generate_state(1, np.uint64)[0])


class ProbeResult(NamedTuple):
    """What :func:`probe_caches` returns: a record per model, pool and evaluator, and the notes of the run
    (a tuple, so ``records, notes = probe_caches(...)`` reads it too)."""

    records: list[dict[str, Any]]
    notes: list[str]


def probe_caches(
    pairs: Sequence[tuple[Path, Path | None]], *, split: float | None = None, pools: Sequence[str] = POOLS,
    evaluators: Sequence[str] = EVALUATORS, epochs: int = 100, relu: bool = False, ep_queries: int = EP_QUERIES,
    ep_with_cls: bool = False, seed: int = 0, n_bootstrap: int = 1000, device: str = "cpu", layer: int | None = None,
    save_heads: Path | None = None, memory_budget: int = IN_MEMORY_BYTES, allow_overlap: bool = False,
    on_progress: OnProgress | None = None,
) -> ProbeResult:
    """Probe every model: ``(train cache, test cache)`` pairs, or ``(cache, None)`` split by ``split``.

    Returns long-format records (``PROBE_COLUMNS`` plus ``gain_over_cls`` and the probed block's
    ``cls_entropy_norm``; with ``layer``, also ``layer``: the 0-based block probed, see :func:`load_probe_set`)
    and notes. With ``save_heads``, every trained pool's whole head (pool, batch norm, classifier) goes to
    :func:`head_path` there (the folder is created if missing), under its row's name (``abmilp``, ``ep`` or ``ep+cls``; see :func:`load_head`).
    Every evaluator runs on ``device`` (auto, cpu, cuda, cuda:N); one this machine lacks is an AttnflowError.
    A test cache that holds training images (:func:`shared_images`) is refused; with ``allow_overlap`` it is
    probed and every record says how many (``n_overlap``)."""
    if save_heads is not None:  # made before hours of training, so that a path that cannot be one fails first
        save_heads = Path(save_heads)
        if save_heads.exists() and not save_heads.is_dir():
            raise AttnflowError(f"--save-heads {save_heads} is a file; give a folder")
        try:
            save_heads.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise AttnflowError(f"--save-heads {save_heads}: cannot create the folder ({e.strerror or e})") from None
    device = str(resolve_device(device))  # a CUDA device this machine lacks: one line, before any reading
    with collect() as notes:
        records: list[dict[str, Any]] = []
        labels_seen: dict[str, int] = {}
        for pool in TRAINED_POOLS:
            if pool in pools and "linear" not in evaluators:
                note(f"{pool} pooling is trained with the linear probe; without --evaluator linear it is skipped")
        for train_path, test_path in pairs:
            train, attrs, names = load_probe_set(train_path, pools, layer=layer, on_progress=on_progress)
            if "cls" in pools and not train.layout.has_cls:
                note(f"{attrs.get('label', train_path)} has no cls token: cls pooling skipped (gain_over_cls is NaN)")
            if "ep" in pools and ep_with_cls and not train.layout.has_cls:
                note(f"{attrs.get('label', train_path)} has no cls token: --ep-with-cls ignored, ep pools the patch tokens")
            if "ep" in pools and not ep_fits(train.tokens.shape[-1], ep_queries):
                note(f"{attrs.get('label', train_path)}: ep pooling splits the token width {train.tokens.shape[-1]} into "
                     f"--ep-queries {ep_queries} groups, which does not divide it; skipped")
            if test_path is None:
                if split is None:
                    raise AttnflowError("give --split to divide one cache into training and test images")
                _need_two_classes(train.labels, names, f"{train_path} has one")
                first, rest = stratified_split(train.labels, split, seed)
                train, test = train.subset(first), train.subset(rest)
            else:
                test, test_attrs, test_names = load_probe_set(test_path, pools, layer=layer, on_progress=on_progress)
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
                    note(f"{train_path} and {test_path} come from different models")
                shared = shared_images(train_path, test_path)
                if shared and not allow_overlap:
                    raise AttnflowError(
                        f"{test_path} holds {len(shared)} of the training images of {train_path} (e.g. {shared[0]}): the "
                        "accuracy would not measure unseen images; pass --allow-overlap to probe anyway and report it")
                if shared:
                    note(f"{test_path} holds {len(shared)} of the {len(train)} training images of {train_path}")
            if len(train) < 2 or len(test) < 1:
                raise AttnflowError(f"{train_path}: too few images to probe ({len(train)} for training, {len(test)} for testing)")
            _need_two_classes(train.labels, names, f"the training images of {train_path} hold one"
                              + (f" after --split {split}" if test_path is None else ""))
            _note_untested_classes(attrs.get("label", str(train_path)), train.labels, test.labels, names,
                                   "too few images to divide" if test_path is None else "none in the test cache")
            trained: dict[str, tuple[nn.Module, dict[str, Any]]] = {}
            correct: dict[tuple[str, str], np.ndarray] = {}
            rows = probe(train, test, pools=pools, evaluators=evaluators, classes=max(len(names), int(train.labels.max()) + 1),
                         epochs=epochs, relu=relu, ep_queries=ep_queries, ep_with_cls=ep_with_cls, seed=seed,
                         n_bootstrap=n_bootstrap, device=device, trained=trained, memory_budget=memory_budget,
                         correct=correct, on_progress=on_progress, model=str(attrs.get("label", train_path)))
            base = {(r["evaluator"]): r["accuracy"] for r in rows if r["pool"] == Pool.cls}
            label = attrs.get("label", str(train_path))
            labels_seen[label] = labels_seen.get(label, 0) + 1
            if labels_seen[label] > 1:  # as compare does: rows of two models must not share a name
                note(f"two models are labelled '{label}'; {train_path} is shown as '{label}#{labels_seen[label]}'")
                label = f"{label}#{labels_seen[label]}"
            for pool, (head, config) in trained.items() if save_heads is not None else ():
                save_head(head_path(save_heads, label, pool), head, reads=[p for pair in pairs for p in pair if p is not None], config={
                    **config, "label": label, "model": str(attrs.get("model")), "checkpoint_sha256": str(attrs.get("checkpoint_sha256")),
                    "num_prefix_tokens": train.layout.num_prefix_tokens, "has_cls": train.layout.has_cls,
                    "grid_size": [int(g) for g in train.layout.grid_size], "trained_on": str(train_path)})
            for r in rows:
                gain = dict.fromkeys(GAIN_COLUMNS, math.nan)
                if r["evaluator"] in base and r["pool"] != Pool.cls:
                    rng = np.random.default_rng([seed, 2000 + len(records)])
                    gain.update(zip(GAIN_COLUMNS[:4], paired_accuracy_difference(
                        correct[(r["pool"], r["evaluator"])], correct[(Pool.cls, r["evaluator"])], n_bootstrap, rng)))
                elif r["evaluator"] in base:
                    gain["gain_over_cls"] = 0.0
                records.append({
                    "model": label, "family": attrs.get("family", "unknown"), **r, **gain,
                    "cls_entropy_norm": train.cls_entropy_norm,
                    **({"layer": train.block} if layer is not None else {}),
                    **({"n_overlap": len(shared) if test_path is not None else 0} if allow_overlap else {}),
                })
    for record, p in zip(records, adjust([r["gain_p"] for r in records], Correction.holm)):
        record["gain_p_holm"] = float(p)
    return ProbeResult(records, notes)


def shared_images(train_path: str | Path, test_path: str | Path) -> list[str]:
    """The test cache's images that are training images too: the same file read twice, an image id that names
    the same file (relative ids resolved against the folder each extraction ran in), or an image of the same
    content (where both caches hold their images' digests)."""
    with open_cache(train_path) as train, open_cache(test_path) as test:
        if os.path.samefile(train.path, test.path):
            return list(test.image_ids)
        seen = {_image_file(i, train.attrs) for i in train.image_ids}
        digests = set(train.image_digests or ())
        test_digests = test.image_digests or [None] * len(test)
        return [i for i, digest in zip(test.image_ids, test_digests) if _image_file(i, test.attrs) in seen or digest in digests]


def _image_file(image_id: str, attrs: dict[str, Any]) -> str:
    return os.path.normpath(os.path.join(str(attrs.get("working_dir", "")), image_id))


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
                           why: str) -> None:
    """Classes with too few images for a stratified split land on one side only: say which and what it means."""
    train_set, test_set = set(train_labels.tolist()), set(test_labels.tolist())
    only_test = sorted(test_set - train_set)
    only_train = sorted(train_set - test_set)
    if only_test:
        note(f"{model}: {_classes(len(only_test))} test images but no training images "
             f"({_class_list([_class_name(c, names) for c in only_test])}): their test images can only count as errors")
    if only_train:
        note(f"{model}: {_classes(len(only_train))} no test images "
             f"({_class_list([_class_name(c, names) for c in only_train])}): {why}, not tested")
