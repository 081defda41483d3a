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
- ``sigterm``: SIGTERM at update ``--at`` (a preemption): the run checkpoints and exits;
- ``sigterm_after_stop``: SIGTERM half a second after ``--stop-pid`` was stopped, when
  training is blocked waiting for the stalled upload.

``--signal-at PHASE:EPOCH:BATCH`` sends ``--send`` (``KILL`` or ``TERM``) at an exact
place instead: ``train`` (inside ``training_step`` of that batch), ``val`` (inside
``validation_step``), ``epoch_end`` (in ``on_train_epoch_end`` of that epoch, after its
checkpoints; BATCH ignored) or ``epoch_start`` (in ``on_train_epoch_start``). EPOCH counts
from 0. ``--epoch-length`` cuts epochs short; ``--iterable`` trains from a dataset without
``len()`` (the same samples, in a fixed order), so ``--epoch-length`` may exceed it.
Under ``torchrun`` with ``--uneven`` (``even_batches=False``) and ``--samples`` not a
multiple of 16, the processes get shards of different lengths.

``--checkpoint-dir URL`` with ``--storage-options JSON`` saves to an object store
(uploaded in the background) instead of ``PROJECT/checkpoints``.

``--stop-pid PID --stop-at N`` sends SIGSTOP to process PID (an object-store server)
just before the checkpoint ``step_N`` is saved, so its upload meets a stalled endpoint;
``--storage-timeout`` and ``--retry-delays`` make such a stall fail fast.
``--ema`` adds :class:`~accel_hydra.EMAMixin` (``--validate-with-ema`` validates with
it) and saves the averaged weights in ``--result`` too; ``--compile BACKEND`` compiles
the model with that ``torch.compile`` backend.
``--seedable-sampler`` keeps Accelerate's ``SeedableRandomSampler`` (how runs
shuffled before :mod:`accel_hydra.epoch_order`).
``--sync-save`` saves on the training thread (``async_save=False``); the environment
variable ``ACCEL_HYDRA_PAUSE_SAVE`` pauses a background save at a phase
(:mod:`accel_hydra.host_snapshot`).
``--pause-at N`` writes ``PROJECT/paused`` at update N and then sleeps until killed
(a run that holds its checkpoint directory).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader

from accel_hydra import EMAMixin, MetricMonitor, Trainer
from accel_hydra.data import BucketBatchSampler
from accel_hydra.distributed import shut_down_process_group
from tests.conftest import FixedOrderStream, ToySteps, make_loader, make_model, regression_data


@dataclass(kw_only=True, eq=False)
class KillableTrainer(ToySteps, Trainer):
    kill: str | None = None
    at: int = -1
    stop_pid: int | None = None
    stop_at: int = -1
    pause_at: int = -1
    signal_at: tuple[str, int, int] | None = None
    signal_number: int = signal.SIGKILL
    _killed_validation: list = field(default_factory=list)

    def _signal_if_at(self, phase, epoch, batch_idx=-1):
        where = self.signal_at
        if where and where[0] == phase and where[1] == epoch and where[2] in (batch_idx, -1):
            self.signal_at = None  # one signal
            self._die(self.signal_number)

    def on_train_epoch_start(self):
        self._signal_if_at("epoch_start", self.epoch)

    def on_train_epoch_end(self):
        self._signal_if_at("epoch_end", self.epoch - 1)

    def _die(self, signum=signal.SIGKILL):
        if signum == signal.SIGKILL:
            # These kills model a crash after the saves before it were stored (every
            # process gets here at the same point); a kill during a background save is
            # tested with ACCEL_HYDRA_PAUSE_SAVE instead.
            self._commit_pending_save()
            self.wait_for_uploads()
        os.kill(os.getpid(), signum)

    def training_step(self, batch, batch_idx):
        accumulating = self.gradient_accumulation_steps > 1
        inside_update = batch_idx % self.gradient_accumulation_steps == 1 or not accumulating
        if self.step == self.pause_at:
            with open(os.path.join(self.project_dir, "paused"), "w") as f:
                f.write(str(os.getpid()))
            while True:
                time.sleep(0.1)
        self._signal_if_at("train", self.epoch, batch_idx)
        if self.step == self.at and inside_update:
            if self.kill == "mid_epoch":
                self._die()
            if self.kill == "sigterm":
                self.kill = None  # one signal
                self._die(signal.SIGTERM)
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        if self.step > 0:  # the epoch's validation, not the sanity pass before training
            self._signal_if_at("val", self.epoch, batch_idx)
        if self.kill == "in_validation" and self.epoch == 1 and batch_idx == 1:
            self._die()
        super().validation_step(batch, batch_idx)

    def save_checkpoint(self, name):
        if self.stop_pid and name == f"step_{self.stop_at}":
            self.wait_for_uploads()  # the checkpoints before it are committed
            os.kill(self.stop_pid, signal.SIGSTOP)
            if self.kill == "sigterm_after_stop":
                threading.Timer(0.5, self._die, (signal.SIGTERM,)).start()
        saved = super().save_checkpoint(name)
        if self.kill == "after_checkpoint" and name == f"step_{self.at}":
            self._die()
        return saved

    def _state_to_save(self):
        if self.kill == "during_save" and self.step == self.at:
            self._die()
        return super()._state_to_save()


@dataclass(kw_only=True, eq=False)
class KillableEMATrainer(EMAMixin, KillableTrainer):
    pass


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
    parser.add_argument("--storage-timeout", type=float, default=None)
    parser.add_argument("--retry-delays", default=None)
    parser.add_argument("--stop-pid", type=int, default=None)
    parser.add_argument("--stop-at", type=int, default=-1)
    parser.add_argument("--pause-at", type=int, default=-1)
    parser.add_argument("--epoch-length", type=int, default=None)
    parser.add_argument("--iterable", action="store_true")
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--uneven", action="store_true", help="even_batches=False")
    parser.add_argument("--signal-at", default=None)
    parser.add_argument("--send", choices=["KILL", "TERM"], default="KILL")
    parser.add_argument("--bucket", action="store_true", help="batches from BucketBatchSampler")
    parser.add_argument("--ema", action="store_true", help="with EMAMixin")
    parser.add_argument("--validate-with-ema", action="store_true")
    parser.add_argument("--compile", default=None, help="a torch.compile backend")
    parser.add_argument("--sync-save", action="store_true", help="async_save=False")
    parser.add_argument(
        "--seedable-sampler",
        action="store_true",
        help="keep Accelerate's SeedableRandomSampler (no accel_hydra.epoch_order)",
    )
    args = parser.parse_args(argv)
    if args.seedable_sampler:
        KillableTrainer._block_epoch_order = False
    if args.retry_delays is not None:
        delays = tuple(float(d) for d in args.retry_delays.split(",") if d)
        KillableTrainer.upload_retry_delays = delays

    signal_at = None
    if args.signal_at:
        phase, epoch, batch = args.signal_at.split(":")
        signal_at = (phase, int(epoch), int(batch))
    train_loader = make_loader(n=args.samples, batch_size=8, shuffle=True)
    if args.iterable:
        train_loader = DataLoader(FixedOrderStream(regression_data(args.samples)), batch_size=8)

    torch.manual_seed(0)
    model = make_model(dropout=0.2)
    if args.bucket:
        train_loader = bucketed_loader()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    extra = {}
    if args.ema:
        extra = {"ema_decay": 0.9, "validate_with_ema": args.validate_with_ema}
    if args.compile:
        extra["compile"] = {"backend": args.compile}
    trainer = (KillableEMATrainer if args.ema else KillableTrainer)(
        model=model,
        optimizer=optimizer,
        train_dataloader=train_loader,
        val_dataloader=make_loader(n=32, batch_size=8, shuffle=False, seed=1),
        epochs=args.epochs,
        epoch_length=args.epoch_length,
        even_batches=not args.uneven,
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
        stop_pid=args.stop_pid,
        stop_at=args.stop_at,
        pause_at=args.pause_at,
        **({"storage_timeout": args.storage_timeout} if args.storage_timeout else {}),
        signal_at=signal_at,
        signal_number=getattr(signal, f"SIG{args.send}"),
        **extra,
        async_save=not args.sync_save,
    )
    trainer.train(seed=0)
    if not trainer.accelerator.is_main_process:  # under torchrun: one rank writes
        return
    model = trainer.model
    if args.compile:  # the plain module's keys, as an uncompiled run has them
        model = trainer.accelerator.unwrap_model(model, keep_torch_compile=False)
    torch.save(
        {
            "model": model.state_dict(),
            "ema": trainer.ema_state_dict() if args.ema else None,
            "optimizer": trainer.optimizer.state_dict(),
            "step": trainer.step,
            "epoch": trainer.epoch,
        },
        args.result,
    )


if __name__ == "__main__":
    main()
    shut_down_process_group()
