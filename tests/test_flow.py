"""Exact attention flow: hand-computed cuts, networkx's max-flow as the reference on random maps of every token
layout, and ``attnflow metrics --flow`` end to end (flow/map, the flow metrics, the typed reader, the errors)."""
from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest
import torch
from PIL import Image

from attnflow.store.read import open_metrics
from attnflow.flow import FLOW_SCALE, attention_flow, max_flow_to_patches
from attnflow.layout import TokenLayout
from attnflow.metrics import REGISTRY

# float32-free tolerance of the integer capacities: a value is off by at most (edges of a cut) / (2 * 2**30)
ROUNDING = 1e-5

LAYOUTS = {
    "cls": TokenLayout(has_cls=True, num_prefix_tokens=1, grid_size=(2, 3), patch_size=(8, 8)),
    "registers": TokenLayout(has_cls=True, num_prefix_tokens=3, grid_size=(2, 2), patch_size=(8, 8)),
    "no_cls": TokenLayout(has_cls=False, num_prefix_tokens=0, grid_size=(2, 3), patch_size=(8, 8)),
    "registers_no_cls": TokenLayout(has_cls=False, num_prefix_tokens=2, grid_size=(2, 2), patch_size=(8, 8)),
}


# ---------------------------------------------------------------- independent references


def reference_mixing(attn: np.ndarray) -> np.ndarray:
    """(L, H, T, T) -> (L, T, T): the README's M_l = rows of 0.5 mean_h A + 0.5 I renormalised, in float64 loops."""
    L, H, T, _ = attn.shape
    out = np.zeros((L, T, T))
    for layer in range(L):
        for i in range(T):
            row = [0.5 * sum(float(attn[layer, h, i, j]) for h in range(H)) / H + (0.5 if i == j else 0.0) for j in range(T)]
            out[layer, i] = np.array(row) / sum(row)
    return out


def reference_flows(mixing: np.ndarray, layout: TokenLayout) -> np.ndarray:
    """networkx's max-flow (the reference implementation's library) from the readout to every input patch.

    mixing: (K, T, T), block 0 first. The readout is a source node feeding cls with capacity 1, or every patch
    with 1 / P for models without cls."""
    K, T, _ = mixing.shape
    graph = nx.DiGraph()
    for i in range(T):
        if layout.has_cls and i == 0:
            graph.add_edge("source", (K, i), capacity=1.0)
        elif not layout.has_cls and i >= layout.num_prefix_tokens:
            graph.add_edge("source", (K, i), capacity=1.0 / layout.num_patches)
    for level in range(K, 0, -1):
        for i in range(T):
            for j in range(T):
                graph.add_edge((level, i), (level - 1, j), capacity=float(mixing[level - 1, i, j]))
    return np.array([nx.maximum_flow_value(graph, "source", (0, j)) for j in range(layout.num_prefix_tokens, T)])


def random_attention(B: int, L: int, H: int, T: int, seed: int, sharpness: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(sharpness * torch.randn(B, L, H, T, T, generator=gen, dtype=torch.float64), -1)


# ---------------------------------------------------------------- hand cases


def test_one_layer_flow_is_the_min_cut_by_hand():
    # one block: every path readout -> token i (level 1) -> patch j (level 0) is its own, so the min cut takes
    # the smaller of the two edges of each path
    m = np.array([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5]]])
    cls = np.array([1.0, 0.0, 0.0])
    np.testing.assert_allclose(max_flow_to_patches(m, cls, 1), [0.3, 0.2], atol=1e-9)  # min(1, M[0, j])
    # no cls (2 patches, p = 1 register): 1/2 into each patch at level 1
    mean = np.array([0.0, 0.5, 0.5])
    expected = [min(0.5, 0.6) + min(0.5, 0.25), min(0.5, 0.3) + min(0.5, 0.5)]  # 0.75, 0.8
    np.testing.assert_allclose(max_flow_to_patches(m, mean, 1), expected, atol=1e-9)


def test_two_and_three_layer_flows_by_hand():
    # two blocks, cls readout: paths cls(2) -> i(1) -> j(0) share no edge, so flow_j = sum_i min(M2[0, i], M1[i, j])
    m1 = np.array([[0.6, 0.3, 0.1], [0.1, 0.5, 0.4], [0.3, 0.3, 0.4]])
    m2 = np.array([[0.5, 0.3, 0.2], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]])
    flows = max_flow_to_patches(np.stack([m1, m2]), np.array([1.0, 0, 0]), 1)
    np.testing.assert_allclose(flows, [0.3 + 0.3 + 0.2, 0.1 + 0.3 + 0.2], atol=1e-9)
    np.testing.assert_allclose(flows, reference_flows(np.stack([m1, m2]), TokenLayout(has_cls=True, num_prefix_tokens=1, grid_size=(1, 2), patch_size=(8, 8))), atol=1e-9)
    # three blocks, two tokens (cls, one patch): the paths share edges. Sending 0.4 via a1 -> b1 and 0.3 via
    # a0 -> b1 fills b1 (0.7 of its 0.9); a0's other 0.3 reaches b0, whose edge to the patch carries 0.1: 0.8.
    # The cut {source, a0, b0} | {a1, b1, patch} has capacity 0.4 (s -> a1) + 0.3 (a0 -> b1) + 0.1 (b0 -> t) = 0.8.
    m3 = np.array([[0.6, 0.4], [0.5, 0.5]])
    m2 = np.array([[0.7, 0.3], [0.2, 0.8]])
    m1 = np.array([[0.9, 0.1], [0.1, 0.9]])
    mixing = np.stack([m1, m2, m3])
    layout = TokenLayout(has_cls=True, num_prefix_tokens=1, grid_size=(1, 1), patch_size=(8, 8))
    np.testing.assert_allclose(max_flow_to_patches(mixing, np.array([1.0, 0.0]), 1), [0.8], atol=1e-9)
    np.testing.assert_allclose(reference_flows(mixing, layout), [0.8], atol=1e-12)


# ---------------------------------------------------------------- networkx on random maps


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_flow_equals_networkx_on_random_maps(kind):
    layout = LAYOUTS[kind]
    B, L, H, T = 2, 3, 2, layout.num_tokens
    attn = random_attention(B, L, H, T, seed=len(kind))
    layers = (0, -1)
    raw = attention_flow(attn.float(), layout, layers, normalise=False)  # float32 input, as read from a cache
    maps = attention_flow(attn.float(), layout, layers)
    assert raw.shape == maps.shape == (B, 2, layout.num_patches) and raw.dtype == torch.float64
    for b in range(B):
        mixing = reference_mixing(attn[b].float().double().numpy())
        for f, layer in enumerate((0, L - 1)):
            expected = reference_flows(mixing[: layer + 1], layout)
            np.testing.assert_allclose(raw[b, f].numpy(), expected, rtol=ROUNDING, atol=1e-8)
            np.testing.assert_allclose(maps[b, f].numpy(), expected / expected.sum(), rtol=ROUNDING)
            assert maps[b, f].sum().item() == pytest.approx(1.0, abs=1e-12)


def test_rounding_error_stays_within_its_bound():
    # capacities off the integer grid: the error of every value within E / (2 S), E the network's edges
    layout = LAYOUTS["cls"]
    T, K = layout.num_tokens, 4
    attn = random_attention(1, K, 3, T, seed=7, sharpness=6.0)
    mixing = reference_mixing(attn[0].numpy())
    got = max_flow_to_patches(mixing, np.eye(T)[0], 1)
    edges = 1 + (K - 1) * T * T + T
    np.testing.assert_allclose(got, reference_flows(mixing, layout), rtol=0, atol=edges / (2 * FLOW_SCALE))


# ---------------------------------------------------------------- the CLI


@pytest.fixture
def flow_cache(tmp_path, image_dir, run_cli):
    masks = tmp_path / "masks"
    masks.mkdir()
    rng = np.random.default_rng(0)
    for path in sorted(image_dir.rglob("*.png"))[:6]:
        Image.fromarray((rng.random((40, 52)) > 0.5).astype(np.uint8) * 255).save(masks / path.name)
    cache = tmp_path / "c.h5"
    result = run_cli("extract", "vit_tiny_patch16_224", image_dir, "-o", cache, "--random-init", "--img-size", 32,
                     "--dtype", "float32", "--masks", masks, "--workers", 0, "-q")
    assert result.exit_code == 0, result.stderr
    return cache


def test_cli_metrics_flow_writes_maps_and_metrics(tmp_path, flow_cache, run_cli):
    from attnflow.store.read import open_cache

    out = tmp_path / "m.h5"
    result = run_cli("metrics", flow_cache, "-o", out, "--flow", "--flow-layers", "2,-1", "-q")
    assert result.exit_code == 0, result.stderr
    with open_cache(flow_cache) as cache:
        attn = cache.attention(0, 3)  # (3, L, H, T, T) float32
        fg = cache.fg()
        layout, L = cache.layout, int(cache.attrs["num_layers"])
    with open_metrics(out) as metrics:
        maps, layers = metrics.flow_maps()
        assert layers == (2, L - 1) and maps.shape == (len(metrics), 2, layout.num_patches) and maps.dtype == np.float32
        values = {name: metrics.values(name) for name in ("flow_entropy_norm", "flow_top10_mass", "flow_fg_mass")}
    for b in range(3):
        mixing = reference_mixing(attn[b].astype(np.float64))
        for f, layer in enumerate(layers):
            flows = reference_flows(mixing[: layer + 1], layout)
            np.testing.assert_allclose(maps[b, f], flows / flows.sum(), rtol=1e-5)
    P = layout.num_patches
    for b in range(len(maps)):
        for layer in range(L):
            if layer not in layers:
                assert all(math.isnan(values[name][b, layer]) for name in values)
                continue
            q = maps[b, layers.index(layer)].astype(np.float64)
            entropy = -sum(x * math.log(x) for x in q if x > 0) / math.log(P)
            top = sum(sorted(q)[-math.ceil(0.1 * P):])
            on_object = sum(x * y for x, y in zip(q, fg[b]))
            np.testing.assert_allclose([values["flow_entropy_norm"][b, layer], values["flow_top10_mass"][b, layer],
                                        values["flow_fg_mass"][b, layer]], [entropy, top, on_object], rtol=1e-5)
    # without --flow nothing of it is written
    plain = tmp_path / "plain.h5"
    assert run_cli("metrics", flow_cache, "-o", plain, "-q").exit_code == 0
    with open_metrics(plain) as metrics:
        assert not {"flow_entropy_norm", "flow_top10_mass", "flow_fg_mass"} & set(metrics.metric_names)
        with pytest.raises(Exception, match="no attention flow maps"):
            metrics.flow_maps()


def test_cli_flow_errors(tmp_path, image_dir, flow_cache, run_cli):
    rows = tmp_path / "rows.h5"
    assert run_cli("extract", "vit_tiny_patch16_224", image_dir, "-o", rows, "--random-init", "--img-size", 32,
                   "--store", "rows", "--workers", 0, "-q").exit_code == 0
    result = run_cli("metrics", rows, "-o", tmp_path / "m.h5", "--flow")
    assert result.exit_code == 1 and "--flow needs every query's attention" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    for args, needle in ((("--flow-layers", "1"), "add --flow"), (("--flow", "--flow-layers", "12"), "out of range"),
                         (("--flow", "--flow-layers", "a,b"), "takes last or comma-separated")):
        result = run_cli("metrics", flow_cache, "-o", tmp_path / "x.h5", *args)
        assert result.exit_code == 2 and needle in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_flow_metrics_are_declared_opt_in():
    names = {"flow_entropy_norm", "flow_top10_mass", "flow_fg_mass"}
    assert names <= set(REGISTRY.names("layer"))
    assert all(not REGISTRY[name].default for name in names)  # opt-in: never in compare's defaults
    layout = LAYOUTS["cls"]
    assert not names & set(REGISTRY.available(layout, full_maps=True, has_fg=True))
    assert names <= set(REGISTRY.available(layout, full_maps=True, has_fg=True, has_flow=True))


def test_resume_with_other_flow_layers_is_refused(tmp_path, flow_cache):
    from attnflow.errors import AttnflowError
    from attnflow.measure import compute_metrics

    class Interrupt(Exception):
        pass

    def stop(done, total):
        raise Interrupt

    out = tmp_path / "m.h5"
    with pytest.raises(Interrupt):
        compute_metrics(flow_cache, out, batch_size=2, device="cpu", flow=True, flow_layers=(-1,), on_progress=stop)
    with pytest.raises(AttnflowError, match=r"started with flow_layers=\[11\], this run has \[0\]"):
        compute_metrics(flow_cache, out, batch_size=2, device="cpu", flow=True, flow_layers=(0,), resume=True)
    compute_metrics(flow_cache, out, batch_size=2, device="cpu", flow=True, flow_layers=(-1,), resume=True)
    with open_metrics(out) as metrics:
        assert list(metrics.flow_maps()[1]) == [11]
