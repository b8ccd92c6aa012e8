"""Salience collection: hand-computed values on a one-layer model, hook cleanup, halves, save/load."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from analysis.salience.collect import SalienceConfig, SalienceStats, collect, layer_block, layer_kind
from quant.observers import InputObserver


class OneLinear(nn.Module):
    """The smallest model the observer understands: one linear layer, timestep / labels as keyword args."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x, timestep=None, class_labels=None):
        return self.fc(x)


def test_hand_computed_salience_on_one_layer():
    m = OneLinear()
    with torch.no_grad():
        m.fc.weight.copy_(torch.tensor([[1.0, -4.0, 0.5], [-2.0, 3.0, 0.25]]))
    # two samples, two tokens, three channels
    x = torch.tensor([[[1.0, -5.0, 0.0], [-2.0, 1.0, 0.5]],
                      [[0.5, 0.5, -3.0], [0.25, -0.5, 1.0]]])
    with InputObserver(m, {"fc": m.fc}) as obs:
        m(x, timestep=torch.tensor([7, 7]), class_labels=torch.tensor([1, 10]))
    st = obs.stats()
    # s(X_j) = max over tokens of |X_j|, per sample
    assert torch.equal(st.absmax["fc"], torch.tensor([[2.0, 5.0, 0.5], [0.5, 0.5, 3.0]]))
    assert torch.equal(st.cmin["fc"], torch.tensor([[-2.0, -5.0, 0.0], [0.25, -0.5, -3.0]]))
    assert torch.equal(st.cmax["fc"], torch.tensor([[1.0, 1.0, 0.5], [0.5, 0.5, 1.0]]))
    assert st.t.tolist() == [7, 7] and st.y.tolist() == [1, 10]
    # grouped on the device: one row for the conditional sample, one for the unconditional (null label 10)
    with InputObserver(m, {"fc": m.fc}, group_null_label=10) as obs:
        m(x, timestep=torch.tensor([7, 7]), class_labels=torch.tensor([1, 10]))
    g = obs.stats()
    assert g.y.tolist() == [-1, 10]
    assert torch.equal(g.absmax["fc"], st.absmax["fc"])  # each group holds one sample here
    # weight salience: max over output rows of |W_oj|
    from analysis.salience.collect import _weight_salience
    assert np.array_equal(_weight_salience(m.fc), np.array([2.0, 4.0, 0.5], dtype=np.float32))


def test_collect_one_pass_rows_halves_and_hooks_removed(tiny_bundle):
    model = tiny_bundle.denoiser
    before = [(len(mod._forward_pre_hooks), len(mod._forward_hooks)) for mod in model.modules()]
    cfg = SalienceConfig(steps=3, samples=3, batch_size=2, guidance=2.0, labels=(4, 1, 7), attention=True)
    st = collect(tiny_bundle, cfg)
    after = [(len(mod._forward_pre_hooks), len(mod._forward_hooks)) for mod in model.modules()]
    assert after == before  # every hook is gone
    # a second pass sees no hooks: the observer's storage does not grow
    with torch.no_grad():
        model(torch.randn(1, *tiny_bundle.latent_shape), timestep=torch.tensor([5]), class_labels=torch.tensor([0]))
    assert all(v.shape[0] == 3 for v in st.act_absmax.values())
    assert len(st.timesteps) == 3 and st.timesteps[0] > st.timesteps[-1]  # noisiest first
    null = tiny_bundle.null_label
    assert st.halves == ["cond", "uncond"]
    assert st.row_labels.tolist() == [4, 1, 7, null, null, null]
    assert st.row_seeds.tolist() == [0, 1, 2, 0, 1, 2]
    q = "transformer_blocks.0.attn1.to_q"
    assert st.act_absmax[q].shape == (3, 6, 16) and st.act_min[q].shape == (3, 2, 16)
    # to_q, to_k, to_v read the same tensor
    assert np.array_equal(st.act_absmax[q], st.act_absmax["transformer_blocks.0.attn1.to_v"])
    # block 0's embedding fires twice per forward (the final layer calls it again): its own key
    assert "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1@2" in st.layers
    assert "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1@2" not in st.layers
    # attention operands: q/k/v per channel, softmax per head, probabilities in [0, 1]
    sm = st.act_absmax["transformer_blocks.0.attn1.softmax"]
    assert sm.shape == (3, 6, 2) and (sm > 0).all() and (sm <= 1).all()
    assert "transformer_blocks.0.attn1.softmax" not in st.weight_absmax
    # halves are kept apart: per-half max equals the max over that half's rows
    a = st.act_absmax[q]
    assert np.allclose(np.maximum(-st.act_min[q][:, 0], st.act_max[q][:, 0]), a[:, :3].max(axis=1))
    assert np.allclose(np.maximum(-st.act_min[q][:, 1], st.act_max[q][:, 1]), a[:, 3:].max(axis=1))
    assert not np.allclose(a[:, :3], a[:, 3:])  # conditional and unconditional rows differ
    assert layer_kind(q) == "qkv" and layer_block(q) == 0 and layer_kind("proj_out_2") == "final"


def test_rows_match_a_direct_forward(tiny_bundle):
    """Row (step, sample) of the statistics equals the salience of that sample's own input at that step."""
    from analysis.models.sampling import sample

    cfg = SalienceConfig(steps=2, samples=3, batch_size=2, guidance=2.0, layers=r"blocks\.1\.ff\.net\.2$")
    st = collect(tiny_bundle, cfg)
    res = sample(tiny_bundle, cfg.sample_labels(10), cfg.seeds(), steps=2, guidance=2.0, batch_size=2,
                 decode=False, record="all")
    cal = res.calibration
    layer = "transformer_blocks.1.ff.net.2"
    fc2 = dict(tiny_bundle.denoiser.named_modules())[layer]
    seen = []
    h = fc2.register_forward_pre_hook(lambda mod, args: seen.append(args[0].abs().amax(1)))
    with torch.no_grad():
        tiny_bundle.denoiser(cal.x, timestep=cal.t, class_labels=cal.y)
    h.remove()
    ref = seen[0]
    # recorded order: batch 0 (samples 0,1) step 0 cond+uncond, step 1 ..., then batch 1 (sample 2)
    step0_sample2_uncond = [i for i in range(len(cal)) if cal.step[i] == 0 and cal.y[i] == 10][-1]
    assert np.allclose(st.act_absmax[layer][0, 5], ref[step0_sample2_uncond].numpy(), rtol=1e-5, atol=1e-6)
    step1_sample1_cond = [i for i in range(len(cal)) if cal.step[i] == 1 and cal.y[i] == 1][0]
    assert np.allclose(st.act_absmax[layer][1, 1], ref[step1_sample1_cond].numpy(), rtol=1e-5, atol=1e-6)


def test_reduced_rows_equal_max_of_per_sample_rows(tiny_bundle):
    base = dict(steps=2, samples=3, batch_size=2, guidance=2.0)
    full = collect(tiny_bundle, SalienceConfig(**base))
    red = collect(tiny_bundle, SalienceConfig(per_sample=False, **base))
    assert red.row_labels.tolist() == [-1, tiny_bundle.null_label] and not red.per_sample
    for k in full.layers:
        a = full.act_absmax[k]
        assert np.allclose(red.act_absmax[k][:, 0], a[:, :3].max(axis=1))
        assert np.allclose(red.act_absmax[k][:, 1], a[:, 3:].max(axis=1))
        assert np.allclose(red.act_min[k], full.act_min[k]) and np.allclose(red.act_max[k], full.act_max[k])


def test_save_load_round_trip_and_frames(tiny_bundle, tmp_path):
    st = collect(tiny_bundle, SalienceConfig(steps=2, samples=2, guidance=2.0, mse_bits=(4, 8), attention=True))
    path = st.save(tmp_path / "stats.npz")
    back = SalienceStats.load(path)
    assert back.layers == st.layers and back.halves == st.halves and back.mse_bits == (4, 8)
    assert back.model == st.model and back.null_label == st.null_label and back.info["steps"] == 2
    for field in ("act_absmax", "act_min", "act_max", "weight_absmax", "act_mse", "weight_mse"):
        a, b = getattr(st, field), getattr(back, field)
        assert a.keys() == b.keys()
        assert all(np.array_equal(a[k], b[k]) for k in a)
    for field in ("timesteps", "row_labels", "row_seeds"):
        assert np.array_equal(getattr(st, field), getattr(back, field))
    layer = "transformer_blocks.1.ff.net.0.proj"
    f = back.frame([layer])
    assert len(f) == 2 * 16 and set(f.columns) >= {"layer", "block", "kind", "timestep", "channel", "absmax"}
    assert np.allclose(f["absmax"].to_numpy().reshape(2, 16), st.act_absmax[layer].max(axis=1))
    fr = back.frame([layer], per_row=True)
    assert len(fr) == 2 * 4 * 16 and fr["uncond"].sum() == 2 * 2 * 16
    w = back.weight_frame([layer])
    assert np.array_equal(w["weight_absmax"].to_numpy(), st.weight_absmax[layer])
    assert {"weight_mse_w4", "weight_mse_w8"} <= set(w.columns)
    with pytest.raises(ValueError, match=".npz"):
        st.save(tmp_path / "stats.csv")
    with pytest.raises(FileNotFoundError, match="dqlab salience"):
        SalienceStats.load(tmp_path / "missing.npz")


def test_config_errors(tiny_bundle):
    with pytest.raises(ValueError, match="no layer"):
        collect(tiny_bundle, SalienceConfig(steps=1, samples=1, layers="nothing-matches"))
    with pytest.raises(ValueError, match="mse_bits"):
        collect(tiny_bundle, SalienceConfig(steps=1, samples=1, mse_bits=(1,)))
