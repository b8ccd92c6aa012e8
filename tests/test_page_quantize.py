"""The Quantize page, driven by AppTest: a real PTQ4DiT W8A8 run on the bundled model, its figures, the variant
kept for Compare, and a bad option reported with st.error without losing the earlier result."""
from __future__ import annotations

import pytest

from streamlit.testing.v1 import AppTest


def _set_small_calibration(at):
    at.number_input(key="q_cal_samples").set_value(2)
    at.number_input(key="q_cal_steps").set_value(5)


def _submit(at):
    next(b for b in at.button if b.label == "Quantize").click()
    at.run()


@pytest.mark.slow
def test_quantize_page_runs_ptq4dit_and_keeps_the_variant():
    at = AppTest.from_file("../pages/quantize.py", default_timeout=600)
    at.run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Quantize"
    assert at.selectbox(key="q_method").value == "ptq4dit"
    assert at.select_slider(key="q_w_bits").value == 8 and at.select_slider(key="q_a_bits").value == 8
    _set_small_calibration(at)
    _submit(at)
    assert not at.exception, at.exception
    variants = at.session_state["variants"]
    assert list(variants) == ["ptq4dit W8A8"]
    v = variants["ptq4dit W8A8"]
    assert v.config.method == "ptq4dit" and v.report.calibration_rows == 2 * 5 * 2  # samples x steps x [c; u]
    assert v.bundle.quant_config["method"] == "ptq4dit"
    # the headline: median over steps of the per-step error, with the pooled value in its help
    headline = next(m for m in at.metric if m.label == "Median step error vs FP")
    assert float(headline.value) == round(v.report["rel_rms_step_median"], 4) and 0 < float(headline.value) < 1
    assert f"{v.report['rel_rms']:.4f}" in headline.proto.help
    charts = at.get("plotly_chart")
    # salience before/after, CSB vector, SSC weights, per-layer error, per-timestep error
    assert len(charts) == 5
    titles = " | ".join(c.proto.spec for c in charts)
    for part in ("before and after folding", "CSB balancing", "salience calibration", "per-layer", "per timestep"):
        assert part in titles, part
    group = at.selectbox(key="q_group").value
    assert group in v.report.salience

    # a second method reuses the calibration inputs and is added beside the first
    at.selectbox(key="q_method").set_value("baseline")
    _submit(at)
    assert not at.exception, at.exception
    assert list(at.session_state["variants"]) == ["ptq4dit W8A8", "baseline W8A8"]
    assert any("no vector" in i.value for i in at.info)  # plain PTQ folds nothing

    # a typo in the excluded layers is an error; earlier variants and their figures stay
    at.text_input(key="q_exclude").set_value("transformer_blocks.99")
    _submit(at)
    assert not at.exception, at.exception
    assert any("transformer_blocks.99" in e.value and "matches no layer" in e.value for e in at.error)
    assert list(at.session_state["variants"]) == ["ptq4dit W8A8", "baseline W8A8"]
    assert len(at.get("plotly_chart")) >= 3


@pytest.mark.slow
def test_quantize_page_download_zip_loads_again(tmp_path):
    import io
    import zipfile

    from analysis.models.loading import load

    at = AppTest.from_file("../pages/quantize.py", default_timeout=600)
    at.run()
    _set_small_calibration(at)
    at.selectbox(key="q_method").set_value("dilatequant")
    at.select_slider(key="q_w_bits").set_value(4)
    _submit(at)
    assert not at.exception, at.exception
    assert list(at.session_state["variants"]) == ["dilatequant W4A8 TPQ"]
    at.button(key="q_prepare").click()
    at.run()
    assert not at.exception, at.exception
    (_, data) = at.session_state["q_zip"]
    zipfile.ZipFile(io.BytesIO(data)).extractall(tmp_path)
    bundle = load(str(tmp_path / "model"))
    assert bundle.quant_config["method"] == "dilatequant" and bundle.quant_config["w_bits"] == 4


@pytest.mark.slow
def test_quantize_page_reconstruction_section():
    at = AppTest.from_file("../pages/quantize.py", default_timeout=600)
    at.run()
    _set_small_calibration(at)
    assert at.selectbox(key="q_recon").value == "none"
    at.select_slider(key="q_w_bits").set_value(4)
    at.selectbox(key="q_recon").set_value("adaround")
    at.number_input(key="q_recon_iters").set_value(3)
    at.number_input(key="q_recon_rows").set_value(8)
    at.number_input(key="q_recon_batch").set_value(4)
    _submit(at)
    assert not at.exception, at.exception
    v = at.session_state["variants"]["ptq4dit W4A8 +AdaRound"]
    recon = v.report.recon
    assert v.config.recon == "adaround" and recon["rows"] == 8 and len(recon["units"]) == 14
    assert any(h.value == "Reconstruction" for h in at.subheader)
    titles = " | ".join(c.proto.spec for c in at.get("plotly_chart"))
    assert "training loss per unit" in titles and "per-block output error before vs after" in titles
    assert any("trained units closer to FP" in c.value for c in at.caption)


def test_quantize_form_shows_only_the_chosen_methods_options():
    """The form is drawn from QuantConfig and the method registry: each method's own options appear only
    when it is chosen, and options no face had before (symmetric, per-channel, percentile) are settable."""
    from analysis.quantization.calibration import CALIBRATION_SEED

    at = AppTest.from_file("../pages/quantize.py", default_timeout=600)
    at.run()
    keys = lambda: {w.key for kind in ("checkbox", "selectbox", "number_input", "select_slider", "text_input")  # noqa: E731
                    for w in at.get(kind) if w.key}
    shown = keys()
    assert {"q_ssc", "q_ssc_rho"} <= shown and "q_alpha" not in shown  # ptq4dit first
    assert {"q_w_symmetric", "q_a_symmetric", "q_w_per_channel", "q_scale_search"} <= shown
    assert "q_percentile" not in shown  # the percentile box appears only when the range search uses it
    at.selectbox(key="q_scale_search").set_value("percentile")
    at.run()
    assert "q_percentile" in keys()
    at.selectbox(key="q_scale_search").set_value("minmax")
    at.run()
    at.selectbox(key="q_method").set_value("smoothquant")
    at.run()
    shown = keys()
    assert "q_alpha" in shown and not {"q_ssc", "q_ssc_rho"} & shown
    at.selectbox(key="q_method").set_value("baseline")
    at.run()
    assert not {"q_alpha", "q_ssc", "q_ssc_rho"} & keys()
    assert at.number_input(key="q_recon_lr").value is None
    assert at.number_input(key="q_recon_lr").proto.placeholder == "default"  # an empty box says what it means
    at.selectbox(key="q_method").set_value("smoothquant")
    at.run()
    at.number_input(key="q_alpha").set_value(0.25)
    at.checkbox(key="q_w_symmetric").check()
    _set_small_calibration(at)
    _submit(at)
    assert not at.exception, at.exception
    v = at.session_state["variants"]["smoothquant W8A8 alpha=0.25"]  # a changed method option names the variant
    assert v.config.options == {"alpha": 0.25} and v.config.w_symmetric
    assert v.recipe.calibration.seed == CALIBRATION_SEED  # the page calibrates away from the evaluated seeds


def test_quantize_page_number_formats():
    """The format fields come from QuantConfig: a format whose bits do not match is one error line, a valid one
    quantizes and names its format in the variant."""
    at = AppTest.from_file("../pages/quantize.py", default_timeout=600)
    at.run()
    at.selectbox(key="q_method").set_value("baseline")
    at.run()
    _set_small_calibration(at)
    at.selectbox(key="q_w_format").set_value("nvfp4")
    _submit(at)
    assert not at.exception, at.exception
    assert any("nvfp4 holds 4-bit elements but w_bits is 8" in e.value for e in at.error)
    assert "variants" not in at.session_state or not at.session_state["variants"]
    at.select_slider(key="q_w_bits").set_value(4)
    at.selectbox(key="q_a_format").set_value("fp8_e4m3")
    _submit(at)
    assert not at.exception, at.exception
    v = at.session_state["variants"]["baseline W4A8 w:nvfp4 a:fp8_e4m3"]
    assert v.config.w_spec.group == 16 and v.report["weight_bytes"] > 0
