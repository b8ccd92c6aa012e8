"""The whole app in a real browser: headless Chromium driven by Playwright against `streamlit run app.py`."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync"]

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if not os.path.exists(CHROMIUM):
    pytest.skip("Chromium is not installed (Debian packages chromium and chromium-driver)",
                allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    port = _free_port()
    env = dict(os.environ, DQLAB_HOME=str(tmp_path_factory.mktemp("dqlab_home")))
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"streamlit did not start: {proc.stdout.read()[-2000:]}")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def page(app_url):
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(300_000)
        pg.goto(app_url)
        yield pg
        browser.close()


def _no_exception(pg):
    assert pg.locator("[data-testid='stException']").count() == 0, pg.locator(
        "[data-testid='stException']").first.inner_text()


def test_home_shows_generated_digits(page, tmp_path):
    page.get_by_text("quantizing diffusion models").first.wait_for()
    page.locator("[data-testid='stImage'] img").first.wait_for()
    img = page.locator("[data-testid='stImage'] img").first
    assert img.evaluate("el => el.naturalWidth") > 100
    _no_exception(page)
    page.screenshot(path=str(tmp_path / "home.png"), full_page=True)


def _open_page(pg, link: str, heading: str):
    pg.locator("[data-testid='stSidebarNav'] a", has_text=link).first.click()
    pg.get_by_role("heading", name=heading).first.wait_for()


def _set_number(pg, label: str, value: int):
    box = pg.get_by_role("spinbutton", name=label, exact=True).first
    box.fill(str(value))
    box.press("Tab")


def _slider_to_min(pg, label: str):
    thumb = pg.locator("[data-testid='stSlider']", has_text=label).first.get_by_role("slider")
    thumb.focus()
    thumb.press("Home")


def test_salience_quantize_compare_flow(page, tmp_path):
    """A user's path through the lab: collect salience, quantize a copy, compare it with FP at the same seeds."""
    _open_page(page, "Salience", "Salience")
    _slider_to_min(page, "DDIM steps")  # 5 steps keep the flow quick; the pages are the same at 50
    _set_number(page, "Calibration samples (classes cycle 0, 1, ...)", 2)
    page.get_by_role("button", name="Collect").click()
    page.get_by_text("59 layers x 5 timesteps").first.wait_for()  # 56 linears, the patch conv, 2 second calls
    for tab in ["(a) Channels", "(b, c) Over timesteps", "(d, e) Complementarity", "(f) All layers"]:
        page.get_by_role("tab", name=tab).click()
        page.locator("[data-testid='stPlotlyChart'] .js-plotly-plot").locator("visible=true").first.wait_for()
    _no_exception(page)
    page.screenshot(path=str(tmp_path / "salience.png"), full_page=True)

    _open_page(page, "Quantize", "Quantize")
    _set_number(page, "Calibration images", 2)
    _set_number(page, "Calibration DDIM steps", 5)
    page.get_by_role("button", name="Quantize").click()
    page.get_by_text("Relative RMS error vs FP").first.wait_for()
    page.get_by_text("over 5 timesteps").first.wait_for()
    assert page.locator("[data-testid='stPlotlyChart']").count() >= 3  # before/after, vector, per-layer error
    _no_exception(page)
    page.screenshot(path=str(tmp_path / "quantize.png"), full_page=True)

    _open_page(page, "Compare", "Compare variants")
    page.locator("[data-testid='stMultiSelect']").first.click()
    page.get_by_role("option").first.click()
    page.keyboard.press("Escape")
    _set_number(page, "Seeds per class", 1)
    _slider_to_min(page, "DDIM steps")
    page.get_by_role("button", name="Compare").click()
    page.get_by_role("heading", name="Samples: 5 DDIM steps").first.wait_for()
    page.get_by_role("heading", name="Metrics").first.wait_for()
    grids = page.locator("[data-testid='stImage'] img")
    grids.nth(1).wait_for()  # the grids' image files load after the page's elements
    assert grids.count() == 2  # FP and the variant, side by side
    page.get_by_text("ptq4dit W8A8 · label agreement").first.wait_for()
    assert all(grids.nth(i).evaluate("el => el.naturalWidth") > 100 for i in range(2))
    _no_exception(page)
    page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)
