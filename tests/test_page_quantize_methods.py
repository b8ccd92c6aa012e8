"""The Quantize page lists every registered method and offers the compositions, from the registry alone, and
shows what a rotation or a low-rank branch did."""
from __future__ import annotations

from streamlit.testing.v1 import AppTest


def test_quantize_page_lists_the_registry_and_shows_rotation_and_spectrum():
    from quant.methods import REGISTRY

    at = AppTest.from_file("../pages/quantize.py", default_timeout=900)
    at.run()
    assert not at.exception, at.exception
    assert set(at.selectbox(key="q_method").options) == {m.name for m in REGISTRY.values() if m.quantizes}
    at.selectbox(key="q_method").set_value("hadamard")
    at.run()
    assert "gptq" in at.multiselect(key="q_combine").options and "svdquant" in at.multiselect(key="q_combine").options
    at.multiselect(key="q_combine").set_value(["gptq"])
    at.run()
    keys = {w.key for kind in ("checkbox", "number_input") for w in at.get(kind) if w.key}
    assert {"q_hadamard_online", "q_gptq_block", "q_gptq_act_order"} <= keys and "q_rank" not in keys
    at.select_slider(key="q_w_bits").set_value(4)
    at.number_input(key="q_cal_samples").set_value(2)
    at.number_input(key="q_cal_steps").set_value(4)
    next(b for b in at.button if b.label == "Quantize").click()
    at.run()
    assert not at.exception, at.exception
    assert "hadamard+gptq W4A8" in at.session_state["variants"]
    titles = " | ".join(c.proto.spec for c in at.get("plotly_chart"))
    assert "after rotation" in titles
    assert any("round-to-nearest" in c.value for c in at.caption)

    at.multiselect(key="q_combine").set_value([])
    at.selectbox(key="q_method").set_value("svdquant")
    at.run()
    next(b for b in at.button if b.label == "Quantize").click()
    at.run()
    assert not at.exception, at.exception
    titles = " | ".join(c.proto.spec for c in at.get("plotly_chart"))
    assert "singular values of the smoothed weight" in titles
