"""Per-image cost of exact attention flow (attnflow.flow) against the networkx reference.

    python benchmarks/flow_cost.py [--nx-sinks 2] [--images 2]

Two cases, read out after the last block: the demo model (``demo:mae``: 64 patches + cls, 6 blocks) on its own
attention of demo images, and ViT-S/16 at 224 (197 tokens, 12 blocks) on random maps (softmax of Gaussian logits,
scale 3: the cost of the max-flow does not depend on where the attention comes from, only on the graph's size).
The networkx reference is the one of Abnar & Zuidema's code: a DiGraph of every level's tokens and
``nx.maximum_flow_value`` per input patch (default flow function, preflow-push). Building the graph is timed once
per image; ``--nx-sinks`` of the P max-flows are timed and the rest extrapolated (a full ViT-S/16 reference
takes hours). Prints one JSON line per case.
"""
from __future__ import annotations

import argparse
import json
import time

import networkx as nx
import numpy as np
import torch

import attnflow
from attnflow.flow import max_flow_to_patches
from attnflow.layout import TokenLayout
from attnflow.metrics import mixing_matrix, readout_vector


def reference_graph(mixing: np.ndarray, start: np.ndarray) -> nx.DiGraph:
    K, T, _ = mixing.shape
    graph = nx.DiGraph()
    for i in np.flatnonzero(start):
        graph.add_edge("readout", (K, int(i)), capacity=float(start[i]))
    for level in range(K, 0, -1):
        m = mixing[level - 1]
        graph.add_edges_from(((level, i), (level - 1, j), {"capacity": float(m[i, j])}) for i in range(T) for j in range(T))
    return graph


def case(name: str, attn: torch.Tensor, layout: TokenLayout, nx_sinks: int) -> dict:
    """attn: (B, L, H, T, T); flow read out after the last block of each image."""
    B, L = attn.shape[:2]
    start = readout_vector(layout).numpy()
    p = layout.num_prefix_tokens
    ours, built, per_sink, errors = [], [], [], []
    for i in range(B):
        mixing = mixing_matrix(attn[i].double()).numpy()  # (L, T, T)
        t0 = time.perf_counter()
        flows = max_flow_to_patches(mixing, start, p)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        graph = reference_graph(mixing, start)
        built.append(time.perf_counter() - t0)
        for j in np.linspace(p, layout.num_tokens - 1, nx_sinks).round().astype(int):
            t0 = time.perf_counter()
            value = nx.maximum_flow_value(graph, "readout", (0, int(j)))
            per_sink.append(time.perf_counter() - t0)
            errors.append(abs(value - flows[j - p]) / value)
    ours_s = float(np.mean(ours))
    reference_s = float(np.mean(built) + np.mean(per_sink) * layout.num_patches)
    return {
        "case": name, "tokens": layout.num_tokens, "blocks": L, "patches": layout.num_patches, "images": B,
        "attnflow_s_per_image": round(ours_s, 4), "attnflow_ms_per_patch": round(1e3 * ours_s / layout.num_patches, 3),
        "networkx_s_per_image": round(reference_s, 2), "networkx_build_s": round(float(np.mean(built)), 2),
        "networkx_s_per_patch": round(float(np.mean(per_sink)), 3), "networkx_patches_timed": len(per_sink),
        "speedup": round(reference_s / ours_s, 1), "max_rel_error_vs_networkx": float(max(errors)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--nx-sinks", type=int, default=2, help="networkx max-flows timed per image")
    args = parser.parse_args()
    torch.manual_seed(0)

    model = attnflow.build_model("demo:mae").model.eval()
    layout = TokenLayout.from_model(model)
    images = torch.randn(args.images, model.patch_embed.proj.in_channels, *layout.img_size)
    with attnflow.AttentionCapture(model) as capture, torch.no_grad():
        model.forward_features(images)
        attn = capture.pop().attn
    print(json.dumps(case("demo:mae (captured, random inputs)", attn, layout, args.nx_sinks)), flush=True)

    vit_s = TokenLayout(has_cls=True, num_prefix_tokens=1, grid_size=(14, 14), patch_size=(16, 16))
    T = vit_s.num_tokens
    attn = torch.softmax(3 * torch.randn(args.images, 12, 6, T, T), -1)
    print(json.dumps(case("ViT-S/16 at 224 (random maps)", attn, vit_s, args.nx_sinks)), flush=True)


if __name__ == "__main__":
    main()
