"""Distributed scenarios, run under ``torchrun --standalone --nproc_per_node N``.

Each process writes what it saw to ``<out>/<scenario>_rank<r>.json``; the tests in
``tests/test_distributed.py`` compare the ranks with each other and with one process.
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import json
import os
import signal
import sys
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from accel_hydra import MetricMonitor, Trainer, TrainLauncher
from accel_hydra.distributed import shut_down_process_group
from accel_hydra.storage import CheckpointStore
from tests.conftest import ToySteps, make_loader, make_model


@dataclass(kw_only=True, eq=False)
class DistTrainer(ToySteps, Trainer):
    kill_at: int = -1
    #: From this update on, the loss of rank 1 alone is NaN (-1: never).
    nan_after: int = -1

    def training_step(self, batch, batch_idx):
        accumulation = self.gradient_accumulation_steps
        if self.step == self.kill_at and (accumulation == 1 or batch_idx % accumulation == 1):
            os.kill(os.getpid(), signal.SIGKILL)
        loss = super().training_step(batch, batch_idx)
        if 0 <= self.nan_after <= self.step and self.accelerator.process_index == 1:
            loss = loss * float("nan")
        return loss


class RecordingStore(CheckpointStore):
    """A real store that also remembers which checkpoints this process committed."""

    committed_here: list

    def commit(self, name, staged, info):
        self.committed_here.append(name)
        super().commit(name, staged, info)


SCHEDULERS = {
    "steplr": (functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5), {}),
    "onecycle": (functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1), {}),
    "warmup_cosine": (
        functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR),
        {"warmup_steps": 2},
    ),
}


def build(args, **extra):
    torch.manual_seed(0)
    model = make_model(dropout=0.1)
    kwargs = dict(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=0.01),
        train_dataloader=make_loader(n=args.samples, batch_size=args.batch_size),
        val_dataloader=make_loader(n=32, batch_size=8, shuffle=False, seed=1),
        epochs=args.epochs,
        gradient_accumulation_steps=args.accumulation,
        project_dir=args.project,
        progress_bar=False,
        accelerator_kwargs={"cpu": True},
        even_batches=not args.uneven,
        report_to=None,
    )
    kwargs.update(extra)
    return DistTrainer(**kwargs)


def predicted(trainer, data, batch_size):
    """What ``trainer.predict`` returned for ``data``, checked against the model."""
    result = trainer.predict(torch.utils.data.DataLoader(data, batch_size=batch_size))
    with torch.no_grad():
        expected = trainer.accelerator.unwrap_model(trainer.model).eval()(data)
    trainer.model.train()
    return {
        "index": result["index"].tolist(),
        "outputs_match_the_model": torch.allclose(result["out"][0], expected, atol=1e-6),
        "parameter_sum": sum(p.double().sum().item() for p in trainer.model.parameters()),
        "pair_rows": len(result["out"][1]),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario")
    parser.add_argument("--out", required=True)
    parser.add_argument("--project", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--kill-at", type=int, default=-1)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--uneven", action="store_true")
    parser.add_argument("--fused", action="store_true", help="a fused AdamW (found_inf)")
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    seen: dict = {}

    if args.scenario == "lr":
        from accelerate.state import AcceleratorState, GradientState

        for name, (factory, extra) in SCHEDULERS.items():
            trainer = build(args, lr_scheduler=factory, **extra)
            trace = seen.setdefault(name, [])
            trainer.on_train_start = functools.partial(
                lambda t, trace: t.optimizer.optimizer.register_step_pre_hook(
                    lambda opt, *_: trace.append(opt.param_groups[0]["lr"])
                ),
                trainer,
                trace,
            )
            trainer.train(seed=0)
            AcceleratorState._reset_state()
            GradientState._reset_state()
    elif args.scenario == "metrics":
        per_rank = [[1.0, 0.9, 0.85, 0.8, 0.75, 0.7], [1.0, 1.2, 1.3, 1.4, 1.5, 1.6]][rank]
        trainer = build(args, metric_monitor=MetricMonitor(metric_name="loss"), early_stop=2)
        trainer.scripted_metrics = [{"loss": v} for v in per_rank]
    elif args.scenario == "writers":
        trainer = build(args, save_every_n_steps=2, save_last_k=2)
        store = RecordingStore(trainer.checkpoint_dir)
        store.committed_here = seen.setdefault("committed", [])
        trainer.checkpoint_store = store
        config = OmegaConf.create({"trainer": {"project_dir": args.project}, "seed": 0})
        seen["config_written"] = TrainLauncher("unused.yaml").save_config(config)
    elif args.scenario == "predict":
        trainer = build(args)
        trainer.predict_step = lambda batch, batch_idx: {
            "index": batch[:, 0].long(),
            "out": (trainer.model(batch), batch[:, :2]),
        }
        data = torch.zeros(37, 4)
        data[:, 0] = torch.arange(37)
        seen["before_train"] = predicted(trainer, data, batch_size=4)
        seen["metrics"] = trainer.validate()
    elif args.scenario == "nan":
        model = make_model(dropout=0.1)
        trainer = build(
            args,
            model=model,
            optimizer=torch.optim.AdamW(model.parameters(), lr=0.01, fused=args.fused),
            save_every_n_steps=2,
            save_last_k=None,
            log_every_n_steps=4,
            nan_after=6,
        )
    else:  # "train": plain training, with optional kill and resume
        trainer = build(
            args,
            save_every_n_steps=2,
            save_last_k=None,
            kill_at=args.kill_at,
            resume_from_checkpoint=args.resume,
        )
    if args.scenario != "lr":
        trainer.train(seed=0)
    if args.scenario == "predict":
        seen["after_train"] = predicted(trainer, data, batch_size=8)
    seen.update(step=trainer.step, epoch=trainer.epoch, stopped=trainer.should_stop_training)
    if args.scenario == "nan":
        params = [p.detach() for p in trainer.model.parameters()]
        seen.update(
            nonfinite_loss_step=trainer.nonfinite_loss_step,
            params_finite=all(bool(torch.isfinite(p).all()) for p in params),
            params=[p.double().sum().item() for p in params],
        )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.scenario}_rank{rank}.json"), "w") as f:
        json.dump(seen, f)
    if rank == 0:
        torch.save(
            {
                "model": trainer.accelerator.unwrap_model(trainer.model).state_dict(),
                "optimizer": trainer.optimizer.state_dict(),
                "step": trainer.step,
                "epoch": trainer.epoch,
            },
            os.path.join(args.out, f"{args.scenario}_result.pt"),
        )


if __name__ == "__main__":
    # CI twice saw a finished 2-process run (its "done" summary printed) never exit
    # under torch 2.6. A hang now ends the process with every thread's stack on stderr,
    # which the test prints, instead of a silent timeout.
    faulthandler.dump_traceback_later(90, exit=True)
    main()
    shut_down_process_group()
    # Skip interpreter finalization, where gloo's threads can hang or abort a process
    # whose work is done and written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
