"""quantize(): a new model (input untouched), TPQ routing per sample, config JSON, save/load round trip."""
import copy
import dataclasses
import json

import pytest
import torch

from analysis.models.saved import load_quantized, save_quantized
from quant.api import QuantConfig, quantize, quantize_with_details, weight_bytes
from quant.modules import ActQuantizer, QuantLinear, TimestepContext, act_quantizers
from tests.conftest import make_tiny_dit


def _batches(model, timesteps=(999, 600, 300, 20), per=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(timesteps) * per
    c, s = model.config.in_channels, model.config.sample_size
    x = torch.randn(n, c, s, s, generator=g)
    t = torch.tensor([ts for _ in range(per) for ts in timesteps])  # every batch mixes timesteps
    y = torch.randint(0, 11, (n,), generator=g)
    return [(x[i:i + 4], t[i:i + 4], y[i:i + 4]) for i in range(0, n, 4)]


def test_quantize_returns_a_new_model_and_leaves_input_unchanged():
    model = make_tiny_dit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    processors = {n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "processor")}
    batches = _batches(model)
    x, t, y = batches[0]
    ref = model(x, timestep=t, class_labels=y).sample
    for method in ("ptq4dit", "dilatequant", "smoothquant"):
        q = quantize(model, QuantConfig(method=method, w_bits=4, a_bits=8, attn_bits=8), batches)
        assert q is not model
        assert not (q(x, timestep=t, class_labels=y).sample - ref).abs().max() < 1e-6  # it did quantize
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "processor")} == processors
    assert not model._forward_pre_hooks and not any(isinstance(m, QuantLinear) for m in model.modules())
    assert torch.equal(model(x, timestep=t, class_labels=y).sample, ref)


def test_every_linear_and_the_patch_conv_are_covered_and_exclusions_hold():
    model = make_tiny_dit()
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    res = quantize_with_details(model, QuantConfig(w_bits=8, a_bits=8), _batches(model))
    assert len(res.layers) == n_linear + 1 and "pos_embed.proj" in res.layers
    res = quantize_with_details(model, QuantConfig(w_bits=8, a_bits=8, exclude=["transformer_blocks.0",
                                                                                "*.norm1.linear"]),
                                _batches(model))
    assert not any(n.startswith("transformer_blocks.0.") or n.endswith("norm1.linear") for n in res.layers)
    assert type(res.model.transformer_blocks[0].attn1.to_q) is torch.nn.Linear
    assert isinstance(res.model.transformer_blocks[1].attn1.to_q, QuantLinear)


def test_tpq_picks_each_samples_timestep_parameters_in_mixed_batches():
    model = make_tiny_dit()
    batches = _batches(model)
    res = quantize_with_details(model, QuantConfig(method="baseline", w_bits=8, a_bits=4, tpq=True), batches)
    q = res.model
    aq = act_quantizers(q)
    some = aq["transformer_blocks.1.ff.net.2.act"]
    assert some.timesteps.tolist() == [20, 300, 600, 999] and some.scale.numel() == 4
    assert len(torch.unique(some.scale)) > 1  # ranges differ by timestep
    # a mixed batch gives each sample exactly what a batch of its own timestep gives
    x = torch.cat([b[0] for b in batches])
    t = torch.cat([b[1] for b in batches])
    y = torch.cat([b[2] for b in batches])
    mixed = q(x, timestep=t, class_labels=y).sample
    for ts in t.unique():
        m = t == ts
        alone = q(x[m], timestep=t[m], class_labels=y[m]).sample
        assert torch.allclose(mixed[m], alone, atol=1e-5)
    # without TPQ one range serves all timesteps
    static = quantize_with_details(model, QuantConfig(method="baseline", w_bits=8, a_bits=4), batches).model
    assert act_quantizers(static)["transformer_blocks.1.ff.net.2.act"].scale.numel() == 1
    assert QuantConfig(method="dilatequant").use_tpq and not QuantConfig(method="ptq4dit").use_tpq


def test_act_quantizer_gathers_per_sample_parameters_directly():
    ctx = TimestepContext()
    q = ActQuantizer(4, per_timestep=True, ctx=ctx)
    q.mode = "observe"
    ctx.t = torch.tensor([10, 900])
    q(torch.stack([torch.linspace(0, 1, 50), torch.linspace(0, 8, 50)]))  # timestep 900 has an 8x range
    q.finalize()
    assert torch.allclose(q.scale, torch.tensor([1 / 15, 8 / 15]))
    ctx.t = torch.tensor([900, 10, 900])
    x = torch.full((3, 5), 0.5)
    s, _ = q.params_for(x)
    assert torch.allclose(s.reshape(-1), torch.tensor([8 / 15, 1 / 15, 8 / 15]))
    ctx.t = torch.tensor([880, 40, 400])  # unseen timesteps use the nearest calibrated one
    s, _ = q.params_for(x)
    assert torch.allclose(s.reshape(-1), torch.tensor([8 / 15, 1 / 15, 1 / 15]))


def test_config_json_round_trip_and_validation():
    cfg = QuantConfig(method="ptq4dit", w_bits=4, a_bits=8, attn_bits=8, exclude=["proj_out_*"],
                      options={"ssc_rho": "per_sample"}, scale_search="mse", tpq=True)
    assert cfg.options == {"ssc": True, "ssc_rho": "per_sample"}  # the method's defaults filled in
    assert QuantConfig.from_json(cfg.to_json()) == cfg
    assert QuantConfig.from_dict(json.loads(cfg.to_json())).to_dict() == cfg.to_dict()
    for bad, msg in [(dict(method="awq"), "unknown method"), (dict(w_bits=1), "w_bits"), (dict(a_bits=9), "a_bits"),
                     (dict(attn_bits=32), "attn_bits"), (dict(scale_search="x"), "scale_search"),
                     (dict(method="ptq4dit", options={"ssc_rho": "x"}), "ssc_rho"),
                     (dict(method="smoothquant", options={"alpha": 2.0}), "alpha"),
                     (dict(method="baseline", options={"alpha": 0.5}), "baseline has no option"),
                     (dict(percentile=50.0), "percentile"), (dict(recon_lr=0.0), "recon_lr")]:
        with pytest.raises(ValueError, match=msg):
            QuantConfig(**bad)  # a config checks itself when it is made
    with pytest.raises(ValueError, match="w_bits"):
        dataclasses.replace(cfg, w_bits=1)  # and when it is remade
    # configs stored with the method options flat beside the common fields still load
    old = {**{k: v for k, v in cfg.to_dict().items() if k != "options"}, "alpha": 0.5, "ssc": False,
           "ssc_rho": "per_sample"}
    assert QuantConfig.from_dict(old).options == {"ssc": False, "ssc_rho": "per_sample"}
    with pytest.raises(ValueError, match="unknown QuantConfig field"):
        QuantConfig.from_dict({"metod": "fp"})
    with pytest.raises(ValueError, match="JSON"):
        QuantConfig.from_json("{not json")
    QuantConfig(w_bits=16, a_bits=None).validate()


@pytest.mark.parametrize("cfg", [QuantConfig(method="ptq4dit", w_bits=4, a_bits=8, attn_bits=8),
                                 QuantConfig(method="dilatequant", w_bits=3, a_bits=6, w_symmetric=True),
                                 QuantConfig(method="fp")])
def test_save_load_round_trip(tiny_bundle, tmp_path, cfg):
    from analysis.models.loading import load

    batches = _batches(tiny_bundle.denoiser)
    q = quantize(tiny_bundle.denoiser, cfg, batches)
    bundle = tiny_bundle.with_denoiser(q, name=f"tiny [{cfg.label}]", quant_config=cfg.to_dict())
    folder = save_quantized(bundle, cfg, tmp_path / "q", base_source="tiny")
    loaded = load(str(folder))  # analysis.models.loading dispatches quantized folders to load_quantized
    assert loaded.quant_config == cfg.to_dict() and loaded.num_classes == tiny_bundle.num_classes
    assert loaded.vae is not None
    x = torch.cat([b[0] for b in batches])
    t = torch.cat([b[1] for b in batches])
    y = torch.cat([b[2] for b in batches])
    assert torch.allclose(loaded.denoiser(x, timestep=t, class_labels=y).sample,
                          q(x, timestep=t, class_labels=y).sample, atol=1e-5)
    stored = (folder / "model.safetensors").stat().st_size
    if cfg.method == "fp":
        assert weight_bytes(q) == weight_bytes(tiny_bundle.denoiser)
    else:  # low-bit weights are stored packed: the file is smaller than the FP weights
        assert weight_bytes(q) < 0.5 * weight_bytes(tiny_bundle.denoiser)
        assert abs(stored - weight_bytes(q)) < 0.1 * weight_bytes(q) + 20000  # header aside, the same bytes
    assert isinstance(load_quantized(folder).denoiser, type(tiny_bundle.denoiser))


def test_load_errors_name_the_problem(tmp_path):
    from analysis.models.bundle import ModelLoadError

    (tmp_path / "quant_config.json").write_text('{"format": "other"}')
    with pytest.raises(ModelLoadError, match="not a dqlab quantized model"):
        load_quantized(tmp_path)


def test_timestep_hook_is_held_by_a_handle_and_never_stacks(tiny_bundle):
    from quant.modules import calibrating, find_timestep_context, timestep_context
    from quant.wrap import wrap_model

    model = copy.deepcopy(tiny_bundle.denoiser)
    before = len(model._forward_pre_hooks)
    wrap_model(model, QuantConfig(method="baseline"))
    ctx = timestep_context(model)
    assert len(model._forward_pre_hooks) == before + 1 and ctx.handle.id in model._forward_pre_hooks
    wrap_model(model, QuantConfig(method="baseline"))  # wrapping again: still one timestep hook
    assert timestep_context(model) is ctx and len(model._forward_pre_hooks) == before + 1
    # the hook is an object the quantizers hold, not an attribute stashed on the model; a copy gets its own
    assert not [k for k in vars(model) if "timestep" in k] and find_timestep_context(model) is ctx
    twin = copy.deepcopy(model)
    assert find_timestep_context(twin) is not ctx and find_timestep_context(twin).attached_to(twin)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 2])
    model(x, timestep=t, class_labels=y)
    assert ctx.t.tolist() == [10, 900]
    ctx.remove()
    assert len(model._forward_pre_hooks) == before
    # calibrating(): observe on the FP weights, then finalize; the quantizers are back to quant mode after
    timestep_context(model)
    with calibrating(model) as quantizers:
        assert quantizers and all(q.mode == "observe" for q in quantizers)
        model(x, timestep=t, class_labels=y)
    assert all(q.mode == "quant" and not q._rows for q in quantizers)
    with pytest.raises(RuntimeError, match="boom"):
        with calibrating(model) as quantizers:
            raise RuntimeError("boom")
    assert all(q.mode == "quant" and not q._rows for q in quantizers)
