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
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import accel_hydra
from accel_hydra import LoopBase
from accel_hydra.extension_points import PER_BATCH_POINTS, overridden_points
from accel_hydra.mixins import (
    CheckpointMixin,
    EarlyStoppingMixin,
    GradClipMixin,
    LoggingMixin,
    LRSchedulingMixin,
)
from tests.conftest import ToySteps, ToyTrainer, compose, make_loader, make_model, trainer_kwargs

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


#: Where a shuffled train loader's per-sample frames were: Accelerate's seedable sampler
#: (a generator around torch's) and torch's ``RandomSampler``.
SAMPLER_FILES = (os.path.join(ACCELERATE_DIR, "data_loader.py"), torch.utils.data.sampler.__file__)


def test_a_shuffled_train_loader_costs_no_python_frame_per_sample(tmp_path):
    def sampling_calls(batch_size):
        loader = make_loader(n=6 * batch_size, batch_size=batch_size, shuffle=True)
        calls = count_calls(
            tmp_path / str(batch_size), layers=1, batches=6, train_dataloader=loader
        )
        return sum(calls[path] for path in SAMPLER_FILES)

    small, large = sampling_calls(16), sampling_calls(64)
    assert small > 0  # the counter sees the dataloader's per-batch frames
    # Four times the samples per batch, not one more call into the samplers.
    assert large == small


# ----------------------------------------------------------- extension points per batch

#: What the loop itself calls per batch on the direct path (accumulation 1): the
#: batch generator's resumption, _train_batch, _direct_sync, _forward_backward and
#: _apply_update. Everything else per batch is an extension point someone overrides.
LOOP_CALLS_PER_BATCH = 5

#: Calls an override makes besides ``super()``, per update, in these settings.
OWN_CALLS = {
    # SGD is not fused: the NaN guard only appends to a list (no call, no tensor op).
    ("EarlyStoppingMixin", "_before_optimizer_step"): 0,
    ("LRSchedulingMixin", "_after_optimizer_step"): 1,  # _optimizer_step_was_skipped()
}

THIS_FILE = os.path.abspath(__file__)


def required_calls(cls) -> int:
    """The calls per batch the overridden per-batch points of ``cls`` need: each
    override's ``super()`` chain down to LoopBase's no-op, plus their own calls."""
    needed = LOOP_CALLS_PER_BATCH
    for name in PER_BATCH_POINTS:
        chain = [k for k in cls.__mro__ if name in vars(k)]
        if chain != [LoopBase]:
            needed += len(chain) + sum(OWN_CALLS.get((k.__name__, name), 0) for k in chain)
    return needed


@dataclass(kw_only=True, eq=False)
class UserAfterUpdate(ToySteps, LoopBase):
    """A user's own subclass overriding one extension point."""

    updates_seen: int = 0

    def _after_update(self):
        super()._after_update()
        self.updates_seen += 1


COMPOSITIONS = {
    "LoopBase": (compose(), {}),
    "CheckpointMixin": (compose(CheckpointMixin), {}),
    "EarlyStoppingMixin": (compose(EarlyStoppingMixin), {}),
    "LRSchedulingMixin": (compose(LRSchedulingMixin), {"lr_scheduler": "linear"}),
    "LoggingMixin": (compose(LoggingMixin), {"report_to": None, "log_every_n_steps": 1000}),
    "GradClipMixin": (compose(GradClipMixin), {"max_grad_norm": 1.0}),
    "Trainer": (
        ToyTrainer,
        {
            "lr_scheduler": "linear",
            "max_grad_norm": 1.0,
            "report_to": None,
            "log_every_n_steps": 1000,
        },
    ),
    "user subclass": (UserAfterUpdate, {}),
}


def train_watching_epoch_two(tmp_path, cls, batches, model, optimizer, start, stop, **settings):
    """Train ``cls`` for two epochs of ``batches`` batches of 8; ``start()`` and
    ``stop()`` bracket the second epoch (its loss read at the end included)."""

    @dataclass(kw_only=True, eq=False)
    class Watched(cls):
        def on_train_epoch_start(self):
            if self.epoch == 1:
                start()

        def on_train_epoch_end(self):
            if self.epoch == 2:  # the epoch counter has moved on by now
                stop()

    trainer = Watched(
        **trainer_kwargs(
            tmp_path / f"{batches}",
            model=model,
            optimizer=optimizer,
            train_dataloader=make_loader(n=8 * batches, batch_size=8),
            val_dataloader=None,
            epochs=2,
        ),
        **settings,
    )
    trainer.train(seed=0)
    assert trainer.direct_updates
    return trainer


def per_batch_calls(tmp_path, cls, settings) -> int:
    """Python calls into accel_hydra (and this file) per batch of the second epoch,
    exactly: the difference between epochs of 8 and 4 batches, over 4."""

    def run(batches):
        calls = Counter()

        def count(frame, event, arg):
            path = frame.f_code.co_filename
            if event == "call" and (path.startswith(PACKAGE_DIR) or path == THIS_FILE):
                calls["ours"] += 1

        model = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        extra = dict(settings)
        if extra.get("lr_scheduler") == "linear":
            extra["lr_scheduler"] = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.5, 20)
        train_watching_epoch_two(
            tmp_path,
            cls,
            batches,
            model,
            optimizer,
            start=lambda: sys.setprofile(count),
            stop=lambda: sys.setprofile(None),
            **extra,
        )
        return calls["ours"]

    return (run(8) - run(4)) // 4


@pytest.mark.parametrize("name", list(COMPOSITIONS))
def test_each_batch_calls_only_the_extension_points_its_class_overrides(tmp_path, name):
    cls, settings = COMPOSITIONS[name]
    assert per_batch_calls(tmp_path, cls, settings) == required_calls(cls)


def test_an_override_on_the_instance_is_called_too(tmp_path):
    """Resolution looks at the trainer, not only its class: a hook set on the instance
    before train() runs on every update."""
    seen = []
    trainer = compose()(**trainer_kwargs(tmp_path, val_dataloader=None, epochs=1))
    trainer._after_update = lambda: seen.append(trainer.step)
    trainer.train(seed=0)
    assert seen == list(range(1, 13))


def test_overridden_points_compares_functions_not_names():
    Trainerish = compose(GradClipMixin, LRSchedulingMixin)
    found = overridden_points(Trainerish(**trainer_kwargs("/tmp/unused")), LoopBase)
    assert found == {"_before_optimizer_step", "_after_optimizer_step"}
    assert overridden_points(compose()(**trainer_kwargs("/tmp/unused")), LoopBase) == set()


# ------------------------------------------------------------------- host reads per update

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


def count_host_reads(monkeypatch, tmp_path, batches, optimizer_kwargs) -> int:
    """Host reads of tensors made by accel_hydra code in a default Trainer run (NaN
    guard on, logging every 50 updates, a checkpoint per epoch, clipping)."""
    reads = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(PACKAGE_DIR):
                reads.append(1)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, **optimizer_kwargs)
    trainer = ToyTrainer(
        **trainer_kwargs(
            tmp_path / str(batches),
            model=model,
            optimizer=optimizer,
            train_dataloader=make_loader(n=8 * batches, batch_size=8),
        ),
        max_grad_norm=1.0,
        report_to=None,
    )
    assert trainer.stop_on_nan  # the default
    try:
        trainer.train(seed=0)
    finally:
        monkeypatch.undo()
    return len(reads)


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_default_trainer_reads_nothing_from_the_device_per_update(tmp_path, monkeypatch, fused):
    """Twice the updates, not one more host read: the NaN guard decides on the device."""
    optimizer_kwargs = {"fused": True} if fused else {}
    short = count_host_reads(monkeypatch, tmp_path / "short", 6, optimizer_kwargs)
    long = count_host_reads(monkeypatch, tmp_path / "long", 18, optimizer_kwargs)
    assert long == short


# ------------------------------------------------------------ tensor ops of the loop itself


def own_tensor_ops_per_batch(tmp_path, optimizer_kwargs) -> Counter:
    """Tensor ops (torch functions and Tensor methods, operators included) called from
    accel_hydra's own frames per batch of a default Trainer (NaN guard on, clipping, a
    per-update LR schedule): the difference between epochs of 8 and 4 batches, over 4.
    The model's, the optimizer's and torch's own ops are not counted."""

    class OwnOps(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(PACKAGE_DIR):
                self.ops[getattr(func, "__name__", str(func))] += 1
            return func(*args, **(kwargs or {}))

    def run(batches):
        counter = OwnOps()
        model = make_model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, **optimizer_kwargs)
        trainer = train_watching_epoch_two(
            tmp_path,
            ToyTrainer,
            batches,
            model,
            optimizer,
            start=counter.__enter__,
            stop=lambda: counter.__exit__(None, None, None),
            lr_scheduler=torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.5, 20),
            max_grad_norm=1.0,
            report_to=None,
            log_every_n_steps=1000,
            save_every_n_epochs=None,
        )
        assert trainer.stop_on_nan  # the default
        return counter.ops

    long, short = run(8), run(4)
    return Counter({op: (long[op] - short[op]) // 4 for op in long if long[op] != short[op]})


def test_the_default_loop_makes_one_tensor_call_per_batch(tmp_path):
    """Keeping the loss and guarding against NaN cost no tensor op between loss reads:
    the loop detaches each loss and appends it to a list. (It used to add it to a
    running sum, and the guard made four ops per update.)"""
    assert own_tensor_ops_per_batch(tmp_path, {}) == {"detach": 1}


def test_an_optimizer_that_skips_on_the_device_is_guarded_per_update(tmp_path):
    """A fused optimizer gets the guard's flag before every update (no host read):
    that takes tensor ops, the price of skipping a bad update on the device."""
    ops = own_tensor_ops_per_batch(tmp_path, {"fused": True})
    assert ops["detach"] == 1 and {"isfinite", "copy_"} <= set(ops)
