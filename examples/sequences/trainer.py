"""Sequence classification on padded batches: loss and accuracy over real samples."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from accel_hydra import Trainer


@dataclass(kw_only=True, eq=False)
class SequenceTrainer(Trainer):
    def training_step(self, batch, batch_idx):
        logits = self.model(batch["tokens"], batch["tokens_mask"])
        return F.cross_entropy(logits, batch["label"])

    def on_validation_start(self):
        self._correct = 0
        self._seen = 0

    def validation_step(self, batch, batch_idx):
        logits = self.model(batch["tokens"], batch["tokens_mask"])
        predicted, labels = self.accelerator.gather_for_metrics(
            (logits.argmax(dim=1), batch["label"])
        )
        self._correct += (predicted == labels).sum()
        self._seen += labels.numel()

    def get_val_metrics(self):
        return {"accuracy": (self._correct / self._seen).item()}
