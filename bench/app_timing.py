"""How fast the app answers in a real browser (headless Chromium), and a screenshot of every page.

    python -m bench.app_timing --out shots/ --json          # from the repository root (it drives tests/app_server)

Measures, on the bundled model:
- first page: from navigation to the Home page's heading, to its controls (the model loaded, the form
  usable), to its first grid, and to its first script run finished (digits drawn, the app idle: "interactive");
- a later session (another browser context): from navigation to its Home grid, which is shared, not sampled again;
- redraw after a layer change and after a timestep change on the Salience page: from the key press to the
  channel-profile chart showing the new layer or timestep (median of --repeats);
then walks Home, Salience, Quantize (2 calibration images, 5 steps), Sweep (baseline W8A8 + W4A4, N = 16, 2 steps)
and Compare on each model of --models, saving one full-page screenshot of each page in --out. Targets: heading
< 2 s, first grid < 8 s for the first session and < 2 s for a later one, redraw < 0.5 s.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from tests.app_server import launch_chromium, open_page, set_number, slider_to_min, start_app, stop_app

PROFILE_TITLE = "[data-testid='stPlotlyChart'] .gtitle"


def _idle(pg, timeout_ms: int = 300_000) -> None:
    """Wait until the script run is over (Streamlit's 'running' status widget is gone)."""
    pg.wait_for_function("() => !document.querySelector(\"[data-testid='stStatusWidget']\")", timeout=timeout_ms)


def _shoot(pg, path: Path) -> str:
    """A screenshot of the whole page: the app scrolls inside its main block, so the window is made tall."""
    size = pg.viewport_size
    pg.set_viewport_size({"width": size["width"], "height": 3600})
    pg.wait_for_timeout(1500)  # charts re-lay themselves out to the new size
    pg.screenshot(path=str(path))
    pg.set_viewport_size(size)
    return str(path)


def _title(pg) -> str:
    return pg.locator(PROFILE_TITLE).first.text_content()  # an SVG text node has no innerText


def _redraw(pg, prepare, action) -> float:
    """Seconds from `action()` (the user's last click or key press; `prepare()`, such as opening a dropdown,
    runs before the clock starts) until the first chart's title changes."""
    prepare()
    before = _title(pg)
    t0 = time.perf_counter()
    action()
    pg.wait_for_function("(old) => { const e = document.querySelector(\"[data-testid='stPlotlyChart'] .gtitle\");"
                         " return e && e.textContent !== old; }", arg=before, timeout=60_000, polling=10)
    return time.perf_counter() - t0


def _layer_box(pg):
    return lambda: pg.locator("[data-testid='stSelectbox']", has_text="Layer").first.click()


def _pick_layer(pg, n: int):
    def act():
        options = pg.get_by_role("option")
        options.nth(n % options.count()).click()
    return act


def _timestep_thumb(pg):
    return lambda: pg.locator("[data-testid='stSlider']", has_text="Timestep").first.get_by_role("slider").focus()


def _step_timestep(pg, key: str):
    return lambda: pg.locator("[data-testid='stSlider']", has_text="Timestep").first.get_by_role("slider").press(key)


def _pick_model(pg, name: str) -> None:
    """Choose a bundled model in the sidebar (every page follows it)."""
    box = pg.locator("[data-testid='stSidebar'] [data-testid='stSelectbox']", has_text="Bundled model").first
    if name in box.inner_text():
        return
    box.click()
    pg.get_by_role("option", name=name, exact=True).click()
    _idle(pg)


def _walk(pg, out: dict, folder: Path, tag: str, repeats: int) -> None:
    """Salience (with redraw timings), Quantize, Sweep and Compare on the model chosen in the sidebar, one
    full-page screenshot of each in `folder`, named with `tag`."""
    open_page(pg, "Salience", "Salience")
    slider_to_min(pg, "DDIM steps")
    set_number(pg, "Calibration samples (classes cycle 0, 1, ...)", 2)
    pg.get_by_role("button", name="Collect").click()
    pg.get_by_text("layers x 5 timesteps").first.wait_for()
    _idle(pg)
    if repeats:
        layer = [_redraw(pg, _layer_box(pg), _pick_layer(pg, i + 1)) for i in range(repeats)]
        _idle(pg)
        timestep = [_redraw(pg, _timestep_thumb(pg), _step_timestep(pg, "ArrowLeft" if i % 2 else "ArrowRight"))
                    for i in range(repeats)]
        _idle(pg)
        out["layer_change_redraw_s"] = {"median": round(statistics.median(layer), 3),
                                        "all": [round(x, 3) for x in layer]}
        out["timestep_change_redraw_s"] = {"median": round(statistics.median(timestep), 3),
                                           "all": [round(x, 3) for x in timestep]}
    out["screenshots"][f"salience-{tag}"] = _shoot(pg, folder / f"salience-{tag}.png")

    open_page(pg, "Quantize", "Quantize")
    set_number(pg, "Calibration images", 2)
    set_number(pg, "Calibration DDIM steps", 5)
    pg.get_by_role("button", name="Quantize").click()
    pg.get_by_text("Median step error vs FP").first.wait_for()
    _idle(pg)
    out["screenshots"][f"quantize-{tag}"] = _shoot(pg, folder / f"quantize-{tag}.png")

    open_page(pg, "Sweep", "Sweep")
    for label in ("Methods", "Bit-widths"):
        box = pg.locator("[data-testid='stMultiSelect']", has_text=label).first
        box.locator("input").click()
        pg.keyboard.press("Backspace")
        pg.keyboard.press("Escape")
    set_number(pg, "Samples per point (N)", 16)
    set_number(pg, "DDIM steps", 2)
    set_number(pg, "Calibration images", 1)
    pg.get_by_role("button", name="Run sweep").click()
    pg.locator("[data-testid='stAlert']", has_text="is the cheapest setting").first.wait_for()
    _idle(pg)
    out["screenshots"][f"sweep-{tag}"] = _shoot(pg, folder / f"sweep-{tag}.png")

    open_page(pg, "Compare", "Compare variants")  # the session's variant is preselected
    set_number(pg, "Seeds per class", 1)
    slider_to_min(pg, "DDIM steps")
    pg.get_by_role("button", name="Compare").click()
    pg.get_by_role("button", name="Metrics as CSV").wait_for()
    _idle(pg)
    out["screenshots"][f"compare-{tag}"] = _shoot(pg, folder / f"compare-{tag}.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("app-screenshots"), help="folder for the screenshots")
    p.add_argument("--repeats", type=int, default=5, help="redraws timed per kind (default: %(default)s)")
    p.add_argument("--models", default="bundled:dit-mnist,bundled:unet-mnist",
                   help="bundled models to walk every page on, comma-separated (timings on the first)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    out: dict = {"screenshots": {}}
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    with tempfile.TemporaryDirectory() as home:
        t0 = time.perf_counter()
        proc, url = start_app(home)
        out["server_start_s"] = round(time.perf_counter() - t0, 3)  # launch to health check: imports warm
        try:
            with sync_playwright() as pw:
                browser = launch_chromium(pw)
                pg = browser.new_page(viewport={"width": 1400, "height": 1000})
                pg.set_default_timeout(300_000)
                t0 = time.perf_counter()
                pg.goto(url)
                pg.get_by_role("heading", name="quantizing diffusion transformers").first.wait_for()
                out["first_page_heading_s"] = round(time.perf_counter() - t0, 3)
                pg.get_by_role("button", name="Generate").wait_for()  # the model is loaded, its form usable
                out["first_page_controls_s"] = round(time.perf_counter() - t0, 3)
                pg.locator("[data-testid='stImage'] img").first.wait_for()
                out["first_grid_s"] = round(time.perf_counter() - t0, 3)
                _idle(pg)
                out["first_page_interactive_s"] = round(time.perf_counter() - t0, 3)
                # a later session (its own browser context): the Home grid is shared, not sampled again
                later_ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
                later = later_ctx.new_page()
                later.set_default_timeout(300_000)
                t1 = time.perf_counter()
                later.goto(url)
                later.locator("[data-testid='stImage'] img").first.wait_for()
                out["later_session_grid_s"] = round(time.perf_counter() - t1, 3)
                later_ctx.close()
                for i, model in enumerate(models):
                    tag = model.removeprefix("bundled:")
                    _pick_model(pg, model)
                    open_page(pg, "Home", "dqlab: quantizing diffusion transformers")
                    pg.locator("[data-testid='stImage'] img").first.wait_for()
                    _idle(pg)
                    out["screenshots"][f"home-{tag}"] = _shoot(pg, args.out / f"home-{tag}.png")
                    _walk(pg, out, args.out, tag, args.repeats if i == 0 else 0)
                browser.close()
        finally:
            stop_app(proc)
    out["targets"] = [
        {"target": "first page heading", "measured_s": out["first_page_heading_s"], "bound_s": 2.0,
         "met": out["first_page_heading_s"] < 2.0},
        {"target": "first grid, first session", "measured_s": out["first_grid_s"], "bound_s": 8.0,
         "met": out["first_grid_s"] < 8.0},
        {"target": "first grid, a later session", "measured_s": out["later_session_grid_s"], "bound_s": 2.0,
         "met": out["later_session_grid_s"] < 2.0},
        {"target": "layer change redraw (median)", "measured_s": out["layer_change_redraw_s"]["median"],
         "bound_s": 0.5, "met": out["layer_change_redraw_s"]["median"] < 0.5},
        {"target": "timestep change redraw (median)", "measured_s": out["timestep_change_redraw_s"]["median"],
         "bound_s": 0.5, "met": out["timestep_change_redraw_s"]["median"] < 0.5}]
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for t in out["targets"]:
        print(f"{t['target']:<36} {t['measured_s']:7.3f} s  (bound {t['bound_s']} s: {'met' if t['met'] else 'NOT met'})")
    print("screenshots: " + ", ".join(out["screenshots"].values()))


if __name__ == "__main__":
    main()
