"""Saved probe heads (probe --save-heads): they reload to the same outputs, and plot maps draws their attention
(checked against a float64 computation by hand from the cache's stored tokens and the saved weights)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from attnflow import open_cache
from attnflow.extract import extract
from attnflow.images import list_images
from attnflow.models import LoadedModel
from attnflow.probe import AbMILP, EfficientProbe, load_head, save_head
from conftest import make_tiny, write_images, tiny


def normed_tokens(cache_path, index: int) -> np.ndarray:
    """(T, D) float64 stored tokens of image ``index`` after the final LayerNorm, by hand."""
    with open_cache(cache_path) as cache:
        x = cache["tokens"][index].astype(np.float64)
        w, b = cache["final_norm_weight"][()].astype(np.float64), cache["final_norm_bias"][()].astype(np.float64)
        eps = float(cache.attrs["final_norm_eps"])
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_a_saved_head_reloads_to_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    tokens = torch.randn(3, 17, 16)
    for head in (AbMILP(16), AbMILP(16, relu=True), EfficientProbe(16, 4)):
        config = {"pool": "ep" if isinstance(head, EfficientProbe) else "abmilp", "dim": 16,
                  "relu": isinstance(head, AbMILP) and isinstance(head.score, torch.nn.Sequential), "queries": 4}
        path = save_head(tmp_path / "h.pt", head, config)
        loaded, read = load_head(path)
        assert read == config and type(loaded) is type(head)
        with torch.no_grad():
            assert torch.equal(loaded(tokens), head(tokens))
            assert torch.equal(loaded.attention(tokens), head.attention(tokens))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(Exception, match="cannot read probe head") as e:
        load_head(tmp_path / "junk.pt")
    assert "\n" not in str(e.value)


def test_maps_draw_the_saved_heads_attention_in_uniform_shares(tmp_path, run_cli):
    pytest.importorskip("matplotlib")
    write_images(tmp_path / "imgs", 12, size=(32, 32), classes=("a", "b"))
    paths = list_images([str(tmp_path / "imgs")])
    cache = tmp_path / "plain.h5"
    extract(tiny("plain"), paths, cache, save_tokens=True, labels_from_dirs=True, workers=0)
    heads = tmp_path / "heads"
    heads.mkdir()
    result = run_cli("probe", cache, "--split", "0.75", "--epochs", "2", "--bootstrap", "10", "--pool", "abmilp",
                     "--pool", "ep", "--ep-queries", "4", "--evaluator", "linear", "--save-heads", heads, "--format", "csv")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in heads.iterdir()) == ["tiny-plain.abmilp.pt", "tiny-plain.ep.pt"]

    # the saved weights, as plain tensors
    ab = torch.load(heads / "tiny-plain.abmilp.pt", weights_only=True)
    ep = torch.load(heads / "tiny-plain.ep.pt", weights_only=True)
    assert ab["config"]["block"] == 1 and ep["config"]["queries"] == 4 and ep["config"]["dim"] == 48
    x = normed_tokens(cache, 2)[1:]  # (P, D): the patches (no cls in either head: --ep-with-cls not given)
    w, b = ab["state"]["score.weight"].double().numpy(), ab["state"]["score.bias"].double().numpy()
    abmilp_share = softmax(x @ w[0] + b[0]) * len(x)
    q = ep["state"]["queries"].double().numpy()
    ep_each = softmax(q @ x.T / np.sqrt(x.shape[1])) * len(x)  # (M, P)

    from attnflow.plot import plot_maps

    out = tmp_path / "maps.png"
    _, rows, _ = plot_maps([cache], 2, out, heads_dir=heads)
    panels = {p.title.split(" ")[0]: p for p in rows[0].panels if "probe" in p.title}
    assert set(panels) == {"abmilp", "ep"} and "mean of 4 queries" in panels["ep"].title
    np.testing.assert_allclose(panels["abmilp"].share.ravel(), abmilp_share, rtol=1e-5)
    np.testing.assert_allclose(panels["ep"].share.ravel(), ep_each.mean(0), rtol=1e-5)
    assert panels["abmilp"].share.shape == rows[0].panels[0].share.shape and out.exists()
    _, rows, _ = plot_maps([cache], 2, out, heads_dir=heads, ep_queries_each=True)
    each = [p for p in rows[0].panels if p.title.startswith("ep query")]
    assert len(each) == 4
    np.testing.assert_allclose(np.stack([p.share.ravel() for p in each]), ep_each, rtol=1e-5)

    # a heads dir of another model (other token width): one line
    other = LoadedModel(model=make_tiny("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2),
                        name="tiny-plain", checkpoint="", checkpoint_sha256="", weights="random", family="unknown", label="narrow")
    extract(other, paths, tmp_path / "narrow.h5", save_tokens=True, workers=0)
    bad = run_cli("plot", "maps", tmp_path / "narrow.h5", "--image", "2", "-o", tmp_path / "x.png", "--heads-dir", heads)
    assert bad.exit_code == 1 and "holds no probe heads for narrow" in bad.stderr and "48-wide" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
