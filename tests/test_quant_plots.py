"""Quantization figures: built from a real report of a tiny model and from hand-made values (titles, axes,
hover, log scales, channel order), and from a report read back from JSON."""
from __future__ import annotations

import json

import numpy as np
import pytest

from analysis.plots.quant import (
    layer_error_figure,
    salience_before_after,
    ssc_figure,
    timestep_error_figure,
    vector_figure,
)


@pytest.fixture(scope="module")
def report(tiny_bundle):
    from analysis.quantization.pipeline import calibration_for, quantize_bundle
    from quant.api import QuantConfig

    cal = calibration_for(tiny_bundle, steps=3, num_samples=2)
    return quantize_bundle(tiny_bundle, QuantConfig(method="ptq4dit", w_bits=4, a_bits=8), cal).report


def test_a_report_survives_json_and_reads_back_typed(report):
    from analysis.quantization.report import QuantReport

    again = QuantReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again == report  # timestep keys come back as ints, every field as it was
    assert again.rel_rms_per_timestep and all(isinstance(t, int) for t in again.rel_rms_per_timestep)


def test_every_figure_draws_from_a_real_report_and_its_json(report):
    for r in (report.to_dict(), json.loads(json.dumps(report.to_dict()))):  # int timestep keys become strings
        group = next(iter(r["salience"]))
        figs = [salience_before_after(r["salience"][group], group),
                vector_figure(r["vectors"][group], group, "ptq4dit"),
                ssc_figure(r["ssc"][group], group), layer_error_figure(r["layer_error"]),
                timestep_error_figure(r["rel_rms_per_timestep"])]
        for fig in figs:
            assert fig.layout.title.text and fig.data
            assert all(t.hovertemplate for t in fig.data)
        assert len(figs[4].data[0].x) == len(r["rel_rms_per_timestep"]) == 3


def test_salience_panels_log_scale_and_sorted_channels():
    sal = {"x_before": [1.0, 8.0, 2.0, 2.0], "x_after": [1.0, 2.0, 2.0, 2.0],
           "w_before": [0.5, 0.1, 0.5, 0.5], "w_after": [0.5, 0.4, 0.5, 0.5]}
    fig = salience_before_after(sal, "transformer_blocks.0.attn1.qkv")
    assert [t.name for t in fig.data] == ["max|X_j| before", "max|X_j| after", "max|W_j| before", "max|W_j| after"]
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis2.type == "log"
    assert fig.layout.yaxis.title.text == "activation units" and fig.layout.xaxis2.title.text == "input channel j"
    titles = [a.text for a in fig.layout.annotations]
    assert "max/median 4.0 before, 1.0 after" in titles[0]  # median of [1, 2, 2, 8] is 2
    sorted_fig = salience_before_after(sal, "g", sort=True)
    assert list(sorted_fig.data[0].y[:2]) == [8.0, 2.0] and list(sorted_fig.data[0].customdata[:1]) == [1]
    assert "channel %{customdata}" in sorted_fig.data[0].hovertemplate  # hover names the real channel
    dead = salience_before_after({k: [0.0, 1.0] for k in sal}, "g")
    assert min(dead.data[0].y) > 0  # zeros are drawn at a floor on the log axis


def test_vector_figure_counts_changed_channels_and_marks_one():
    fig = vector_figure(np.array([1.0, 1.0, 2.5, 1.2]), "transformer_blocks.1.ff.net.0.proj", "dilatequant")
    assert "weight dilation" in fig.layout.title.text and "2 of 4 channels changed" in fig.layout.title.text
    assert fig.layout.yaxis.type == "log" and list(fig.data[-1].y) == [1.0, 1.0]  # b = 1 marked
    lo, hi = fig.layout.yaxis.range  # fitted to the data (log10 units), not a fixed decade
    assert lo <= 0.0 and np.log10(2.5) <= hi < 0.6
    assert "b = %{y" in fig.data[0].hovertemplate


def test_ssc_figure_bars_are_the_weights():
    fig = ssc_figure({"timesteps": [999, 500, 1], "rho": [0.9, 0.1, -0.2], "eta": [0.2, 0.37, 0.43]}, "g")
    bars = next(t for t in fig.data if t.type == "bar")
    assert list(bars.y) == [0.2, 0.37, 0.43] and list(bars.x) == ["999", "500", "1"]
    assert "softmax(-rho)" in fig.layout.yaxis.title.text  # bars below, the rho line on the top axis
    assert fig.layout.yaxis2.title.text == "Spearman rho" and fig.data[-1].yaxis == "y2"


def test_layer_error_bars_keep_model_order_and_name_the_worst():
    err = {"pos_embed.proj": 0.01, "transformer_blocks.0.attn1.to_q": 0.05, "transformer_blocks.0.ff.net.2": 0.2,
           "proj_out_2": 0.03}
    fig = layer_error_figure(err)
    # readable names and kinds from the family table (quant.families)
    assert list(fig.layout.xaxis.categoryarray) == ["patch embed", "block 0 · attn q", "block 0 · MLP fc2", "final out"]
    assert "worst: transformer_blocks.0.ff.net.2" in fig.layout.title.text
    assert [t.name for t in fig.data] == ["patch_embed", "qkv", "fc2", "final"]
    assert fig.layout.yaxis.title.text == "||Y_q - Y|| / ||Y||"


def test_timestep_error_one_line_per_variant_noisiest_first():
    fig = timestep_error_figure({"a": {1: 0.5, 999: 0.1}, "b": {"1": 0.4, "999": 0.2}})
    assert [t.name for t in fig.data] == ["a", "b"] and list(fig.data[0].x) == ["999", "1"]
    assert fig.layout.yaxis.type == "log" and fig.layout.showlegend
    single = timestep_error_figure({999: 0.1, 1: 0.5}, log=False)
    assert single.layout.yaxis.type in (None, "linear") and not single.layout.showlegend
    # one variant: its median over steps (the headline error) is drawn on the curve
    median = next(t for t in single.data if t.name == "median over steps")
    assert list(median.y) == [0.3, 0.3]


def test_ssc_figure_draws_timesteps_in_sampling_order_as_its_axis_says():
    """The method stores one entry per timestep in ascending t; the axis says noisiest (largest t) left, so
    the figure reorders them (rho and eta move with their timestep)."""
    fig = ssc_figure({"timesteps": [1, 500, 999], "rho": [-0.2, 0.1, 0.9], "eta": [0.43, 0.37, 0.2]}, "g")
    bars = next(t for t in fig.data if t.type == "bar")
    line = next(t for t in fig.data if t.type == "scatter")
    assert list(bars.x) == ["999", "500", "1"] and list(bars.y) == [0.2, 0.37, 0.43]
    assert list(line.y) == [0.9, 0.1, -0.2]
    assert "noisiest (largest t) left" in fig.layout.xaxis.title.text
