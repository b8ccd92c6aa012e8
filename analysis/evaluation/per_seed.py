"""Per-seed identity: how close each quantized image is to its FP twin (same label, same seed).

FID vs FP compares two distributions: it rewards cleaner images even when a seed's content changed. These
measures compare image i with image i:

- PSNR vs FP: 10 log10(1 / MSE) of the set's mean squared error over pixels in [0, 1] (the PSNR of the set,
  not a mean of per-image PSNRs, which an identical pair would make infinite);
- SSIM vs FP: the mean over images of SSIM (Wang et al., 2004: Gaussian window 11 x 11, sigma 1.5,
  K1 = 0.01, K2 = 0.03, data range 1, 'valid' windows, channels averaged);
- same class as FP: the share of seeds where a classifier reads the same class in both images (the bundled
  digit classifier for the digit models; any predictions for other models).

PSNR and SSIM need no classes, so they work for unconditional and text-to-image models alike. Each comes with
an interval over seeds: a percentile bootstrap of the mean with BOOTSTRAP_REPLICATES replicates (PSNR: of the
mean MSE, mapped through the monotone PSNR), and a Wilson score interval for the share of same classes.
"""
from __future__ import annotations

import math
from statistics import NormalDist

import torch
import torch.nn.functional as F

BOOTSTRAP_REPLICATES = 1000  # 25 replicates beyond each quantile of a 95% percentile interval
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
METHODS = {"psnr_vs_fp": f"percentile bootstrap over seeds of the mean MSE ({BOOTSTRAP_REPLICATES} replicates)",
           "ssim_vs_fp": f"percentile bootstrap over seeds of the mean SSIM ({BOOTSTRAP_REPLICATES} replicates)",
           "same_digit_vs_fp": "Wilson score interval over seeds"}


def _check_pair(images: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if images.shape != reference.shape or images.dim() != 4:
        raise ValueError(f"per-seed measures need two image sets of the same shape [N, C, H, W], got "
                         f"{tuple(images.shape)} and {tuple(reference.shape)}")
    to01 = lambda x: x.float() / 255.0 if x.dtype == torch.uint8 else x.float()  # noqa: E731
    return to01(images).cpu(), to01(reference).cpu()


def mse_per_image(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """[N] mean squared error of each image against its twin, pixels in [0, 1] (uint8 images are scaled)."""
    images, reference = _check_pair(images, reference)
    return (images.double() - reference.double()).pow(2).flatten(1).mean(1)


def psnr(mse: float, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB for a mean squared error of images in [0, peak]: infinite when the
    images are identical (shown as "identical", never as a made-up finite number)."""
    return math.inf if mse <= 0 else 10 * math.log10(peak ** 2 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim_per_image(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """[N] SSIM of each image against its twin (the module's definition); images smaller than the window
    use a window as large as the image."""
    images, reference = _check_pair(images, reference)
    n, c, h, w = images.shape
    size = min(SSIM_WINDOW, h, w)
    win = _gaussian_window(size, SSIM_SIGMA)
    x = images.double().reshape(n * c, 1, h, w)
    y = reference.double().reshape(n * c, 1, h, w)
    mu_x, mu_y = F.conv2d(x, win), F.conv2d(y, win)
    var_x = F.conv2d(x * x, win) - mu_x ** 2
    var_y = F.conv2d(y * y, win) - mu_y ** 2
    cov = F.conv2d(x * y, win) - mu_x * mu_y
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.reshape(n, c, -1).mean(dim=(1, 2))


def bootstrap_mean_interval(values: torch.Tensor, level: float = 0.95, replicates: int = BOOTSTRAP_REPLICATES,
                            seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` [N] (resampling the seeds)."""
    values = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if len(values) < 2:
        v = float(values.mean()) if len(values) else float("nan")
        return v, v
    gen = torch.Generator().manual_seed(seed)
    means = torch.cat([values[torch.randint(0, len(values), (min(200, replicates - i), len(values)),
                                            generator=gen)].mean(1) for i in range(0, replicates, 200)])
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(lo), float(hi)


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (coverage close to nominal even near 0 or 1, unlike p +- z se)."""
    if n <= 0:
        return float("nan"), float("nan")
    z = NormalDist().inv_cdf((1 + level) / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def image_identity(images: torch.Tensor, reference: torch.Tensor, level: float = 0.95) -> dict:
    """PSNR and SSIM of `images` against their twins `reference` (same order), each with its interval:
    {"psnr_vs_fp", "psnr_vs_fp_interval", "ssim_vs_fp", "ssim_vs_fp_interval"}. Identical sets have no finite
    PSNR: it is None (JSON holds no infinity) and "identical_to_fp" is True."""
    mse = mse_per_image(images, reference)
    ssim = ssim_per_image(images, reference)
    lo_mse, hi_mse = bootstrap_mean_interval(mse, level)
    mean_mse = float(mse.mean())
    finite = lambda v: None if math.isinf(v) else v  # noqa: E731
    return {"psnr_vs_fp": finite(psnr(mean_mse)),
            "psnr_vs_fp_interval": None if mean_mse <= 0 else [psnr(hi_mse), finite(psnr(lo_mse))],
            "ssim_vs_fp": float(ssim.mean()), "ssim_vs_fp_interval": list(bootstrap_mean_interval(ssim, level)),
            "identical_to_fp": mean_mse <= 0}


def same_class(predicted: torch.Tensor, reference_predicted: torch.Tensor, level: float = 0.95) -> dict:
    """The share of seeds whose two images a classifier reads as the same class, with its Wilson interval:
    {"same_digit_vs_fp", "same_digit_vs_fp_interval"} (named for the digit models, the lab's classifier)."""
    predicted, reference_predicted = torch.as_tensor(predicted), torch.as_tensor(reference_predicted)
    if predicted.shape != reference_predicted.shape:
        raise ValueError(f"got {len(predicted)} predictions and {len(reference_predicted)} FP predictions")
    k, n = int((predicted == reference_predicted).sum()), len(predicted)
    return {"same_digit_vs_fp": k / n if n else None, "same_digit_vs_fp_interval": list(wilson_interval(k, n, level))}


def per_seed_identity(images: torch.Tensor, reference: torch.Tensor, classify=None, level: float = 0.95) -> dict:
    """Every per-seed measure of `images` against their FP twins: image_identity, and same_class when a
    `classify` function (images -> predicted classes [N]) is given, with "per_seed_methods" naming how each
    interval is computed."""
    out = image_identity(images, reference, level)
    if classify is not None:
        out.update(same_class(classify(images), classify(reference), level))
    out["per_seed_methods"] = {k: v for k, v in METHODS.items() if k in out}
    return out


def per_seed_text(m: dict) -> str:
    """'same digit 93.2% [92.1, 94.2], PSNR 24.1 dB [23.9, 24.3], SSIM 0.912 [0.905, 0.918]': the per-seed
    measures of a result as one line (only those present)."""
    parts = []
    iv = lambda key, fmt: "" if not m.get(key) or None in m[key] else \
        f" [{fmt.format(m[key][0])}, {fmt.format(m[key][1])}]"  # noqa: E731
    if m.get("same_digit_vs_fp") is not None:
        parts.append(f"same digit {100 * m['same_digit_vs_fp']:.1f}%"
                     + ("" if not m.get("same_digit_vs_fp_interval") else
                        f" [{100 * m['same_digit_vs_fp_interval'][0]:.1f}, {100 * m['same_digit_vs_fp_interval'][1]:.1f}]"))
    if m.get("psnr_vs_fp") is not None:
        parts.append(f"PSNR {m['psnr_vs_fp']:.1f} dB" + iv("psnr_vs_fp_interval", "{:.1f}"))
    elif m.get("ssim_vs_fp") is not None:
        parts.append("PSNR identical")
    if m.get("ssim_vs_fp") is not None:
        parts.append(f"SSIM {m['ssim_vs_fp']:.3f}" + iv("ssim_vs_fp_interval", "{:.3f}"))
    return ", ".join(parts) or "n/a"
