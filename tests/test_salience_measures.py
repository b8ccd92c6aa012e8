"""Derived salience measures: rank correlation against scipy, quantization error, variability, difficulty."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as sps

from analysis.salience.channel_error import activation_quant_mse, activation_quant_mse_bits, weight_quant_mse
from analysis.salience.collect import SalienceConfig, SalienceStats, collect, layer_menu
from analysis.salience.measures import (
    layer_difficulty,
    outlier_ratio,
    profile_by_kind,
    quant_error,
    rankdata,
    spearman,
    spearman_by_timestep,
    temporal_variability,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_stats(act: dict[str, np.ndarray], weights: dict[str, np.ndarray], timesteps=None) -> SalienceStats:
    """Statistics from given activation saliences [T, R, C] (two rows: cond, uncond) and weight saliences [C]."""
    T = next(iter(act.values())).shape[0]
    timesteps = np.arange(T)[::-1] * 10 if timesteps is None else np.asarray(timesteps)
    return SalienceStats(model="synthetic", timesteps=timesteps.astype(np.int64), row_labels=np.array([-1, 10]),
                         row_seeds=np.array([-1, -1]), halves=["cond", "uncond"], null_label=10,
                         act_absmax={k: v.astype(np.float32) for k, v in act.items()},
                         act_min={k: -v.astype(np.float32) for k, v in act.items()},
                         act_max={k: v.astype(np.float32) for k, v in act.items()},
                         weight_absmax={k: v.astype(np.float32) for k, v in weights.items()})


# ---- rank correlation ---------------------------------------------------------------------------------
def test_rankdata_matches_scipy_with_ties_on_any_axis():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(4, 7, 30)).astype(float)  # many ties
    for axis in (0, 1, -1):
        assert np.array_equal(rankdata(a, axis=axis), sps.rankdata(a, axis=axis))
    assert np.array_equal(rankdata([3.0, 1.0, 3.0, 2.0]), [3.5, 1.0, 3.5, 2.0])


def test_spearman_matches_scipy_with_and_without_ties():
    rng = np.random.default_rng(1)
    w = rng.gamma(2.0, size=64)
    act = rng.gamma(2.0, size=(5, 64))
    act[1] = np.round(act[1])  # ties in one timestep
    act[2] = w * 3 + 1  # same order as w: rho = 1
    act[3] = -w  # reversed: rho = -1
    rho = spearman(act, w, axis=-1)  # [5], broadcast over timesteps
    ref = [sps.spearmanr(act[t], w).statistic for t in range(5)]
    assert np.allclose(rho, ref, atol=1e-12)
    assert rho[2] == pytest.approx(1.0) and rho[3] == pytest.approx(-1.0)
    # a constant side has no rank correlation: NaN, as in scipy
    assert np.isnan(spearman(np.ones(8), np.arange(8.0)))


def test_spearman_by_timestep_against_scipy_per_timestep_and_per_row():
    rng = np.random.default_rng(2)
    act = rng.gamma(2.0, size=(6, 2, 40))
    w = rng.gamma(2.0, size=40)
    st = make_stats({"a.fc": act, "a.q": act}, {"a.fc": w})
    rho = spearman_by_timestep(st)
    assert list(rho) == ["a.fc"]  # operands without a weight have no rho
    s_t = act.max(axis=1)  # default: the maximum over rows at each timestep
    assert np.allclose(rho["a.fc"], [sps.spearmanr(s_t[t], w).statistic for t in range(6)])
    per_row = spearman_by_timestep(st, per_sample=True)["a.fc"]
    assert per_row.shape == (6, 2)
    assert per_row[4, 1] == pytest.approx(sps.spearmanr(act[4, 1], w).statistic)
    uncond = spearman_by_timestep(st, rows="uncond")["a.fc"]
    assert np.allclose(uncond, per_row[:, 1])


# ---- temporal variability, outliers, difficulty --------------------------------------------------------
def test_temporal_variability_by_hand():
    # channel 0 constant, channel 1 grows 1 -> 4, channel 2 peaks at the second timestep
    s = np.array([[2.0, 1.0, 1.0], [2.0, 2.0, 5.0], [2.0, 4.0, 1.0]])
    st = make_stats({"x": np.stack([s, s / 2], axis=1)}, {}, timesteps=[900, 500, 100])
    tv = temporal_variability(st, "x")
    assert tv["range"].tolist() == [0.0, 3.0, 4.0]
    assert tv["cv"][0] == 0.0
    assert tv["cv"][1] == pytest.approx(np.std([1, 2, 4]) / np.mean([1, 2, 4]))
    assert tv["peak_timestep"].tolist() == [900, 100, 500]
    assert tv["mean"][2] == pytest.approx(7 / 3)


def test_outlier_ratio_and_difficulty_ranking():
    assert outlier_ratio(np.array([1.0, 2.0, 3.0, 30.0, 2.0])) == pytest.approx(15.0)
    assert np.allclose(outlier_ratio(np.array([[1.0, 1.0, 4.0], [2.0, 2.0, 2.0]])), [4.0, 1.0])
    rng = np.random.default_rng(3)
    T, C = 4, 32
    flat = rng.uniform(1.0, 1.1, size=(T, 2, C))
    spiky = flat.copy()
    spiky[:, :, 5] = 40.0  # one outlier channel at every timestep
    drifting = flat * np.array([1.0, 2.0, 4.0, 8.0])[:, None, None]  # range moves 8x over time, no outliers
    st = make_stats({"b.flat": flat, "b.spiky": spiky, "b.drift": drifting},
                    {k: rng.uniform(0.5, 1.0, C) for k in ("b.flat", "b.spiky", "b.drift")})
    d = layer_difficulty(st)
    assert d["layer"].tolist()[0] == "b.spiky" and d["rank"].tolist() == [1, 2, 3]
    assert d.set_index("layer").loc["b.spiky", "act_outlier_ratio"] == pytest.approx(40.0 / np.median(spiky.max(axis=(0, 1))))
    by_time = layer_difficulty(st, sort_by="act_temporal_ratio")
    assert by_time["layer"][0] == "b.drift" and by_time["act_temporal_ratio"][0] == pytest.approx(8.0, rel=0.1)
    with pytest.raises(ValueError, match="cannot sort by"):
        layer_difficulty(st, sort_by="nonsense")
    prof = profile_by_kind(st)
    assert prof["layers"].sum() == 3


# ---- quantization error --------------------------------------------------------------------------------
def test_quant_error_sanity():
    from quant.quantizers import fake_quantize

    torch.manual_seed(0)
    x = torch.randn(2, 50, 24) * torch.linspace(0.1, 5.0, 24)
    errs = activation_quant_mse_bits(x, (2, 4, 8))
    assert errs.shape == (3, 24) and (errs >= 0).all()
    assert (errs[0].mean() > errs[1].mean() > errs[2].mean())  # more bits, less error
    # the same numbers as the project's quantizer, one bit-width at a time
    ref = (fake_quantize(x.reshape(-1, 24), 4, axis=None) - x.reshape(-1, 24)).pow(2).mean(0)
    assert torch.equal(errs[1], ref) and torch.equal(activation_quant_mse(x, 4), ref)
    # a per-tensor step is set by the widest channel: rounding error is at most (step / 2)^2 everywhere
    step = (x.max() - min(x.min(), 0)) / 255
    assert (errs[2] <= (step / 2) ** 2 * 1.0001).all()
    w = torch.randn(16, 24)
    w_err = weight_quant_mse(w, 8)
    assert w_err.shape == (24,) and (w_err > 0).all()
    assert w_err.mean() < weight_quant_mse(w, 4).mean()
    # an exactly representable weight (values on each row's grid) has no error
    grid = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-3.0, 0.0, 3.0, 6.0]])
    assert np.all(weight_quant_mse(grid, 2) < 1e-12)


def test_collected_quant_error_matches_the_layer_inputs(tiny_bundle):
    """act_mse[layer][step] is the error of that layer's actual inputs at that step (to_k shares to_q's input)."""
    from analysis.models.sampling import sample

    cfg = SalienceConfig(steps=2, samples=2, guidance=2.0, mse_bits=(4, 8), layers=r"blocks\.1\.(attn1|ff)")
    st = collect(tiny_bundle, cfg)
    assert st.mse_bits == (4, 8) and "mse_seconds" in st.info
    cal = sample(tiny_bundle, cfg.sample_labels(10), cfg.seeds(), steps=2, guidance=2.0, decode=False,
                 record="all").calibration
    modules = dict(tiny_bundle.denoiser.named_modules())
    for layer in ("transformer_blocks.1.attn1.to_k", "transformer_blocks.1.ff.net.2"):
        seen = []
        h = modules[layer].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
        with torch.no_grad():
            tiny_bundle.denoiser(cal.x[cal.step == 1], timestep=cal.t[cal.step == 1],
                                    class_labels=cal.y[cal.step == 1])
        h.remove()
        expect = activation_quant_mse_bits(seen[0], (4, 8)).numpy()
        assert np.allclose(st.act_mse[layer][1], expect, rtol=1e-5, atol=1e-10)
        act, w = quant_error(st, layer, 1, 8)
        assert np.array_equal(act, st.act_mse[layer][1, 1])
        assert np.allclose(w, weight_quant_mse(modules[layer].weight, 8))
    with pytest.raises(ValueError, match="no quantization error at 6 bits"):
        quant_error(st, "transformer_blocks.1.ff.net.2", 0, 6)


# ---- tables --------------------------------------------------------------------------------------------
def test_channel_table_csv_and_layer_menu(tiny_bundle):
    st = collect(tiny_bundle, SalienceConfig(steps=2, samples=2, guidance=2.0, mse_bits=(4,), per_sample=False))
    layer = "transformer_blocks.0.ff.net.2"
    table = st.channel_table([layer])
    C = st.act_absmax[layer].shape[-1]
    assert len(table) == 2 * C
    assert {"timestep", "channel", "absmax", "absmax_cond", "absmax_uncond", "weight_absmax", "act_mse_a4",
            "weight_mse_w4"} <= set(table.columns)
    assert np.allclose(table["absmax"], np.maximum(table["absmax_cond"], table["absmax_uncond"]))
    assert np.allclose(table["weight_absmax"][:C], st.weight_absmax[layer])
    assert np.allclose(table["act_mse_a4"].to_numpy().reshape(2, C), st.act_mse[layer][:, 0])
    text = st.to_csv([layer]).decode()
    assert text.splitlines()[0].startswith("layer,block,kind,step,timestep,channel,absmax")
    assert len(text.splitlines()) == 2 * C + 1
    menu = layer_menu(st.layers)
    assert list(menu) == ["patch embedding", "block 0", "block 1", "final layer"]  # the patch conv first
    assert menu["block 0"][0].endswith("timestep_embedder.linear_1")
    assert [k.rsplit(".", 1)[-1] for k in menu["block 0"] if ".attn1.to_" in k] == ["to_q", "to_k", "to_v", "0"]
    # the embedding's second call in a forward belongs to the final layer
    assert "transformer_blocks.0.norm1.emb.timestep_embedder.linear_2@2" in menu["final layer"]
    assert sum(len(v) for v in menu.values()) == len(st.layers)
