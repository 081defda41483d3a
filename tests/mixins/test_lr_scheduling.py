import functools
import math

import pytest
import torch

from accel_hydra import LRSchedulingMixin, MetricMonitor
from tests.conftest import compose, make_loader, trainer_kwargs

Scheduled = compose(LRSchedulingMixin)


def lr_trace(trainer):
    """The LR every optimizer update used, read from the real optimizer."""
    trace = []
    trainer.on_train_start = lambda: trainer.optimizer.optimizer.register_step_pre_hook(
        lambda opt, *_: trace.append(opt.param_groups[0]["lr"])
    )
    return trace


@pytest.mark.parametrize("accumulation", [1, 3])
def test_step_interval_steps_once_per_update(tmp_path, accumulation):
    kwargs = trainer_kwargs(tmp_path, gradient_accumulation_steps=accumulation, epochs=2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(kwargs["optimizer"], lambda n: 1.0 / (n + 1))
    trainer = Scheduled(**kwargs, lr_scheduler=scheduler)
    trace = lr_trace(trainer)
    trainer.train(seed=0)
    updates = 2 * 12 // accumulation
    assert trainer.step == updates
    assert scheduler.last_epoch == updates
    assert trace == pytest.approx([0.05 / (n + 1) for n in range(updates)])


def test_epoch_interval_steps_once_per_epoch(tmp_path):
    kwargs = trainer_kwargs(tmp_path, epochs=3)
    scheduler = torch.optim.lr_scheduler.StepLR(kwargs["optimizer"], step_size=1, gamma=0.5)
    trainer = Scheduled(**kwargs, lr_scheduler=scheduler, lr_scheduler_interval="epoch")
    trace = lr_trace(trainer)
    trainer.train(seed=0)
    assert scheduler.last_epoch == 3
    assert trace == pytest.approx([0.05] * 12 + [0.025] * 12 + [0.0125] * 12)


def test_partial_scheduler_gets_the_true_number_of_updates(tmp_path):
    trainer = Scheduled(
        **trainer_kwargs(tmp_path, epochs=3, gradient_accumulation_steps=4),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1),
    )
    trainer.train(seed=0)
    assert trainer.lr_scheduler.total_steps == 9  # 3 epochs x ceil(12 / 4)
    assert trainer.lr_scheduler.last_epoch == 9


def test_plateau_is_fed_the_monitored_metric(tmp_path):
    trainer = Scheduled(
        **trainer_kwargs(tmp_path, epochs=4),
        metric_monitor=MetricMonitor(metric_name="score", mode="max"),
        lr_scheduler=functools.partial(
            torch.optim.lr_scheduler.ReduceLROnPlateau, mode="max", patience=0, factor=0.1
        ),
        lr_scheduler_interval="epoch",
    )
    trainer.scripted_metrics = [{"score": v, "loss": 0.0} for v in (0.5, 0.6, 0.6, 0.7)]
    trace = lr_trace(trainer)
    trainer.train(seed=0)
    # Epoch 3 did not improve "score": the LR drops for epoch 4, but not for epoch 3.
    per_epoch = trace[::12]
    assert per_epoch == pytest.approx([0.05, 0.05, 0.05, 0.005])


def test_plateau_needs_a_monitor(tmp_path):
    trainer = Scheduled(
        **trainer_kwargs(tmp_path),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau),
        lr_scheduler_interval="epoch",
    )
    with pytest.raises(ValueError, match="ReduceLROnPlateau needs the metric to watch"):
        trainer.train(seed=0)


def test_bad_interval_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="'step' or 'epoch'"):
        Scheduled(**trainer_kwargs(tmp_path), lr_scheduler_interval="batch")


def test_truncated_epochs_size_the_schedule(tmp_path):
    trainer = Scheduled(
        **trainer_kwargs(tmp_path, train_dataloader=make_loader(n=800), epoch_length=10),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR),
    )
    trainer.train(seed=0)
    assert trainer.lr_scheduler.T_max == 20


def test_linear_warmup_then_cosine(tmp_path):
    trainer = Scheduled(
        **trainer_kwargs(tmp_path, epochs=2),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR),
        warmup_steps=4,
    )
    trace = lr_trace(trainer)
    trainer.train(seed=0)
    assert trace[:5] == pytest.approx([0.05 * f for f in (0.25, 0.4375, 0.625, 0.8125, 1.0)])
    expected_tail = [
        0.05 * (1 + math.cos(math.pi * t / 20)) / 2 for t in range(20)
    ]  # T_max = 24 updates - 4 of warmup
    assert trace[4:] == pytest.approx(expected_tail)


def warmup_then_linear(optimizer, num_warmup_steps, num_training_steps):
    """The transformers-style signature: warmup length is an argument."""

    def factor(step):
        if step < num_warmup_steps:
            return step / num_warmup_steps
        return (num_training_steps - step) / (num_training_steps - num_warmup_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def test_warmup_ratio_fills_num_warmup_steps(tmp_path):
    trainer = Scheduled(
        **trainer_kwargs(tmp_path, epochs=2, gradient_accumulation_steps=2),
        lr_scheduler=warmup_then_linear,
        warmup_ratio=0.25,
    )
    trace = lr_trace(trainer)
    trainer.train(seed=0)
    # 2 epochs x 6 updates = 12; a quarter of them (3) warm up.
    assert trace == pytest.approx(
        [
            0.05 * f
            for f in (0, 1 / 3, 2 / 3, 1, 8 / 9, 7 / 9, 6 / 9, 5 / 9, 4 / 9, 3 / 9, 2 / 9, 1 / 9)
        ]
    )


def test_warmup_needs_a_partial(tmp_path):
    kwargs = trainer_kwargs(tmp_path)
    built = torch.optim.lr_scheduler.StepLR(kwargs["optimizer"], step_size=1)
    with pytest.raises(ValueError, match="need lr_scheduler as a callable"):
        Scheduled(**kwargs, lr_scheduler=built, warmup_steps=3)


def test_resuming_with_a_longer_run_is_a_clear_error(tmp_path):
    from accel_hydra import CheckpointMixin

    ScheduledCheckpointed = compose(CheckpointMixin, LRSchedulingMixin)
    onecycle = functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1)
    ScheduledCheckpointed(**trainer_kwargs(tmp_path, epochs=1), lr_scheduler=onecycle).train(seed=0)
    longer = ScheduledCheckpointed(
        **trainer_kwargs(tmp_path, epochs=2), lr_scheduler=onecycle, resume_from_checkpoint="latest"
    )
    with pytest.raises(
        ValueError, match="sized for 12 updates when this run started; the resumed run asks for 24"
    ):
        longer.train(seed=0)
