"""Upstream's MNIST convolutional classifier, ported.

The one change: upstream subclassed ``accel_hydra.models.CountParamsBase``, a helper
that counts parameters; this package prints the count in its start summary, so the
model is a plain ``nn.Module``.
"""

from __future__ import annotations

import torch
from torch import nn


class Model(nn.Module):
    """Two convolutions with pooling, a global max pool, then a two-layer head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 512, kernel_size=3),
            nn.MaxPool2d(2),
            nn.Conv2d(512, 256, kernel_size=5),
            nn.MaxPool2d(2),
            nn.Dropout2d(0.1),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))
