"""The Sweep page, driven by AppTest: a tiny grid measured, its front and recommendation shown, a repeat read
from the run store; the Sensitivity tab ranks layers and offers a mixed-precision config."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "sweep.py")


@pytest.fixture
def store_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DQLAB_HOME", str(tmp_path / "store"))
    return tmp_path / "store"


@pytest.mark.slow
def test_sweep_page_runs_a_grid_and_recommends(store_dir, one_torch_thread):
    at = AppTest.from_file(PAGE, default_timeout=600)
    at.run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Sweep"
    assert [t.label for t in at.tabs] == ["Sweep", "Sensitivity"]
    assert any("Run sweep" in i.value for i in at.info)
    at.multiselect(key="sw_methods").set_value(["baseline"])
    at.multiselect(key="sw_bits").set_value(["W8A8", "W4A4"])
    at.number_input(key="sw_n").set_value(16)
    at.number_input(key="sw_steps").set_value(3)
    at.number_input(key="sw_calib").set_value(1)
    at.button[0].click()
    at.run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert list(table["setting"]) == ["FP", "baseline W8A8", "baseline W4A4"]
    assert set(table["N"]) == {16} and set(table["source"]) == {"measured now"}
    assert table["GBOPs"].is_monotonic_decreasing  # FP, W8A8, W4A4
    assert (table["on front"] == "yes").any()
    assert len(at.get("plotly_chart")) == 2  # Pareto chart, per-timestep error
    # N = 16 and 3 steps: the recommendation is shown, hedged, with the reasons
    rec = next(w.value for w in at.warning if "cheapest setting" in w.value)
    assert "Tentative" in rec and "N = 16 is below 2048" in rec and "3 sampling steps" in rec
    assert any(d.proto.label == "Download this config (JSON)" for d in at.get("download_button"))
    # the same grid again comes from the run store
    at.button[0].click()
    at.run()
    assert not at.exception, at.exception
    assert set(at.dataframe[0].value["source"]) == {"run store"}
    # at a zero tolerance only FP itself qualifies
    at.number_input(key="sw_tol_fid_vs_fp").set_value(0.0)
    at.run()
    assert any(w.value.startswith("FP is the cheapest setting") for w in at.warning)


def test_sensitivity_tab_ranks_layers(store_dir, one_torch_thread):
    at = AppTest.from_file(PAGE, default_timeout=600)
    at.run()
    at.selectbox(key="se_gran").set_value("block")
    at.number_input(key="se_steps").set_value(3)
    at.number_input(key="se_samples").set_value(1)
    at.button[1].click()
    at.run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert list(table["rank"]) == list(range(1, 9))  # patch embedding, 6 blocks, final layer
    assert table["error only this quantized"].is_monotonic_decreasing
    assert any("3 sampling steps is below 10" in w.value for w in at.warning)  # few steps: said so
    assert any("Measured on 1 calibration image:" in w.value for w in at.warning)
    charts = at.get("plotly_chart")
    assert len(charts) == 2
    t = at.select_slider(key="se_t")
    t.set_value(t.options[-1])  # the last (least noisy) timestep re-ranks the bars at that timestep
    at.run()
    assert not at.exception, at.exception
    bars = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert "at t =" in bars["layout"]["title"]["text"]
