"""Number formats: OCP MX element grids, rounding, saturation, MX and NVFP4 scales, blocks, configs, save/load."""
import dataclasses

import numpy as np

import pytest
import torch

from quant.formats import (ELEMENTS, PRESETS, bits_per_element, block_params, e8m0_scale, element_codes,
                           element_grid, element_values, fake_quant_blocks, fake_quantize_format, grid_neighbours,
                           pad_blocks, parse_format, round_element_ste, round_to_element, tensor_scale_for)

# Positive values of each element format, written out from the OCP MX v1.0 tables (not from the code).
E2M1 = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
E2M3 = [i / 8 for i in range(8)] + [m * 2.0 ** e for e in range(0, 3) for m in (1, 1.125, 1.25, 1.375, 1.5, 1.625,
                                                                                  1.75, 1.875)]
E3M2 = [i / 16 for i in range(4)] + [m * 2.0 ** e for e in range(-2, 5) for m in (1, 1.25, 1.5, 1.75)]
E4M3 = [i / 512 for i in range(8)] + [m * 2.0 ** e for e in range(-6, 9) for m in (1, 1.125, 1.25, 1.375, 1.5,
                                                                                    1.625, 1.75, 1.875)][:-1]
E5M2 = [i * 2.0 ** -16 for i in range(4)] + [m * 2.0 ** e for e in range(-14, 16) for m in (1, 1.25, 1.5, 1.75)]
TABLES = {"fp4_e2m1": E2M1, "fp6_e2m3": E2M3, "fp6_e3m2": E3M2, "fp8_e4m3": E4M3, "fp8_e5m2": E5M2}


def _full(pos):
    pos = sorted(set(float(v) for v in pos))
    return torch.tensor([-v for v in reversed(pos) if v > 0] + pos)


@pytest.mark.parametrize("name", list(TABLES))
def test_each_element_grid_is_its_full_table_and_rounds_onto_itself(name):
    grid = element_grid(name)
    assert torch.equal(grid, _full(TABLES[name]))
    assert grid.max().item() == {"fp4_e2m1": 6, "fp6_e2m3": 7.5, "fp6_e3m2": 28, "fp8_e4m3": 448,
                                 "fp8_e5m2": 57344}[name] == ELEMENTS[name].max
    assert torch.equal(round_to_element(grid, name), grid)
    # every value between two neighbours rounds to the nearer one (the midpoints are the ties, checked below)
    lo, hi = grid[:-1], grid[1:]
    for frac in (0.2, 0.8):
        v = lo + frac * (hi - lo)
        assert torch.equal(round_to_element(v, name), torch.where(torch.tensor(frac < 0.5), lo, hi))
    codes = element_codes(grid, name)
    assert torch.equal(element_values(codes, name), grid)
    assert codes.max() < 2 ** ELEMENTS[name].bits


def test_ties_round_to_even_mantissa_and_out_of_range_saturates():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.5, 7.0, 1e9, -0.25, -5.0, -1e9])
    assert round_to_element(x, "fp4_e2m1").tolist() == [0, 1, 1, 2, 2, 4, 4, 6, 6, 6, -0, -4, -6]
    # E4M3: 464 lies halfway between 448 and the missing 480: saturates to 448; 1.0625 ties to 1.0 (even)
    assert round_to_element(torch.tensor([464.0, 1000.0, 1.0625, 1.1875]), "fp8_e4m3").tolist() == [448, 448, 1, 1.25]
    # E5M2 has inf in its encoding, but conversion saturates: no inf ever
    assert round_to_element(torch.tensor([float("inf"), 1e6]), "fp8_e5m2").tolist() == [57344, 57344]


def test_zero_and_subnormals_are_exact_and_nan_is_refused():
    for name, e in ELEMENTS.items():
        sub = torch.arange(0, 2 ** e.mbits) * e.min_subnormal  # every subnormal and zero
        assert torch.equal(round_to_element(sub, name), sub)
        # half the smallest subnormal is a tie between 0 (even) and the subnormal: rounds to 0
        assert round_to_element(torch.tensor([e.min_subnormal / 2, e.min_subnormal * 0.51]), name).tolist() == \
            [0, e.min_subnormal]
        with pytest.raises(ValueError, match="NaN"):
            round_to_element(torch.tensor([1.0, float("nan")]), name)


def test_mx_scale_exponent_matches_a_hand_computation():
    e2m1 = ELEMENTS["fp4_e2m1"]  # emax 2
    # amax 7.9: floor(log2 7.9) = 2 -> 2^(2 - 2) = 1; amax 8: 2^(3 - 2) = 2; amax 0.3: floor(log2 0.3) = -2 -> 2^-4
    assert e8m0_scale(torch.tensor([7.9, 8.0, 0.3, 6.0]), e2m1).tolist() == [1.0, 2.0, 2.0 ** -4, 1.0]
    assert e8m0_scale(torch.tensor([448.0, 500.0]), ELEMENTS["fp8_e4m3"]).tolist() == [1.0, 1.0]  # emax 8
    assert e8m0_scale(torch.tensor([1.0]), ELEMENTS["fp8_e5m2"]).tolist() == [2.0 ** -15]
    assert e8m0_scale(torch.tensor([0.0]), e2m1).item() == 2.0 ** -127  # all-zero block: the smallest scale
    # a whole MXFP4 block: scale 2, then each element x / 2 on the E2M1 grid, saturating at 6 * 2
    block = torch.tensor([[15.0, 1.0, -3.1, 0.4] + [0.0] * 28])
    out = fake_quantize_format(block, PRESETS["mxfp4"], axis=-1)
    assert out[0, :4].tolist() == [12.0, 1.0, -3.0, 0.0]


def test_nvfp4_two_level_scale_round_trips():
    torch.manual_seed(0)
    x = torch.randn(4, 64) * torch.logspace(-2, 1, 64)  # blocks of very different size
    spec = PRESETS["nvfp4"]
    ts = tensor_scale_for(x.abs().amax(), spec)
    assert ts.item() == pytest.approx(x.abs().amax().item() / (448 * 6))
    scale, _ = block_params(pad_blocks(x, 16), spec, ts)
    assert torch.equal(round_to_element(scale, "fp8_e4m3"), scale) and scale.max() <= 448  # E4M3 block scales
    out = fake_quant_blocks(x, spec, ts)
    eff = (scale * ts).repeat_interleave(16, dim=-1)
    assert torch.equal(round_to_element(out / eff, "fp4_e2m1"), out / eff)  # every element on the E2M1 grid
    assert torch.equal(fake_quant_blocks(out, spec, ts), out)  # quantizing again changes nothing
    # the block scale follows each block: small blocks keep their relative precision
    rel = ((out - x).pow(2).sum(-1) / x.pow(2).sum(-1)).sqrt()
    assert rel.max() < 0.2


def test_blocks_pad_when_the_input_dimension_is_not_a_multiple_of_the_group():
    torch.manual_seed(0)
    x = torch.randn(3, 70)
    for spec in (PRESETS["mxfp4"], PRESETS["int4-g32"], parse_format("fp8_e4m3", 8, 16)):
        out = fake_quantize_format(x, spec, axis=-1)
        assert out.shape == x.shape
        padded = torch.cat([x, torch.zeros(3, 26)], dim=1)  # 70 -> 96 = 3 blocks of 32 (fp8: 80 = 5 x 16)
        ref = fake_quantize_format(padded, spec, axis=-1)[:, :70]
        assert torch.equal(out, ref)
        # the last, short block has its own scale: scaling it up leaves the first blocks unchanged
        y = x.clone()
        y[:, 64:] *= 100
        assert torch.equal(fake_quantize_format(y, spec, axis=-1)[:, :64], out[:, :64])


def test_a_block_scale_keeps_an_outlier_inside_its_block():
    x = torch.randn(1, 128)
    x[0, 5] = 200.0  # an outlier in block 0
    per_channel = fake_quantize_format(x, parse_format("fp4_e2m1", 4), axis=0)
    mx = fake_quantize_format(x, PRESETS["mxfp4"], axis=-1)
    err_pc, err_mx = (per_channel - x)[0, 32:].abs().mean(), (mx - x)[0, 32:].abs().mean()
    assert err_mx < 0.3 * err_pc  # blocks 1-3 do not pay for block 0's outlier


def test_straight_through_gradient_and_float_grid_neighbours():
    v = torch.tensor([0.3, 1.2, -2.6, 9.0], requires_grad=True)
    round_element_ste(v, "fp4_e2m1").sum().backward()
    assert v.grad.tolist() == [1, 1, 1, 0]  # saturated values pass no gradient
    lo, hi = grid_neighbours(torch.tensor([1.2, -2.6, 0.1, 5.0, 0.0]), "fp4_e2m1")
    assert lo.tolist() == [1.0, -3.0, 0.0, 4.0, 0.0] and hi.tolist() == [1.5, -2.0, 0.5, 6.0, 0.5]
    # zero's upper neighbour is the smallest subnormal in every format
    for name, e in ELEMENTS.items():
        assert grid_neighbours(torch.zeros(1), name)[1].item() == e.min_subnormal


def test_rounding_leaves_its_input_alone_and_keeps_half_precision():
    v = torch.tensor([0.3, 1.2, -2.6, 9.0])
    before = v.clone()
    assert round_to_element(v, "fp4_e2m1").tolist() == [0.5, 1.0, -3.0, 6.0]
    assert torch.equal(v, before)
    h = round_to_element(v.half(), "fp8_e4m3")
    assert h.dtype == torch.float16 and h.tolist() == [0.3125, 1.25, -2.5, 9.0]


def test_presets_and_bits_per_element_with_scales():
    assert bits_per_element(PRESETS["mxfp4"]) == 4.25 and bits_per_element(PRESETS["nvfp4"]) == 4.5
    assert bits_per_element(PRESETS["mxfp8"]) == 8.25
    assert bits_per_element(PRESETS["int4-g128"], symmetric=False) == 4 + 24 / 128
    assert PRESETS["mxfp6"].element == "fp6_e2m3" and PRESETS["nvfp4"].group == 16


@pytest.mark.parametrize("bad, match", [
    (dict(w_format="fp4_e2m1", w_bits=8), "fp4_e2m1 holds 4-bit elements but w_bits is 8"),
    (dict(a_format="mxfp4", a_bits=8), "a_bits to 4"),
    (dict(w_format="fp9"), "unknown w_format"),
    (dict(w_format="nvfp4", w_bits=4, w_group=32), "nvfp4 fixes blocks of 16"),
    (dict(w_group=1), "w_group"),
    (dict(a_per_token=True, a_group=32), "per-token or per-block"),
])
def test_config_refuses_nonsense_formats_in_one_line(bad, match):
    from quant.config import QuantConfig

    with pytest.raises(ValueError, match=match) as exc:
        QuantConfig(**bad)
    assert "\n" not in str(exc.value)


def test_config_round_trips_formats_and_old_configs_still_load():
    from quant.config import QuantConfig

    cfg = QuantConfig(w_bits=4, a_bits=4, w_format="nvfp4", a_format="mxfp4", tpq=True)
    again = QuantConfig.from_json(cfg.to_json())
    assert again == cfg and again.w_spec == PRESETS["nvfp4"] and "w:nvfp4 a:mxfp4" in cfg.label
    old = QuantConfig(w_bits=4, a_bits=8).to_dict()
    assert "w_format" not in old  # an int config serialises as before formats existed (stored keys unchanged)
    assert QuantConfig.from_dict(old).w_format == "int"
    # mixed precision: layers kept at 8 bits under an FP4 format run the int grid at 8 bits
    mixed = QuantConfig(w_bits=4, a_bits=4, w_format="mxfp4", a_format="mxfp4", layer_bits={"pos_embed.proj": [8, 8]})
    assert mixed.formats_for("pos_embed.proj") == (parse_format("int", 8), parse_format("int", 8))
    assert mixed.formats_for("proj_out_2")[0] == PRESETS["mxfp4"]


FORMAT_CONFIGS = [
    dict(w_bits=8, a_bits=8, w_format="fp8_e4m3", a_format="fp8_e4m3"),
    dict(w_bits=8, a_bits=8, w_format="fp8_e5m2", a_format="fp8_e5m2", a_per_token=True),
    dict(w_bits=6, a_bits=6, w_format="fp6_e3m2", a_format="mxfp6"),
    dict(w_bits=6, a_bits=8, w_format="fp6_e2m3", w_per_channel=False),
    dict(w_bits=4, a_bits=4, w_format="fp4_e2m1", a_format="fp4_e2m1"),
    dict(w_bits=8, a_bits=8, w_format="mxfp8", a_format="mxfp8"),
    dict(w_bits=4, a_bits=4, w_format="mxfp4", a_format="mxfp4", tpq=True),
    dict(w_bits=4, a_bits=4, w_format="nvfp4", a_format="nvfp4", tpq=True),
    dict(w_bits=4, a_bits=8, w_format="int4-g32"),
    dict(w_bits=4, a_bits=4, w_format="int4-g64", a_format="int4-g128", w_symmetric=True),
    dict(w_bits=3, a_bits=8, w_format="int", w_group=16),
]


@pytest.mark.parametrize("fields", FORMAT_CONFIGS, ids=lambda f: f"{f['w_format']}-{f.get('a_format', 'int')}")
def test_a_saved_folder_in_every_format_reloads_bit_identically(tiny_bundle, tmp_path, fields):
    from analysis.models.saved import save_quantized
    from analysis.models.loading import load
    from quant.api import QuantConfig, quantize, weight_bytes
    from quant.modules import quant_layers
    from tests.test_quant_api import _batches

    cfg = QuantConfig(method="baseline", **fields)
    batches = _batches(tiny_bundle.denoiser)
    q = quantize(tiny_bundle.denoiser, cfg, batches)
    assert all(layer.w_fmt == cfg.w_spec for layer in quant_layers(q).values())
    folder = save_quantized(tiny_bundle.with_denoiser(q, name="q", quant_config=cfg.to_dict()), cfg,
                            tmp_path / "q", base_source="tiny")
    loaded = load(str(folder)).denoiser
    x, t, y = (torch.cat([b[i] for b in batches]) for i in range(3))
    out = q(x, timestep=t, class_labels=y).sample
    assert torch.equal(loaded(x, timestep=t, class_labels=y).sample, out)
    for name, layer in quant_layers(loaded).items():
        assert torch.equal(layer.quantized_weight(), quant_layers(q)[name].quantized_weight())
    stored = (folder / "model.safetensors").stat().st_size
    assert abs(stored - weight_bytes(q)) < 20000  # the header aside, the file holds what weight_bytes counts
    assert dataclasses.asdict(cfg) == dataclasses.asdict(QuantConfig.from_dict(cfg.to_dict()))


def test_scale_bytes_are_counted_in_the_stored_size():
    from quant.io import stored_tensors
    from quant.modules import ActQuantizer, QuantLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 64, bias=False)
    weights = {}
    for name in ("fp4_e2m1", "mxfp4", "nvfp4", "int4-g32"):
        layer = QuantLinear(lin, 4, ActQuantizer(None), w_fmt=parse_format(name, 4))
        tensors, _ = stored_tensors(torch.nn.Sequential(layer))
        weights[name] = sum(t.numel() * t.element_size() for k, t in tensors.items() if not k.startswith("0.act"))
    # 64 x 256 codes at 4 bits = 8192 bytes, plus: per-channel fp32 scales 64 x 4; MXFP4 one E8M0 byte per 32
    # (4.25 bits); NVFP4 one E4M3 byte per 16 (4.5 bits) and a 4-byte tensor scale; int4-g32 an fp16 scale and a
    # uint8 zero point per 32 (4.75 bits)
    assert weights == {"fp4_e2m1": 8192 + 256, "mxfp4": 8192 * 4.25 / 4, "nvfp4": 8192 * 4.5 / 4 + 4,
                       "int4-g32": 8192 * 4.75 / 4}


@pytest.mark.parametrize("recon", ["adaround", "bkd"])
def test_block_wise_optimization_on_float_grids_ends_on_the_grid(recon):
    from quant.api import QuantConfig, quantize_with_details
    from quant.modules import quant_layers
    from quant.recon.bkd import on_grid
    from tests.conftest import make_tiny_dit
    from tests.test_quant_api import _batches

    model = make_tiny_dit()
    fmt = "fp4_e2m1" if recon == "adaround" else "nvfp4"  # per-channel FP4, and FP4 in blocks under two scales
    cfg = QuantConfig(method="baseline", w_bits=4, a_bits=4, w_format=fmt, a_format=fmt, tpq=True, recon=recon,
                      recon_iters=30, recon_rows=12)
    res = quantize_with_details(model, cfg, _batches(model))
    assert all(on_grid(layer) for layer in quant_layers(res.model).values())
    units = res.recon["units"]
    assert sum(u["error_after"] < u["error_before"] for u in units) >= len(units) // 2
    key = "codes_changed" if recon == "bkd" else "rounding_flipped"
    assert any(u[key] for u in units)  # the optimization moved some weights to the other grid neighbour


def test_sweep_formats_axis_and_bops_count_scale_bits():
    from analysis.quantization.sizes import bops
    from analysis.evaluation.sweep import SweepSpec, point_config
    from quant.config import QuantConfig

    spec = SweepSpec(methods=["baseline"], bits=["W8A8", "W4A4", "W4A8"],
                     formats=["int", "fp8_e4m3", "mxfp4", "nvfp4/fp8_e4m3"]).validate()
    labels = [point_config(m, b, o, spec, None, fmt=f).label for m, b, f, o in spec.grid()]
    assert labels == ["baseline W8A8", "baseline W8A8 fp8_e4m3", "baseline W4A4", "baseline W4A4 mxfp4",
                      "baseline W4A8", "baseline W4A8 w:mxfp4", "baseline W4A8 w:nvfp4 a:fp8_e4m3"]
    with pytest.raises(ValueError, match="unknown format"):
        SweepSpec(methods=["baseline"], bits=["W4A4"], formats=["fp5"]).validate()
    with pytest.raises(ValueError, match="no format"):
        SweepSpec(methods=["baseline"], bits=["W8A8"], formats=["mxfp4"]).validate()
    table = {"l": {"kind": "linear", "macs": 1000}}
    assert bops(table, QuantConfig(w_bits=4, a_bits=4)) == 16000
    assert bops(table, QuantConfig(w_bits=4, a_bits=4, w_format="mxfp4", a_format="mxfp4")) == int(1000 * 4.25 * 4.25)
    assert bops(table, QuantConfig(w_bits=4, a_bits=8, w_format="nvfp4")) == int(1000 * 4.5 * 8)


def test_teaching_view_isolates_an_outlier_to_its_block():
    from analysis.quantization.format_view import compare_formats
    from analysis.plots.formats import format_channel_error, format_histogram

    torch.manual_seed(0)
    x = torch.randn(64, 96)
    x[:, 40] *= 50  # one outlier channel, in block 1 of 32 (and block 2 of 16)
    view = compare_formats(x, channel=40)
    err = view.channel_error
    assert set(err) == {"int4", "fp4_e2m1", "mxfp4", "nvfp4"}
    ordinary = [j for j in range(96) if j // 32 != 1]
    # a per-tensor scale crushes every ordinary channel; MXFP4 leaves the blocks without the outlier alone
    assert err["int4"][ordinary].mean() > 0.5 and err["mxfp4"][ordinary].mean() < 0.2
    assert err["mxfp4"][32:64].mean() > 2 * err["mxfp4"][ordinary].mean()
    assert err["nvfp4"][[j for j in range(96) if j // 16 != 2]].mean() < 0.2
    # FP4 grid points crowd near zero: the smallest gap is 1/4 of the largest (E2M1: 0.5 vs 2)
    g = np.diff(view.grids["fp4_e2m1"])
    assert g.max() / g.min() == pytest.approx(4.0, rel=1e-4)
    assert len(format_histogram(view).data) == 5 and len(format_channel_error(view).data) == 4


def test_tpq_keeps_a_per_timestep_tensor_scale_under_the_block_scales():
    from quant.modules import ActQuantizer, TimestepContext

    ctx = TimestepContext()
    q = ActQuantizer(4, per_timestep=True, ctx=ctx, num_timesteps=2, fmt=PRESETS["nvfp4"])
    x = torch.randn(4, 8, 64)
    x[2:] *= 100  # timestep 900 is 100x louder than timestep 10
    ctx.t = torch.tensor([10, 10, 900, 900])
    q.start_observing()
    q(x)
    q.finalize()
    assert q.timesteps.tolist() == [10, 900] and q.dynamic and q.uses_tensor_scale
    amax = [x[:2].abs().amax(), x[2:].abs().amax()]
    assert torch.allclose(q.scale, torch.stack(amax) / (448 * 6))  # NVFP4's tensor scale, one per timestep
    out = q(x)
    # each sample is quantized with its own timestep's tensor scale: the same as quantizing it alone
    for rows, ts in ((slice(0, 2), q.scale[0]), (slice(2, 4), q.scale[1])):
        assert torch.equal(out[rows], fake_quant_blocks(x[rows], PRESETS["nvfp4"], ts))
