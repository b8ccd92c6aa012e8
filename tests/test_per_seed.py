"""Per-seed identity with the FP twin: PSNR and SSIM against independent by-hand definitions, the Wilson
interval, and the combined measures with and without a classifier."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analysis.evaluation import per_seed as P


def _ssim_by_hand(x: np.ndarray, y: np.ndarray, win: int = 11, sigma: float = 1.5) -> float:
    """Wang et al. (2004), one window at a time: Gaussian-weighted means, variances and covariance."""
    g = np.exp(-((np.arange(win) - (win - 1) / 2) ** 2) / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    vals = []
    for i in range(x.shape[0] - win + 1):
        for j in range(x.shape[1] - win + 1):
            a, b = x[i:i + win, j:j + win], y[i:i + win, j:j + win]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * a * a).sum() - ma ** 2, (w * b * b).sum() - mb ** 2
            cov = (w * a * b).sum() - ma * mb
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_psnr_and_ssim_match_their_definitions():
    gen = torch.Generator().manual_seed(0)
    ref = torch.rand(3, 1, 16, 16, generator=gen)
    img = (ref + 0.1 * torch.randn(3, 1, 16, 16, generator=gen)).clamp(0, 1)
    mse = P.mse_per_image(img, ref)
    assert mse[0].item() == pytest.approx(float(((img[0] - ref[0]) ** 2).mean()), rel=1e-6)
    assert P.psnr(0.01) == pytest.approx(20.0) and math.isinf(P.psnr(0.0))
    ssim = P.ssim_per_image(img, ref)
    for k in range(3):
        assert ssim[k].item() == pytest.approx(_ssim_by_hand(img[k, 0].double().numpy(), ref[k, 0].double().numpy()),
                                               rel=1e-6)
    assert torch.allclose(P.ssim_per_image(ref, ref), torch.ones(3, dtype=torch.float64))
    u8 = (ref * 255).round().to(torch.uint8)
    assert P.mse_per_image(u8, u8).abs().max() == 0  # uint8 images are read on the same [0, 1] scale
    with pytest.raises(ValueError, match="same shape"):
        P.mse_per_image(img[:2], ref)


def test_wilson_interval():
    lo, hi = P.wilson_interval(90, 100)
    assert lo == pytest.approx(0.8256, abs=1e-3) and hi == pytest.approx(0.9448, abs=1e-3)  # textbook values
    lo, hi = P.wilson_interval(100, 100)
    assert hi == 1.0 and 0.95 < lo < 1.0  # never the degenerate [1, 1] of p +- z se


def test_per_seed_identity_with_and_without_classes():
    gen = torch.Generator().manual_seed(1)
    fp = torch.rand(40, 3, 8, 8, generator=gen)
    q = (fp + 0.05 * torch.randn(40, 3, 8, 8, generator=gen)).clamp(0, 1)
    out = P.per_seed_identity(q, fp)  # no classifier: a model without classes
    assert "same_digit_vs_fp" not in out and out["psnr_vs_fp"] is not None
    lo, hi = out["psnr_vs_fp_interval"]
    assert lo <= out["psnr_vs_fp"] <= hi and out["ssim_vs_fp_interval"][0] <= out["ssim_vs_fp"] <= 1
    assert set(out["per_seed_methods"]) == {"psnr_vs_fp", "ssim_vs_fp"}
    same = P.per_seed_identity(fp, fp)
    assert same["psnr_vs_fp"] is None and same["identical_to_fp"] and same["ssim_vs_fp"] == pytest.approx(1.0)
    classify = lambda imgs: (imgs.mean(dim=(1, 2, 3)) > 0.5).long()  # noqa: E731
    out = P.per_seed_identity(q, fp, classify)
    expected = float((classify(q) == classify(fp)).float().mean())
    assert out["same_digit_vs_fp"] == pytest.approx(expected)
    lo, hi = out["same_digit_vs_fp_interval"]
    assert lo <= expected <= hi
    assert "same digit" in P.per_seed_text(out) and "PSNR" in P.per_seed_text(out)
