"""Exact attention flow (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020).

The attention of an image is a layered graph: a node per token per level, level 0 the tokens entering block 0
and level l those leaving block l - 1, and an edge from token i at level l to token j at level l - 1 with
capacity ``M_{l-1}[i, j]``, where ``M`` is rollout's per-layer matrix (head-fused attention plus the identity,
halved, rows renormalised: :func:`attnflow.metrics.mixing_matrix`). The flow map read out after block k is,
for every input patch j, the maximum flow from the readout to patch j's node at level 0 (a separate
single-source single-sink problem per patch), renormalised over patches to sum 1.

The readout is the one rollout uses (:func:`attnflow.metrics.readout_vector`): a super-source with an edge
of capacity ``r_i`` into token i at level k + 1, r the cls token's one-hot vector, or for models without
cls ``1 / P`` into every patch (the flow analogue of rollout's mean of the patch rows: the patches' readouts
share one source, so the value is the flow the mean readout can push, not the mean of P separate flows,
which would cost P times as much). With cls the super-source adds nothing: the cls node's own
out-capacity is 1.

The maximum flows are computed with scipy's Dinic (``scipy.sparse.csgraph.maximum_flow``) on integer
capacities ``round(c * 2**30)``; see :func:`max_flow_to_patches` for the rounding bound.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import maximum_flow

from .layout import TokenLayout
from .metrics import Fusion, mixing_matrix, readout_vector

__all__ = ["FLOW_SCALE", "max_flow_to_patches", "attention_flow"]

# Capacities in [0, 1] become integers up to 2**30: a flow never exceeds the source's capacity (at most 1,
# so at most 2**30 + T / 2 after rounding), well inside scipy's int32 (which silently wraps wider types).
FLOW_SCALE = 2 ** 30


def _layered_graph(mixing: np.ndarray, start: np.ndarray) -> sp.csr_matrix:
    """The flow network of readout level K = len(mixing), with the sink's edges still at capacity 0.

    Args:
        mixing: (K, T, T) float64, ``mixing[b]`` the matrix of block b.
        start: (T,) float64 readout capacities, summing to at most 1.
    Returns:
        (N, N) int32 CSR, N = 2 + K T: node 0 the super-source, node ``1 + (K - l) T + i`` token i at level
        l (K >= l >= 1), node N - 1 the sink; its last T stored entries are the level-1 tokens' edges to the
        sink. Level 0 is not built: only one of its nodes (the sink's patch) is reachable in each problem.
    """
    K, T, _ = mixing.shape
    N = 2 + K * T
    sources = np.flatnonzero(start > 0)
    level = lambda l: 1 + (K - l) * T  # noqa: E731 - the first node id of level l
    # rows: super-source, then levels K..2 (T edges each, to the next level), then level 1 (one edge each)
    counts = np.concatenate([[len(sources)], np.full((K - 1) * T, T), np.ones(T, dtype=np.int64), [0]])
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    below = [level(l - 1) + np.tile(np.arange(T), T) for l in range(K, 1, -1)]
    indices = np.concatenate([level(K) + sources, *below, np.full(T, N - 1)]).astype(np.int32)
    capacities = np.concatenate([start[sources], *(mixing[l - 1].ravel() for l in range(K, 1, -1)), np.zeros(T)])
    graph = sp.csr_matrix((_scaled(capacities), indices, indptr), shape=(N, N))
    graph.has_sorted_indices = True  # built sorted: ids grow along every row
    return graph


def _scaled(capacities: np.ndarray) -> np.ndarray:
    return np.rint(capacities * FLOW_SCALE).astype(np.int32)


def max_flow_to_patches(mixing: np.ndarray, start: np.ndarray, num_prefix_tokens: int) -> np.ndarray:
    """Maximum flow from the readout above block K - 1 to every input patch, one max-flow problem per patch.

    Args:
        mixing: (K, T, T) float64 row-stochastic matrices of blocks 0..K-1 (``mixing[0]`` the first block's).
        start: (T,) float64 readout capacities into level K, summing to at most 1.
        num_prefix_tokens: p; the sinks are the P = T - p patch tokens at level 0.
    Returns:
        (P,) float64 flow values, unnormalised (each at most ``start.sum()``).

    Rounding: capacities are scaled by S = 2**30 and rounded to the nearest integer, so each changes by at most
    1 / (2 S). Every cut's capacity then changes by at most |C| / (2 S) for its |C| edges, and so does the
    minimum cut, which is the maximum flow: the error of each value is at most E / (2 S) = E * 4.7e-10, E the
    edges of the network (K = 12 blocks of T = 197 tokens: E = 427,097, at most 2.0e-4; 6 blocks of 65:
    at most 9.9e-6). That bound needs every rounding on one cut to go the same way; measured against
    networkx's float64 reference the error is below 1e-8 (tests/test_flow.py).
    """
    K, T, _ = mixing.shape
    if K < 1 or mixing.shape != (K, T, T) or start.shape != (T,):
        raise ValueError(f"mixing must be (K, T, T) with K >= 1 and start (T,), got {mixing.shape} and {start.shape}")
    if start.sum() > 1 + 1e-6 or mixing.max() > 1 + 1e-6 or min(start.min(), mixing.min()) < 0:
        raise ValueError("capacities must lie in [0, 1] and the readout's sum to at most 1")
    graph = _layered_graph(mixing, start)
    sink_edges = slice(graph.nnz - T, graph.nnz)
    sink = graph.shape[0] - 1
    flows = np.empty(T - num_prefix_tokens)
    for j in range(num_prefix_tokens, T):
        graph.data[sink_edges] = _scaled(mixing[0][:, j])  # level-1 token i -> patch j at level 0
        flows[j - num_prefix_tokens] = maximum_flow(graph, 0, sink, method="dinic").flow_value
    return flows / FLOW_SCALE


def attention_flow(
    attn: torch.Tensor,
    layout: TokenLayout,
    layers: Sequence[int],
    fusion: Fusion | str = Fusion.mean,
    discard_ratio: float = 0.0,
    *,
    normalise: bool = True,
) -> torch.Tensor:
    """Attention flow maps of a batch, read out after each of ``layers``.

    Args:
        attn: (B, L, H, T, T) attention of all layers (any float dtype; the flows run in float64).
        layers: 0-based block indices (negative from the end) after which the flow is read out.
    Returns:
        (B, F, P) float64, F = len(layers): per image and chosen layer, the maximum flow from the readout to
        each input patch, renormalised over patches to sum 1 (``normalise=False``: the raw flow values).
    """
    B, L = attn.shape[:2]
    picked = [layer % L for layer in layers]
    if any(not -L <= layer < L for layer in layers):
        raise ValueError(f"layers {list(layers)} are not all in range for {L} blocks")
    deepest = max(picked) + 1 if picked else 0
    # the mixing matrices of blocks 0..deepest-1, once per image; float64 so the capacities are the exact M
    mixing = torch.stack([mixing_matrix(attn[:, b].double(), fusion, discard_ratio) for b in range(deepest)], 1)
    mixing = mixing.cpu().numpy() if deepest else np.zeros((B, 0, layout.num_tokens, layout.num_tokens))
    start = readout_vector(layout).numpy()
    out = np.empty((B, len(picked), layout.num_patches))
    for i in range(B):
        for f, layer in enumerate(picked):
            out[i, f] = max_flow_to_patches(mixing[i, : layer + 1], start, layout.num_prefix_tokens)
    maps = torch.from_numpy(out)
    return maps / maps.sum(-1, keepdim=True) if normalise else maps
