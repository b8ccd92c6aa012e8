"""`dqlab quantize`: JSON fields, a saved model that `--model DIR` loads and samples again with the same
error, and one-line errors with exit status 2."""
from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

SMALL = ["--calib-samples", "2", "--calib-steps", "3", "--device", "cpu"]


def test_quantize_json_save_and_reload_round_trip(tiny_folder, tmp_path, capsys):
    from analysis.models.loading import load
    from analysis.quantization.calibration import calibration_for
    from analysis.quantization.pipeline import output_errors

    out_dir = tmp_path / "q"
    rc, out, err = run_cli(capsys, "quantize", "--model", tiny_folder, "--method", "ptq4dit", "--w-bits", 4,
                        "--a-bits", 8, "--attn-bits", 8, "--tpq", *SMALL, "--out", out_dir, "--json")
    assert rc == 0, err
    res = json.loads(out)
    for key in ("method", "w_bits", "a_bits", "seconds", "layers_quantized", "weight_bytes", "rel_rms",
                "calibration_seconds"):
        assert key in res, key
    assert (res["method"], res["w_bits"], res["a_bits"], res["attn_bits"], res["tpq"]) == ("ptq4dit", 4, 8, 8, True)
    assert res["label"] == "ptq4dit W4A8 attn8 TPQ" and res["out"] == str(out_dir)
    fp = load(str(tiny_folder))
    n_linear = sum(1 for m in fp.denoiser.modules() if type(m).__name__ in ("Linear", "Conv2d"))
    assert res["layers_quantized"] == n_linear  # every linear and the patch-embedding conv
    assert 0 < res["weight_bytes"] < res["fp_weight_bytes"] and 0 < res["rel_rms"] < 1
    assert res["calibration_rows"] == 2 * 3 * 2 and len(res["rel_rms_per_timestep"]) == 3
    # the headline: median over the 3 timesteps' errors (the pooled rel_rms is kept beside it)
    assert res["rel_rms_step_median"] == pytest.approx(sorted(res["rel_rms_per_timestep"].values())[1])
    assert (out_dir / "quant_config.json").exists() and (out_dir / "model.safetensors").exists()
    assert json.loads((out_dir / "quant_report.json").read_text())["rel_rms"] == res["rel_rms"]
    # the saved model, loaded through --model's loader, has the error the run reported on the same inputs
    q = load(str(out_dir))
    assert q.quant_config["method"] == "ptq4dit" and q.quant_config["tpq"] is True
    cal = calibration_for(fp, steps=3, num_samples=2)  # the default seeds are the CLI's
    rel, _, _ = output_errors(fp.denoiser, q.denoiser, list(cal.batches(64)), fp.latent_shape[0],
                              per_layer=False)
    assert rel == pytest.approx(res["rel_rms_in_sample"], rel=1e-3)
    held = res["held_out"]  # the headline: the seeds right after the calibration's, which it never saw
    cal = calibration_for(fp, steps=3, num_samples=held["images"], seed=held["seed"])
    rel, _, _ = output_errors(fp.denoiser, q.denoiser, list(cal.batches(64)), fp.latent_shape[0],
                              per_layer=False)
    assert res["rel_rms_basis"] == "held_out" and rel == pytest.approx(res["rel_rms"], rel=1e-3)
    # quantizing it again is refused; saving over the earlier output is allowed
    rc, _, err = run_cli(capsys, "quantize", "--model", out_dir, *SMALL)
    assert rc == 2 and "already quantized" in err and len(err.strip().splitlines()) == 1
    rc, out, err = run_cli(capsys, "quantize", "--model", tiny_folder, "--method", "baseline", *SMALL,
                        "--out", out_dir)
    assert rc == 0, err
    assert "baseline W8A8: noise-prediction error vs FP" in out and "median over steps" in out
    assert str(out_dir) in out
    assert load(str(out_dir)).quant_config["method"] == "baseline"


def test_bundled_model_saved_then_sampled_with_model_dir(tmp_path, capsys):
    out_dir = tmp_path / "dq"
    rc, out, err = run_cli(capsys, "quantize", "--method", "dilatequant", "--w-bits", 4, "--a-bits", 8, *SMALL,
                        "--out", out_dir, "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["model"] == "bundled:dit-mnist" and res["tpq"] is True and res["label"] == "dilatequant W4A8 TPQ"
    rc, out, err = run_cli(capsys, "sample", "--model", out_dir, "--classes", "0-1", "--seeds", "0", "--steps", 3,
                        "--device", "cpu", "--out", tmp_path / "grid.png", "--json")
    assert rc == 0, err
    sampled = json.loads(out)
    assert sampled["images"] == 2 and (tmp_path / "grid.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["--method", "awq"], "unknown method 'awq'"),
    (["--w-bits", "9"], "w_bits must be an integer from 2 to 8"),
    (["--scale-search", "best"], "unknown scale_search 'best'"),
    (["--method", "smoothquant", "--alpha", "1.5"], "alpha must be a finite number in [0, 1]"),
    (["--method", "ptq4dit", "--alpha", "0.3"], "--alpha is an option of smoothquant, not of ptq4dit"),
    (["--calib-samples", "0"], "calibration images must be an integer >= 1, got 0 (--calib-samples)"),
    (["--calib-steps", "0"], "calibration steps must be an integer >= 1, got 0 (--calib-steps)"),
    (["--exclude", "transformer_blocks.99"], "--exclude 'transformer_blocks.99' matches no layer"),
    (["--model", "./no/such/folder"], "does not exist"),
    (["--recon", "brecq"], "unknown recon 'brecq'"),
    (["--recon", "bkd", "--recon-iters", "0"], "recon_iters must be an integer >= 1"),
    (["--recon", "adaround", "--recon-input", "int8"], "unknown recon_input 'int8'"),
    (["--recon", "bkd", "--recon-lr", "nan"], "'nan' is not a finite number"),
    (["--recon", "bkd", "--recon-lr", "0"], "recon_lr must be a finite number > 0, or null"),
    (["--method", "fp", "--recon", "bkd"], "recon needs a quantizing method"),
])
def test_bad_input_exits_2_with_one_line(tiny_folder, capsys, argv, message):
    model = [] if "--model" in argv else ["--model", tiny_folder]
    rc, out, err = run_cli(capsys, "quantize", *model, *SMALL, *argv)
    assert rc == 2 and out == ""
    assert err.startswith("dqlab quantize: error:") and message in err and len(err.strip().splitlines()) == 1


def test_out_must_be_a_new_empty_or_earlier_output_folder(tiny_folder, tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    rc, _, err = run_cli(capsys, "quantize", "--model", tiny_folder, *SMALL, "--out", a_file)
    assert rc == 2 and "is a file" in err
    rc, _, err = run_cli(capsys, "quantize", "--model", tiny_folder, *SMALL, "--out", tmp_path)
    assert rc == 2 and "non-empty folder that is not a saved quantized model" in err
    assert a_file.read_text() == "x"


def test_quantize_with_block_wise_optimization_saves_and_reloads(tmp_path, capsys):
    from analysis.models.loading import load

    out_dir = tmp_path / "bkd"
    rc, out, err = run_cli(capsys, "quantize", "--method", "dilatequant", "--w-bits", 4, "--a-bits", 4, *SMALL,
                           "--recon", "bkd", "--recon-iters", 2, "--recon-batch", 4, "--recon-rows", 8,
                           "--out", out_dir, "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["label"] == "dilatequant W4A4 TPQ +BKD" and res["config"]["recon_iters"] == 2
    rs = res["recon"]
    assert rs["mode"] == "bkd" and rs["rows"] == 8 and len(rs["units"]) == 14
    assert all("losses" not in u and u["error_before"] > 0 and u["error_after"] > 0 for u in rs["units"])
    # the progress: one line per unit on stderr when it is not a terminal
    lines = [ln for ln in err.splitlines() if ln.startswith("bkd: unit")]
    assert len(lines) == 14 and lines[-1].startswith("bkd: unit 14/14 done")
    q = load(str(out_dir))
    assert q.quant_config["recon"] == "bkd" and q.quant_config["recon_rows"] == 8


def test_eval_takes_the_same_block_wise_options(tmp_path, capsys):
    rc, out, err = run_cli(capsys, "eval", "--method", "baseline", "--recon", "adaround", "--recon-batch", "0",
                           "--num-samples", "16", "--steps", "2", "--data-dir", tmp_path, "--json")
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("dqlab eval: error:") and "recon_batch must be an integer >= 1" in err


def test_quantization_flags_come_from_the_config_and_the_methods():
    from analysis.cli import build_parser
    from analysis.cli.quantize import config_from_args

    parser = build_parser()
    args = parser.parse_args(["quantize", "--method", "smoothquant", "--alpha", "0.25", "--w-symmetric",
                              "--a-symmetric", "--no-w-per-channel", "--scale-search", "percentile",
                              "--percentile", "99.5", "--no-tpq", "--exclude", "proj_out_*"])
    config = config_from_args(args)
    assert (config.w_symmetric, config.a_symmetric, config.w_per_channel, config.tpq) == (True, True, False, False)
    assert config.options == {"alpha": 0.25} and config.percentile == 99.5 and config.exclude == ["proj_out_*"]
    defaults = config_from_args(parser.parse_args(["quantize"]))
    assert defaults.method == "ptq4dit" and defaults.options == {"ssc": True, "ssc_rho": "per_timestep"}
    assert config_from_args(parser.parse_args(["quantize", "--no-ssc"])).options["ssc"] is False
    help_text = parser._subparsers._group_actions[0].choices["quantize"].format_help()
    for flag in ("--w-symmetric", "--a-symmetric", "--w-per-channel", "--percentile", "--alpha", "--ssc-rho",
                 "--recon-rows"):
        assert flag in help_text, flag


def test_quantize_format_flags_save_reload_and_refuse_nonsense(tiny_folder, tmp_path, capsys):
    from analysis.models.loading import load

    out_dir = tmp_path / "q"
    rc, out, err = run_cli(capsys, "quantize", "--model", tiny_folder, "--method", "dilatequant", "--w-bits", 4,
                           "--a-bits", 4, "--w-format", "nvfp4", "--a-format", "mxfp4", *SMALL, "--out", out_dir,
                           "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["label"] == "dilatequant W4A4 w:nvfp4 a:mxfp4 TPQ"
    q = load(str(out_dir))
    assert q.quant_config["w_format"] == "nvfp4" and q.quant_config["a_format"] == "mxfp4"
    for bad, words in ((["--w-format", "fp4_e2m1"], "holds 4-bit elements but w_bits is 8"),
                       (["--a-format", "fp6"], "unknown a_format 'fp6'"),
                       (["--w-group", "0"], "w_group must be an integer in [2, 4096]"),
                       (["--a-per-token", "--a-group", "32"], "per-token or per-block")):
        rc, _, err = run_cli(capsys, "quantize", "--model", tiny_folder, "--method", "baseline", *bad, *SMALL)
        assert rc == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_rel_rms_is_held_out_with_the_in_sample_value_beside_it(bundled):
    """The headline error is measured on seeds that calibration never saw; the in-sample value stays beside
    it, and data without a spec (no seeds to step past) says it is in sample."""
    from analysis.quantization.calibration import CalibrationSpec, calibrate
    from analysis.quantization.pipeline import quantize_bundle
    from quant.api import QuantConfig

    spec = CalibrationSpec(images=3, steps=3)
    config = QuantConfig(method="baseline", w_bits=4, a_bits=4)
    v = quantize_bundle(bundled, config, spec)
    r = v.report
    assert r["rel_rms_basis"] == "held_out" and r["rel_rms"] == r["rel_rms_held_out"]
    assert r["held_out"]["seed"] == spec.seed + spec.images and r["held_out"]["steps"] == 3
    assert 0 < r["rel_rms_in_sample"] < 1 and r["rel_rms_in_sample"] != r["rel_rms"]
    assert len(r["rel_rms_per_timestep"]) == len(r["rel_rms_per_timestep_in_sample"]) == 3
    data = calibrate(bundled, spec)
    data.spec = None
    bare = quantize_bundle(bundled, config, data).report
    assert bare["rel_rms_basis"] == "in_sample" and bare["rel_rms"] == bare["rel_rms_in_sample"]
    assert bare["rel_rms_held_out"] is None
