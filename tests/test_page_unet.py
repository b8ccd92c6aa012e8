"""The pages on the bundled UNet (`bundled:unet-mnist`), driven by AppTest with few steps: Home draws its
digits, Salience collects conv layers, Quantize runs DilateQuant and says which layers were balanced."""
from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

UNET = "bundled:unet-mnist"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _page(name: str) -> AppTest:
    at = AppTest.from_file(f"../pages/{name}.py", default_timeout=600)
    at.session_state["model_bundled"] = UNET  # the sidebar's bundled-model choice
    return at


def test_home_page_samples_the_bundled_unet():
    at = _page("home")
    at.run()
    assert not at.exception, at.exception
    assert any("UNet" in c.value and "classes 0-9" in c.value for c in at.caption)
    images = at.get("image") or at.get("imgs")
    assert len(images) == 1


def test_salience_page_ranks_unet_conv_layers():
    at = _page("salience")
    at.run()
    [s for s in at.slider if s.label == "DDIM steps"][0].set_value(5)
    at.number_input[0].set_value(2)
    at.multiselect[0].set_value([4])
    at.button[0].click()
    at.run()
    assert not at.exception, at.exception
    assert not at.error
    stats = at.session_state["salience_stats"][at.session_state["salience_current"]]
    assert "down_blocks.0.resnets.0.conv1" in stats.weight_absmax
    assert len(at.get("plotly_chart")) == 6


def test_quantize_page_runs_dilatequant_and_lists_balanced_layers():
    at = _page("quantize")
    at.run()
    at.selectbox(key="q_method").set_value("dilatequant")
    at.select_slider(key="q_w_bits").set_value(4)
    at.number_input(key="q_cal_samples").set_value(2)
    at.number_input(key="q_cal_steps").set_value(4)
    next(b for b in at.button if b.label == "Quantize").click()
    at.run()
    assert not at.exception, at.exception
    v = at.session_state["variants"]["dilatequant W4A8 TPQ"]
    plan = v.report.balance
    assert plan["family"] == "unet" and 0 < plan["foldable_share"] < 1
    # DilateQuant dilates weights; it does not "balance", and the page says so; a UNet's inputs are not a transformer's
    assert any(e.label.startswith("Dilated layers:") for e in at.expander)
    assert not any("transformer" in m.value for m in at.markdown if "Calibration" in m.value)
    frames = at.dataframe
    assert any("SiLU" in " ".join(map(str, f.value["why"])) for f in frames if "why" in f.value)
