"""The bundled digit classifier: a small CNN on 16x16 digits.

Two jobs: it reads generated digits to report label agreement (how often the class asked for is the class
seen), and its penultimate features stand in for Inception's when FID is computed offline on digits.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from analysis.models.digits import RESOLUTION
from analysis.models.resources import asset_path

CLASSIFIER_DIR = asset_path("digit-classifier")
FEATURE_DIM = 128


class DigitClassifier(nn.Module):
    """conv 32 -> conv 64 -> pool -> conv 128 -> pool -> fc 128 (features) -> fc 10."""

    def __init__(self, num_classes: int = 10, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc1 = nn.Linear(128 * 4 * 4, feature_dim)
        self.fc2 = nn.Linear(feature_dim, num_classes)
        self.dropout = nn.Dropout(0.3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, 1, 16, 16] in [0, 1] -> [N, FEATURE_DIM] penultimate activations."""
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.features(x)))


def prepare(images: torch.Tensor) -> torch.Tensor:
    """Any [N, C, H, W] image batch (float in [0, 1] or uint8) -> [N, 1, 16, 16] float grayscale."""
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    if x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[-1] != RESOLUTION or x.shape[-2] != RESOLUTION:
        x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="area")
    return x


@functools.lru_cache(maxsize=1)
def load_classifier(folder: str | None = None) -> DigitClassifier:
    """The trained classifier from assets/ (safetensors), in eval mode on the CPU. Shared: do not modify."""
    from safetensors.torch import load_file

    folder = Path(folder) if folder else CLASSIFIER_DIR
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"digit classifier weights missing at {weights}; run scripts/train_classifier.py")
    model = DigitClassifier()
    model.load_state_dict(load_file(weights))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def predict(images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted digit for each image."""
    model = load_classifier()
    x = prepare(images.cpu())
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def label_agreement(images: torch.Tensor, labels) -> float:
    """Fraction of images the classifier reads as the class they were generated for."""
    labels = torch.as_tensor(list(labels))
    return float((predict(images) == labels).float().mean())


def classifier_card() -> dict:
    path = CLASSIFIER_DIR / "training.json"
    return json.loads(path.read_text()) if path.exists() else {}
