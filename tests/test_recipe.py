"""A recipe (source + QuantConfig + CalibrationSpec) is stored with every run and saved folder, and rebuilds the
same model bit for bit; calibration seeds stay apart from evaluation seeds by default."""
from __future__ import annotations

import hashlib

import pytest
import torch

from analysis.quantization.calibration import CALIBRATION_SEED, CalibrationSpec
from analysis.quantization.recipe import Recipe, read_recipe, recipe_of_run
from quant.api import QuantConfig

SPEC = CalibrationSpec(images=2, steps=3)


def _digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_stored_run_rebuilds_the_scored_model_bit_for_bit(bundled, tmp_path):
    from analysis.evaluation.evaluate import EvalOptions, evaluate_variants
    from analysis.evaluation.store import Store
    from analysis.quantization.pipeline import quantize_bundle, rebuild

    config = QuantConfig(method="dilatequant", w_bits=4, a_bits=8)
    variant = quantize_bundle(bundled, config, SPEC)
    assert variant.recipe == Recipe("bundled:dit-mnist", config, SPEC.resolved(bundled))
    assert variant.report.calibration["guidance"] == bundled.eval_guidance  # the spec as it ran
    store = Store(tmp_path / "home")
    (result,) = evaluate_variants(bundled, {variant.name: variant}, EvalOptions(num_samples=4, steps=3, bootstrap=0),
                                 store=store)
    run = store.get(result.run_id)
    assert Recipe.from_dict(run.recipe) == variant.recipe and not recipe_of_run(run).inferred
    again = rebuild(run, bundled)
    assert _digest(again.bundle.denoiser) == _digest(variant.bundle.denoiser)
    assert again.report.rel_rms == variant.report.rel_rms


def test_saved_folder_carries_its_recipe_and_rebuilds_the_same_file(bundled, tmp_path):
    from analysis.models.saved import save_quantized
    from analysis.quantization.pipeline import build, quantize_bundle

    config = QuantConfig(method="ptq4dit", w_bits=4, a_bits=8, options={"ssc_rho": "per_sample"})
    variant = quantize_bundle(bundled, config, SPEC)
    first = save_quantized(variant.bundle, config, tmp_path / "a", recipe=variant.recipe)
    recipe = read_recipe(first)
    assert recipe == variant.recipe
    rebuilt = build(recipe)  # loads the source itself
    second = save_quantized(rebuilt.bundle, rebuilt.config, tmp_path / "b", recipe=rebuilt.recipe)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()


def test_calibration_seeds_are_disjoint_from_evaluation_seeds_by_default(bundled):
    from analysis.cli import build_parser
    from analysis.evaluation.evaluate import EvalOptions, eval_labels_seeds

    spec = CalibrationSpec()
    assert spec.seed == CALIBRATION_SEED
    _, eval_seeds = eval_labels_seeds(10, 50_000)  # more images than any evaluation here takes
    assert not spec.overlaps(eval_seeds) and not set(spec.seeds) & set(eval_seeds)
    # every face takes the library's default: evaluate, dqlab quantize / eval
    opts = EvalOptions(num_samples=2048, steps=7)
    assert opts.calibration(bundled) == CalibrationSpec(steps=7, guidance=bundled.eval_guidance)
    args = build_parser().parse_args(["quantize"])
    assert args.calib_seed == CALIBRATION_SEED
    args = build_parser().parse_args(["eval"])
    assert EvalOptions(calib_samples=args.calib_samples).calib_seed == CALIBRATION_SEED
    assert CalibrationSpec(seed=0, images=4).overlaps(range(0, 8))


def test_evaluation_warns_when_calibration_images_are_scored(bundled):
    from analysis.evaluation.evaluate import EvalOptions, evaluate_variants
    from analysis.quantization.pipeline import quantize_bundle

    variant = quantize_bundle(bundled, QuantConfig(method="baseline"), CalibrationSpec(seed=0, images=2, steps=3))
    (result,) = evaluate_variants(bundled, {variant.name: variant}, EvalOptions(num_samples=4, steps=3, bootstrap=0))
    assert "overlap the evaluated seeds" in result.metrics["warning"]


def test_recipe_of_a_run_stored_before_recipes_is_the_eval_default():
    class OldRun:  # the fields analysis.evaluation.store.Run has for such a run
        recipe, model, steps, guidance, scheduler = None, "bundled:dit-mnist", 25, 1.5, "ddpm"
        config = {"method": "smoothquant", "w_bits": 8, "a_bits": 8, "alpha": 0.3, "ssc": True,
                  "ssc_rho": "per_timestep"}

    recipe = recipe_of_run(OldRun())
    assert recipe.inferred and recipe.config.options == {"alpha": 0.3}
    assert recipe.calibration == CalibrationSpec(steps=25, guidance=1.5, scheduler="ddpm")


def test_recipe_round_trip_and_bad_input():
    recipe = Recipe("bundled:dit-mnist", QuantConfig(method="smoothquant", options={"alpha": 0.25}), SPEC)
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(ValueError, match="needs source, config and calibration"):
        Recipe.from_dict({"source": "x"})
    for bad, msg in [(dict(images=0), "calibration images"), (dict(steps=0), "calibration steps"),
                     (dict(guidance=float("nan")), "calibration guidance"), (dict(scheduler="euler"), "scheduler")]:
        with pytest.raises(ValueError, match=msg):
            CalibrationSpec(**bad)
