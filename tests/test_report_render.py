"""The report's outputs: names, plots, and the HTML page as a real browser renders it.

The browser is Debian's ``chromium`` (headless). Without it the page test is
skipped, naming it, except under CI (``CI`` set), whose command installs it:
there it fails.
"""

import io
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from mergekit_wudi.report.binding import TensorReport
from mergekit_wudi.report.figures import interference_figures, summarise
from mergekit_wudi.report.render import (
    PLOTS,
    build_report,
    expert_labels,
    layer_and_module,
    plots,
    report_html,
    summary_text,
)

CHROMIUM = shutil.which("chromium")
REQUIRED = bool(os.environ.get("CI"))
# Marks where the page places each image; no plot uses this exact colour.
OUTLINE = (255, 0, 255)
OUTLINE_PX = 3

EXPERTS = ["./experts/math", "./experts/code", "./experts/chat"]
MODULES = ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")


def synthetic_tensors(solve: bool = True):
    """3 layers x 3 module types; the third expert leaves layer 0's q_proj untouched."""
    generator = torch.Generator().manual_seed(0)
    tensors = []
    for layer in range(3):
        for module in MODULES:
            taus = [torch.randn(16, 12, generator=generator) * 1e-2 for _ in EXPERTS]
            if layer == 0 and module == "self_attn.q_proj":
                taus[2] = torch.zeros(16, 12)
            solution = sum(taus) * 0.8 if solve else None
            tensors.append(TensorReport(
                name=f"model.layers.{layer}.{module}.weight", shape=[16, 12], dtype="float32",
                fate="wudi", reason="solved", view="out_in", parameters={"lambda": 1.0},
                summary=summarise(interference_figures(taus, solution)),
            ))
    tensors.append(TensorReport(name="model.norm.weight", shape=[12], dtype="float32",
                                fate="task_arithmetic", reason="1-D"))
    return tensors


def synthetic_report(solve: bool = True):
    return build_report(synthetic_tensors(solve), EXPERTS, recipe={"path": "recipe.yml", "text": ""},
                        options={"solve": solve}, versions={"mergekit": "0.1.5"})


def test_layer_and_module_from_tensor_names():
    assert layer_and_module("model.layers.3.self_attn.q_proj.weight") == (3, "self_attn.q_proj")
    assert layer_and_module("bert.encoder.layer.11.attention.self.query.weight") == (11, "attention.self.query")
    assert layer_and_module("transformer.h.0.attn.c_attn.weight") == (0, "attn.c_attn")
    assert layer_and_module("lm_head.weight") == (None, "lm_head")


def test_expert_labels_are_short_unless_ambiguous():
    assert expert_labels(["./a/math", "/b/code/"]) == ["math", "code"]
    assert expert_labels(["./base+./adapters/math-lora"]) == ["math-lora"]
    assert expert_labels(["./x/model", "./y/model"]) == ["./x/model", "./y/model"]


@pytest.mark.parametrize("solve", [True, False])
def test_every_plot_is_a_png_with_content(solve):
    images = plots(synthetic_report(solve))
    assert set(images) == set(PLOTS)
    for name, data in images.items():
        image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert image.shape[0] > 200 and image.shape[1] > 300, name
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 100, name


def test_names_without_layer_numbers_get_every_plot_but_the_per_layer_curves(recwarn):
    generator = torch.Generator().manual_seed(1)
    tensors = []
    for name in ("fc1.weight", "fc2.weight"):
        taus = [torch.randn(8, 8, generator=generator) for _ in range(2)]
        tensors.append(TensorReport(name=name, shape=[8, 8], dtype="float32", fate="wudi",
                                    reason="solved", summary=summarise(interference_figures(taus, sum(taus)))))
    images = plots(build_report(tensors, EXPERTS[:2], recipe={}, options={}, versions={}))
    assert set(images) == set(PLOTS) - {"layers.png"}
    warned = [str(w.message) for w in recwarn if issubclass(w.category, UserWarning)]
    assert not warned, warned  # e.g. matplotlib's empty-legend warning


def test_a_report_with_nothing_solved_has_no_plots_and_still_a_page():
    report = build_report(synthetic_tensors()[-1:], EXPERTS, recipe={}, options={}, versions={})
    assert plots(report) == {}
    assert "0 tensors solved by WUDI, 1 by task arithmetic" in report_html(report, {})
    assert summary_text(report) == "0 tensors solved by WUDI, 1 by task arithmetic, 0 unchanged."


def image_boxes(screenshot: np.ndarray):
    """The interiors of the outlined image boxes, top to bottom."""
    mask = (screenshot == OUTLINE).all(axis=-1)
    edge_rows = np.flatnonzero(mask.sum(axis=1) > 200)
    runs = np.split(edge_rows, np.flatnonzero(np.diff(edge_rows) > 1) + 1) if edge_rows.size else []
    assert len(runs) % 2 == 0, f"unpaired outline edges at rows {[r[0] for r in runs]}"
    boxes = []
    for top, bottom in zip(runs[0::2], runs[1::2]):
        columns = np.flatnonzero(mask[top[-1] + 1])
        boxes.append(screenshot[top[-1] + 1:bottom[0], columns.min() + OUTLINE_PX:columns.max() - OUTLINE_PX + 1])
    return boxes


@pytest.mark.skipif(CHROMIUM is None and not REQUIRED,
                    reason="the HTML test needs Debian's chromium (apt-get install -y chromium)")
def test_the_page_renders_offline_in_a_real_browser_with_every_plot_visible(tmp_path):
    assert CHROMIUM, "the HTML test needs Debian's chromium: apt-get install -y chromium"
    report = synthetic_report()
    images = plots(report)
    page = report_html(report, images)
    outline = "img { outline: %dpx solid rgb%s; }" % (OUTLINE_PX, OUTLINE)
    (tmp_path / "report.html").write_text(page.replace("</style>", outline + "</style>", 1))
    screenshot = tmp_path / "screenshot.png"
    (tmp_path / "profile").mkdir()
    completed = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={screenshot}",
         "--window-size=1280,4000", (tmp_path / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert screenshot.exists(), completed.stderr[-3000:]
    shot = np.asarray(Image.open(screenshot).convert("RGB"))
    boxes = image_boxes(shot)
    assert len(boxes) == len(images), f"{len(boxes)} image boxes on the page, {len(images)} plots"
    for box, (name, data) in zip(boxes, images.items()):
        with Image.open(io.BytesIO(data)) as png:
            width, height = png.size
        # The plot itself, at most scaled to the page's width, not a broken-image icon.
        assert box.shape[1] > 300 and box.shape[1] <= width + 1, name
        assert box.shape[0] / box.shape[1] == pytest.approx(height / width, rel=0.02), name
        pixels = box.reshape(-1, 3)
        assert (pixels.min(axis=1) < 235).mean() > 0.05, f"{name} is blank on the page"
        assert len(np.unique(pixels, axis=0)) > 100, f"{name} shows too few colours to be the plot"
