"""Upstream's MNIST trainer, ported: it runs here unchanged in behaviour.

Nothing in it needed editing: ``training_step``, ``validation_step``,
``get_val_metrics`` and the ``on_validation_*`` hooks have the same names and
meaning, and ``self.accelerator.log`` reaches this package's logger.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from accel_hydra import Trainer


@dataclass(kw_only=True, eq=False)
class MnistTrainer(Trainer):
    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = self.loss_fn(self.model(images), labels)
        self.accelerator.log({"train/lr": self.optimizer.param_groups[0]["lr"]}, step=self.step)
        return loss

    def on_validation_start(self):
        self.counts = {"correct": 0, "total": 0}

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        gathered = self.accelerator.gather_for_metrics(
            {"predicted": self.model(images).argmax(dim=-1), "labels": labels}
        )
        hits = gathered["predicted"] == gathered["labels"]
        self.counts["correct"] += hits.long().sum()
        self.counts["total"] += hits.shape[0]

    def get_val_metrics(self):
        return {"accuracy": self._accuracy()}

    def on_validation_end(self):
        accuracy = self._accuracy()
        now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        self.accelerator.print(f"epoch[{self.epoch}]@{now} --> eval_metric= {100 * accuracy:.2f}%")
        self.accelerator.log({"val/accuracy": accuracy}, step=self.step)

    def _accuracy(self) -> float:
        return int(self.counts["correct"]) / self.counts["total"]
