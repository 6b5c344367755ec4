"""attnflow report: the page's embedded maps decode to the caches' values, and in a real browser (headless Chromium)
the page loads offline without errors, its controls draw the cache's values and its curves the metrics' means.

Every expected value is computed here from the HDF5 files with h5py and numpy, not with attnflow's readers.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from attnflow.demo_models import demo_data_dir
from attnflow.errors import AttnflowError
from attnflow.extract import extract
from attnflow.images import list_images
from attnflow.measure import compute_metrics
from attnflow.models import build_model
from attnflow.report import build_report, sample_images
from conftest import tiny, write_mask_case

# The page's documented quantisation: shares clipped to [1/8, 16], 256 steps even in log, so within 0.96%.
LOW, HIGH, STEPS, ERROR = 1 / 8, 16.0, 255, 0.0096
N_DEMO = 100
SIZE_LIMIT = 10e6  # bytes: the bound for a report of 100 demo images
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"]


def page_data(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    found = re.search(r'<script type="application/json" id="attnflow-data">(.*?)</script>', text, re.S)
    return json.loads(found.group(1))


def unpack(array: dict) -> np.ndarray:
    """A stored array of the page: base64 of the deflated uint8 values in C order, with its shape."""
    return np.frombuffer(zlib.decompress(base64.b64decode(array["deflate_base64"])), np.uint8).reshape(array["shape"])


def decoded(codes: np.ndarray) -> np.ndarray:
    return LOW * (HIGH / LOW) ** (codes.astype(np.float64) / STEPS)


def assert_shares(codes: np.ndarray, attention_over_patches: np.ndarray) -> None:
    """Stored codes stand for the attention (rows over the P patches, summing to 1) x P within the error."""
    expected = np.clip(attention_over_patches * attention_over_patches.shape[-1], LOW, HIGH)
    np.testing.assert_array_less(np.abs(decoded(codes) / expected - 1), ERROR)


def over_patches(rows: np.ndarray, prefix: int) -> np.ndarray:
    patches = rows[..., prefix:].astype(np.float64)
    return patches / patches.sum(-1, keepdims=True)


def rollout_by_hand(attn: np.ndarray, prefix: int, has_cls: bool) -> np.ndarray:
    """(L, H, T, T) -> (L, P): mean over heads, plus identity, halved, rows normalised, multiplied up, read out."""
    T = attn.shape[-1]
    joint = np.eye(T)
    out = []
    for layer in attn.astype(np.float64):
        mixed = (layer.mean(0) + np.eye(T)) / 2
        joint = (mixed / mixed.sum(-1, keepdims=True)) @ joint
        readout = joint[0] if has_cls else joint[prefix:].mean(0)
        out.append(over_patches(readout, prefix))
    return np.stack(out)


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    """Caches and metrics files of both demo models over 100 demo images, and their report."""
    folder = tmp_path_factory.mktemp("demo")
    paths = list_images([str(demo_data_dir() / "images")])
    paths = [paths[round(i * len(paths) / N_DEMO)] for i in range(N_DEMO)]
    caches, metrics = [], []
    for name in ("demo:mae", "demo:dino"):
        short = name.split(":")[1]
        result = extract(build_model(name), paths, folder / f"{short}.h5", masks=demo_data_dir() / "masks", labels_from_dirs=True,
                         metrics=folder / f"{short}_metrics.h5", batch_size=50, workers=0)
        caches.append(result.path)
        metrics.append(result.metrics_path)
    probe = folder / "probe.csv"
    probe.write_text("model,family,pool,evaluator,accuracy,ci_low,ci_high,n_train,n_test\n"
                     "demo:mae,mim,cls,linear,0.323,0.295,0.353,4000,1000\n")
    report = build_report([*caches, *metrics], folder / "report.html", probes=[probe], n_images=N_DEMO, n_bootstrap=200)
    return report, caches, metrics


def test_demo_report_size_and_sample(demo_report):
    report, caches, _ = demo_report
    assert report.size_bytes == report.path.stat().st_size < SIZE_LIMIT
    assert len(report.image_ids) == N_DEMO and report.models == ["demo:mae", "demo:dino"]
    data = page_data(report.path)
    assert [table["title"] for table in data["tables"]][-1] == "probes: probe.csv"
    assert data["tables"][0]["columns"][:2] == ["metric", "layer"]  # the summary as compare prints it


def test_embedded_maps_are_the_caches_values(demo_report):
    report, caches, _ = demo_report
    data = page_data(report.path)
    ids = [image["id"] for image in data["images"]]
    for model, path in zip(data["models"], caches):
        with h5py.File(path, "r") as f:
            stored = [i.decode() for i in f["image_ids"][()]]
            rows = [stored.index(i) for i in ids]
            assert rows == sorted(rows)  # the page lists the images in the cache's order
            attn = f["attn"][rows].astype(np.float64)  # (n, L, H, T, T)
            fg = f["fg"][rows]
        attention, query, rollout = (unpack(model["arrays"][k]) for k in ("attention", "query", "rollout"))
        n, L, H = attn.shape[:3]
        assert attention.shape == (n, L, H + 1, 64) and query.shape == (n, L, 1, 64, 64) and rollout.shape == (n, L, 64)
        cls = over_patches(attn[:, :, :, 0, :], 1)  # (n, L, H, P)
        assert_shares(attention[:, :, :H], cls)
        assert_shares(attention[:, :, H], cls.mean(2))
        patch_rows = over_patches(attn[:, :, :, 1:, :], 1)  # (n, L, H, P, P)
        assert_shares(query[:, :, 0], patch_rows.mean(2))
        for k in (0, n - 1):
            assert_shares(rollout[k], rollout_by_hand(attn[k], 1, True))
        np.testing.assert_array_equal(unpack(model["arrays"]["fg"]), fg >= 0.5)


def test_sample_is_stratified_and_reproducible():
    labels = np.repeat(np.arange(4), [50, 30, 15, 5])
    picked = sample_images(100, 20, labels, seed=3)
    assert np.array_equal(picked, sample_images(100, 20, labels, seed=3)) and len(set(picked)) == 20
    assert sorted(np.bincount(labels[picked], minlength=4)) == [5, 5, 5, 5]
    assert sorted(np.bincount(labels[sample_images(100, 30, labels, seed=3)], minlength=4)) == [5, 8, 8, 9]  # class 3 runs out
    assert np.array_equal(sample_images(10, 20), np.arange(10))


@pytest.mark.filterwarnings("ignore:the model has no cls token")
def test_layouts_flow_and_every_heads_query_rows(tmp_path):
    """A model without cls (mean patch row readout), a rows-only cache, flow from a metrics file, every head's query
    rows, and none."""
    images, masks = write_mask_case(tmp_path)
    paths = list_images([str(images)])
    gap, rows = tmp_path / "gap.h5", tmp_path / "rows.h5"
    extract(tiny("registers_no_cls"), paths, gap, dtype="float32", workers=0)
    extract(tiny("registers"), paths, rows, store="rows", workers=0)
    compute_metrics(gap, tmp_path / "gap_m.h5", flow=True, flow_layers=(0,))
    report = build_report([gap, rows, tmp_path / "gap_m.h5"], tmp_path / "r.html", query_rows="heads", n_bootstrap=20)
    data = page_data(report.path)
    gap_model, rows_model = data["models"]
    with h5py.File(gap, "r") as f:
        attn = f["attn"][()].astype(np.float64)  # (2, L, H, T, T); prefix: 4 registers
    with h5py.File(tmp_path / "gap_m.h5", "r") as f:
        flow = f["flow/map"][()]
    patch_rows = over_patches(attn[:, :, :, 4:, :], 4)
    assert_shares(unpack(gap_model["arrays"]["attention"])[:, :, :3], patch_rows.mean(-2))
    query = unpack(gap_model["arrays"]["query"])
    assert query.shape[2] == 4
    assert_shares(query[:, :, :3], patch_rows)
    assert_shares(unpack(gap_model["arrays"]["flow"]), flow)
    assert gap_model["flow_layers"] == [0] and gap_model["readout"] == "mean patch row"
    assert set(rows_model["arrays"]) == {"attention"} and any("no rollout" in n for n in data["notes"])
    without = page_data(build_report([gap], tmp_path / "none.html", query_rows="none").path)["models"][0]
    assert set(without["arrays"]) == {"attention", "rollout"}


def test_page_text_cannot_end_its_script(tmp_path):
    from attnflow.report import render_page

    page = render_page({"title": "</script><script>alert(1)</script><!--", "x": "</script>"})
    assert page.count("</script>") == 2 and "alert(1)</script>" not in page
    assert json.loads(re.search(r'id="attnflow-data">(.*?)</script>', page, re.S).group(1))["x"] == "</script>"


def test_user_errors_are_one_line(tmp_path, run_cli, demo_report):
    _, caches, _ = demo_report
    cases = [
        (["report", caches[0], "-o", tmp_path / "r.png"], 2, "--output"),
        (["report", caches[0], "-o", tmp_path / "no" / "r.html"], 2, "no such directory"),
        (["report", tmp_path / "missing.h5", "-o", tmp_path / "r.html"], 1, "missing.h5"),
        (["report", caches[0], "-o", tmp_path / "r.html", "--probe", caches[0]], 1, "--probe"),
        (["report", caches[0], "-o", tmp_path / "r.html", "--images", "0"], 2, "--images"),
    ]
    (tmp_path / "text.h5").write_text("not hdf5")
    cases.append((["report", tmp_path / "text.h5", "-o", tmp_path / "r.html"], 1, "text.h5"))
    for args, code, named in cases:
        result = run_cli(*args)
        assert result.exit_code == code and named in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (tmp_path / "r.html").exists()


def test_cli_writes_the_page_and_replaces_a_symlink_not_its_target(tmp_path, run_cli, demo_report):
    _, caches, metrics = demo_report
    target = tmp_path / "elsewhere.html"
    target.write_text("keep")
    (tmp_path / "r.html").symlink_to(target)
    result = run_cli("report", caches[0], metrics[0], "-o", tmp_path / "r.html", "--images", "3", "--bootstrap", "20")
    assert result.exit_code == 0, result.stderr
    assert re.search(r"wrote .*r\.html \(\d+\.\d MB\): maps of 3 images from 1 model", result.stderr) and result.stdout == ""
    assert target.read_text() == "keep" and not (tmp_path / "r.html").is_symlink()
    assert len(page_data(tmp_path / "r.html")["images"]) == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


def test_api_checks_its_inputs(tmp_path, demo_report):
    _, caches, _ = demo_report
    with pytest.raises(AttnflowError, match="^images: "):
        build_report(caches, tmp_path / "r.html", n_images=0)
    with pytest.raises(AttnflowError, match="caches and/or metrics"):
        build_report([], tmp_path / "r.html")


# -- in a real browser ------------------------------------------------------------------------------------


def chromium_path() -> str | None:
    found = os.environ.get("ATTNFLOW_CHROMIUM") or next(
        (shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None)
    return found


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright: pip install -e '.[test]'")
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium installed (apt-get install chromium, or set ATTNFLOW_CHROMIUM): the page is not tested in a browser")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=BROWSER_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, demo_report):
    """The demo report opened from disk; every console message, page error and request is recorded."""
    report = demo_report[0]
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.messages, page.requests = [], []
    page.on("console", lambda m: page.messages.append((m.type, m.text)))
    page.on("pageerror", lambda e: page.messages.append(("pageerror", str(e))))
    page.on("request", lambda r: page.requests.append(r.url))
    page.goto(report.path.as_uri())
    page.wait_for_selector("body[data-ready=true]", state="attached", timeout=30_000)
    yield page
    context.close()


def inferno() -> np.ndarray:
    """The maps' colour map as (256, 3) bytes, from matplotlib: a pixel's colour gives its code."""
    import matplotlib

    return np.rint(matplotlib.colormaps["inferno"].resampled(256)(np.arange(256))[:, :3] * 255).astype(int)


def drawn_codes(page, model: int) -> np.ndarray:
    """The codes of the map drawn for model ``model``, read from its canvas at the patch centres."""
    pixels = page.evaluate("""m => {
        const canvas = document.querySelectorAll('.map')[m];
        const [gh, gw] = canvas.dataset.grid.split(' ').map(Number), cell = Number(canvas.dataset.cell);
        const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data, out = [];
        for (let r = 0; r < gh; r++) for (let c = 0; c < gw; c++) {
            const i = 4 * ((Math.floor((r + 0.5) * cell)) * canvas.width + Math.floor((c + 0.5) * cell));
            out.push([data[i], data[i + 1], data[i + 2]]);
        }
        return out;
    }""", model)
    colours = inferno()
    distance = np.abs(np.array(pixels)[:, None, :] - colours[None]).sum(-1)
    assert distance.min(1).max() <= 3, "a patch centre holds no colour of the map's colour map"
    return distance.argmin(1)


def cache_attention(path: Path, image_id: str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        index = [i.decode() for i in f["image_ids"][()]].index(image_id)
        return f["attn"][index].astype(np.float64)  # (L, H, T, T)


def test_page_loads_offline_without_errors(page, demo_report, tmp_path):
    assert [m for m in page.messages if m[0] in ("error", "pageerror", "warning")] == []
    assert page.requests and all(url.startswith(("file:", "data:")) for url in page.requests)
    assert page.locator(".map").count() == 2 and page.locator("#image-list button").count() == N_DEMO
    assert page.inner_text("#status") == ""
    artifacts = Path(os.environ.get("ATTNFLOW_TEST_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    page.mouse.move(*centre_of_patch(page, 0, 3, 4))
    page.screenshot(path=str(artifacts / "report.png"), clip={"x": 0, "y": 0, "width": 1400, "height": 1000})
    assert (artifacts / "report.png").stat().st_size > 10_000


def centre_of_patch(page, model: int, row: int, col: int) -> tuple[float, float]:
    box = page.locator(".map").nth(model).bounding_box()
    cell = box["width"] / 8
    return box["x"] + (col + 0.5) * cell, box["y"] + (row + 0.5) * cell


def test_controls_draw_the_caches_values(page, demo_report):
    report, caches, _ = demo_report
    image = 7
    page.locator("#image-list button").nth(image).click()
    page.select_option("#layer", "2")
    page.select_option("#head", "1")
    image_id = report.image_ids[image]
    for m, path in enumerate(caches):
        attn = cache_attention(path, image_id)
        assert_shares(drawn_codes(page, m), over_patches(attn[2, 1, 0], 1))  # cls row of block 2, head 1
    page.select_option("#head", "mean")
    page.select_option("#readout", "rollout")
    for m, path in enumerate(caches):
        assert_shares(drawn_codes(page, m), rollout_by_hand(cache_attention(path, image_id), 1, True)[2])
    # hovering over a patch draws that patch's own row (head mean); both models at the same patch
    page.mouse.move(*centre_of_patch(page, 1, 5, 2))
    for m, path in enumerate(caches):
        rows = over_patches(cache_attention(path, image_id)[2, :, 1 + 5 * 8 + 2], 1)  # (H, P)
        assert_shares(drawn_codes(page, m), rows.mean(0))
    assert "patch (5, 2)" in page.locator(".caption").first.inner_text()
    # a click keeps the patch; the arrow keys move it; Escape lets it go
    page.mouse.click(*centre_of_patch(page, 0, 5, 2))
    page.mouse.move(10, 10)
    page.keyboard.press("ArrowRight")
    rows = over_patches(cache_attention(caches[0], image_id)[2, :, 1 + 5 * 8 + 3], 1)
    assert_shares(drawn_codes(page, 0), rows.mean(0))
    page.keyboard.press("Escape")
    assert_shares(drawn_codes(page, 0), rollout_by_hand(cache_attention(caches[0], image_id), 1, True)[2])
    # the image list is one tab stop; the arrow keys choose the next image
    page.locator("#image-list button").nth(image).focus()
    page.keyboard.press("ArrowDown")
    assert page.get_attribute("#image-list button >> nth=8", "aria-pressed") == "true"
    assert_shares(drawn_codes(page, 1), rollout_by_hand(cache_attention(caches[1], report.image_ids[8]), 1, True)[2])
    # the image list filters by class
    page.fill("#image-search", "sandal")
    shown = page.locator("#image-list button:visible")
    assert 0 < shown.count() < N_DEMO and all("sandal" in t for t in shown.all_inner_texts())


def test_curves_plot_the_metrics_means(page, demo_report):
    _, _, metrics = demo_report
    page.select_option("#metric", "cls_entropy_norm")
    page.select_option("#reduction", "mean")
    pixel_bottom, pixel_top, low, high = map(float, page.get_attribute("#curve-plot", "data-y-axis").split())
    for path in metrics:
        with h5py.File(path, "r") as f:
            label = f.attrs["label"]
            want = np.nanmean(f["metrics/cls_entropy_norm"][()].astype(np.float64).mean(-1), axis=0)  # heads, then images
        ys = page.eval_on_selector_all(f'#curve-plot g[data-model="{label}"] circle', "cs => cs.map(c => Number(c.getAttribute('cy')))")
        plotted = low + (pixel_bottom - np.array(ys)) / (pixel_bottom - pixel_top) * (high - low)
        np.testing.assert_allclose(plotted, want, rtol=1e-9, atol=1e-12)
    # heads reduced by their max first; a layer-level metric is the same under every reduction
    page.select_option("#reduction", "max")
    for name, reduce in (("cls_entropy_norm", lambda v: v.max(-1)), ("rollout_entropy_norm", lambda v: v)):
        page.select_option("#metric", name)
        pixel_bottom, pixel_top, low, high = map(float, page.get_attribute("#curve-plot", "data-y-axis").split())
        with h5py.File(metrics[1], "r") as f:
            want = np.nanmean(reduce(f[f"metrics/{name}"][()].astype(np.float64)), axis=0)
        ys = page.eval_on_selector_all('#curve-plot g[data-model="demo:dino"] circle', "cs => cs.map(c => Number(c.getAttribute('cy')))")
        np.testing.assert_allclose(low + (pixel_bottom - np.array(ys)) / (pixel_bottom - pixel_top) * (high - low), want, rtol=1e-9)
    page.locator("#legend button", has_text="demo:mae").click()  # hides that model
    assert page.locator("#curve-plot g[data-model]").count() == 1
    assert page.get_attribute("#legend button >> nth=0", "aria-pressed") == "false"


def test_other_layouts_in_the_browser(browser, tmp_path):
    """A model without cls (4 x 4 patches) beside a rows-only cache with registers (2 x 2): the readouts are the
    cache's, and hovering gives the query view where the page has patch rows and says why not where it has none."""
    images, _ = write_mask_case(tmp_path)
    paths = list_images([str(images)])
    gap, rows = tmp_path / "gap.h5", tmp_path / "rows.h5"
    extract(tiny("registers_no_cls"), paths, gap, dtype="float32", workers=0)
    extract(tiny("registers"), paths, rows, store="rows", dtype="float32", workers=0)
    report = build_report([gap, rows], tmp_path / "r.html", query_rows="heads")
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(report.path.as_uri())
    page.wait_for_selector("body[data-ready=true]", state="attached", timeout=30_000)
    image_id = report.image_ids[1]
    page.locator("#image-list button").nth(1).click()
    page.select_option("#layer", "0")
    page.select_option("#head", "2")
    with h5py.File(gap, "r") as f:
        attn = f["attn"][[i.decode() for i in f["image_ids"][()]].index(image_id)].astype(np.float64)  # (L, H, T, T)
    with h5py.File(rows, "r") as f:
        cls_rows = f["attn_rows"][[i.decode() for i in f["image_ids"][()]].index(image_id)].astype(np.float64)  # (L, H, 5, T)
    assert_shares(drawn_codes(page, 0), over_patches(attn[0, 2, 4:], 4).mean(0))  # the mean patch row of head 2
    assert_shares(drawn_codes(page, 1), over_patches(cls_rows[0, 2, 0], 5))
    box = page.locator(".map").nth(0).bounding_box()
    page.mouse.move(box["x"] + 2.5 * box["width"] / 4, box["y"] + 1.5 * box["height"] / 4)  # patch (1, 2)
    assert_shares(drawn_codes(page, 0), over_patches(attn[0, 2, 4 + 1 * 4 + 2], 4))  # that patch's row, head 2
    assert "No query view: the cache keeps no patch rows (store=rows)" in page.locator(".caption").nth(1).inner_text()
    assert_shares(drawn_codes(page, 1), over_patches(cls_rows[0, 2, 0], 5))  # the readout stays
    assert errors == []
    page.close()
