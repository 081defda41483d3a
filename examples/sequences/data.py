"""Generated variable-length token sequences (no download), batched by length.

Each class draws its tokens from its own distribution over a small vocabulary; the
lengths vary from ``min_length`` to ``max_length``, so batches of similar length waste
little padding. The data is generated from ``seed``, identically on every process.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["SequenceDataset", "sequence_dataloader"]


class SequenceDataset(Dataset):
    """Token sequences whose class shows in their token frequencies.

    Args:
        size: how many sequences.
        num_classes: how many classes (token distributions).
        vocab_size: tokens are ``1..vocab_size-1``; 0 is left for padding.
        min_length: the shortest sequence.
        max_length: the longest sequence.
        seed: fixes the class distributions and the samples.
    """

    def __init__(
        self,
        size: int,
        num_classes: int = 4,
        vocab_size: int = 32,
        min_length: int = 4,
        max_length: int = 96,
        seed: int = 0,
    ) -> None:
        rng = np.random.default_rng(seed)
        # The class distributions come from a fixed seed, so train and val share them.
        topics = np.random.default_rng(1234).dirichlet(np.full(vocab_size - 1, 0.3), num_classes)
        self.labels = rng.integers(0, num_classes, size)
        self.lengths = rng.integers(min_length, max_length + 1, size).tolist()
        self.tokens = [
            torch.as_tensor(1 + rng.choice(vocab_size - 1, n, p=topics[label]))
            for label, n in zip(self.labels, self.lengths, strict=True)
        ]

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict:
        return {"tokens": self.tokens[index], "label": int(self.labels[index])}


def sequence_dataloader(
    size: int,
    seed: int,
    batch_sampler: Callable,
    collate_fn: Callable,
    **dataset_kwargs,
) -> DataLoader:
    """A DataLoader over a :class:`SequenceDataset`.

    Args:
        size: how many sequences.
        seed: the data's seed (use different seeds for train and val).
        batch_sampler: called with the dataset's lengths (a Hydra ``_partial_`` of
            ``accel_hydra.data.BucketBatchSampler``).
        collate_fn: pads the batch (``accel_hydra.data.PaddingCollate``).
        **dataset_kwargs: passed on to :class:`SequenceDataset`.
    """
    dataset = SequenceDataset(size, seed=seed, **dataset_kwargs)
    return DataLoader(dataset, batch_sampler=batch_sampler(dataset.lengths), collate_fn=collate_fn)
