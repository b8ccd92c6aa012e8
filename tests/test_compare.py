"""Side-by-side sampling, per-timestep errors, evaluation of several variants, and the evaluation figures."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from analysis.evaluation.compare import FP_NAME, compare, grid_layout, image_errors, psnr, psnr_text


def _perturbed(bundle, scale: float, name: str):
    """A real second model: the FP transformer with its output projection scaled (a different network)."""
    tr = copy.deepcopy(bundle.denoiser)
    with torch.no_grad():
        tr.proj_out_2.weight.mul_(1 + scale)
    return bundle.with_denoiser(tr, name=name)


def test_compare_aligns_images_and_measures_errors(tiny_bundle):
    labels, seeds = grid_layout([1, 2, 3], 2)
    assert labels == [1, 2, 3, 1, 2, 3] and seeds == [0, 0, 0, 1, 1, 1]
    before = {k: v.clone() for k, v in tiny_bundle.denoiser.state_dict().items()}
    same = tiny_bundle.with_denoiser(copy.deepcopy(tiny_bundle.denoiser), name="copy")
    small, large = _perturbed(tiny_bundle, 0.05, "small"), _perturbed(tiny_bundle, 0.5, "large")
    seen = []
    cmp = compare(tiny_bundle, {"copy": same, "small": small, "large": large}, labels, seeds, steps=4, guidance=2.0,
                  on_progress=lambda stage, f: seen.append(f))
    assert cmp.names == [FP_NAME, "copy", "small", "large"]
    assert all(cmp.images[n].shape == (6, 3, 16, 16) for n in cmp.names)
    assert seen and seen[-1] == pytest.approx(1.0) and all(b >= a for a, b in zip(seen, seen[1:]))
    summary = {r["variant"]: r for r in cmp.summary()}
    # an identical copy reproduces FP exactly (same seeds), at every step
    assert summary["copy"]["mse_vs_fp"] == 0.0 and math.isinf(summary["copy"]["psnr_vs_fp"])
    assert psnr_text(summary["copy"]["psnr_vs_fp"]) == "identical" and psnr_text(summary[FP_NAME]["psnr_vs_fp"]) == "identical"
    assert all(r["rel_rms"] < 1e-12 for r in cmp.step_error if r["variant"] == "copy")
    # a bigger change gives bigger errors everywhere
    assert 0 < summary["small"]["mse_vs_fp"] < summary["large"]["mse_vs_fp"]
    assert summary["small"]["psnr_vs_fp"] > summary["large"]["psnr_vs_fp"]
    assert summary["copy"]["ssim_vs_fp"] == pytest.approx(1.0)
    assert 1.0 > summary["small"]["ssim_vs_fp"] > summary["large"]["ssim_vs_fp"]
    assert summary["small"]["same_digit_vs_fp"] is None  # no classifier for this model: no digits to compare
    step = lambda name: [r["rel_rms"] for r in cmp.step_error if r["variant"] == name]  # noqa: E731
    assert len(step("small")) == 4 and all(s < l for s, l in zip(step("small"), step("large")))
    drift = [r for r in cmp.drift if r["variant"] == "large"]
    assert [r["step"] for r in drift] == [0, 1, 2, 3] and drift[-1]["rel_rms_drift"] > 0
    assert [r["t"] for r in drift] == [r["t"] for r in cmp.step_error if r["variant"] == "large"]
    assert len([r for r in cmp.image_errors if r["variant"] == "small"]) == 6
    assert cmp.label_agreement is None  # only the bundled digit model has a classifier
    # speed beside quality: every model's forward timed on the same batch (2 x 6 rows: guidance doubles it)
    assert all(summary[n]["forward_ms"] > 0 and summary[n]["forward_rows"] == 12 for n in cmp.names)
    assert summary["copy"]["weights_mib"] == summary[FP_NAME]["weights_mib"] > 0
    # the shared FP model was not touched
    assert all(torch.equal(before[k], v) for k, v in tiny_bundle.denoiser.state_dict().items())


def test_compare_rejects_reserved_name_and_mismatched_models(tiny_bundle, bundled):
    with pytest.raises(ValueError, match="reserved"):
        compare(tiny_bundle, {FP_NAME: tiny_bundle}, [0], [0], steps=1)
    with pytest.raises(ValueError, match="does not match"):
        compare(tiny_bundle, {"other": bundled}, [0], [0], steps=1)


def test_psnr_and_image_errors():
    a = torch.zeros(2, 1, 4, 4)
    b = a.clone()
    b[1] += 0.1
    mse, ps = image_errors(a, b)
    assert mse == pytest.approx([0.0, 0.01])
    assert math.isinf(ps[0]) and ps[1] == pytest.approx(20.0)
    assert psnr(1.0) == pytest.approx(0.0)


def test_evaluate_variants_with_a_folder_reference(tiny_bundle, tmp_path):
    """A non-bundled model scored against a folder of 'real' images; FP sampled once and cached."""
    from PIL import Image

    from analysis.evaluation.evaluate import EvalOptions, evaluate_variants
    from analysis.evaluation.store import Store

    ref = tmp_path / "real"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    store = Store(tmp_path / "store")
    opts = EvalOptions(num_samples=12, steps=2, guidance=2.0, reference=str(ref), extractor="digits", bootstrap=20)
    variants = {"FP": None, "large": _perturbed(tiny_bundle, 0.5, "large")}
    res = evaluate_variants(tiny_bundle, variants, opts, store=store)
    fp, large = res
    assert fp.metrics["fid_vs_fp"] == 0.0 and large.metrics["fid_vs_fp"] > 0
    assert fp.metrics["fid"] is not None and fp.metrics["reference_size"] == 12  # half the 24: the other half floors
    assert large.metrics["num_samples"] == 12 and "2048" in large.metrics["warning"]
    assert fp.timings["fp_cached"] is False and large.config == {"method": "custom"}
    for r in res:  # every FID carries its interval, and FID vs real the real-vs-real floor at the same N
        lo, hi = r.metrics["fid_interval"]
        assert lo <= r.metrics["fid"] <= hi and r.metrics["fid_floor"] > 0 and r.metrics["floor_sizes"] == [12, 12]
        assert r.metrics["ssim_vs_fp_interval"][0] <= r.metrics["ssim_vs_fp"] <= 1.0
        # seconds: one meaning, the sum of the named parts
        parts = ("fp_sampling", "shared_scoring", "quantize_seconds", "sampling", "scoring")
        assert r.timings["total"] == pytest.approx(sum(r.timings.get(k, 0.0) for k in parts), abs=2e-3)
    lo, hi = large.metrics["fid_vs_fp_interval"]
    assert lo <= large.metrics["fid_vs_fp"] <= hi and fp.metrics["fid_vs_fp_interval"] == [0.0, 0.0]
    runs = store.list()
    assert [r.label for r in runs] == ["large", "FP"] and runs[0].fid == pytest.approx(large.metrics["fid"])
    assert runs[0].files["grid.png"].exists() and runs[0].files["fp_grid.png"].exists()
    again = evaluate_variants(tiny_bundle, {"FP": None}, opts, store=None)[0]
    assert again.metrics["fid"] == pytest.approx(fp.metrics["fid"])  # same seeds, same images
    # the cache lives in the store; without a store FP is sampled again, with it the cached copy is used
    cached = evaluate_variants(tiny_bundle, {"FP": None}, opts, store=store)[0]
    assert cached.timings["fp_cached"] is True and torch.equal(cached.images, fp.images)


def test_evaluate_without_reference_for_a_hub_style_model(tiny_bundle):
    from analysis.evaluation.evaluate import EvalOptions, evaluate_variants

    res = evaluate_variants(tiny_bundle, {"large": _perturbed(tiny_bundle, 0.5, "large")},
                            EvalOptions(num_samples=8, steps=2, extractor="digits", bootstrap=0))[0]
    assert res.metrics["fid"] is None and "no reference" in res.metrics["warning"]
    assert res.metrics["fid_vs_fp"] > 0


def test_figures(tiny_bundle):
    from analysis.plots.evaluation import drift_figure, metrics_figure, psnr_figure, step_error_figure

    labels, seeds = grid_layout([0, 1], 1)
    cmp = compare(tiny_bundle, {"a": _perturbed(tiny_bundle, 0.1, "a"), "b": _perturbed(tiny_bundle, 0.3, "b")},
                  labels, seeds, steps=3)
    fig = step_error_figure(cmp.step_error)
    assert [t.name for t in fig.data] == ["a", "b"] and list(fig.data[0].x) == [0, 1, 2]
    assert fig.layout.yaxis.type == "log"
    assert len(drift_figure(cmp.drift).data) == 2
    assert len(psnr_figure(cmp.image_errors).data) == 2
    rows = [{"variant": "FP", "fid": 10.0, "fid_interval": [9.0, 11.5], "fid_floor": 4.0, "fid_vs_fp": 0.0,
             "fid_vs_fp_interval": [0.0, 0.0], "label_agreement": 0.9, "num_samples": 512},
            {"variant": "a", "fid": 12.0, "fid_interval": [10.0, 14.0], "fid_floor": 4.0, "fid_vs_fp": 3.0,
             "fid_vs_fp_interval": [2.0, 4.5], "label_agreement": 0.8, "num_samples": 512}]
    mf = metrics_figure(rows)
    assert len(mf.data) == 3 and "N=512" in mf.layout.annotations[0].text
    # the intervals are error bars around the bars, the floor a line on the FID vs real panel
    assert list(mf.data[0].error_y.array) == [1.5, 2.0] and list(mf.data[0].error_y.arrayminus) == [1.0, 2.0]
    assert list(mf.data[1].error_y.array) == [0.0, 1.5]
    assert any("real vs real 4" in (a.text or "") for a in mf.layout.annotations)
    assert mf.layout.shapes and mf.layout.shapes[0].y0 == 4.0
    assert "2048" in mf.layout.title.text  # a warning for small N
    assert list(mf.data[0].y) == [10.0, 12.0]


def test_a_quantized_reference_is_named_as_what_it_is(tiny_bundle):
    """A saved quantized folder loaded as the model is the reference of a comparison: it is not called FP."""
    labels, seeds = grid_layout([0], 1)
    cmp = compare(tiny_bundle, {"b": _perturbed(tiny_bundle, 0.1, "b")}, labels, seeds, steps=1,
                  base_name="q/ (loaded, quantized)")
    assert cmp.names == ["q/ (loaded, quantized)", "b"] and "FP" not in cmp.images
