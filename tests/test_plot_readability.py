"""What a reader sees on a projector, checked where a test can see it: tick text that reads as numbers, axis
ranges fitted to the data, titles short enough not to be cut, every layer labelled, neutral colours."""
from __future__ import annotations

import re

import numpy as np
import pytest

from analysis.plots import evaluation, quant, salience, sweep
from analysis.plots.axes import log_axis, nice_ticks, wrap
from analysis.salience.collect import SalienceStats


def _lines(text: str | None) -> list[str]:
    """Visible lines of a plotly title (tags such as <sup> removed)."""
    return [re.sub(r"<[^>]+>", "", part) for part in (text or "").split("<br>")]


def _tick_labels_are_their_numbers(axis) -> None:
    assert axis.tickmode == "array" and len(axis.tickvals) == len(axis.ticktext) >= 2
    for value, text in zip(axis.tickvals, axis.ticktext):
        assert float(text) == pytest.approx(value, rel=1e-3), (value, text)  # "0.2", never a bare "2"


@pytest.mark.parametrize("values", [[0.0026, 0.5], [0.04, 0.85], [1.0, 1.15], [3.0, 4000.0], [1e-5, 2e-5]])
def test_log_axis_ticks_read_as_numbers_and_fit_the_data(values):
    axis = log_axis(values, "t")
    lo, hi = axis["range"]
    assert lo <= np.log10(min(values)) and np.log10(max(values)) <= hi
    assert hi - lo < np.log10(max(values) / min(values)) + 0.5  # no decade of empty axis
    assert len(axis["tickvals"]) >= 2
    for value, text in zip(axis["tickvals"], axis["ticktext"]):
        assert float(text) == pytest.approx(value, rel=1e-3)
        assert min(values) / 1.01 <= value <= max(values) * 1.01


def test_nice_ticks_and_wrapped_titles():
    assert nice_ticks(0.0, 0.0893, 4) == [0.0, 0.025, 0.05, 0.075]
    text = wrap("transformer_blocks.0.attn1.qkv: CSB balancing b_j = sqrt(s~(X_j) / s(W_j))", 48)
    assert all(len(line) <= 48 for line in text.split("<br>")) and "sqrt(s~(X_j) / s(W_j))" in text


def test_quantize_page_figures_keep_titles_whole_and_ticks_round():
    b = np.r_[np.ones(60), np.linspace(1.0, 1.15, 68)]  # a dilation vector: values 1-1.15
    vec = quant.vector_figure(b, "transformer_blocks.0.attn1.qkv", "dilatequant")
    _tick_labels_are_their_numbers(vec.layout.yaxis)
    assert vec.layout.yaxis.range[1] < 0.1  # log10(1.15) = 0.06: not stretched to 10
    ssc = quant.ssc_figure({"timesteps": list(range(999, 0, -40)), "rho": list(np.linspace(-0.3, 0.6, 25)),
                            "eta": list(np.linspace(0.0249, 0.0893, 25))}, "transformer_blocks.3.ff.net.0.proj")
    assert all(re.fullmatch(r"0(\.\d{1,3})?", t) for t in ssc.layout.yaxis.ticktext)  # eta: 0, 0.025, ...
    assert ssc.data[-1].type == "scatter" and ssc.data[-1].yaxis == "y2"  # the rho line drawn above the bars
    names = [f"transformer_blocks.{i}.{n}" for i in range(6) for n in ("attn1.to_q", "attn1.to_out.0", "ff.net.2")]
    err = quant.layer_error_figure({n: 0.01 * (i + 1) for i, n in enumerate(names)})
    assert len(err.layout.xaxis.tickvals) == len(names)  # every layer labelled
    assert err.layout.yaxis.rangemode == "tozero"
    for fig in (vec, ssc, quant.salience_before_after({k: [1.0, 8.0, 2.0] for k in
                                                       ("x_before", "x_after", "w_before", "w_after")},
                                                      "transformer_blocks.0.attn1.qkv")):
        assert all(len(line) <= 60 for line in _lines(fig.layout.title.text)), fig.layout.title.text
    for fig in (vec, ssc):  # shown in half-width columns
        assert all(len(line) <= 48 for line in _lines(fig.layout.title.text)[:-1] or [""])


def test_compare_figures_keep_labels_apart_and_colours_calm():
    rows = [{"variant": v, "fid": f, "fid_interval": [f * 0.9, f * 1.1], "fid_floor": 3.7, "fid_vs_fp": fp,
             "fid_vs_fp_interval": [fp * 0.8, fp * 1.2] if fp else None, "label_agreement": a, "num_samples": 2048}
            for v, f, fp, a in (("FP", 55.0, 0.0, 0.97), ("ptq4dit W4A8", 58.0, 3.3, 0.96))]
    fig = evaluation.metrics_figure(rows)
    assert all(t.textposition == "inside" for t in fig.data)  # values clear of the error bars' caps
    assert fig.layout.annotations[-1].xanchor == "right" or "right" in str(fig.layout.annotations[-1])
    colours = {t.marker.color for t in fig.data}
    assert len(colours) == 3 and not any(c.lower() in ("red", "#d62728", "#ef553b") for c in colours)
    steps = [{"variant": "W4A8", "step": i, "t": 999 - 40 * i, "rel_rms": e}
             for i, e in enumerate([0.04, 0.05, 0.06, 0.08, 0.85])]
    line = evaluation.step_error_figure(steps)
    _tick_labels_are_their_numbers(line.layout.yaxis)


@pytest.fixture(scope="module")
def stats_with_a_dead_channel():
    rng = np.random.default_rng(0)
    T, C = 10, 64
    a = rng.random((T, 2, C), dtype=np.float32) + 0.5
    a[:, :, 3] = 0.0  # a channel that never fires
    a[:, :, 7] *= 20  # an outlier channel
    layers = [f"transformer_blocks.{b}.{n}" for b in range(6) for n in ("attn1.to_q", "ff.net.0.proj", "ff.net.2")]
    act = {k: a * (1 + i / 10) for i, k in enumerate(layers)}
    return SalienceStats(model="synthetic", timesteps=np.arange(T)[::-1] * 100, row_labels=np.array([-1, 10]),
                         row_seeds=np.array([-1, -1]), halves=["cond", "uncond"], null_label=10, act_absmax=act,
                         act_min={k: -v for k, v in act.items()}, act_max=act,
                         weight_absmax={k: rng.random(C, dtype=np.float32) + 0.1 for k in layers})


def test_salience_figures_for_a_projector(stats_with_a_dead_channel):
    stats = stats_with_a_dead_channel
    layer = "transformer_blocks.2.ff.net.0.proj"
    heat = salience.channel_timestep_heatmap(stats, layer)
    assert heat.data[0].zmin > -3  # the dead channel (log10 0 -> -12) does not stretch the colour scale
    box = salience.timestep_boxplot(stats, layer)
    assert box.layout.yaxis.type == "log"
    _tick_labels_are_their_numbers(box.layout.yaxis)
    overview = salience.layer_overview(stats)
    assert len(overview.layout.xaxis.tickvals) == len(stats.act_absmax)  # every layer labelled
    _tick_labels_are_their_numbers(overview.layout.yaxis)
    scatter = salience.complementarity_scatter(stats, layer, 0)
    _tick_labels_are_their_numbers(scatter.layout.xaxis)


def test_sensitivity_charts_label_every_unit():
    units = [f"transformer_blocks.{b}.ff.net.{n}" for b in range(6) for n in (0, 2)]
    sens = {"ranking": [{"unit": u, "error_only_this_quantized": 0.1 - i / 200, "error_all_but_this_quantized": 0.2,
                         "only_per_timestep": [0.1, 0.2], "all_but_per_timestep": [0.2, 0.3]}
                        for i, u in enumerate(units)],
            "timesteps": [999, 1], "all_quantized_mean": 0.3, "all_quantized_median": 0.25, "all_quantized": [0.2, 0.3],
            "w_bits": 4, "a_bits": 4, "method": "baseline", "granularity": "layer"}
    bars = sweep.sensitivity_bars(sens)
    assert len(bars.layout.yaxis.tickvals) == len(units) and "median over timesteps" in bars.layout.title.text
    heat = sweep.sensitivity_heatmap(sens)
    assert len(heat.layout.yaxis.tickvals) == len(units)
