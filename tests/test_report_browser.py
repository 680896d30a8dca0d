"""The HTML report in a real browser: headless Chromium renders report.html (figures embedded as data URIs,
no network) and its screenshot shows the figures. Skips when no Chromium is installed
(`apt-get install chromium` on Debian)."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from analysis.report import ReportInputs, VerdictSettings, build_report
from study.registry import method_colors, method_roles
from tests.helpers import EQUAL, history_frame, per_image_frame, runs_frame, trials_frame

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(BROWSER is None, reason="no Chromium installed (apt-get install chromium)")
def test_the_html_report_renders_its_figures_in_chromium(tmp_path):
    per_image = per_image_frame(EQUAL, images=300, seeds=3, noise=0.1)
    trials = trials_frame()
    result = build_report(tmp_path / "report", "browser",
                          ReportInputs(trials, history_frame(trials), per_image, runs_frame(per_image)),
                          VerdictSettings(method_roles(), method_colors(), margin=0.02))
    shot = tmp_path / "shot.png"  # look at it: pytest --basetemp=DIR keeps it
    subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1280,6000", result.html.as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)  # (H, W, 3)
    assert pixels.shape[:2] == (6000, 1280)
    assert pixels.std() > 20  # not a blank page
    # The methods figure draws init in its registered colour: some of its pixels are on the page.
    target = np.array(Image.new("RGB", (1, 1), method_colors()["init"]).getpixel((0, 0)))
    assert (np.abs(pixels - target).sum(axis=2) < 30).sum() > 200
