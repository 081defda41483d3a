"""Dataloaders over scikit-learn's ``load_digits``: 1,797 8x8 images shipped in the package."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset


def digits_dataset(split: str, val_fraction: float = 0.2, split_seed: int = 0) -> TensorDataset:
    """The train or val part of the digits data, scaled to [0, 1], split reproducibly."""
    from sklearn.datasets import load_digits

    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    images, labels = load_digits(return_X_y=True)
    order = np.random.default_rng(split_seed).permutation(len(labels))
    n_val = int(len(labels) * val_fraction)
    chosen = order[n_val:] if split == "train" else order[:n_val]
    x = torch.tensor(images[chosen] / 16.0, dtype=torch.float32)
    y = torch.tensor(labels[chosen], dtype=torch.long)
    return TensorDataset(x, y)


def digits_dataloader(split: str, batch_size: int = 64, shuffle: bool = False) -> DataLoader:
    """A DataLoader over one split; shuffling is reseeded per epoch by the trainer."""
    return DataLoader(digits_dataset(split), batch_size=batch_size, shuffle=shuffle)
