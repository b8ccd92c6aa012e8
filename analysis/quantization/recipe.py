"""A recipe: everything that makes a quantized model, so a stored result can be rebuilt.

    recipe = Recipe("bundled:dit-mnist", QuantConfig(method="ptq4dit", w_bits=4, a_bits=8), CalibrationSpec())
    variant = analysis.quantization.pipeline.build(recipe)   # the same weights, bit for bit (same machine, versions)

A recipe is model source + QuantConfig + CalibrationSpec (+ the rows per forward of the quantization pass).
Every stored run (analysis.evaluation.store) and every saved quantized folder (analysis.models.saved) carries one;
analysis.quantization.pipeline.rebuild(run) makes the model whose scores are shown beside it.
"""
from __future__ import annotations

import dataclasses

from analysis.quantization.calibration import DEFAULT_CAL_SAMPLES, CalibrationSpec
from quant.config import QuantConfig


@dataclasses.dataclass
class Recipe:
    source: str  # what analysis.models.loading.load reads: "bundled:dit-mnist", a folder or a hub id
    config: QuantConfig
    calibration: CalibrationSpec
    batch_size: int = 64  # calibration rows per forward while quantizing
    inferred: bool = False  # True: reconstructed for a run stored before recipes were (see recipe_of_run)

    def to_dict(self) -> dict:
        return {"source": self.source, "config": self.config.to_dict(), "calibration": self.calibration.to_dict(),
                "batch_size": self.batch_size, "inferred": self.inferred}

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        try:
            return cls(source=str(d["source"]), config=QuantConfig.from_dict(d["config"]),
                       calibration=CalibrationSpec.from_dict(d["calibration"]),
                       batch_size=int(d.get("batch_size", 64)), inferred=bool(d.get("inferred", False)))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a quantization recipe ({exc}); it needs source, config and calibration") from None


def recipe_of_run(run) -> Recipe:
    """A stored run's recipe. A run stored before recipes were is given the one `dqlab eval` used then: the
    default calibration at the run's steps, guidance and scheduler (marked inferred)."""
    if run.recipe:
        return Recipe.from_dict(run.recipe)
    spec = CalibrationSpec(images=DEFAULT_CAL_SAMPLES, steps=int(run.steps or CalibrationSpec.steps),
                           guidance=run.guidance, scheduler=run.scheduler or "ddim")
    return Recipe(source=run.model, config=QuantConfig.from_dict(run.config), calibration=spec, inferred=True)


def read_recipe(folder) -> Recipe | None:
    """The recipe a saved quantized folder was made with (None for folders saved without one)."""
    from quant.io import read_meta

    d = read_meta(folder).get("recipe")
    return Recipe.from_dict(d) if d else None
