"""The whole app in a real browser: headless Chromium driven by Playwright against the app served by
`python app.py`."""
from __future__ import annotations

import os

import pytest

from tests.app_server import (CHROMIUM, launch_chromium, no_exception as _no_exception, open_page as _open_page,
                              set_number as _set_number, slider_to_min as _slider_to_min, start_app, stop_app)

pytestmark = pytest.mark.slow  # a real browser against a real server: a minute on a quiet machine

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if not os.path.exists(CHROMIUM):
    pytest.skip("Chromium is not installed (Debian packages chromium and chromium-driver)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    try:
        proc, url = start_app(tmp_path_factory.mktemp("dqlab_home"))
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield url
    stop_app(proc)


@pytest.fixture(scope="module")
def page(app_url):
    with playwright.sync_playwright() as pw:
        browser = launch_chromium(pw)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(300_000)
        pg.goto(app_url)
        yield pg
        browser.close()


def test_home_shows_generated_digits(page, tmp_path):
    page.get_by_text("quantizing diffusion transformers").first.wait_for()
    page.locator("[data-testid='stImage'] img").first.wait_for()
    img = page.locator("[data-testid='stImage'] img").first
    assert img.evaluate("el => el.naturalWidth") > 100
    _no_exception(page)
    page.screenshot(path=str(tmp_path / "home.png"), full_page=True)


def _drop_last(pg, label: str):
    """Remove the last chosen item of a multiselect (Backspace in its input)."""
    box = pg.locator("[data-testid='stMultiSelect']", has_text=label).first
    box.locator("input").click()
    pg.keyboard.press("Backspace")
    pg.keyboard.press("Escape")


def test_salience_quantize_sweep_compare_flow(page, tmp_path):
    """A user's path through the lab: collect salience, quantize a copy, sweep a small grid and read its front
    and recommendation, compare the variant with FP at the same seeds."""
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
    page.get_by_text("Median step error vs FP").first.wait_for()
    page.get_by_text("over 5 timesteps").first.wait_for()
    # before/after, vector, per-layer error: the texts above can arrive before the last chart is drawn
    page.wait_for_function("document.querySelectorAll(\"[data-testid='stPlotlyChart']\").length >= 3",
                           timeout=120_000)
    _no_exception(page)
    page.screenshot(path=str(tmp_path / "quantize.png"), full_page=True)

    _open_page(page, "Sweep", "Sweep")
    _drop_last(page, "Methods")  # baseline only
    _drop_last(page, "Bit-widths")  # W8A8 and W4A8: a 1 x 2 grid plus FP
    _set_number(page, "Samples per point (N)", 16)
    _set_number(page, "DDIM steps", 2)
    _set_number(page, "Calibration images", 1)
    page.get_by_role("button", name="Run sweep").click()
    pareto = page.locator("[data-testid='stPlotlyChart']", has_text="vs BOPs").first
    pareto.wait_for()
    traces = pareto.locator(".scatterlayer .trace")
    traces.nth(1).wait_for(state="attached")  # plotly draws its traces after the chart's element appears
    assert traces.count() >= 2  # the method's points and the front line
    recommendation = page.locator("[data-testid='stAlert']", has_text="is the cheapest setting").first
    recommendation.wait_for()
    assert recommendation.is_visible() and pareto.is_visible()
    page.get_by_role("button", name="Download this config (JSON)").wait_for()
    _no_exception(page)
    page.screenshot(path=str(tmp_path / "sweep.png"), full_page=True)

    _open_page(page, "Compare", "Compare variants")
    # the session's variant is preselected (not a stored run of anyone's)
    assert "ptq4dit W8A8" in page.locator("[data-testid='stMultiSelect']").first.inner_text()
    _set_number(page, "Seeds per class", 1)
    _slider_to_min(page, "DDIM steps")
    page.get_by_role("button", name="Compare").click()
    page.get_by_role("heading", name="Samples: 5 DDIM steps").first.wait_for()
    page.get_by_role("heading", name="Metrics").first.wait_for()
    grids = page.locator("[data-testid='stImage'] img")
    grids.nth(1).wait_for()  # the grids' image files load after the page's elements
    assert grids.count() == 2  # FP and the variant
    page.get_by_text("ptq4dit W8A8 · label agreement").first.wait_for()
    assert all(grids.nth(i).evaluate("el => el.naturalWidth") > 100 for i in range(2))
    page.get_by_role("button", name="Metrics as CSV").wait_for()
    _no_exception(page)
    page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)
