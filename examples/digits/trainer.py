"""The digits trainer: cross-entropy training, accuracy and loss on validation."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from accel_hydra import Trainer


@dataclass(kw_only=True)
class DigitsTrainer(Trainer):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def on_validation_start(self):
        self._correct = 0
        self._seen = 0
        self._loss_sum = 0.0

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        logits, y = self.accelerator.gather_for_metrics((logits, y))
        self._correct += (logits.argmax(dim=1) == y).sum()
        self._loss_sum += F.cross_entropy(logits, y, reduction="sum")
        self._seen += y.numel()

    def get_val_metrics(self):
        return {
            "accuracy": (self._correct / self._seen).item(),
            "loss": (self._loss_sum / self._seen).item(),
        }
