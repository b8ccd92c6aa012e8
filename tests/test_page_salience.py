"""The Salience page, driven by AppTest on the bundled model with few steps and samples."""
from __future__ import annotations

import json

import pytest
from streamlit.testing.v1 import AppTest

PAGE = "../pages/salience.py"
FC2 = "transformer_blocks.2.ff.net.2"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _figures(at) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def _title(fig: dict) -> str:
    title = fig["layout"].get("title", {})
    return title.get("text", "") if isinstance(title, dict) else str(title)


def _collect(at, steps=5, samples=2, bits=(4,), pattern=""):
    [s for s in at.slider if s.label == "DDIM steps"][0].set_value(steps)
    at.number_input[0].set_value(samples)
    at.multiselect[0].set_value(list(bits))
    [t for t in at.text_input if t.label.startswith("Only layers")][0].set_value(pattern)
    at.button[0].click()
    at.run()


def test_salience_page_figures_selection_download_and_errors():
    at = AppTest.from_file(PAGE, default_timeout=600)
    at.run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Salience"
    assert any("Collect" in i.value for i in at.info)  # nothing collected yet: says what to do
    assert not at.get("plotly_chart")

    _collect(at)
    assert not at.exception, at.exception
    assert not at.error
    assert any("5 timesteps" in c.value and "collected in" in c.value for c in at.caption)
    figs = _figures(at)
    assert len(figs) == 6  # (a), (b), (c), (d), (e), (f)
    titles = [_title(f) for f in figs]
    assert "per-channel salience" in titles[0] and "quantization MSE at 4 bits" in titles[0]
    assert "Spearman" in titles[3] and "activation vs weight" in titles[4] and "Layers ranked" in titles[5]
    downloads = at.get("download_button")
    assert [d.proto.label for d in downloads] == ["This layer as CSV", "All layers as CSV", "Layer ranking as CSV"]
    stats = at.session_state["salience_stats"]
    assert len(stats) == 1
    collected = next(iter(stats.values()))
    assert len(collected.timesteps) == 5 and collected.mse_bits == (4,)
    # the page opens on the hardest layer of the ranking, and its error axes never reach below zero
    from analysis.salience.measures import layer_difficulty

    hardest = layer_difficulty(collected)["layer"].iloc[0]
    assert [s for s in at.selectbox if s.label == "Layer"][0].value == hardest
    assert hardest in titles[0]
    # salience and MSE axes start at zero (a weight-MSE axis not starting at zero misread the scale)
    assert all(figs[0]["layout"][ax]["rangemode"] == "tozero" for ax in ("yaxis", "yaxis2", "yaxis3", "yaxis4"))
    assert figs[0]["layout"]["yaxis2"]["tickformat"] == ".1e"  # MSE ticks: 2.6e-3, never 17.89u

    # choose another block and layer: the figures follow, nothing is collected again
    [s for s in at.selectbox if s.label == "Block"][0].set_value("block 2")
    at.run()
    [s for s in at.selectbox if s.label == "Layer"][0].set_value(FC2)
    at.run()
    assert not at.exception, at.exception
    figs = _figures(at)
    assert FC2 in _title(figs[0]) and FC2 in _title(figs[1]) and FC2 in _title(figs[4])
    # another timestep
    t_last = int(collected.timesteps[-1])
    at.select_slider[0].set_value(t_last)
    at.run()
    assert not at.exception, at.exception
    assert f"t={t_last}" in _title(_figures(at)[0])
    assert next(iter(at.session_state["salience_stats"].values())) is collected  # cached, not recollected

    # the same settings again: taken from the session, not collected again
    _collect(at)
    assert next(iter(at.session_state["salience_stats"].values())) is collected

    # bad input: a clear error, and the statistics collected before stay on screen
    _collect(at, pattern="([")
    assert not at.exception, at.exception
    assert any("regular expression" in e.value for e in at.error)
    assert len(_figures(at)) == 6
    _collect(at, pattern="no_such_layer")
    assert any("no layer of the model matches" in e.value for e in at.error)
    assert len(at.session_state["salience_stats"]) == 1


def test_salience_page_csv_content(bundled):
    """What the download buttons hand out: one row per timestep and channel, with the weight salience."""
    from analysis.salience.collect import SalienceConfig, collect

    stats = collect(bundled, SalienceConfig(steps=2, samples=1, per_sample=False, layers=r"blocks\.0\.ff"))
    text = stats.to_csv(["transformer_blocks.0.ff.net.2"]).decode().splitlines()
    header = text[0].split(",")
    assert header[:7] == ["layer", "block", "kind", "step", "timestep", "channel", "absmax"]
    assert "weight_absmax" in header and len(text) == 1 + 2 * 512


def test_number_formats_tab_draws_grids_and_errors_per_format():
    at = AppTest.from_file(PAGE, default_timeout=600)
    at.run()
    _collect(at)
    assert not at.exception, at.exception
    assert any("Compare formats" in i.value for i in at.info)  # on demand only
    [b for b in at.button if b.label == "Compare formats"][0].click()
    at.run()
    assert not at.exception, at.exception
    assert not at.error
    figs = _figures(at)
    assert len(figs) == 8  # (a)-(f) and the two format figures
    hist, err = figs[6], figs[7]
    assert "values each format can give it" in _title(hist)
    names = [t["name"] for t in err["data"]]
    assert names == ["int4", "fp4_e2m1", "mxfp4 (blocks of 32)", "nvfp4 (blocks of 16)"]
    assert [t["name"] for t in hist["data"][1:]] == ["int4", "fp4_e2m1", "mxfp4", "nvfp4"]
