"""Sampling (class-conditional with classifier-free guidance, or unconditional), driven step by step with
diffusers schedulers, for DiTs and UNets alike (quant.denoiser.denoise calls either).

DiTPipeline takes no initial latents, so this loop uses the bundle's components directly. That gives:
- fixed seeds per image: image i starts from noise drawn by its own generator seeded with seeds[i], and DDPM's
  per-step noise comes from that same generator, so an image does not depend on the batch it is in;
- a per-step callback (progress bars);
- recording of the transformer's exact inputs (x_t, t, y) at chosen steps, for calibrating quantizers.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Iterable

import torch

from analysis.models.bundle import ModelBundle, check_finite
from quant.denoiser import denoise

SCHEDULERS = ("ddim", "ddpm")
NO_CLASS = -1  # the label rows of an unconditional model carry (the model never sees it)


@dataclasses.dataclass
class CalibrationData:
    """Transformer inputs seen while sampling. With guidance, each step holds the [cond; uncond] batch."""

    x: torch.Tensor  # [M, C, H, W] noisy latents as fed to the transformer
    t: torch.Tensor  # [M] integer timesteps
    y: torch.Tensor  # [M] class labels (null label = num_classes for the unconditional half; -1: no class)
    step: torch.Tensor  # [M] index of the sampling step (0 = first, noisiest)
    spec: object = None  # the analysis.quantization.calibration.CalibrationSpec that made it, when calibrate() did

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def timesteps(self) -> list[int]:
        """The distinct timesteps recorded, in sampling order (noisiest first)."""
        return list(dict.fromkeys(self.t.tolist()))

    def batches(self, batch_size: int = 64):
        """Yield (x, t, y) chunks in recording order."""
        for i in range(0, len(self), batch_size):
            yield self.x[i:i + batch_size], self.t[i:i + batch_size], self.y[i:i + batch_size]

    def subset(self, mask: torch.Tensor) -> "CalibrationData":
        return CalibrationData(self.x[mask], self.t[mask], self.y[mask], self.step[mask])


@dataclasses.dataclass
class SampleResult:
    images: torch.Tensor  # [N, C, H, W] float32 on the CPU, in [0, 1]
    labels: list[int]
    seeds: list[int]
    seconds: float
    latents: torch.Tensor | None = None  # final latents before decoding, [N, C, h, w]
    calibration: CalibrationData | None = None
    trajectory: list[torch.Tensor] | None = None  # x_t after each step, [N, C, h, w] on the CPU


def make_scheduler(bundle: ModelBundle, kind: str = "ddim"):
    """A fresh diffusers scheduler of `kind` built from the bundle's training schedule."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if kind not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {kind!r}; choose one of {SCHEDULERS}")
    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
    cfg = {k: v for k, v in bundle.scheduler_config.items() if k in keep}
    cfg.update(clip_sample=False)
    return DDIMScheduler(**cfg) if kind == "ddim" else DDPMScheduler(**cfg)


MAX_LIST = 100_000  # seeds or classes one command may list: 100k images already take hours on a GPU
MAX_SEED = 2 ** 63 - 1  # torch.Generator.manual_seed's range


def parse_int_list(text: str, limit: int = MAX_LIST) -> list[int]:
    """'0,1,5-7' -> [0, 1, 5, 6, 7] (non-negative integers up to 2^63 - 1, at most `limit` of them); raises
    ValueError naming the bad part before anything is allocated for a range."""
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            values = range(int(lo), int(hi) + 1) if sep else [int(part)]
        except ValueError:
            raise ValueError(f"cannot read {part!r} as a non-negative integer or a range like 0-9") from None
        if sep and not values:
            raise ValueError(f"range {part!r} is empty: write the smaller number first")
        if values and values[-1] > MAX_SEED:
            raise ValueError(f"{part!r} is beyond {MAX_SEED} (2^63 - 1), the largest seed torch takes")
        if len(out) + len(values) > limit:
            raise ValueError(f"{text!r} lists more than {limit} values; ask for fewer")
        out.extend(values)
    if not out:
        raise ValueError(f"no integers in {text!r}")
    return out


def guided_eps(transformer: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
               null_label: int, guidance: float) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One guided noise prediction. Returns eps and the exact (x, t, y) the transformer received."""
    latent_c = x.shape[1]
    if guidance > 1.0:
        x_in = torch.cat([x, x])
        y_in = torch.cat([y, torch.full_like(y, null_label)])
        t_in = torch.cat([t, t])
    else:
        x_in, y_in, t_in = x, y, t
    out = denoise(transformer, x_in, t_in, y_in)
    eps = out[:, :latent_c]  # learned-sigma models (DiT-XL/2) also output a variance half, unused here
    if guidance > 1.0:
        cond, uncond = eps.chunk(2)
        eps = uncond + guidance * (cond - uncond)
    return eps, (x_in, t_in, y_in)


@torch.no_grad()
def sample(bundle: ModelBundle, labels: Iterable[int] | None, seeds: Iterable[int], steps: int = 50,
           guidance: float | None = None, scheduler: str = "ddim", batch_size: int | None = None,
           on_step: Callable[[int, int], None] | None = None, decode: bool = True,
           record: str | Iterable[int] | None = None, keep_trajectory: bool = False) -> SampleResult:
    """Sample one image per (label, seed) pair; for an unconditional model, one per seed (labels None).

    guidance: classifier-free guidance scale (1 = off); None uses the bundle's default.
    on_step(done, total): called after every denoising step of every batch.
    record: None, "all", or step indices (0 = first step) at which to record the transformer inputs.
    keep_trajectory: keep x_t after every step (for drift measurements).
    """
    seeds = [int(v) for v in seeds]
    if labels is None:
        if bundle.conditional:
            raise ValueError(f"{bundle.name} is class-conditional: give one class label per seed")
        labels = [NO_CLASS] * len(seeds)
    labels = [int(v) for v in labels]
    if not bundle.conditional and any(v != NO_CLASS for v in labels):
        raise ValueError(f"{bundle.name} is unconditional: sample it from seeds alone, without classes")
    if len(labels) != len(seeds):
        raise ValueError(f"got {len(labels)} labels but {len(seeds)} seeds; give one seed per image")
    if not labels:
        raise ValueError("nothing to sample: no labels given")
    bad = [c for c in labels if bundle.conditional and not 0 <= c < bundle.num_classes]
    if bad:
        raise ValueError(f"class {bad[0]} is out of range: {bundle.name} has classes 0-{bundle.num_classes - 1}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    guidance = bundle.default_guidance if guidance is None else float(guidance)
    if not (math.isfinite(guidance) and guidance >= 0):
        raise ValueError(f"guidance must be a finite number >= 0, got {guidance}")
    if guidance > 1.0 and not bundle.conditional:
        raise ValueError(f"{bundle.name} is unconditional: classifier-free guidance needs a class-conditional "
                         "model; use guidance 1")
    n = len(labels)
    batch_size = batch_size or n
    record_steps = _record_set(record, steps)
    device, dtype = bundle.device, bundle.dtype
    total = steps * ((n + batch_size - 1) // batch_size)
    done = 0
    images, latents_out, traj_batches, rec = [], [], [], []
    start = time.perf_counter()
    for b0 in range(0, n, batch_size):
        bl, bs = labels[b0:b0 + batch_size], seeds[b0:b0 + batch_size]
        sched = make_scheduler(bundle, scheduler)
        sched.set_timesteps(steps)
        gens = [torch.Generator().manual_seed(s) for s in bs]
        # Noise is drawn on the CPU per image so the same seed gives the same start on any device and batch.
        x = torch.stack([torch.randn(bundle.latent_shape, generator=g) for g in gens]).to(device, dtype)
        x = x * sched.init_noise_sigma
        y = torch.tensor(bl, device=device)
        traj = []
        for i, t in enumerate(sched.timesteps):
            t_batch = torch.full((len(bl),), int(t), device=device, dtype=torch.long)
            eps, (x_in, t_in, y_in) = guided_eps(bundle.denoiser, sched.scale_model_input(x, t), t_batch, y,
                                                 bundle.null_label, guidance)
            if i in record_steps:
                rec.append((x_in.float().cpu(), t_in.cpu(), y_in.cpu(), torch.full((len(t_in),), i)))
            x = _step(sched, eps, t, x, gens)
            if keep_trajectory:
                traj.append(x.float().cpu())
            done += 1
            if on_step is not None:
                on_step(done, total)
        check_finite(x, f"the sampled latents of images {b0}-{b0 + len(bl) - 1} ({bundle.name})",
                     "the model or its quantization produced NaN/inf; try float32 or bfloat16 instead of float16, "
                     "or check the model's weights")
        latents_out.append(x.float().cpu())
        images.append(_to_images(bundle, x) if decode else x.float().cpu())
        if keep_trajectory:
            traj_batches.append(torch.stack(traj))
    calibration = None
    if rec:
        calibration = CalibrationData(*(torch.cat(parts) for parts in zip(*rec)))
    trajectory = list(torch.cat(traj_batches, dim=1)) if keep_trajectory else None
    return SampleResult(images=torch.cat(images), labels=labels, seeds=seeds,
                        seconds=time.perf_counter() - start, latents=torch.cat(latents_out),
                        calibration=calibration, trajectory=trajectory)


def _record_set(record, steps: int) -> set[int]:
    if record is None:
        return set()
    if record == "all":
        return set(range(steps))
    return {int(i) for i in record if 0 <= int(i) < steps}


def _step(sched, eps: torch.Tensor, t, x: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """One scheduler step. DDPM draws its variance noise per image from that image's own generator
    (diffusers' randn_tensor takes one CPU generator per batch element); DDIM runs with eta = 0."""
    from diffusers import DDPMScheduler

    if isinstance(sched, DDPMScheduler):
        return sched.step(eps, t, x, generator=gens, return_dict=False)[0]
    return sched.step(eps, t, x, eta=0.0, return_dict=False)[0]


def _to_images(bundle: ModelBundle, x: torch.Tensor) -> torch.Tensor:
    if bundle.vae is not None:
        x = bundle.vae.decode(x / bundle.vae_scale_factor).sample
    return ((x.float() + 1) / 2).clamp(0, 1).cpu()
