"""GPTQ, Hadamard rotation and SVDQuant's low-rank branch: exact in float, better than round-to-nearest, and
composable, saved and reloaded bit for bit (docs/ARCHITECTURE.md section 7)."""
import pytest
import torch

from quant.api import QuantConfig, quantize_with_details
from quant.gptq import gptq_quantize, output_error
from quant.lowrank import lowrank_split
from quant.quantizers import fake_quant, search_params
from quant.rotation import fwht, rotate, rotation_kind, rotation_matrix
from tests.conftest import make_tiny_dit


def _batches(model, timesteps=(999, 600, 300, 20), per=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, s = model.config.in_channels, model.config.sample_size
    out = []
    for t in timesteps:
        x = torch.randn(per, c, s, s, generator=g)
        y = torch.randint(0, model.config.num_embeds_ada_norm, (per,), generator=g)
        out.append((x, torch.full((per,), t), y))
    return out


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("n, kind", [(64, "walsh"), (12, "paley12x1"), (40, "paley20x2"), (6, "random")])
def test_rotation_is_orthonormal_and_the_fast_transform_matches_the_matrix(n, kind):
    assert rotation_kind(n) == kind
    q = rotation_matrix(n)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    if kind != "random":  # a Hadamard matrix: every entry +-1/sqrt(n)
        assert torch.allclose(q.abs(), torch.full_like(q, n ** -0.5), atol=1e-12)
    x = torch.randn(5, 3, n, dtype=torch.float64)
    assert torch.allclose(rotate(x), x @ q.T, atol=1e-12)


def test_fwht_spreads_one_outlier_channel_over_all():
    x = torch.zeros(1, 128)
    x[0, 7] = 100.0
    y = fwht(x)
    assert torch.allclose(y.abs(), torch.full_like(y, 100.0 / 128 ** 0.5))
    assert torch.allclose(fwht(y), x, atol=1e-4)  # H is symmetric and orthonormal: its own inverse


# head_dim 8: width 16 (Walsh); head_dim 6: width 12 (Paley) with heads of 6 (random orthogonal fallback)
@pytest.mark.parametrize("method, head_dim", [("hadamard", 8), ("hadamard", 6), ("svdquant", 8),
                                              ("hadamard+gptq", 6), ("svdquant+gptq", 6), ("ptq4dit+hadamard", 8),
                                              ("dilatequant+hadamard", 6)])
def test_rotation_and_lowrank_are_exact_in_float(method, head_dim):
    model = make_tiny_dit(layers=2, head_dim=head_dim)
    batches = _batches(model)
    cfg = QuantConfig(method=method, w_bits=None, a_bits=None, options={"rank": 4} if "svd" in method else {})
    res = quantize_with_details(model, cfg, batches)
    mods = dict(res.model.named_modules())
    if "hadamard" in method:
        rot = res.methods["rotation"]
        assert "transformer_blocks.0.attn1.to_out.0" in rot["folded"]
        assert "transformer_blocks.0.ff.net.2" in rot["online"]
        assert mods["transformer_blocks.0.ff.net.2"].rotation is not None
        assert mods["transformer_blocks.0.attn1.to_out.0"].rotation is None  # folded into to_v: free
        assert not torch.equal(mods["transformer_blocks.0.attn1.to_v"].weight,
                               model.transformer_blocks[0].attn1.to_v.weight)
    if "svdquant" in method:
        low = res.methods["lowrank"]
        assert low["extra_bytes"] > 0 and mods["transformer_blocks.0.attn1.to_q"].lowrank.rank == 4
    for x, t, y in batches:
        ref = model(x, timestep=t, class_labels=y).sample
        assert _rel(res.model(x, timestep=t, class_labels=y).sample, ref) < 1e-5


def _rtn(w, bits=4):
    scale, zero = search_params(w, bits, 0)
    return lambda cols, index: fake_quant(cols, scale.reshape(-1, 1), zero.reshape(-1, 1), bits)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(act_order):
    gen = torch.Generator().manual_seed(0)
    n_in, n_out, rows = 96, 48, 4096
    mix = torch.randn(n_in, n_in, generator=gen) / n_in ** 0.5
    x = torch.randn(rows, n_in, generator=gen) @ (mix + 0.3 * torch.eye(n_in))  # correlated inputs
    x[:, 3] *= 10  # one outlier channel
    w = torch.randn(n_out, n_in, generator=gen)
    h = 2 * x.T @ x / rows
    quant = _rtn(w)
    q = gptq_quantize(w, h, quant, block=32, act_order=act_order)
    rtn = quant(w, torch.arange(n_in))
    assert torch.equal(quant(q, torch.arange(n_in)), q)  # every entry on the quantizer's grid
    err_rtn = (x @ (w - rtn).T).pow(2).mean()
    err_gptq = (x @ (w - q).T).pow(2).mean()
    assert err_gptq < 0.7 * err_rtn
    assert output_error(w, q, h) < output_error(w, rtn, h)


@pytest.mark.parametrize("per_channel", [True, False])
def test_gptq_in_the_engine_lowers_each_layers_output_error(per_channel):
    model = make_tiny_dit(layers=1)
    batches = _batches(model)
    cfg = QuantConfig(method="ptq4dit+gptq", w_bits=3, a_bits=8, w_per_channel=per_channel)
    res = quantize_with_details(model, cfg, batches)
    rep = res.methods["rounding"]
    assert rep["method"] == "gptq" and rep["gptq_error"] < rep["rtn_error"]
    assert all(r["gptq_error"] <= r["rtn_error"] * 1.0001 for r in rep["layers"].values())
    layer = dict(res.model.named_modules())["transformer_blocks.0.ff.net.2"]
    assert torch.equal(layer.quantized_weight(), layer.weight)  # GPTQ left the weight on its grid


def test_lowrank_split_is_exact_and_takes_the_top_singular_values():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(40, 24, generator=gen) + 5 * torch.outer(torch.randn(40, generator=gen), torch.randn(24, generator=gen))
    l1, l2, r, s = lowrank_split(w, 3)
    assert l1.dtype == torch.float16 and l1.shape == (40, 3) and l2.shape == (3, 24)
    assert _rel(l1.float() @ l2.float() + r, w) < 1e-6
    assert torch.linalg.matrix_norm(r, ord=2) < 0.5 * s[0]  # the dominant direction went into the branch
    assert r.abs().max() < w.abs().max()


@pytest.mark.parametrize("spec, why", [("ptq4dit+smoothquant", "both set the per-channel vector b"),
                                       ("svdquant+ptq4dit", "both set the per-channel vector b"),
                                       ("svdquant+hadamard", "spreads again the outliers"),
                                       ("fp+gptq", "quantizes nothing"),
                                       ("gptq+gptq", "twice"),
                                       ("gptq+nope", "unknown method")])
def test_refused_compositions_say_why_in_one_line(spec, why):
    with pytest.raises(ValueError, match=why) as info:
        QuantConfig(method=spec)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="AdaRound learns"):
        QuantConfig(method="hadamard+gptq", recon="adaround")


def test_compositions_are_stored_in_one_spelling_with_every_components_options():
    cfg = QuantConfig(method="gptq+dilatequant", options={"gptq_act_order": True})
    assert cfg.method == "dilatequant+gptq" and cfg.use_tpq  # dilatequant's TPQ default holds
    assert cfg.options["gptq_act_order"] is True and cfg.options["gptq_block"] == 128
    assert QuantConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="has no option"):
        QuantConfig(method="hadamard", options={"rank": 8})


@pytest.mark.parametrize("fmt", [dict(w_format="int", w_group=8), dict(w_format="nvfp4"), dict(w_format="fp4_e2m1")])
def test_gptq_rounds_through_every_weight_format(fmt):
    """Group-wise INT, NVFP4 blocks and FP4 elements: GPTQ's columns use the layer's own grid and block scales."""
    model = make_tiny_dit(layers=1)
    res = quantize_with_details(model, QuantConfig(method="gptq", w_bits=4, a_bits=8, **fmt), _batches(model))
    rep = res.methods["rounding"]
    assert rep["gptq_error"] < rep["rtn_error"]
    layer = dict(res.model.named_modules())["transformer_blocks.0.ff.net.2"]
    assert torch.equal(layer.quantized_weight(), layer.weight)  # on the format's grid


@pytest.mark.parametrize("method", ["gptq", "hadamard", "svdquant", "hadamard+gptq", "svdquant+gptq"])
def test_save_and_load_are_bit_identical(tiny_bundle, tmp_path, method):
    from analysis.models.saved import save_quantized
    from analysis.models.loading import load

    model = tiny_bundle.denoiser
    batches = _batches(model)
    cfg = QuantConfig(method=method, w_bits=4, a_bits=4, options={"rank": 4} if "svd" in method else {})
    q = quantize_with_details(model, cfg, batches).model
    bundle = tiny_bundle.with_denoiser(q, name=f"tiny [{cfg.label}]", quant_config=cfg.to_dict())
    folder = save_quantized(bundle, cfg, tmp_path / "q", base_source="tiny")
    loaded = load(str(folder)).denoiser
    from quant.modules import quant_layers

    layers = quant_layers(q)
    stored = loaded.state_dict()
    for key, value in q.state_dict().items():  # weights are stored as their codes: compare what they compute with
        if key.endswith(".weight") and key[:-7] in layers:
            assert torch.equal(quant_layers(loaded)[key[:-7]].quantized_weight(), layers[key[:-7]].quantized_weight())
        else:
            assert torch.equal(stored[key], value), key
    if "gptq" in method:  # GPTQ leaves every weight on its grid: the stored codes give it back exactly
        assert all(torch.equal(quant_layers(loaded)[n].weight, m.weight) for n, m in layers.items())
    x, t, y = batches[0]
    assert torch.equal(loaded(x, timestep=t, class_labels=y).sample, q(x, timestep=t, class_labels=y).sample)


def test_cli_flags_and_help_come_from_the_registry_alone(tiny_folder, capsys):
    from analysis.cli import build_parser
    from analysis.cli.quantize import config_from_args
    from quant.methods import REGISTRY
    from tests.conftest import run_cli

    parser = build_parser()
    help_text = parser._subparsers._group_actions[0].choices["quantize"].format_help()
    for method in REGISTRY.values():
        assert f"{method.name}:" in help_text
        for opt in method.describe_options():
            assert opt.flag in help_text, opt.flag
    args = parser.parse_args(["quantize", "--method", "gptq+hadamard", "--gptq-act-order", "--no-hadamard-online"])
    config = config_from_args(args)
    assert config.method == "hadamard+gptq"
    assert config.options["gptq_act_order"] is True and config.options["hadamard_online"] is False
    rc, out, err = run_cli(capsys, "quantize", "--model", tiny_folder, "--method", "svdquant+hadamard")
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1 and "does not combine with hadamard" in err
    rc, out, err = run_cli(capsys, "quantize", "--model", tiny_folder, "--method", "hadamard", "--rank", "8")
    assert rc == 2 and "--rank is an option of svdquant" in err


def test_quantize_cli_reports_what_each_method_did(tiny_folder, capsys):
    import json

    from tests.conftest import run_cli

    rc, out, err = run_cli(capsys, "quantize", "--model", tiny_folder, "--calib-samples", "2", "--calib-steps", "3",
                           "--method", "svdquant+gptq", "--rank", "4", "--w-bits", "4", "--a-bits", "8", "--json")
    assert rc == 0, err
    methods = json.loads(out)["methods"]
    assert methods["lowrank"]["rank"] == 4 and methods["lowrank"]["extra_bytes"] > 0
    assert methods["rounding"]["method"] == "gptq" and methods["rounding"]["error_ratio"] < 1


def test_rotation_histograms_show_the_range_shrink():
    from analysis.quantization.method_views import method_headline, method_summary, rotation_histograms
    from analysis.plots.quant import rotation_histogram_figure, spectrum_figure

    model = make_tiny_dit(layers=1)
    batches = _batches(model)
    with torch.no_grad():  # plant an outlier channel in fc2's input: fc1 row 3 scaled up
        model.transformer_blocks[0].ff.net[0].proj.weight[3] *= 30
    res = quantize_with_details(model, QuantConfig(method="hadamard", w_bits=8, a_bits=8), batches)
    hists = rotation_histograms(res.model, batches[:1])
    h = hists["transformer_blocks.0.ff.net.2"]
    assert max(h["absmax_after"]) < 0.5 * max(h["absmax_before"])
    assert sum(h["before"]) == sum(h["after"]) > 0
    fig = rotation_histogram_figure(h, "transformer_blocks.0.ff.net.2")
    assert len(fig.data) == 2 and "after rotation" in fig.layout.title.text
    res = quantize_with_details(model, QuantConfig(method="svdquant", w_bits=8, a_bits=8, options={"rank": 4}),
                                batches)
    summary = method_summary(res.methods)
    layer = "transformer_blocks.0.ff.net.2"
    fig = spectrum_figure(summary["lowrank"]["spectra"][layer], 4, layer)
    assert len(fig.data[0].y) == 16 and fig.layout.shapes[0].x0 == 4.5 and "rank 4" in fig.layout.annotations[0].text
    assert method_headline(summary)["lowrank"]["layers"] > 0


@pytest.mark.parametrize("method", ["hadamard+gptq", "svdquant+gptq"])
def test_unet_rotation_lowrank_exact_in_float_and_gptq_rounds_convs(method):
    from tests.test_unet import make_tiny_unet

    model = make_tiny_unet()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(3, 3, 8, 8, generator=g), torch.full((3,), t), torch.zeros(3, dtype=torch.long))
               for t in (900, 400, 30)]
    options = {"rank": 4} if "svd" in method else {}
    res = quantize_with_details(model, QuantConfig(method=method, w_bits=None, a_bits=None, options=options), batches)
    for x, t, _ in batches:
        ref = model(x, t).sample
        assert _rel(res.model(x, t).sample, ref) < 1e-5
    res = quantize_with_details(model, QuantConfig(method=method, w_bits=4, a_bits=8, options=options), batches)
    rounded = res.methods["rounding"]["layers"]
    assert any("conv" in name for name in rounded)  # convolutions are rounded by GPTQ too (unfolded patches)
    assert res.methods["rounding"]["gptq_error"] < res.methods["rounding"]["rtn_error"]
    if "svd" in method:
        assert any("conv" in name for name in res.methods["lowrank"]["costs"])  # conv branches: k x k then 1 x 1
