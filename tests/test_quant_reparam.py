"""Offline folding is exact: with quantization off the folded model equals the original, and the folded
layers' inputs shrink exactly to s(X)/b."""
import pytest
import torch

from quant.api import QuantConfig, quantize_with_details
from quant.observers import observe_inputs
from quant.families import balance_groups
from quant.reparam import ADALN_CHUNKS, apply_scaling
from tests.conftest import make_tiny_dit


def _inputs(model, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, s = model.config.in_channels, model.config.sample_size
    x = torch.randn(n, c, s, s, generator=g)
    t = torch.tensor([999, 700, 400, 50] * (n // 4))
    y = torch.randint(0, model.config.num_embeds_ada_norm + 1, (n,), generator=g)
    return x, t, y


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_adaln_chunk_order_matches_installed_diffusers():
    import inspect

    from diffusers.models.normalization import AdaLayerNormZero

    src = inspect.getsource(AdaLayerNormZero.forward)
    assert ", ".join(ADALN_CHUNKS) + " = emb.chunk(6, dim=1)" in src


def test_random_scales_fold_exactly_into_tiny_model():
    model = make_tiny_dit(layers=2)
    x, t, y = _inputs(model)
    ref = model(x, timestep=t, class_labels=y).sample
    folded = make_tiny_dit(layers=2)
    gen = torch.Generator().manual_seed(1)
    for group in balance_groups(folded):
        b = torch.exp(torch.randn(folded.config.num_attention_heads * folded.config.attention_head_dim,
                                  generator=gen) * 1.5)  # scales from ~0.05 to ~20
        apply_scaling(folded, group, b)
    assert not torch.equal(folded.transformer_blocks[0].attn1.to_q.weight, model.transformer_blocks[0].attn1.to_q.weight)
    out = folded(x, timestep=t, class_labels=y).sample
    assert _rel(out, ref) < 1e-4


def _fold_check(model, batches, method):
    """quantize with bits off = fold only; the output must not move and inputs must equal s(X)/b."""
    cfg = QuantConfig(method=method, w_bits=None, a_bits=None)
    res = quantize_with_details(model, cfg, batches)
    # (WD may leave a group at 1 when every channel holds some row's extreme; some group must move)
    assert res.vectors and any((b != 1).any() for b in res.vectors.values())
    for x, t, y in batches:
        ref = model(x, timestep=t, class_labels=y).sample
        assert _rel(res.model(x, timestep=t, class_labels=y).sample, ref) < 1e-4
    groups = {g.name: g for g in balance_groups(res.model)}
    fp_mods, q_mods = dict(model.named_modules()), dict(res.model.named_modules())
    before = observe_inputs(model, batches, layers={n: fp_mods[groups[n].layers[0]] for n in res.vectors})
    after = observe_inputs(res.model, batches, layers={n: q_mods[groups[n].layers[0]] for n in res.vectors})
    for name, b in res.vectors.items():
        predicted = before.absmax[name].amax(0) / b  # s(X) of the original model over b
        assert torch.allclose(after.absmax[name].amax(0), predicted, rtol=1e-4, atol=1e-6), name
        assert torch.allclose(res.salience[name]["x_after"], predicted, rtol=1e-4, atol=1e-6)
        assert torch.allclose(res.salience[name]["x_before"], before.absmax[name].amax(0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["smoothquant", "ptq4dit", "dilatequant"])
def test_fold_is_exact_on_tiny_random_model(method):
    model = make_tiny_dit(layers=2)
    x, t, y = _inputs(model)
    _fold_check(model, [(x[:4], t[:4], y[:4]), (x[4:], t[4:], y[4:])], method)


@pytest.mark.parametrize("method", ["ptq4dit", "dilatequant"])
def test_fold_is_exact_on_bundled_model(bundled, method):
    from analysis.models.sampling import sample

    cal = sample(bundled, [1, 7], [0, 1], steps=4, decode=False, record="all").calibration
    _fold_check(bundled.denoiser, list(cal.batches(8)), method)
