"""A training run that a test can kill at a chosen moment, then resume.

Run as ``python -m tests.resume_harness --project DIR --result FILE [options]``. It
trains a small regression model with every mixin on (shuffled data, dropout, AdamW,
a step LR schedule, clipping, step checkpoints) and, when it finishes, saves the
final model and optimizer state to ``--result`` for bitwise comparison.

``--kill`` makes the process send itself a real signal at one moment:

- ``mid_epoch``: SIGKILL inside an update (between accumulation batches when
  accumulating), at update ``--at``;
- ``after_checkpoint``: SIGKILL right after the step checkpoint at update ``--at``;
- ``in_validation``: SIGKILL during the second batch of epoch 2's validation;
- ``during_save``: SIGKILL inside the save at update ``--at``, after the weights are
  written and before the commit marker;
- ``sigterm``: SIGTERM at update ``--at`` (a preemption): the run checkpoints and exits.

``--checkpoint-dir URL`` with ``--storage-options JSON`` saves to an object store
(uploaded in the background) instead of ``PROJECT/checkpoints``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader

from accel_hydra import MetricMonitor, Trainer
from accel_hydra.data import BucketBatchSampler
from accel_hydra.distributed import shut_down_process_group
from tests.conftest import ToySteps, make_loader, make_model, regression_data


@dataclass(kw_only=True, eq=False)
class KillableTrainer(ToySteps, Trainer):
    kill: str | None = None
    at: int = -1
    _killed_validation: list = field(default_factory=list)

    def _die(self, signum=signal.SIGKILL):
        os.kill(os.getpid(), signum)

    def training_step(self, batch, batch_idx):
        accumulating = self.gradient_accumulation_steps > 1
        inside_update = batch_idx % self.gradient_accumulation_steps == 1 or not accumulating
        if self.step == self.at and inside_update:
            if self.kill == "mid_epoch":
                self._die()
            if self.kill == "sigterm":
                self.kill = None  # one signal
                self._die(signal.SIGTERM)
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        if self.kill == "in_validation" and self.epoch == 1 and batch_idx == 1:
            self._die()
        super().validation_step(batch, batch_idx)

    def save_checkpoint(self, name):
        saved = super().save_checkpoint(name)
        if self.kill == "after_checkpoint" and name == f"step_{self.at}":
            self._die()
        return saved

    def _state_to_save(self):
        if self.kill == "during_save" and self.step == self.at:
            self._die()
        return super()._state_to_save()


def bucketed_loader():
    """The regression data in batches of varying size from a BucketBatchSampler."""
    lengths = torch.randint(1, 20, (96,), generator=torch.Generator().manual_seed(3))
    sampler = BucketBatchSampler(lengths.tolist(), max_tokens=80, num_buckets=4)
    return DataLoader(regression_data(96), batch_sampler=sampler)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--project", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--save-every", type=int, default=3)
    parser.add_argument("--kill", default=None)
    parser.add_argument("--at", type=int, default=-1)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--storage-options", type=json.loads, default=None)
    parser.add_argument("--bucket", action="store_true", help="batches from BucketBatchSampler")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = make_model(dropout=0.2)
    train_dataloader = make_loader(n=96, batch_size=8, shuffle=True)
    if args.bucket:
        train_dataloader = bucketed_loader()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    trainer = KillableTrainer(
        model=model,
        optimizer=optimizer,
        train_dataloader=train_dataloader,
        val_dataloader=make_loader(n=32, batch_size=8, shuffle=False, seed=1),
        epochs=args.epochs,
        gradient_accumulation_steps=args.accumulation,
        project_dir=args.project,
        progress_bar=False,
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR),
        max_grad_norm=1.0,
        log_every_n_steps=5,
        metric_monitor=MetricMonitor(metric_name="loss"),
        save_every_n_steps=args.save_every,
        save_last_k=2,
        checkpoint_dir=args.checkpoint_dir,
        storage_options=args.storage_options,
        resume_from_checkpoint=args.resume,
        kill=args.kill,
        at=args.at,
    )
    trainer.train(seed=0)
    torch.save(
        {
            "model": trainer.model.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "step": trainer.step,
            "epoch": trainer.epoch,
        },
        args.result,
    )


if __name__ == "__main__":
    main()
    shut_down_process_group()
