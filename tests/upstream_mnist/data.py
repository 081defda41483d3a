"""The MNIST datasets swapped for scikit-learn's bundled digits, upsampled to 28x28.

The only change the port makes to upstream's data: no download. Each 8x8 digit is
scaled to [0, 1] and resized bilinearly to MNIST's 28x28; a fixed shuffle puts 80%
of the 1,797 images in training and the rest in validation.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = ["train_dataset", "val_dataset"]


def _split(train: bool) -> TensorDataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = torch.nn.functional.interpolate(
        images, size=(28, 28), mode="bilinear", align_corners=False
    )
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    cut = int(0.8 * len(labels))
    chosen = torch.as_tensor(order[:cut] if train else order[cut:])
    return TensorDataset(images[chosen], labels[chosen])


def train_dataset() -> TensorDataset:
    return _split(train=True)


def val_dataset() -> TensorDataset:
    return _split(train=False)
