"""The bundle's plot and HTML page: real PNG, self-contained page, and the page renders in headless Chromium
with the plot and the highlighted worst layer visible on the screenshot."""

from __future__ import annotations

import io
import logging
import re
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image

from edgequant.bundle.render import layers_png, report_html

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
BAR_BLUE = (0x54, 0xAE, 0xFF)  # "this layer alone" bars
BAR_RED = (0xCF, 0x22, 0x2E)  # the worst layer's bar
ROW_PINK = (0xFF, 0xEB, 0xE9)  # the worst layer's table row


def _pixels_near(img: np.ndarray, rgb, tol: int = 12) -> int:
    return int(np.sum(np.all(np.abs(img[..., :3].astype(int) - np.array(rgb)) <= tol, axis=-1)))


def test_layers_png_is_a_real_plot(digits_bundle):
    png = (digits_bundle.path / "layers.png").read_bytes()
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert img.shape[0] >= 400 and img.shape[1] >= 600
    assert _pixels_near(img, BAR_BLUE) > 5000 and _pixels_near(img, BAR_RED) > 500


def test_page_is_self_contained(digits_bundle):
    page = (digits_bundle.path / "report.html").read_text(encoding="utf-8")
    assert 'src="data:image/png;base64,' in page
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)  # nothing fetched from the network
    for r in digits_bundle.report["layers"]:
        assert f"<code>{r['tensor']}</code>" in page


def test_without_matplotlib_the_plot_is_skipped_with_a_log_line(digits_bundle, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    with caplog.at_level(logging.INFO, logger="edgequant.bundle.render"):
        assert layers_png(digits_bundle.report["layers"]) is None
    assert "matplotlib is not installed" in caplog.text
    page = report_html(digits_bundle.report, None)
    assert "<img" not in page and digits_bundle.report["layers"][0]["tensor"] in page


def test_page_renders_in_headless_chromium(digits_bundle, tmp_path):
    browser = next((shutil.which(b) for b in CHROMIUM if shutil.which(b)), None)
    assert browser, "headless Chromium is needed for this check: apt-get install chromium (.ci/run does it)"
    shot = tmp_path / "page.png"
    width, height = 1100, 1300
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         f"--screenshot={shot}", f"--window-size={width},{height}", (digits_bundle.path / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (height, width)
    white = np.all(img > 245, axis=-1).mean()
    assert 0.3 < white < 0.97  # a page with content, not blank, not an error screen
    # the plot was decoded from its data URI and drawn (its bar colours), and the worst row is highlighted
    assert _pixels_near(img, BAR_BLUE) > 5000 and _pixels_near(img, BAR_RED) > 500
    assert _pixels_near(img, ROW_PINK, tol=4) > 2000
