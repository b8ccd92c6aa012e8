"""Salience figures on DiT-XL/2's block shape (width 1152, 16 heads x 72, MLP 4608) with few blocks and steps,
and on synthetic statistics at DiT-XL/2's full size (250 steps, 4608 channels): titles, axes, hovers, sizes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.plots import salience as figs
from analysis.salience.collect import SalienceConfig, SalienceStats, collect

FC1 = "transformer_blocks.1.ff.net.0.proj"  # 1152 input channels
FC2 = "transformer_blocks.1.ff.net.2"  # 4608 input channels
ADALN = "transformer_blocks.0.norm1.linear"
SOFTMAX = "transformer_blocks.0.attn1.softmax"  # one channel per head, no weight
Q_OPERAND = "transformer_blocks.0.attn1.q"


@pytest.fixture(scope="module")
def xl_stats():
    """One collecting pass of a random diffusers DiT with DiT-XL/2's blocks (2 of its 28), on a 4x4 latent."""
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    from analysis.models.bundle import ModelBundle

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a shared machine wait on each other
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=4, patch_size=2, num_embeds_ada_norm=1000).eval()
    bundle = ModelBundle(name="random DiT-XL/2 blocks", denoiser=model,
                         scheduler_config=dict(DDIMScheduler(num_train_timesteps=1000).config), num_classes=1000,
                         latent_shape=(4, 4, 4), default_guidance=1.5)
    stats = collect(bundle, SalienceConfig(steps=3, samples=2, mse_bits=(4, 8), attention=True, per_sample=False))
    torch.set_num_threads(threads)
    return stats


@pytest.fixture(scope="module")
def full_size_stats():
    """Synthetic statistics of DiT-XL/2's size at 250 steps: 28 blocks x (fc1 1152, fc2 4608) channels."""
    rng = np.random.default_rng(0)
    T = 250
    act, weights = {}, {}
    for b in range(28):
        for name, C in (("ff.net.0.proj", 1152), ("ff.net.2", 4608)):
            key = f"transformer_blocks.{b}.{name}"
            a = rng.random((T, 2, C), dtype=np.float32) + 0.5
            a[:, :, rng.integers(0, C, 4)] *= 30  # a few outlier channels
            act[key], weights[key] = a, rng.random(C, dtype=np.float32) + 0.1
    return SalienceStats(model="synthetic DiT-XL/2", timesteps=np.arange(T)[::-1] * 4, row_labels=np.array([-1, 1000]),
                         row_seeds=np.array([-1, -1]), halves=["cond", "uncond"], null_label=1000, act_absmax=act,
                         act_min={k: -v for k, v in act.items()}, act_max=act, weight_absmax=weights)


def _hovers(fig) -> str:
    return " ".join(str(getattr(tr, "hovertemplate", "") or "") for tr in fig.data)


def _titles(fig) -> tuple[str, str, str]:
    return fig.layout.title.text or "", fig.layout.xaxis.title.text or "", fig.layout.yaxis.title.text or ""


@pytest.mark.slow
def test_xl_block_shape_is_recorded(xl_stats):
    assert xl_stats.act_absmax[FC1].shape[-1] == 1152 and xl_stats.act_absmax[FC2].shape[-1] == 4608
    assert xl_stats.act_absmax[SOFTMAX].shape[-1] == 16 and SOFTMAX not in xl_stats.weight_absmax
    assert len(xl_stats.timesteps) == 3 and xl_stats.halves == ["cond", "uncond"]


@pytest.mark.parametrize("layer", [FC1, FC2, ADALN, Q_OPERAND])
def test_channel_profile(xl_stats, layer):
    fig = figs.channel_profile(xl_stats, layer, step=1, bits=4)
    title, _, _ = _titles(fig)
    assert layer in title and f"t={xl_stats.timesteps[1]}" in title
    assert fig.layout.xaxis2.title.text == "input channel j"
    assert "activation units" in fig.layout.yaxis.title.text
    hover = _hovers(fig)
    assert all(word in hover for word in ("layer", "channel", "timestep"))
    traces, points = figs.figure_size(fig)
    assert traces <= 4  # one line per quantity, whatever the channel count
    C = xl_stats.act_absmax[layer].shape[-1]
    assert points <= 4 * C
    if layer == Q_OPERAND:  # no weight: the lower panel says why instead of drawing
        assert traces == 1 and any("no weight" in a.text for a in fig.layout.annotations)
    else:
        names = [tr.name for tr in fig.data]
        assert names == ["max|X_j|", "activation MSE (A4)", "max|W_j|", "weight MSE (W4)"]
        assert "MSE" in fig.layout.yaxis2.title.text


def test_channel_profile_without_collected_bits(xl_stats):
    fig = figs.channel_profile(xl_stats, FC1, step=0, bits=6)
    assert "no 6-bit error collected" in fig.layout.title.text
    assert len(fig.data) == 2


@pytest.mark.parametrize("layer", [FC2, SOFTMAX])
def test_timestep_boxplot(xl_stats, layer):
    fig = figs.timestep_boxplot(xl_stats, layer, split_halves=True)
    title, xlab, ylab = _titles(fig)
    assert layer in title and "timestep" in xlab and "activation units" in ylab
    assert len(fig.data) == 4  # a box and a top-channel marker per half
    assert "channel" in _hovers(fig) and "layer" in _hovers(fig)
    # boxes are drawn from quartiles: no raw channel values travel to the browser
    assert all(getattr(tr, "y", None) is None for tr in fig.data if tr.type == "box")


def test_channel_timestep_heatmap_caps_channels(xl_stats):
    fig = figs.channel_timestep_heatmap(xl_stats, FC2, max_channels=256)
    title, xlab, ylab = _titles(fig)
    assert "top 256 of 4608 channels" in title and "timestep" in xlab and "channel" in ylab
    assert len(fig.data) == 1 and np.asarray(fig.data[0].z).shape == (256, 3)
    assert all(word in _hovers(fig) for word in ("layer", "timestep", "max|X_j|"))
    shown = [int(s.split()[1]) for s in fig.data[0].y]
    peak = xl_stats.channel_salience(FC2).max(axis=0)
    assert peak[shown].min() >= np.sort(peak)[-256]  # the most salient channels, in channel order
    assert shown == sorted(shown)


def test_spearman_over_timesteps(xl_stats):
    few = figs.spearman_over_timesteps(xl_stats, [FC1, FC2])
    assert [tr.type for tr in few.data] == ["scatter", "scatter"]
    assert "Spearman" in few.layout.title.text and "rho" in few.layout.yaxis.title.text
    assert "timestep" in few.layout.xaxis.title.text
    assert all(word in _hovers(few) for word in ("layer", "timestep", "rho"))
    every = figs.spearman_over_timesteps(xl_stats)  # every linear layer (more than 12): one heatmap
    assert len(every.data) == 1 and every.data[0].type == "heatmap"
    assert np.asarray(every.data[0].z).shape[0] == len(xl_stats.weight_absmax)
    with pytest.raises(ValueError, match="linear layer"):
        figs.spearman_over_timesteps(xl_stats, [SOFTMAX])


def test_complementarity_scatter(xl_stats):
    fig = figs.complementarity_scatter(xl_stats, FC2, step=2)
    title, xlab, ylab = _titles(fig)
    assert FC2 in title and "Spearman rho" in title and "max|X_j|" in xlab and "max|W_j|" in ylab
    assert len(fig.data) == 2 and len(fig.data[0].x) == 4608  # one marker per channel, in one trace
    assert all(word in _hovers(fig) for word in ("layer", "channel", "timestep"))
    with pytest.raises(ValueError, match="no weight"):
        figs.complementarity_scatter(xl_stats, SOFTMAX, step=0)


def test_layer_overview(xl_stats):
    fig = figs.layer_overview(xl_stats)
    title, xlab, ylab = _titles(fig)
    assert f"{len(xl_stats.layers)} layers" in title and "layer" in xlab and "ratio" in ylab
    n_kinds = len({k for k in xl_stats.layer_frame()["kind"]})
    assert len(fig.data) == n_kinds + 1  # one bar trace per kind, one weight marker trace
    assert sum(len(tr.x) for tr in fig.data if tr.type == "bar") == len(xl_stats.layers)
    assert "layer" in _hovers(fig) and "block" in _hovers(fig)


@pytest.mark.slow
def test_full_dit_xl2_size_stays_small(full_size_stats):
    """250 steps x up to 4608 channels x 56 layers: every figure keeps a handful of traces and bounded data."""
    st = full_size_stats
    layer = "transformer_blocks.27.ff.net.2"
    built = {"a": figs.channel_profile(st, layer, step=100), "b": figs.timestep_boxplot(st, layer),
             "c": figs.channel_timestep_heatmap(st, layer), "d": figs.spearman_over_timesteps(st),
             "e": figs.complementarity_scatter(st, layer, step=100), "f": figs.layer_overview(st)}
    sizes = {k: figs.figure_size(f) for k, f in built.items()}
    assert all(traces <= 12 for traces, _ in sizes.values()), sizes
    assert sizes["c"][1] <= 512 * 250  # heatmap capped at 512 channels
    assert sizes["b"][1] <= 2 * 250  # quartiles and one marker per timestep
    assert sizes["d"][1] == 56 * 250  # one heatmap row per layer rather than 56 line traces
    for k, f in built.items():
        assert len(f.to_json()) < 3_000_000, k  # what the browser receives per figure
