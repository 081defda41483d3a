"""A bag-of-embeddings classifier that ignores padding through the collate's mask."""

from __future__ import annotations

import torch
from torch import nn


class MeanPoolClassifier(nn.Module):
    """Embed tokens, average over the real (unpadded) positions, classify."""

    def __init__(self, vocab_size: int = 32, dim: int = 64, num_classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, num_classes))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.unsqueeze(-1).to(self.embed.weight.dtype)
        pooled = (self.embed(tokens) * weights).sum(1) / weights.sum(1).clamp(min=1)
        return self.head(pooled)
