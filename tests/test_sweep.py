"""Sweep and sensitivity: BOPs from layer shapes, the Pareto front, the recommendation, mixed precision, and
`dqlab sweep` / `dqlab sensitivity` / `dqlab quantize --config` on the bundled model with tiny settings."""
from __future__ import annotations

import json

import pytest

from analysis.evaluation.sweep import pareto_front, parse_bits, recommend
from tests.conftest import run_cli


def _pt(label, bops, fid, size=1, method="baseline"):
    return {"label": label, "method": method, "bops": bops, "weight_bytes": size, "fid_vs_fp": fid,
            "fid_vs_fp_interval": [fid * 0.8, fid * 1.2], "rel_rms": fid / 100, "num_samples": 64,
            "config": {"method": method}}


POINTS = [_pt("FP", 100, 0.0, 8, "fp"), _pt("W8A8", 25, 3.0, 2), _pt("W6A6", 20, 9.0, 2),
          _pt("W4A8 worse", 22, 12.0, 1), _pt("W4A4", 12, 60.0, 1)]


def test_pareto_front_keeps_points_no_other_beats_on_both():
    assert pareto_front(POINTS) == ["W4A4", "W6A6", "W8A8", "FP"]  # W4A8 costs more than W6A6 and is worse


def test_pareto_front_keeps_equal_points():
    """By the definition (no other point is no worse on both and better on one), two equal points are both on
    the front; a point that only ties one of them on cost and is worse is not."""
    twins = [_pt("a", 10, 5.0), _pt("b", 10, 5.0), _pt("c", 10, 6.0), _pt("d", 20, 1.0)]
    assert pareto_front(twins) == ["a", "b", "d"]


def test_tolerances_on_per_seed_measures_are_lower_bounds():
    pts = [dict(p, same_digit_vs_fp=s, psnr_vs_fp=d) for p, s, d in
           zip(POINTS, [1.0, 0.99, 0.95, 0.9, 0.7], [None, 30.0, 22.0, 20.0, 12.0])]
    assert recommend(pts, {"same_digit_vs_fp": 0.95})["label"] == "W6A6"
    assert recommend(pts, {"psnr_vs_fp": 25})["label"] == "W8A8"
    assert ">= 25" in recommend(pts, {"psnr_vs_fp": 25})["reason"]
    assert pareto_front(pts, quality="same_digit_vs_fp") == ["W4A4", "W6A6", "W8A8", "FP"]
    assert "FP" in pareto_front(pts, quality="psnr_vs_fp")  # identical to itself: the best PSNR there is


def test_recommend_picks_the_cheapest_point_within_the_tolerance():
    rec = recommend(POINTS, {"fid_vs_fp": 10})
    assert rec["label"] == "W6A6"
    assert "0.20x FP's BOPs" in rec["reason"] and "W4A4" in rec["reason"]
    assert recommend(POINTS, {"fid_vs_fp": 100})["label"] == "W4A4"
    assert recommend(POINTS, {"rel_rms": 0.05})["label"] == "W8A8"
    assert recommend([p for p in POINTS if p["method"] != "fp"], {"fid_vs_fp": 1})["label"] is None
    with pytest.raises(ValueError, match="unknown tolerance measure"):
        recommend(POINTS, {"psnr": 3})


def test_parse_bits():
    assert parse_bits("W4A8") == (4, 8) and parse_bits("w8a16") == (8, None)
    for bad in ("4/8", "W9A8", "W4"):
        with pytest.raises(ValueError):
            parse_bits(bad)


def test_bops_follow_the_layer_bits(bundled):
    from analysis.quantization.sizes import bops, mac_table
    from quant.config import QuantConfig

    table = mac_table(bundled.denoiser)
    fc1 = table["transformer_blocks.0.ff.net.0.proj"]
    # 16x16 image, patch 2 -> 64 tokens; fc1 maps width 128 to 512
    assert fc1 == {"kind": "linear", "macs": 64 * 128 * 512, "inner": 128, "out": 512}
    assert table["transformer_blocks.0.attn1.qkv_softmax"]["macs"] == 2 * 64 * 64 * 128
    # the final layer calls block 0's embedding again: two rows per forward instead of one
    assert table["transformer_blocks.0.norm1.emb.timestep_embedder.linear_2"]["macs"] == 2 * 128 * 128
    fp = bops(table, None)
    w8 = bops(table, QuantConfig(method="baseline", w_bits=8, a_bits=8))
    mixed = bops(table, QuantConfig(method="baseline", w_bits=4, a_bits=4,
                                    layer_bits={"transformer_blocks.0.ff.net.0.proj": [8, 8]}))
    w4 = bops(table, QuantConfig(method="baseline", w_bits=4, a_bits=4))
    assert fp > w8 > mixed > w4
    assert mixed - w4 == fc1["macs"] * (64 - 16)


def test_bops_count_the_low_rank_branch_and_the_online_rotation(bundled):
    """SVDQuant's 16-bit branch and an online Hadamard transform run beside the quantized GEMMs: counted by hand
    for one layer, and for the whole model a rank-32 branch makes W4A4 cost more than W8A8 at width 128."""
    from analysis.quantization.sizes import bops, mac_table, side_bops
    from quant.config import QuantConfig
    from quant.wrap import planned_branches

    table = mac_table(bundled.denoiser)
    fc1 = "transformer_blocks.0.ff.net.0.proj"  # 64 rows, 128 -> 512
    assert side_bops(table, {"lowrank": {fc1: 32}}) == 64 * 32 * (128 + 512) * 16 * 16
    assert side_bops(table, {"rotation": {fc1: {"where": "online"}}}, float_bits=32) == 64 * 128 * 7 * 32
    assert side_bops(table, {"rotation": {fc1: {"where": "folded"}}}) == 0
    w4 = QuantConfig(method="baseline", w_bits=4, a_bits=4)
    svd32 = QuantConfig(method="svdquant", w_bits=4, a_bits=4)
    svd4 = QuantConfig(method="svdquant", w_bits=4, a_bits=4, options={"rank": 4})
    had = QuantConfig(method="hadamard", w_bits=4, a_bits=4)
    cost = {name: bops(table, qc, 32, planned_branches(bundled.denoiser, qc))
            for name, qc in (("w4", w4), ("svd32", svd32), ("svd4", svd4), ("had", had))}
    w8 = bops(table, QuantConfig(method="baseline", w_bits=8, a_bits=8))
    assert cost["w4"] == bops(table, w4)  # no branch, no rotation: nothing beside the GEMMs
    assert cost["w4"] < cost["had"] < cost["svd4"] < w8 < cost["svd32"]


def test_layer_bits_quantize_the_named_layers_at_their_bits(bundled):
    from analysis.quantization.pipeline import calibration_for
    from quant.api import QuantConfig, quantize
    from quant.modules import quant_layers

    cal = calibration_for(bundled, steps=2, num_samples=1)
    config = QuantConfig(method="baseline", w_bits=4, a_bits=4, layer_bits={"*.ff.net.2": [8, 6]})
    q = quant_layers(quantize(bundled.denoiser, config, cal))
    assert (q["transformer_blocks.3.ff.net.2"].w_bits, q["transformer_blocks.3.ff.net.2"].act.bits) == (8, 6)
    assert (q["transformer_blocks.3.ff.net.0.proj"].w_bits, q["transformer_blocks.3.ff.net.0.proj"].act.bits) == (4, 4)
    assert QuantConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="layer_bits"):
        QuantConfig(layer_bits={"*": [9, 4]}).validate()


def test_sensitivity_ranks_units_per_timestep(bundled, one_torch_thread):
    from analysis.quantization.pipeline import calibration_for
    from analysis.quantization.sensitivity import sensitivity

    cal = calibration_for(bundled, steps=3, num_samples=1)
    before = {k: v.clone() for k, v in bundled.denoiser.state_dict().items()}
    sens = sensitivity(bundled, 4, 4, cal, granularity="kind")
    assert all((before[k] == v).all() for k, v in bundled.denoiser.state_dict().items())  # not modified
    assert sens.only.shape == sens.all_but.shape == (len(sens.units), 3) and len(sens.timesteps) == 3
    ranking = sens.ranking()
    assert ranking["error_only_this_quantized"].is_monotonic_decreasing
    # every unit alone does less damage than all of them together, on average over units
    assert sens.only.mean() < sens.all_quantized.mean()
    assert (sens.all_but <= sens.all_quantized.max() * 1.5).all()


@pytest.mark.slow
def test_cli_sweep_2x2_then_resumes_from_the_store(capsys, tmp_path, one_torch_thread):
    args = ["sweep", "--methods", "baseline,dilatequant", "--bits", "W8A8,W4A4", "--num-samples", "16",
            "--steps", "3", "--calib-samples", "1", "--device", "cpu", "--data-dir", str(tmp_path / "store"),
            "--tolerance", "fid_vs_fp=1000", "--config-out", str(tmp_path / "pick.json"), "--bootstrap", "0", "--json"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    res = json.loads(out)
    labels = [p["label"] for p in res["points"]]
    assert labels == ["FP", "baseline W8A8", "dilatequant W8A8 TPQ", "baseline W4A4", "dilatequant W4A4 TPQ"]
    assert res["measured"] == 5 and res["reused"] == 0
    for p in res["points"]:
        assert p["num_samples"] == 16 and p["weight_bytes"] > 0 and p["bops"] > 0
        assert p["fid_vs_fp"] is not None and p["rel_rms"] is not None
        assert p["fid_vs_fp_interval"] is None or p["label"] == "FP"  # --bootstrap 0: no intervals
    assert set(res["front"]) <= set(labels) and "FP" in res["front"]
    rec = res["recommendation"]
    assert rec["label"] in res["front"] and "cheapest" in rec["reason"]
    assert json.loads((tmp_path / "pick.json").read_text()) == rec["config"]
    assert "[5/5]" in err  # progress over points
    code, out, _ = run_cli(capsys, *args)
    again = json.loads(out)
    assert code == 0 and again["measured"] == 0 and again["reused"] == 5
    assert [p["fid_vs_fp"] for p in again["points"]] == [p["fid_vs_fp"] for p in res["points"]]
    # the recommended config quantizes through dqlab quantize --config
    code, out, err = run_cli(capsys, "quantize", "--config", str(tmp_path / "pick.json"), "--calib-samples", "1",
                             "--calib-steps", "2", "--device", "cpu", "--json")
    assert code == 0, err
    assert json.loads(out)["config"] == rec["config"]


def test_joined_options_make_one_point_with_each_setting():
    from analysis.evaluation.sweep import SweepSpec, point_config

    spec = SweepSpec(methods=["svdquant+gptq", "baseline"], bits=["W4A4"],
                     options=["tpq", "bkd", "tpq+bkd", "tpq+float-io"]).validate()
    configs = [point_config(m, b, o, spec, None) for m, b, f, o in spec.grid()]
    assert len(configs) == 8
    joined = configs[2]
    assert joined.method == "svdquant+gptq" and joined.tpq and joined.recon == "bkd"
    assert joined.label == "svdquant+gptq W4A4 TPQ +BKD"
    assert not configs[1].tpq and configs[1].recon == "bkd"  # bkd alone keeps the method's own activations
    assert configs[3].tpq and configs[3].exclude and configs[3].recon == "none"
    with pytest.raises(ValueError, match="twice"):
        SweepSpec(methods=["baseline"], bits=["W4A4"], options=["tpq+tpq"]).validate()


def test_method_options_reach_the_methods_that_declare_them_and_name_the_point():
    from analysis.evaluation.sweep import SweepSpec, point_config

    spec = SweepSpec(methods=["svdquant+gptq", "baseline"], bits=["W4A4"], options=["tpq"],
                     method_options={"rank": 4}).validate()
    low, base = [point_config(m, b, o, spec, None) for m, b, f, o in spec.grid()]
    assert low.options["rank"] == 4 and low.label == "svdquant+gptq W4A4 rank=4 TPQ"
    assert base.options == {} and base.label == "baseline W4A4 TPQ"
    default = SweepSpec(methods=["svdquant"], bits=["W4A4"]).validate()
    assert point_config("svdquant", "W4A4", "default", default).label == "svdquant W4A4"  # rank 32 says nothing


@pytest.mark.parametrize("argv, reason", [
    (["sweep", "--bits", "W9A8"], "bit-width"),
    (["sweep", "--methods", "fp"], "unknown method"),
    (["sweep", "--options", "keep8"], "unknown sweep option"),
    (["sweep", "--options", "adaround+bkd"], "both reconstructions"),
    (["sweep", "--options", "default+tpq"], "joins nothing"),
    (["sweep", "--methods", "baseline", "--method-option", "rank=4"], "no method of this sweep"),
    (["sweep", "--methods", "svdquant", "--method-option", "rank=four"], "rank must be an integer"),
    (["sweep", "--methods", "svdquant", "--method-option", "rank=0"], "rank must be an integer >= 1"),
    (["sweep", "--method-option", "colour=red"], "unknown; method options"),
    (["sweep", "--method-option", "rank"], "NAME=VALUE"),
    (["sweep", "--tolerance", "psnr=3"], "--tolerance"),
    (["sensitivity", "--granularity", "head"], "--granularity"),
])
def test_cli_sweep_bad_arguments_exit_2_with_one_line(capsys, argv, reason):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert reason in err and len(err.strip().splitlines()) == 1


def test_cli_quantize_config_file_errors(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"method": "baseline", "w_bits": 4, "colour": "red"}')
    code, _, err = run_cli(capsys, "quantize", "--config", str(bad))
    assert code == 2 and "colour" in err and str(bad) in err
    code, _, err = run_cli(capsys, "quantize", "--config", str(tmp_path / "missing.json"))
    assert code == 2 and "cannot read" in err


def test_cli_sensitivity_json(capsys, one_torch_thread):
    code, out, err = run_cli(capsys, "sensitivity", "--w-bits", "4", "--a-bits", "4", "--steps", "2", "--samples", "1",
                             "--granularity", "block", "--device", "cpu", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert [r["rank"] for r in res["ranking"]] == list(range(1, 9))  # patch embedding, 6 blocks, final layer
    assert {r["unit"] for r in res["ranking"]} >= {"patch embedding", "block 0", "final layer"}
    assert len(res["timesteps"]) == 2 and all(len(r["only_per_timestep"]) == 2 for r in res["ranking"])
