"""A run that logs every update and can be SIGKILLed, for the exact-logs tests.

Run as ``python -m tests.log_harness --project DIR --log-dir DIR_OR_URL [options]``. It
trains 3 epochs of 12 updates, logs ``train/loss`` on every update, saves ``step_20``
only (no epoch or best checkpoints), and with ``--kill-at N`` sends itself SIGKILL
inside update ``N``. ``--report-to`` (JSON: a name or a list) and ``--tracker-kwargs``
(JSON) choose the trackers, ``--config`` (JSON) is the run's ``config_dict``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from dataclasses import dataclass

import torch

from accel_hydra import Trainer
from accel_hydra.distributed import shut_down_process_group
from tests.conftest import ToySteps, make_loader, make_model


@dataclass(kw_only=True, eq=False)
class LoggedTrainer(ToySteps, Trainer):
    kill_at: int = -1

    def training_step(self, batch, batch_idx):
        if self.step + 1 == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().training_step(batch, batch_idx)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--project", required=True)
    parser.add_argument("--log-dir", required=True)
    parser.add_argument("--storage-options", type=json.loads, default=None)
    parser.add_argument("--kill-at", type=int, default=-1)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--report-to", type=json.loads, default='"tensorboard"')
    parser.add_argument("--tracker-kwargs", type=json.loads, default=None)
    parser.add_argument("--config", type=json.loads, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = make_model(dropout=0.2)
    LoggedTrainer(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=0.01),
        train_dataloader=make_loader(n=96, batch_size=8),
        val_dataloader=make_loader(n=32, batch_size=8, shuffle=False, seed=1),
        epochs=3,
        project_dir=args.project,
        progress_bar=False,
        log_dir=args.log_dir,
        log_storage_options=args.storage_options,
        log_every_n_steps=1,
        save_every_n_steps=20,
        save_every_n_epochs=None,
        resume_from_checkpoint=args.resume,
        kill_at=args.kill_at,
        report_to=args.report_to,
        tracker_kwargs=args.tracker_kwargs or {},
        config_dict=args.config,
    ).train(seed=0)


if __name__ == "__main__":
    main()
    shut_down_process_group()
