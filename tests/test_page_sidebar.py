"""What every page shares: the sidebar (model source, device, dtype) with errors in the app's words, and an
opening with a collapsible 'why' holding formulas as math and a paper link."""
from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

PAGES = Path(__file__).resolve().parents[1] / "pages"


# home.py samples a grid of digits on open: slow (the other pages open without work)
@pytest.mark.parametrize("page", [pytest.param("home.py", marks=pytest.mark.slow), "salience.py", "quantize.py",
                                  "sweep.py", "compare.py"])
def test_every_page_opens_with_an_intro_and_the_math(page, tmp_path, monkeypatch):
    monkeypatch.setenv("DQLAB_HOME", str(tmp_path))
    at = AppTest.from_file(str(PAGES / page), default_timeout=300)
    at.run()
    assert not at.exception, at.exception
    why = [e for e in at.expander if e.label == "Why, and the math behind it"]
    assert len(why) == 1
    assert len(why[0].latex) >= 1 and all(x.value.strip() for x in why[0].latex)
    assert any("arxiv.org" in m.value for m in why[0].markdown)
    assert [s.label for s in at.sidebar.selectbox][-2:] == ["Device", "Precision of the FP model"]


def test_sidebar_errors_speak_the_app_s_words(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network: a hub id that is not cached fails at once
    monkeypatch.setenv("DQLAB_HOME", str(tmp_path))
    at = AppTest.from_file(str(PAGES / "salience.py"), default_timeout=300)
    at.run()
    at.sidebar.radio(key="_sb_kind").set_value("Hub id")
    at.run()
    at.sidebar.text_input(key="_sb_hub").set_value("nobody/no-such-dit")
    at.run()
    assert not at.exception, at.exception
    text = at.error[0].value
    assert "nobody/no-such-dit" in text and "Local folder" in text and "sidebar" in text
    assert "--model" not in text
    at.sidebar.text_input(key="_sb_hub").set_value("not a hub id")  # an id that cannot exist: said so, no folder talk
    at.run()
    assert "is not a hub id" in at.error[0].value and "does not exist" not in at.error[0].value
    at.sidebar.radio(key="_sb_kind").set_value("Local folder")
    at.run()
    at.sidebar.text_input(key="_sb_folder").set_value(str(tmp_path / "missing"))
    at.run()
    assert "does not exist" in at.error[0].value
    import torch

    if not torch.cuda.is_available():
        at.sidebar.radio(key="_sb_kind").set_value("Bundled")
        at.sidebar.selectbox(key="_sb_device").set_value("cuda")
        at.run()
        assert "choose **auto** or **cpu**" in at.error[0].value and "--device" not in at.error[0].value
