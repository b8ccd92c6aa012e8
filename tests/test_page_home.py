from streamlit.testing.v1 import AppTest


def test_home_page_shows_digits():
    at = AppTest.from_file("../pages/home.py", default_timeout=180)
    at.run()
    assert not at.exception, at.exception
    assert "quantizing diffusion transformers" in at.title[0].value
    assert len(at.get("imgs")) == 1  # the digit grid
    assert any("DDIM steps" in c.value for c in at.caption)
    # a new guidance value through the form regenerates
    at.slider[0].set_value(20)
    at.button[0].click()
    at.run()
    assert not at.exception
    assert "20 DDIM steps" in at.get("imgs")[0].proto.imgs[0].caption
