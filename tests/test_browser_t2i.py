"""A text-to-image pipeline in a real browser: headless Chromium driven by Playwright against the app served by
`python app.py`, with a tiny random PixArt-sigma folder chosen in the sidebar and prompts typed where a class model
shows classes:
Home draws one column per prompt, Salience collects and shows the token view of cross-attention's k/v input,
Quantize calibrates and lists the PixArt fold sites.

Slow (a Streamlit server and a browser): runs when DQLAB_SLOW_TESTS=1, e.g.
    DQLAB_SLOW_TESTS=1 python -m pytest tests/test_browser_t2i.py -q
"""
from __future__ import annotations

import os

import pytest

from tests.app_server import (CHROMIUM, launch_chromium, no_exception as _no_exception, open_page, set_number,
                              slider_to_min, start_app, stop_app)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("DQLAB_SLOW_TESTS", "0") in ("", "0"),
                                 reason="slow browser test: set DQLAB_SLOW_TESTS=1 to run it")]
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if not os.path.exists(CHROMIUM):
    pytest.skip("Chromium is not installed (Debian packages chromium and chromium-driver)", allow_module_level=True)

PROMPTS = "a red car\na photo of a cat"


@pytest.fixture(scope="module")
def page(tmp_path_factory, pixart_folder):
    proc, url = start_app(tmp_path_factory.mktemp("dqlab_home"))
    try:
        with playwright.sync_playwright() as pw:
            browser = launch_chromium(pw)
            pg = browser.new_page(viewport={"width": 1400, "height": 1000})
            pg.set_default_timeout(int(os.environ.get("DQLAB_BROWSER_TIMEOUT_MS", 300_000)))
            pg.goto(url)
            pg.get_by_text("quantizing diffusion transformers").first.wait_for()
            sidebar = pg.locator("[data-testid='stSidebar']")
            sidebar.locator("[data-testid='stRadio'] label", has_text="Local folder").first.click()
            box = sidebar.locator("[data-testid='stTextInput'] input").first
            box.fill(str(pixart_folder))
            box.press("Enter")
            prompts = sidebar.locator("[data-testid='stTextArea'] textarea").first
            prompts.wait_for()
            prompts.fill(PROMPTS)
            prompts.press("Control+Enter")
            yield pg
            browser.close()
    finally:
        stop_app(proc)


def test_text_to_image_flow_in_the_browser(page, tmp_path):
    shots = os.environ.get("DQLAB_SHOTS") or str(tmp_path)
    page.get_by_text("“a photo of a cat”").first.wait_for()  # Home's grid caption names the sidebar prompts
    page.get_by_text("text encoder and VAE stay FP").first.wait_for()
    _no_exception(page)
    page.screenshot(path=os.path.join(shots, "t2i_home.png"), full_page=True)

    open_page(page, "Salience", "Salience")
    slider_to_min(page, "DDIM steps")
    set_number(page, "Calibration samples (prompts of the sidebar cycle)", 2)
    page.get_by_role("button", name="Collect").click()
    page.get_by_text("Token salience of cross-attention").first.wait_for()
    page.get_by_text("timesteps, 2 samples").first.wait_for()
    _no_exception(page)
    page.screenshot(path=os.path.join(shots, "t2i_salience.png"), full_page=True)

    open_page(page, "Quantize", "Quantize")
    set_number(page, "Calibration images", 2)
    set_number(page, "Calibration DDIM steps", 3)
    page.get_by_role("button", name="Quantize").click()
    page.get_by_text("Median step error vs FP").first.wait_for()
    # PixArt's fold sites (the table inside is a canvas grid: its rows are checked by tests/test_page_t2i.py)
    page.get_by_text("Balanced layers: 16 of 27").first.click()
    _no_exception(page)
    page.screenshot(path=os.path.join(shots, "t2i_quantize.png"), full_page=True)
