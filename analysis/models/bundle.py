"""A model bundle: a diffusion denoiser (a DiT or a UNet) with what it needs to sample, and the device and
precision helpers every room uses. analysis.models.loading builds bundles from a source name."""
from __future__ import annotations

import dataclasses

import torch


class ModelLoadError(RuntimeError):
    """A model source could not be loaded; the message says why and what to do. `ui` says the same in the
    app's words (its sidebar instead of command-line flags) where the two differ."""

    def __init__(self, message: str, ui: str | None = None):
        super().__init__(message)
        self.ui = ui or message


class NonFiniteError(ValueError):
    """A tensor that must hold numbers holds NaN or inf; the message names the tensor."""


def check_finite(tensor: torch.Tensor, what: str, hint: str = "") -> None:
    """Raise NonFiniteError naming `what` when `tensor` holds NaN or inf (one reduction, no host copy)."""
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteError(f"{what} hold{'s' if bad == 1 else ''} {bad} NaN/inf value{'s' if bad > 1 else ''}"
                             + (f"; {hint}" if hint else ""))


@dataclasses.dataclass
class ModelBundle:
    """Everything the sampler needs: a denoiser, its scheduler config, and how to turn latents to images.

    `denoiser` is the network that predicts the noise, a DiT or a UNet; `family` says which.
    num_classes is 0 for an unconditional model: it samples from seeds alone and has no guidance.
    """

    name: str
    denoiser: torch.nn.Module
    scheduler_config: dict
    num_classes: int
    latent_shape: tuple[int, int, int]  # (C, H, W) the denoiser works on
    vae: torch.nn.Module | None = None
    vae_scale_factor: float = 0.18215  # DiT's latent scaling (Peebles & Xie, 2023)
    default_guidance: float = 1.5  # for sample grids
    eval_guidance: float = 1.5  # the FID protocol's guidance (PTQ4DiT evaluates DiT-XL/2 at 1.5)
    bundled: bool = False
    quant_config: dict | None = None  # set when the denoiser is a quantized copy

    @property
    def family(self) -> str:
        """'dit' or 'unet', from the denoiser's class (the family table, quant.families)."""
        from quant.families import family_of

        return family_of(self.denoiser)

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def describe(self) -> str:
        """One line: family, size and classes, e.g. 'DiT, 6 blocks, classes 0-9'."""
        from quant.families import family_for

        shape = family_for(self.denoiser).describe(self.denoiser)
        return shape + (f", classes 0-{self.num_classes - 1}" if self.conditional else ", unconditional")

    @property
    def null_label(self) -> int:
        # diffusers' LabelEmbedding keeps one extra row after the classes for the dropped (unconditional) label
        return self.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        if self.vae is None:
            return self.latent_shape
        c = self.vae.config.out_channels
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (c, self.latent_shape[1] * f, self.latent_shape[2] * f)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def with_denoiser(self, denoiser: torch.nn.Module, name: str | None = None,
                      quant_config: dict | None = None) -> "ModelBundle":
        """A bundle that shares scheduler and VAE but samples with another denoiser (e.g. a quantized copy)."""
        return dataclasses.replace(self, denoiser=denoiser, name=name or self.name, quant_config=quant_config)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "ModelBundle":
        """Move in place (the bundle owns its modules) and return self."""
        # diffusers warns whenever a dtype is passed, even a no-op one: pass only what changes.
        kwargs = {"device": device} if device is not None else {}
        if dtype is not None and dtype != self.dtype:
            kwargs["dtype"] = dtype
        for module in (self.denoiser, self.vae):
            if module is not None and kwargs:
                module.to(**kwargs)
        return self


DEVICE_TYPES = ("cpu", "cuda")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' or None picks CUDA when there is one, else the CPU; a CUDA request without a GPU is an error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(device)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise ModelLoadError(f"unknown device {text!r}; choose auto, cpu or cuda (cuda:N for one GPU of several)",
                             ui="Choose **auto**, **cpu** or **cuda** as the device in the sidebar.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu",
                             ui="No CUDA GPU is available on this machine: choose **auto** or **cpu** as the device "
                                "in the sidebar.")
    return device


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]
