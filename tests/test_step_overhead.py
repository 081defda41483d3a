"""What the loop itself does per batch, counted exactly with ``sys.setprofile``.

Times drift on a shared machine (``benchmarks/overhead.py`` measures them with
medians); Python call counts do not, so these tests pin the properties behind the
numbers: the trainer's own work per batch does not grow with the model, and on the
direct path no Accelerate wrapper runs per batch.
"""

import os
import sys
from collections import Counter
from dataclasses import dataclass, field

import accelerate
import torch
from torch import nn

import accel_hydra
from tests.conftest import ToyTrainer, make_loader, trainer_kwargs

PACKAGE_DIR = os.path.dirname(accel_hydra.__file__)
ACCELERATE_DIR = os.path.dirname(accelerate.__file__)


@dataclass(kw_only=True, eq=False)
class CountingTrainer(ToyTrainer):
    """Counts Python calls by source file during the second epoch."""

    calls: Counter = field(default_factory=Counter)

    def on_train_epoch_start(self):
        if self.epoch == 1:
            sys.setprofile(self._count)

    def on_train_epoch_end(self):
        sys.setprofile(None)

    def _count(self, frame, event, arg):
        if event == "call":
            self.calls[frame.f_code.co_filename] += 1


def count_calls(tmp_path, layers: int, batches: int, **overrides) -> Counter:
    widths = [4] + [16] * layers + [1]
    model = nn.Sequential(*(nn.Linear(a, b) for a, b in zip(widths, widths[1:], strict=False)))
    kwargs = trainer_kwargs(
        tmp_path,
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        train_dataloader=make_loader(n=8 * batches, batch_size=8),
        val_dataloader=None,
        max_grad_norm=1.0,
        report_to=None,
        stop_on_nan=False,
        save_every_n_epochs=None,
        log_every_n_steps=1000,
    )
    kwargs.update(overrides)
    trainer = CountingTrainer(**kwargs)
    trainer.train(seed=0)
    return trainer.calls


def calls_in(calls: Counter, directory: str, names: tuple[str, ...] = ()) -> int:
    return sum(
        n
        for path, n in calls.items()
        if path.startswith(directory) and (not names or os.path.basename(path) in names)
    )


def test_the_loops_work_per_batch_does_not_grow_with_the_model(tmp_path):
    small = count_calls(tmp_path / "small", layers=1, batches=12)
    large = count_calls(tmp_path / "large", layers=12, batches=12)
    ours_small = calls_in(small, PACKAGE_DIR)
    assert ours_small > 12  # the counter sees the loop's own frames
    assert calls_in(large, PACKAGE_DIR) == ours_small


def test_no_accelerate_wrapper_runs_per_batch_on_the_direct_path(tmp_path):
    wrappers = ("accelerator.py", "optimizer.py", "scheduler.py")
    short = count_calls(tmp_path / "short", layers=1, batches=6)
    long = count_calls(tmp_path / "long", layers=1, batches=18)
    # Twelve more batches, and not one more call into Accelerator or its optimizer.
    assert calls_in(long, ACCELERATE_DIR, wrappers) == calls_in(short, ACCELERATE_DIR, wrappers)
    # ...whereas forcing Accelerate's path shows up in the same count, batch by batch.

    @dataclass(kw_only=True, eq=False)
    class AcceleratedCounting(CountingTrainer):
        _allow_direct_updates = False

    def accelerated(name, batches):
        trainer = AcceleratedCounting(
            **trainer_kwargs(
                tmp_path / name,
                train_dataloader=make_loader(n=8 * batches, batch_size=8),
                val_dataloader=None,
                report_to=None,
                stop_on_nan=False,
            )
        )
        trainer.train(seed=0)
        return calls_in(trainer.calls, ACCELERATE_DIR, wrappers)

    assert accelerated("acc-long", 18) > accelerated("acc-short", 6) + 12
