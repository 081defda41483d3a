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
        self._val_correct = 0
        self._val_seen = 0
        self._val_loss_sum = 0.0

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        logits, y = self.accelerator.gather_for_metrics((logits, y))
        self._val_correct += (logits.argmax(dim=1) == y).sum()
        self._val_loss_sum += F.cross_entropy(logits, y, reduction="sum")
        self._val_seen += y.numel()

    def get_val_metrics(self):
        return {
            "accuracy": (self._val_correct / self._val_seen).item(),
            "loss": (self._val_loss_sum / self._val_seen).item(),
        }
