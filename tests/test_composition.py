"""Mixins compose in any subset and any order, with the same behaviour."""

import functools
import os

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from accel_hydra import (
    CheckpointMixin,
    EarlyStoppingMixin,
    GradClipMixin,
    LoggingMixin,
    LoopBase,
    LRSchedulingMixin,
    MetricMonitor,
    Trainer,
)
from accel_hydra.storage import CheckpointStore
from tests.conftest import ToyTrainer, compose, make_model, parameters_of, trainer_kwargs

ALL = (CheckpointMixin, EarlyStoppingMixin, LRSchedulingMixin, LoggingMixin, GradClipMixin)


def full_run(cls, tmp_path):
    torch.manual_seed(0)
    model = make_model(dropout=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.02)
    trainer = cls(
        **trainer_kwargs(tmp_path, model=model, optimizer=optimizer, epochs=6),
        metric_monitor=MetricMonitor(metric_name="loss"),
        early_stop=2,
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR),
        max_grad_norm=0.5,
        log_every_n_steps=4,
        save_every_n_steps=7,
        save_last_k=2,
    )
    trainer.scripted_metrics = [{"loss": v} for v in (1.0, 0.8, 0.9, 0.85, 0.7, 0.6)]
    trainer.train(seed=0)
    events = EventAccumulator(str(tmp_path / "logs"))
    events.Reload()
    logged = {
        tag: [(e.step, e.value) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
        if tag != "train/samples_per_sec"
    }
    return trainer, logged


def test_all_five_in_two_orders_behave_the_same(tmp_path):
    assert Trainer in ToyTrainer.__mro__
    reversed_order = compose(*reversed(ALL))
    a, logs_a = full_run(ToyTrainer, tmp_path / "a")
    b, logs_b = full_run(reversed_order, tmp_path / "b")
    assert (a.epoch, a.step) == (b.epoch, b.step) == (4, 48)  # early stop after epoch 4
    for key, value in parameters_of(a.model).items():
        assert torch.equal(value, parameters_of(b.model)[key])
    assert logs_a == logs_b
    assert set(logs_a) >= {"train/loss", "train/lr", "train/grad_norm", "val/loss"}
    names = sorted(CheckpointStore(a.checkpoint_dir).committed())
    assert names == sorted(CheckpointStore(b.checkpoint_dir).committed())
    assert names == ["best", "epoch_4", "step_42"]


@pytest.mark.parametrize("mixin", ALL, ids=lambda m: m.__name__)
def test_each_mixin_alone_over_loopbase(tmp_path, mixin):
    cls = compose(mixin)
    assert cls.__mro__[-3:] == (LoopBase, LoopBase.__mro__[1], object)
    extra = {
        CheckpointMixin: {"save_every_n_steps": 5},
        EarlyStoppingMixin: {"metric_monitor": MetricMonitor(), "early_stop": 1},
        LRSchedulingMixin: {"lr_scheduler": functools.partial(torch.optim.lr_scheduler.LinearLR)},
        LoggingMixin: {"log_every_n_steps": 5},
        GradClipMixin: {"max_grad_norm": 0.1},
    }[mixin]
    trainer = cls(**trainer_kwargs(tmp_path, epochs=2), **extra)
    trainer.scripted_metrics = [{"loss": 1.0}, {"loss": 2.0}]
    trainer.train(seed=0)
    assert trainer.step == 24
    assert os.path.isdir(tmp_path / "checkpoints") == (mixin is CheckpointMixin)
    assert os.path.isdir(tmp_path / "logs") == (mixin is LoggingMixin)
    if mixin is EarlyStoppingMixin:
        assert trainer.should_stop_training  # patience 1, worse at epoch 2


def test_loopbase_before_a_mixin_is_rejected_by_python():
    with pytest.raises(TypeError, match="MRO"):
        type("Wrong", (LoopBase, GradClipMixin), {})


@pytest.mark.parametrize("stop_on_nan", [False, True])
def test_trainer_reads_from_the_device_only_when_asked(tmp_path, monkeypatch, stop_on_nan):
    """All mixins on, logging every 50 updates, checkpoints each epoch: the loop moves
    the loss off the device once per epoch, NaN guard or not (it decides on the
    device; before the sync-free guard it read one flag per update)."""
    import sys

    reads = []
    original = torch.Tensor.item

    def counting_item(self):
        if f"accel_hydra{os.sep}" in sys._getframe(1).f_code.co_filename:
            reads.append(1)
        return original(self)

    trainer = compose(*ALL)(
        **trainer_kwargs(tmp_path, epochs=3),
        max_grad_norm=1.0,
        log_every_n_steps=50,
        stop_on_nan=stop_on_nan,
    )
    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    trainer.train(seed=0)
    monkeypatch.undo()
    assert trainer.step == 36
    assert len(reads) == 3
