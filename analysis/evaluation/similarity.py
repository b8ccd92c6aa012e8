"""Same-seed similarity to the FP model's images: PSNR and SSIM per image pair, averaged.

A quantized model sampled from the same seed (and prompt, or class) as its FP model should draw the same
image; SVDQuant (Li et al. 2024) reports PSNR and LPIPS against the 16-bit model this way. Unlike FID these
need no feature extractor and no reference set, so they work for any model offline.

    PSNR = 10 log10(1 / MSE) for images in [0, 1], MSE averaged over the pairs (infinite for identical images:
           reported as None in JSON, "identical" on pages, never as a made-up finite number)
    SSIM (Wang et al. 2004): Gaussian window 11 x 11, sigma 1.5, C1 = (0.01)^2, C2 = (0.03)^2, per channel,
         averaged over positions, channels and images
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"need two image batches [N, C, H, W] of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def psnr(mse: float, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, peak] from their mean squared error (inf if 0)."""
    return math.inf if mse <= 0 else 10 * math.log10(peak ** 2 / mse)


def mse(images: torch.Tensor, reference: torch.Tensor) -> float:
    _check(images, reference)
    return float((images.float() - reference.float()).pow(2).mean())


def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return (g / g.sum()).float()


def ssim(images: torch.Tensor, reference: torch.Tensor, size: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity of image pairs in [0, 1]; the window shrinks to the image for small images."""
    _check(images, reference)
    a, b = images.float(), reference.float()
    size = min(size, a.shape[-1], a.shape[-2])
    g = _gaussian(size, sigma * size / 11 if size < 11 else sigma)
    c = a.shape[1]
    win = (g[:, None] * g[None, :]).expand(c, 1, size, size).contiguous()
    blur = lambda x: F.conv2d(x, win, groups=c)  # noqa: E731  ("valid" positions, as Wang et al.)
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    value = float(s.mean())
    return value if math.isfinite(value) else 0.0


def similarity_vs_fp(images: torch.Tensor, fp_images: torch.Tensor) -> dict:
    """{"psnr_vs_fp", "ssim_vs_fp"} of images against the FP model's images at the same seeds and conditions."""
    value = psnr(mse(images, fp_images))
    return {"psnr_vs_fp": None if math.isinf(value) else round(value, 4),
            "ssim_vs_fp": round(ssim(images, fp_images), 6)}
