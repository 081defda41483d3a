import math
from dataclasses import dataclass

import pytest
import torch

from accel_hydra import EarlyStoppingMixin, MetricMonitor
from accel_hydra.mixins.checkpoint import TRAINER_STATE_FILE
from accel_hydra.safe_state import load_trainer_state
from accel_hydra.storage import CheckpointStore
from tests.conftest import (
    ToyTrainer,
    assert_same_parameters,
    compose,
    parameters_of,
    trainer_kwargs,
)

EarlyStopOnly = compose(EarlyStoppingMixin)


def run_scripted(tmp_path, values, patience, mode="min", min_delta=0.0, cls=EarlyStopOnly):
    loop = cls(
        **trainer_kwargs(tmp_path, epochs=len(values)),
        metric_monitor=MetricMonitor(metric_name="loss", mode=mode, min_delta=min_delta),
        early_stop=patience,
    )
    loop.scripted_metrics = [{"loss": v} for v in values]
    loop.train(seed=0)
    return loop


def test_stops_after_patience_epochs_without_improvement(tmp_path):
    loop = run_scripted(tmp_path, [1.0, 0.9, 0.95, 0.93, 0.91, 0.5, 0.4], patience=3)
    assert loop.epoch == 5
    assert loop.should_stop_training


def test_an_improvement_resets_patience(tmp_path):
    loop = run_scripted(tmp_path, [1.0, 1.1, 0.9, 1.0, 0.8, 0.85], patience=2)
    assert loop.epoch == 6
    assert not loop.should_stop_training


def test_min_delta_ignores_tiny_improvements(tmp_path):
    loop = run_scripted(tmp_path, [1.0, 0.99, 0.98, 0.97, 0.5], patience=2, min_delta=0.05)
    assert loop.epoch == 3


def test_max_mode(tmp_path):
    loop = run_scripted(tmp_path, [0.5, 0.6, 0.7, 0.65, 0.6, 0.9], patience=2, mode="max")
    assert loop.epoch == 5
    assert loop.metric_monitor.best_value == 0.7


def test_patience_without_a_monitor_is_an_error_at_construction(tmp_path):
    with pytest.raises(ValueError, match="early_stop=3 needs a metric to watch"):
        EarlyStopOnly(**trainer_kwargs(tmp_path), early_stop=3)


def test_missing_metric_error_lists_returned_keys(tmp_path):
    loop = EarlyStopOnly(
        **trainer_kwargs(tmp_path),
        metric_monitor=MetricMonitor(metric_name="accuracy"),
        early_stop=2,
    )
    with pytest.raises(KeyError, match=r"'accuracy' not in get_val_metrics\(\) keys \['loss'\]"):
        loop.train(seed=0)


@dataclass(kw_only=True, eq=False)
class NaNAfter(ToyTrainer):
    """Loss becomes NaN from this update on (as a diverging run would)."""

    nan_from_step: int = 10**9

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * math.nan if self.step >= self.nan_from_step else loss


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    trainer = NaNAfter(
        **trainer_kwargs(tmp_path, epochs=4),
        save_every_n_steps=5,
        save_last_k=2,
        log_every_n_steps=3,
        nan_from_step=17,
        report_to=None,
    )
    trainer.train(seed=0)

    assert trainer.should_stop_training
    assert trainer.nonfinite_loss_step == 18  # the update that was skipped
    assert (trainer.step, trainer.epoch) == (17, 1)
    store = CheckpointStore(trainer.checkpoint_dir)
    assert sorted(store.committed()) == ["epoch_1", "step_15"]
    state = load_trainer_state(f"{trainer.checkpoint_dir}/step_15/{TRAINER_STATE_FILE}")
    assert state["progress"]["step"] == 15
    from safetensors.torch import load_file

    weights = load_file(f"{trainer.checkpoint_dir}/step_15/model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_nan_update_never_reaches_the_parameters(tmp_path):
    """The run with a NaN at update 21 ends with exactly the state of a clean run
    stopped after update 20."""
    torch.manual_seed(0)
    nan_run = NaNAfter(**trainer_kwargs(tmp_path / "nan", epochs=3), nan_from_step=20)
    torch.manual_seed(0)
    clean = NaNAfter(**trainer_kwargs(tmp_path / "clean", epochs=3))
    clean.training_step_original = clean.training_step

    def stop_at_20(batch, batch_idx):
        loss = clean.training_step_original(batch, batch_idx)
        if clean.step == 19:
            clean.should_stop_training = True
        return loss

    clean.training_step = stop_at_20
    nan_run.train(seed=0)
    clean.train(seed=0)
    assert nan_run.nonfinite_loss_step == 21
    assert nan_run.step == clean.step == 20
    assert_same_parameters(parameters_of(nan_run.model), parameters_of(clean.model))
    for a, b in zip(
        nan_run.optimizer.state_dict()["state"].values(),
        clean.optimizer.state_dict()["state"].values(),
        strict=True,
    ):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # Nothing was saved from the bad state: the epoch_1 checkpoint is the newest.
    assert sorted(CheckpointStore(nan_run.checkpoint_dir).committed()) == ["epoch_1"]


def test_stop_on_nan_false_keeps_training(tmp_path):
    trainer = NaNAfter(
        **trainer_kwargs(tmp_path, epochs=2), nan_from_step=3, stop_on_nan=False, report_to=None
    )
    trainer.train(seed=0)
    assert trainer.epoch == 2
    assert math.isnan(trainer.last_loss)


def test_resuming_an_early_stopped_run_does_nothing(tmp_path):
    values = [1.0, 0.9, 0.95, 0.93, 0.5, 0.4]
    first = run_scripted(tmp_path, values, patience=2, cls=ToyTrainer)
    assert first.epoch == 4
    again = ToyTrainer(
        **trainer_kwargs(tmp_path, epochs=len(values)),
        metric_monitor=MetricMonitor(metric_name="loss"),
        early_stop=2,
        resume_from_checkpoint="latest",
    )
    again.scripted_metrics = [{"loss": v} for v in values]
    again.train(seed=0)
    assert (again.epoch, again.step) == (first.epoch, first.step)
    assert "already stopped early" in again.stop_reason
