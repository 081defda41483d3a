"""A small MLP for 8x8 digit images."""

from __future__ import annotations

from torch import nn


class DigitsMLP(nn.Module):
    """64 pixels -> ``hidden`` -> ``hidden`` -> 10 classes, with dropout."""

    def __init__(self, hidden: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )

    def forward(self, x):
        return self.net(x)
