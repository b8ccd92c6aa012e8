import pytest
from streamlit.testing.v1 import AppTest


def _images(at):
    """Image elements; their type name is "image" in recent Streamlit and "imgs" in older releases."""
    return at.get("image") or at.get("imgs")


@pytest.mark.slow
def test_home_page_shows_digits():
    at = AppTest.from_file("../pages/home.py", default_timeout=180)
    at.run()
    assert not at.exception, at.exception
    assert "quantizing diffusion transformers" in at.title[0].value
    grids = _images(at)
    assert len(grids) == 1  # the digit grid
    assert "20 DDIM steps" in grids[0].proto.imgs[0].caption
    assert any("parameters" in c.value for c in at.caption)
    # a new guidance value through the form regenerates
    at.slider[0].set_value(30)
    at.button[0].click()
    at.run()
    assert not at.exception
    assert "30 DDIM steps" in _images(at)[0].proto.imgs[0].caption
