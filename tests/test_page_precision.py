"""The precision switch: results are keyed by (model, device, precision), so switching the FP model's
precision in the sidebar never shows a result of the other precision under either's name."""
from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

PAGES = Path(__file__).resolve().parents[1] / "pages"


def _caption(at) -> str:
    imgs = at.get("image") or at.get("imgs")
    return imgs[0].proto.imgs[0].caption


def test_home_grid_follows_the_precision(tmp_path, monkeypatch):
    monkeypatch.setenv("DQLAB_HOME", str(tmp_path))
    at = AppTest.from_file(str(PAGES / "home.py"), default_timeout=300)
    at.run()
    assert not at.exception, at.exception
    assert "float32" in _caption(at)
    at.sidebar.selectbox(key="_sb_dtype").set_value("bfloat16")
    at.run()
    assert not at.exception, at.exception
    assert "bfloat16" in _caption(at) and "float32" not in _caption(at)
    at.sidebar.selectbox(key="_sb_dtype").set_value("float32")
    at.run()
    assert "float32" in _caption(at)


def test_a_variant_stays_with_the_precision_it_was_quantized_from(tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.setenv("DQLAB_HOME", str(tmp_path))
    at = AppTest.from_file(str(PAGES / "quantize.py"), default_timeout=600)
    at.run()
    at.sidebar.selectbox(key="_sb_dtype").set_value("bfloat16")
    at.run()
    at.selectbox(key="q_method").set_value("baseline")
    at.number_input(key="q_cal_samples").set_value(1)
    at.number_input(key="q_cal_steps").set_value(4)
    next(b for b in at.button if b.label == "Quantize").click()
    at.run()
    assert not at.exception, at.exception
    assert list(at.session_state["variants"]) == ["baseline W8A8"]
    assert any("quantized from bundled:dit-mnist on cpu, bfloat16" in c.value for c in at.caption)
    at.sidebar.selectbox(key="_sb_dtype").set_value("float32")
    at.run()
    assert not at.exception, at.exception
    # the bfloat16 variant is not offered beside the float32 model: no picker, no metrics
    assert not [s for s in at.selectbox if s.key == "q_pick"]
    assert not at.metric
    # the same setting quantized from float32 is kept beside it, under a name that says which, not over it
    next(b for b in at.button if b.label == "Quantize").click()
    at.run()
    assert not at.exception, at.exception
    assert list(at.session_state["variants"]) == ["baseline W8A8", "baseline W8A8 (dit-mnist, float32)"]
    assert at.selectbox(key="q_pick").options == ["baseline W8A8 (dit-mnist, float32)"]
    at.sidebar.selectbox(key="_sb_dtype").set_value("bfloat16")
    at.run()
    assert at.selectbox(key="q_pick").options == ["baseline W8A8"]
