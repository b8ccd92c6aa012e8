"""The pages on a tiny random PixArt-sigma pipeline folder, driven by AppTest: the sidebar takes prompts where a class
model shows classes; Home draws one column per prompt, Salience adds the token view of cross-attention's k/v input,
Quantize calibrates and lists the PixArt fold sites."""
from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPTS = "a red car\na photo of a cat"


def _page(name: str, folder) -> AppTest:
    at = AppTest.from_file(f"../pages/{name}.py", default_timeout=600)
    at.session_state["model_kind"] = "Local folder"
    at.session_state["model_folder"] = str(folder)
    at.session_state["prompts_text"] = PROMPTS
    at.session_state["negative_prompt"] = "blurry"
    return at


def test_home_page_samples_one_column_per_prompt(pixart_folder):
    at = _page("home", pixart_folder)
    at.run()
    assert not at.exception, at.exception
    assert [t.value for t in at.sidebar.text_area] == [PROMPTS]
    assert any("text encoder and VAE stay FP" in c.value for c in at.caption)
    image = (at.get("image") or at.get("imgs"))[0]
    assert "a red car" in str(image.proto) and "a photo of a cat" in str(image.proto)


def test_salience_page_collects_with_prompts_and_shows_token_salience(pixart_folder):
    at = _page("salience", pixart_folder)
    at.run()
    assert not at.exception, at.exception
    [s for s in at.slider if s.label == "DDIM steps"][0].set_value(5)
    at.number_input[0].set_value(2)
    at.multiselect[0].set_value([8])
    at.button[0].click()
    at.run()
    assert not at.exception, at.exception
    assert not at.error
    stats = at.session_state["salience_stats"][at.session_state["salience_current"]]
    assert stats.info["prompts"] == PROMPTS.splitlines() and stats.info["negative_prompt"] == "blurry"
    assert any("Token salience" in s.value for s in at.subheader)
    assert len(at.get("plotly_chart")) == 7  # six salience figures and the token view


def test_quantize_page_calibrates_on_the_sidebar_prompts_and_lists_pixart_fold_sites(pixart_folder):
    at = _page("quantize", pixart_folder)
    at.run()
    at.selectbox(key="q_method").set_value("ptq4dit")
    at.select_slider(key="q_w_bits").set_value(4)
    at.number_input(key="q_cal_samples").set_value(2)
    at.number_input(key="q_cal_steps").set_value(3)
    at.checkbox(key="q_own_prompts").check()
    next(b for b in at.button if b.label == "Quantize").click()
    at.run()
    assert not at.exception, at.exception
    v = at.session_state["variants"]["ptq4dit W4A8"]
    assert v.recipe.calibration.prompts == tuple(PROMPTS.splitlines())
    assert v.recipe.calibration.negative_prompt == "blurry"
    plan = v.report["balance"]
    assert plan["family"] == "pixart" and "attn1.qkv (all blocks)" in [g["group"] for g in plan["balanced"]]
    frames = at.dataframe
    assert any("PixArt" in " ".join(map(str, f.value["why"])) for f in frames if "why" in f.value)
