"""Calibration data as part of a recipe: which FP images a quantized model was calibrated on.

    spec = CalibrationSpec(images=10, steps=50)              # seeds from CALIBRATION_SEED, eval guidance
    cal = calibrate(bundle, spec)                            # FP sampling, recording the transformer's inputs

The seed policy lives here, in the library: calibration images use seeds from CALIBRATION_SEED, while every
evaluation samples from seed 0 (analysis.evaluation.evaluate), so the images a model was calibrated on are never the
images it is scored on, whichever face (CLI, page, Python) made it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # sampling imports diffusers; the CLI reads this module's defaults to build --help
    from analysis.models.bundle import ModelBundle
    from analysis.models.sampling import CalibrationData

# First calibration seed. Evaluations use seeds 0..N-1, so any N below this keeps the two sets disjoint.
CALIBRATION_SEED = 1_000_000
DEFAULT_CAL_SAMPLES = 10
DEFAULT_CAL_STEPS = 50


@dataclasses.dataclass(frozen=True)
class CalibrationSpec:
    """The FP sampling run whose transformer inputs calibrate a quantized model.

    Image i asks for class i mod K with seed `seed + i`; every step of the sampler is recorded, so the set
    covers all timesteps (TPQ keeps one range per timestep). guidance None: the bundle's evaluation guidance,
    so the calibrated ranges match the trajectories that are scored (resolved() fills it in).
    """

    seed: int = CALIBRATION_SEED
    images: int = DEFAULT_CAL_SAMPLES
    steps: int = DEFAULT_CAL_STEPS
    guidance: float | None = None
    scheduler: str = "ddim"

    def __post_init__(self) -> None:
        for name, low in (("seed", 0), ("images", 1), ("steps", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"calibration {name} must be an integer >= {low}, got {v!r}")
        if self.steps > 1000:
            raise ValueError(f"calibration steps must be between 1 and 1000, got {self.steps}")
        if self.guidance is not None and not (isinstance(self.guidance, (int, float)) and math.isfinite(self.guidance)
                                              and self.guidance >= 0):
            raise ValueError(f"calibration guidance must be a finite number >= 0, got {self.guidance!r}")
        from analysis.models.sampling import SCHEDULERS

        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown calibration scheduler {self.scheduler!r}; choose one of {SCHEDULERS}")

    @property
    def seeds(self) -> range:
        return range(self.seed, self.seed + self.images)

    def labels(self, num_classes: int) -> list[int] | None:
        """Image i asks for class i mod K; None for an unconditional model (K = 0), which samples from seeds."""
        return [i % num_classes for i in range(self.images)] if num_classes else None

    def resolved(self, bundle: ModelBundle) -> "CalibrationSpec":
        """The same spec with the guidance the run will use written down."""
        g = bundle.eval_guidance if self.guidance is None else float(self.guidance)
        return dataclasses.replace(self, guidance=float(g))

    def overlaps(self, seeds) -> bool:
        """Whether any of these (evaluation) seeds is also a calibration seed."""
        return any(self.seed <= s < self.seed + self.images for s in seeds)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CalibrationSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown calibration field(s) {unknown}; known fields: {sorted(names)}")
        return cls(**d)


def calibrate(bundle: ModelBundle, spec: CalibrationSpec | None = None,
              on_step: Callable[[int, int], None] | None = None) -> CalibrationData:
    """The transformer inputs of the spec's FP sampling run; the data carries its resolved spec (.spec)."""
    from analysis.models.sampling import sample

    spec = (spec or CalibrationSpec()).resolved(bundle)
    result = sample(bundle, spec.labels(bundle.num_classes), list(spec.seeds), steps=spec.steps,
                    guidance=spec.guidance, scheduler=spec.scheduler, decode=False, record="all", on_step=on_step)
    result.calibration.spec = spec
    return result.calibration


def calibration_for(bundle: ModelBundle, steps: int = DEFAULT_CAL_STEPS, num_samples: int = DEFAULT_CAL_SAMPLES,
                    guidance: float | None = None, seed: int = CALIBRATION_SEED, scheduler: str = "ddim",
                    on_step: Callable[[int, int], None] | None = None) -> CalibrationData:
    """calibrate() with the spec's fields as arguments (labels cycle through the classes, seeds
    seed..seed+N-1, by default from CALIBRATION_SEED)."""
    spec = CalibrationSpec(seed=seed, images=num_samples, steps=steps, guidance=guidance, scheduler=scheduler)
    return calibrate(bundle, spec, on_step=on_step)
