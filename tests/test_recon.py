"""Block-wise optimization (quant.recon) on the bundled model: AdaRound ends with binary rounding folded onto
the weight grid, BKD keeps weights on their grid and moves TPQ parameters per timestep, each block's error
falls, memory holds one unit's activations, the input model is untouched, and a saved model reloads exactly."""
from __future__ import annotations

import pytest
import torch

from analysis.quantization.pipeline import calibration_for
from quant.api import QuantConfig, quantize_with_details
from quant.io import read_quantized, write_quantized
from quant.modules import act_quantizers, quant_layers
from quant.families import recon_units
from quant.recon import reconstruct
from quant.recon.adaround import beta_at, inverse_rectified_sigmoid, rectified_sigmoid
from quant.recon.bkd import on_grid

SMALL = dict(recon_iters=8, recon_batch=8, recon_rows=24)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread, set before the module's shared runs (a function-scoped fixture would come after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def calib(bundled):
    return list(calibration_for(bundled, steps=3, num_samples=4, seed=1_000_000).batches(64))


@pytest.fixture(scope="module")
def bkd_run(bundled, calib):
    """dilatequant W4A4 (TPQ) without and with BKD on the same calibration."""
    before = quantize_with_details(bundled.denoiser, QuantConfig(method="dilatequant", w_bits=4, a_bits=4), calib)
    after = quantize_with_details(bundled.denoiser, QuantConfig(method="dilatequant", w_bits=4, a_bits=4,
                                                                   recon="bkd", **SMALL), calib)
    return before, after


def _row(calib):
    x, t, y = calib[0]
    return x[:6], t[:6], y[:6]


def test_rectified_sigmoid_and_beta_schedule():
    h = torch.linspace(0.01, 0.99, 50)
    assert torch.allclose(rectified_sigmoid(inverse_rectified_sigmoid(h)), h, atol=1e-5)
    assert rectified_sigmoid(torch.tensor([-10.0, 10.0])).tolist() == [0.0, 1.0]  # reaches the ends exactly
    assert beta_at(0, 100) is None and beta_at(19, 100) is None  # warm-up: no penalty
    assert beta_at(20, 100) == 20.0 and beta_at(100, 100) == 2.0 and 2.0 < beta_at(60, 100) < 20.0


def test_units_compose_to_the_fp_forward(bundled, calib):
    """pos_embed -> (embedding, block) x N -> final equals the diffusers forward (before unpatchify)."""
    model = bundled.denoiser
    x, t, y = _row(calib)
    with torch.no_grad():
        h = x
        for unit in recon_units(model):
            out = unit.run(model, h, t, y)
            h = out if unit.advances else h
        ref = model(x, timestep=t, class_labels=y).sample
    p, c = model.config.patch_size, model.out_channels
    side = int(h.shape[1] ** 0.5)
    image = torch.einsum("nhwpqc->nchpwq", h.reshape(-1, side, side, p, p, c)).reshape(ref.shape)
    assert torch.allclose(image, ref, atol=1e-5)


@pytest.mark.slow
def test_adaround_rounding_ends_binary_and_is_folded_onto_the_grid(bundled, calib):
    # one block only (everything else excluded), with a rounding lr large enough to anneal in 200 steps
    others = [f"transformer_blocks.{i}" for i in range(1, 6)] + ["pos_embed", "proj_out_*",
                                                                  "transformer_blocks.0.norm1.emb"]
    cfg = QuantConfig(method="ptq4dit", w_bits=4, a_bits=8, exclude=others, recon="adaround", recon_iters=200,
                      recon_batch=4, recon_rows=16, recon_lr=0.1)
    res = quantize_with_details(bundled.denoiser, cfg, calib)
    units = {u["name"]: u for u in res.recon["units"]}
    block = units["transformer_blocks.0"]
    # h(V) is exactly 0 or 1 for (almost) every weight once beta has annealed to 2; 2e-4 at the start
    assert block["iterations"] == 200 and block["rounding_binary"] > 0.98
    assert 0 < block["rounding_flipped"] < 0.5  # it learned something other than round-to-nearest
    assert block["error_after"] < block["error_before"]
    assert all(u["iterations"] == 0 for n, u in units.items() if n != "transformer_blocks.0")  # nothing to train
    layers = quant_layers(res.model)
    assert all(on_grid(m) for n, m in layers.items() if n.startswith("transformer_blocks.0.") and m.w_bits == 4)
    assert all(m.weight_override is None for m in layers.values())


@pytest.mark.slow
def test_adaround_every_block_error_falls_and_memory_holds_one_unit(bundled, calib):
    before = {k: v.clone() for k, v in bundled.denoiser.state_dict().items()}
    cfg = QuantConfig(method="ptq4dit", w_bits=4, a_bits=8, recon="adaround", **SMALL)
    res = quantize_with_details(bundled.denoiser, cfg, calib)
    rep = res.recon
    names = [u["name"] for u in rep["units"]]
    assert names[0] == "pos_embed" and names[-1] == "final" and len(names) == 2 + 2 * 6
    for u in rep["units"]:
        assert u["iterations"] == 8 and len(u["losses"]) == 8 and u["error_before"] > 0
    blocks = [u for u in rep["units"] if u["name"].startswith("transformer_blocks.") and "emb" not in u["name"]]
    assert all(u["error_after"] < u["error_before"] for u in blocks), [(u["error_before"], u["error_after"])
                                                                        for u in blocks]
    # memory: the engine holds FP and quantized inputs and outputs of one unit, whatever the model's depth
    rows, tokens, width = rep["rows"], 64, 128
    assert rows == 24
    assert rep["peak_cached_tensors"] <= 4
    assert rep["peak_cached_bytes"] <= 4 * rows * tokens * width * 4
    # the FP model is untouched
    after = bundled.denoiser.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_reconstruct_returns_a_new_model_and_leaves_its_input_alone(bundled, calib):
    base = quantize_with_details(bundled.denoiser, QuantConfig(method="baseline", w_bits=4, a_bits=8), calib)
    snapshot = {k: v.clone() for k, v in base.model.state_dict().items()}
    cfg = QuantConfig(method="baseline", w_bits=4, a_bits=8, recon="bkd", recon_iters=3, recon_batch=4,
                      recon_rows=8, recon_input="fp")
    new, report = reconstruct(base.model, bundled.denoiser, calib, cfg)
    assert new is not base.model and report.mode == "bkd" and report.rows == 8
    now = base.model.state_dict()
    assert all(torch.equal(snapshot[k], now[k]) for k in snapshot)
    assert not any(torch.equal(snapshot[k], v) for k, v in new.state_dict().items() if k.endswith("to_q.weight"))
    assert not any(p.requires_grad for p in new.parameters())


def test_bkd_keeps_weights_on_grid_and_moves_tpq_parameters_per_timestep(bkd_run):
    before, after = bkd_run
    layers_b, layers_a = quant_layers(before.model), quant_layers(after.model)
    assert all(on_grid(m) for m in layers_a.values())
    changed = [n for n in layers_a if not torch.equal(layers_a[n].weight, layers_b[n].weight)]
    assert len(changed) == len(layers_a)  # every layer's weights (codes or steps) trained
    assert any(not torch.equal(layers_a[n].w_scale, layers_b[n].w_scale) for n in layers_a)
    qa, qb = act_quantizers(after.model), act_quantizers(before.model)
    moved_per_timestep = 0
    for name, q in qa.items():
        assert q.per_timestep and q.scale.numel() == 3 and torch.equal(q.timesteps, qb[name].timesteps)
        ratio = q.scale / qb[name].scale
        moved_per_timestep += int(ratio.std() > 1e-4)  # not one common factor: each timestep learned its own
        assert torch.equal(q.zero, q.zero.round())  # zero points stay integers
    assert moved_per_timestep >= len(qa) // 2
    for u in after.recon["units"]:
        if u["name"].startswith("transformer_blocks.") and "emb" not in u["name"]:
            assert u["error_after"] < u["error_before"]
            assert u["codes_changed"] > 0


@pytest.mark.slow
def test_bkd_trains_zero_points_as_integers(bundled, calib):
    # one block, with an activation lr large enough for zero points to move a code within a few steps
    others = [f"transformer_blocks.{i}" for i in range(1, 6)] + ["pos_embed", "proj_out_*"]
    kw = dict(method="dilatequant", w_bits=4, a_bits=4, exclude=others)
    before = quantize_with_details(bundled.denoiser, QuantConfig(**kw), calib)
    after = quantize_with_details(bundled.denoiser, QuantConfig(**kw, recon="bkd", recon_act_lr=0.05,
                                                                   recon_iters=8, recon_batch=8, recon_rows=24), calib)
    qa, qb = act_quantizers(after.model), act_quantizers(before.model)
    assert all(torch.equal(q.zero, q.zero.round()) for q in qa.values())
    moved = [n for n, q in qa.items() if not torch.equal(q.zero, qb[n].zero)]
    assert moved and all(n.startswith("transformer_blocks.0.") for n in moved)


def test_saved_model_reloads_bit_identically(bundled, bkd_run, calib, tmp_path):
    from analysis.models.loading import load
    from analysis.models.saved import save_quantized

    _, res = bkd_run
    write_quantized(res.model, res.config, tmp_path / "q")
    model, config, meta = read_quantized(tmp_path / "q")
    assert config == res.config and config.recon == "bkd" and meta["config"]["recon_iters"] == 8
    saved, loaded = res.model.state_dict(), model.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved), [k for k in saved if not torch.equal(saved[k],
                                                                                                       loaded[k])]
    x, t, y = _row(calib)
    with torch.no_grad():
        assert torch.equal(res.model(x, timestep=t, class_labels=y).sample, model(x, timestep=t, class_labels=y).sample)
    # a whole bundle, as `dqlab quantize --out` writes it and `--model DIR` reads it
    save_quantized(bundled.with_denoiser(res.model), res.config, tmp_path / "bundle")
    again = load(str(tmp_path / "bundle")).denoiser.state_dict()
    assert all(torch.equal(saved[k], again[k]) for k in saved)


def test_recon_config_validation_and_round_trip():
    cfg = QuantConfig(method="baseline", w_bits=4, a_bits=4, tpq=True, recon="bkd", recon_iters=5, recon_lr=1e-4)
    assert QuantConfig.from_json(cfg.to_json()) == cfg and cfg.label == "baseline W4A4 TPQ +BKD"
    assert cfg.recon_lrs == (1e-4, 1e-3)
    assert QuantConfig.from_dict({"method": "ptq4dit"}).recon == "none"  # configs saved before recon existed
    for bad, message in ((dict(recon="brecq"), "unknown recon 'brecq'"), (dict(recon_iters=0), "recon_iters must"),
                         (dict(recon_batch=2.5), "recon_batch must"), (dict(recon_rows=-1), "recon_rows must"),
                         (dict(recon_input="int8"), "unknown recon_input"),
                         (dict(recon_lr=float("nan")), "recon_lr must be a finite number"),
                         (dict(recon_act_lr=0), "recon_act_lr must be a finite number"),
                         (dict(method="fp", recon="bkd"), "recon needs a quantizing method")):
        with pytest.raises(ValueError, match=message):
            QuantConfig(**{"method": "baseline", **bad}).validate()


def test_lp_loss_defaults_follow_the_official_ptq4dit_run():
    """BRECQ's lp_loss (which the official PTQ4DiT code calls with its default p = 2.0: --cali_p is parsed but
    never passed) sums over dimension 1, the tokens of a block's [B, N, C] output; the earlier reduction
    (sum over features, p = 2.4, act lr 4e-4) stays an option and is what configs written before it ran with."""
    from quant.recon.trainers import lp_loss

    gen = torch.Generator().manual_seed(0)
    out, target = torch.randn(2, 3, 5, generator=gen), torch.randn(2, 3, 5, generator=gen)
    diff = (out - target).abs()
    assert lp_loss(out, target, 2.0).item() == pytest.approx(diff.pow(2).sum(1).mean().item())
    assert lp_loss(out, target, 2.4, "last").item() == pytest.approx(diff.pow(2.4).sum(-1).mean().item())
    cfg = QuantConfig(method="ptq4dit", w_bits=4, a_bits=8, recon="adaround")
    assert (cfg.recon_p, cfg.recon_sum, cfg.recon_lrs) == (2.0, "dim1", (1e-3, 4e-5))
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("recon_p", "recon_sum", "recon_loss", "recon_guidance")}
    legacy = QuantConfig.from_dict(old)  # a whole config stored before these fields: its run's settings
    assert (legacy.recon_p, legacy.recon_sum, legacy.recon_lrs) == (2.4, "last", (1e-3, 4e-4))
    assert QuantConfig.from_dict({"method": "ptq4dit", "recon": "adaround"}).recon_p == 2.0  # a new, short one
    assert QuantConfig.from_json(cfg.to_json()) == cfg


def test_guided_loss_pairs_conditional_and_unconditional_rows(bundled, calib):
    """Rows come in (conditional, unconditional) twins of one image and step; the guided view is
    [u, u + s (c - u)], and a guided BKD run trains and lowers every block's error."""
    from quant.recon.engine import calibration_rows, guidance_pairs
    from quant.recon.trainers import guided_view

    x, t, y = calibration_rows(calib, 24, paired=True)
    half = len(x) // 2
    assert half == 12 and torch.equal(x[:half], x[half:]) and torch.equal(t[:half], t[half:])
    null = bundled.num_classes
    assert (y[half:] == null).all() and (y[:half] != null).all()
    xa, ta, ya = (torch.cat([b[i] for b in calib]) for i in range(3))
    cond, uncond = guidance_pairs(xa, ta, ya)
    assert 2 * len(cond) == len(xa) and torch.equal(xa[cond], xa[uncond])
    c, u = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.allclose(guided_view(torch.cat([c, u]), 1.5), torch.cat([u, u + 1.5 * (c - u)]))
    with pytest.raises(ValueError, match="pairs"):
        guidance_pairs(xa[:5], ta[:5], ya[:5])
    config = QuantConfig(method="dilatequant", w_bits=4, a_bits=4, recon="bkd", recon_loss="guided", **SMALL)
    assert config.label.endswith("+BKD guided")
    qmodel = quantize_with_details(bundled.denoiser, QuantConfig(method="dilatequant", w_bits=4, a_bits=4),
                                   calib).model
    with pytest.raises(ValueError, match="guidance scale"):
        reconstruct(qmodel, bundled.denoiser, calib, config)
    _, report = reconstruct(qmodel, bundled.denoiser, calib, config, guidance=1.5)
    blocks = [u for u in report.units if u["name"].startswith("transformer_blocks.") and "emb" not in u["name"]]
    assert report.rows == 24 and all(u["error_after"] < u["error_before"] for u in blocks)
