"""The Compare page, driven by AppTest: variants side by side, charts, metrics with N, and the History view."""
from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "compare.py")


@pytest.fixture
def store_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DQLAB_HOME", str(tmp_path / "store"))
    return tmp_path / "store"


@pytest.fixture(scope="module")
def w8a8_variant(bundled):
    """A real baseline W8A8 quantization of the bundled model (small calibration set)."""
    from analysis.quantization.pipeline import calibration_for, quantize_bundle
    from quant.api import QuantConfig

    cal = calibration_for(bundled, steps=5, num_samples=2)
    return quantize_bundle(bundled, QuantConfig(method="baseline", w_bits=8, a_bits=8), cal)


def _form_set(at, steps=5, seeds=1, fid_n=0):
    at.number_input[0].set_value(seeds)
    at.slider[0].set_value(steps)
    at.number_input[1].set_value(fid_n)


@pytest.mark.slow
def test_compare_page_side_by_side_and_history(store_dir, w8a8_variant, bundled):
    from analysis.app_state import model_key

    at = AppTest.from_file(PAGE, default_timeout=600)
    at.session_state["variants"] = {"W8A8 baseline": w8a8_variant}
    at.session_state["variant_origin"] = {"W8A8 baseline": model_key(bundled)}  # quantized from the FP model
    at.run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Compare variants"
    assert [t.label for t in at.tabs] == ["Compare", "History"]
    assert any("No stored runs yet" in i.value for i in at.info)
    assert at.multiselect[0].value == ["W8A8 baseline"]  # the session's variant, preselected
    assert at.slider(key="cmp_guidance").value == 1.5  # grids at the FID protocol's guidance
    _form_set(at, steps=5, seeds=1, fid_n=16)
    at.button[0].click()
    at.run()
    assert not at.exception, at.exception
    imgs = at.get("image") or at.get("imgs")  # the element's type name differs across Streamlit versions
    assert len(imgs) == 2  # FP and the variant, one above the other
    captions = [i.proto.imgs[0].caption for i in imgs]
    assert captions[0].startswith("FP") and "PSNR vs FP" in captions[1] and "label agreement" in captions[1]
    charts = at.get("plotly_chart")
    assert len(charts) == 4  # per-step error, drift, PSNR, metric bars
    assert any("2048" in w.value for w in at.warning)  # N=16 is flagged
    table = at.dataframe[0].value
    assert list(table["model"]) == ["FP", "W8A8 baseline"]
    assert set(table["FID N"]) == {16} and table["FID vs real"].notna().all()
    assert table.loc[table.model == "FP", "FID vs FP"].item() == 0.0
    # one label agreement per model, with its N (the FID samples'), and no number standing in for "identical"
    assert [c for c in table.columns if "agreement" in c] == ["label agreement", "label agreement N"]
    assert set(table["label agreement N"]) == {16}
    assert table.loc[table.model == "FP", "PSNR vs FP (grid)"].item() == "identical"
    labels = [d.proto.label for d in at.get("download_button")]
    assert labels == ["FP grid (PNG)", "W8A8 baseline grid (PNG)", "Metrics as CSV"]
    # the scored runs and the comparison went to the store; History lists them and reloads one
    from analysis.evaluation.store import Store

    runs = [r for r in Store(store_dir).list() if r.note != "comparison"]
    assert [r.label for r in runs] == ["W8A8 baseline", "FP"]
    assert [r.label for r in Store(store_dir).list() if r.note == "comparison"] == ["W8A8 baseline", "FP"]
    # the page's address now names the comparison and its settings
    assert at.query_params["cmp"] and at.query_params["steps"] in ("5", ["5"])
    # a reload (a new session with the same address) shows that comparison from the store, and the form as it was
    fresh = AppTest.from_file(PAGE, default_timeout=600)
    for key, value in at.query_params.items():
        fresh.query_params[key] = value[0] if isinstance(value, list) else value
    fresh.run()
    assert not fresh.exception, fresh.exception
    assert any("Your comparison" in i.value and "kept in the run store" in i.value for i in fresh.info)
    assert len(fresh.get("image") or fresh.get("imgs")) == 2
    assert list(fresh.dataframe[0].value["model"]) == ["FP", "W8A8 baseline"]
    assert fresh.slider(key="cmp_steps").value == 5 and fresh.number_input(key="cmp_fid_n").value == 16
    assert any(o.startswith("run #") and "W8A8 baseline" in o for o in fresh.multiselect[0].options)
    # another person's fresh session (no address) sees neither that comparison nor those runs
    other = AppTest.from_file(PAGE, default_timeout=600)
    other.run()
    assert not other.exception, other.exception
    assert not (other.get("image") or other.get("imgs")) and other.multiselect[0].options == []
    other.toggle(key="cmp_everyone").set_value(True)  # everyone's runs, behind a filter
    other.run()
    assert any(o.startswith("run #") and "W8A8 baseline" in o for o in other.multiselect[0].options)
    at.run()
    hist = at.dataframe[-1].value
    assert {r.id for r in runs} <= set(hist["run_id"])
    at.selectbox(key="hist_pick").set_value(runs[0].id)
    at.button(key="hist_reload").click()
    at.run()
    assert not at.exception, at.exception
    assert any("Run #" in s.value and "W8A8 baseline" in s.value for s in at.subheader)
    assert any("FID vs real (N=16)" in m.label for m in at.metric)
    # the stored run can be put into the comparison (it is then re-quantized from its config on Compare)
    at.button(key="hist_add").click()
    at.run()
    assert not at.exception, at.exception
    assert f"run #{runs[0].id} W8A8 baseline" in at.multiselect[0].value


def test_compare_page_filters_history(store_dir):
    from analysis.evaluation.store import RunRecord, Store

    store = Store(store_dir)
    for method in ("baseline", "ptq4dit"):
        store.add(RunRecord(model="bundled:dit-mnist", method=method, label=f"{method} W4A8",
                            config={"method": method, "w_bits": 4, "a_bits": 8}, num_samples=100,
                            seeds=list(range(100)), labels=[0] * 100, metrics={"fid": 5.0}, timings={"total": 1.0}))
    at = AppTest.from_file(PAGE, default_timeout=300)
    at.run()
    assert not at.exception, at.exception
    assert any("You have not stored a run" in i.value for i in at.info)  # others' runs stay behind the filter
    at.toggle(key="hist_everyone").set_value(True)
    at.run()
    assert len(at.dataframe[-1].value) == 2
    at.multiselect(key="hist_methods").set_value(["ptq4dit"])
    at.run()
    assert list(at.dataframe[-1].value["method"]) == ["ptq4dit"]
    at.number_input(key="hist_min_n").set_value(1000)
    at.run()
    assert at.dataframe[-1].value.empty
