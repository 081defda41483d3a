"""Two-process scenarios for preemption and failures between collectives.

Run once per process with ``RANK``/``WORLD_SIZE``/``MASTER_*`` set (``tests/
test_collectives.py`` starts both, as one machine or posing as two):

- ``preempt``: a ``CheckpointMixin + LoopBase`` trainer; ``--sigterm-rank R --at K``
  sends SIGTERM to rank ``R`` inside update ``K + 1``; ``--resume latest`` continues.
- ``failures``: runs every ``--case NAME:RANK`` in turn in the same process group, each
  with a failure injected on that rank, and records the error each rank got. A rank
  left waiting would hang the harness (a faulthandler dump after 120 s says where).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
from dataclasses import dataclass

import torch
from accelerate.state import AcceleratorState, GradientState

from accel_hydra import CheckpointMixin
from accel_hydra.preemption import TrainingInterrupted
from accel_hydra.storage import CheckpointStore
from tests.conftest import compose, make_loader, make_model

RANK = int(os.environ.get("RANK", "0"))

Composed = compose(CheckpointMixin)


@dataclass(kw_only=True, eq=False)
class Preempted(Composed):
    sigterm_rank: int = -1
    at: int = -1

    def training_step(self, batch, batch_idx):
        if self.step == self.at and self.accelerator.process_index == self.sigterm_rank:
            self.at = -1
            os.kill(os.getpid(), signal.SIGTERM)
        return super().training_step(batch, batch_idx)


class FailingStore(CheckpointStore):
    """A real store that raises in one method on one rank."""

    fail: str = ""
    fail_rank: int = -1

    def _maybe_fail(self, method: str) -> None:
        if method == self.fail and self.fail_rank == RANK:
            raise OSError(f"injected failure in {method} on rank {RANK}")

    def commit(self, name, staged, info, callback=None):
        self._maybe_fail("commit")
        super().commit(name, staged, info, callback)

    def delete(self, name):
        self._maybe_fail("delete")
        super().delete(name)

    def upload(self, name, staged, callback=None):
        self._maybe_fail("upload")
        return super().upload(name, staged, callback)

    def write_marker(self, name, info, files):
        self._maybe_fail("write_marker")
        super().write_marker(name, info, files)


@dataclass(kw_only=True, eq=False)
class Failing(Composed):
    fail: str = ""
    fail_rank: int = -1

    def _state_to_save(self):
        if self.fail == "trainer_state" and self.fail_rank == RANK:
            raise ValueError(f"injected failure in _state_to_save on rank {RANK}")
        return super()._state_to_save()

    def get_val_metrics(self):
        if self.fail == "metrics" and self.fail_rank == RANK:
            raise ValueError(f"injected failure in get_val_metrics on rank {RANK}")
        return super().get_val_metrics()


# case -> (what fails, where checkpoints go)
CASES = {
    "trainer_state": ("trainer_state", "local"),
    "commit": ("commit", "local"),
    "prune": ("delete", "local"),
    "prune_async": ("delete", "remote"),
    "metrics": ("metrics", "local"),
    "upload": ("upload", "remote"),
    "marker": ("write_marker", "remote"),
}


def kwargs(args, **extra):
    torch.manual_seed(0)
    model = make_model(dropout=0.1)
    base = dict(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=0.01),
        train_dataloader=make_loader(n=96, batch_size=8),
        val_dataloader=make_loader(n=32, batch_size=8, shuffle=False, seed=1),
        epochs=2,
        project_dir=args.project,
        progress_bar=False,
        accelerator_kwargs={"cpu": True},
    )
    base.update(extra)
    return base


def preempt(args) -> dict:
    trainer = Preempted(
        **kwargs(args),
        sigterm_rank=args.sigterm_rank,
        at=args.at,
        resume_from_checkpoint=args.resume,
    )
    seen: dict = {}
    try:
        trainer.train(seed=0)
    except TrainingInterrupted as stop:
        seen["interrupted"] = stop.code
        raise
    finally:
        seen["step"] = trainer.step
        write(args, "preempt", seen)
        if RANK == 0 and "interrupted" not in seen:
            torch.save(
                {
                    "model": trainer.accelerator.unwrap_model(trainer.model).state_dict(),
                    "optimizer": trainer.optimizer.state_dict(),
                    "step": trainer.step,
                    "epoch": trainer.epoch,
                },
                os.path.join(args.out, "preempt_result.pt"),
            )
    return seen


def failures(args) -> dict:
    seen = {}
    for case in args.case:
        name, rank = case.split(":")
        fail, where = CASES[name]
        project = os.path.join(args.project, name + rank)
        url = f"{args.bucket}/{name}{rank}" if where == "remote" else None
        trainer = Failing(
            **kwargs(args, project_dir=project, epochs=1),
            checkpoint_dir=url,
            storage_options=args.storage_options if url else None,
            save_every_n_steps=2,
            save_every_n_epochs=None if fail == "metrics" else 1,
            fail=fail,
            fail_rank=int(rank),
        )
        trainer.upload_retry_delays = ()
        store = FailingStore(trainer.checkpoint_dir, trainer.storage_options)
        store.fail, store.fail_rank = fail, int(rank)
        trainer.checkpoint_store = store
        try:
            trainer.train(seed=0)
            seen[case] = None
        except Exception as err:
            seen[case] = [type(err).__name__, str(err), trainer.step]
        if where == "remote":  # asked of Accelerate's state on both ranks, as a save does
            seen["several_machines"] = trainer._stages_per_machine()
        AcceleratorState._reset_state()
        GradientState._reset_state()
    return seen


def write(args, scenario, seen):
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{scenario}_rank{RANK}.json"), "w") as f:
        json.dump(seen, f)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["preempt", "failures"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--project", required=True)
    parser.add_argument("--sigterm-rank", type=int, default=-1)
    parser.add_argument("--at", type=int, default=-1)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--case", action="append", default=[])
    parser.add_argument("--bucket", default=None)
    parser.add_argument("--storage-options", type=json.loads, default=None)
    args = parser.parse_args()
    if args.scenario == "preempt":
        preempt(args)
    else:
        write(args, "failures", failures(args))


if __name__ == "__main__":
    faulthandler.dump_traceback_later(120, exit=True)
    main()
