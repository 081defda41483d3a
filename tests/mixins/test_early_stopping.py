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
    make_model,
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


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    """Update 18 is the first with a NaN loss; the guard reads nothing per update, so
    the loop notices at the next loss read (the logging step 20), stops there and
    writes no checkpoint from then on: step_20 is never saved."""
    trainer = NaNAfter(
        **trainer_kwargs(tmp_path, epochs=4),
        save_every_n_steps=5,
        save_last_k=2,
        log_every_n_steps=4,
        nan_from_step=17,
        report_to=None,
    )
    trainer.train(seed=0)

    assert trainer.should_stop_training
    assert trainer.nonfinite_loss_step == 18  # the first bad update, found at the read
    assert (trainer.step, trainer.epoch) == (20, 1)
    assert "NaN or infinite at update 18 (epoch 2); updates 18 to 20 changed" in (
        capsys.readouterr().out
    )
    store = CheckpointStore(trainer.checkpoint_dir)
    assert sorted(store.committed()) == ["epoch_1", "step_15"]
    state = load_trainer_state(f"{trainer.checkpoint_dir}/step_15/{TRAINER_STATE_FILE}")
    assert state["progress"]["step"] == 15
    from safetensors.torch import load_file

    weights = load_file(f"{trainer.checkpoint_dir}/step_15/model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_with_accumulation_the_first_bad_update_is_the_one_holding_the_bad_batch(tmp_path, capsys):
    """Two batches per update, six updates per epoch, a loss read at update 4 (logging)
    and 6 (epoch end). The second batch of update 5 is the first NaN: the guard finds
    it at the epoch-end read from the window's batch losses, not from a device flag."""

    @dataclass(kw_only=True, eq=False)
    class NaNFromBatch(ToyTrainer):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            bad = (self.step == 4 and batch_idx % 2 == 1) or self.step > 4
            return loss * math.nan if bad else loss

    trainer = NaNFromBatch(
        **trainer_kwargs(tmp_path, epochs=2),
        gradient_accumulation_steps=2,
        log_every_n_steps=4,
        report_to=None,
    )
    trainer.train(seed=0)
    assert (trainer.nonfinite_loss_step, trainer.step) == (5, 6)
    assert "NaN or infinite at update 5 (epoch 1); updates 5 to 6 changed" in (
        capsys.readouterr().out
    )


def fused_sgd(model):
    # fused=True: the optimizer takes found_inf, so the guard skips updates on the device.
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, fused=True)


def test_nan_update_never_reaches_the_parameters(tmp_path, capsys):
    """With an optimizer that can skip on the device, the run with a NaN at update 21
    ends with exactly the parameters and optimizer state of a clean run stopped after
    update 20, though the loop noticed only at the epoch's end (update 24)."""
    torch.manual_seed(0)
    nan_model = make_model()
    nan_run = NaNAfter(
        **trainer_kwargs(
            tmp_path / "nan", epochs=3, model=nan_model, optimizer=fused_sgd(nan_model)
        ),
        nan_from_step=20,
    )
    torch.manual_seed(0)
    clean_model = make_model()
    clean = NaNAfter(
        **trainer_kwargs(
            tmp_path / "clean", epochs=3, model=clean_model, optimizer=fused_sgd(clean_model)
        ),
    )
    clean.training_step_original = clean.training_step

    def stop_at_20(batch, batch_idx):
        loss = clean.training_step_original(batch, batch_idx)
        if clean.step == 19:
            clean.should_stop_training = True
        return loss

    clean.training_step = stop_at_20
    nan_run.train(seed=0)
    assert "updates 21 to 24 were skipped on the device" in capsys.readouterr().out
    clean.train(seed=0)
    assert nan_run.nonfinite_loss_step == 21
    assert (nan_run.step, clean.step) == (24, 20)
    assert_same_parameters(parameters_of(nan_run.model), parameters_of(clean.model))
    for a, b in zip(
        nan_run.optimizer.state_dict()["state"].values(),
        clean.optimizer.state_dict()["state"].values(),
        strict=True,
    ):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # Nothing was saved from the bad state: the epoch_1 checkpoint is the newest.
    assert sorted(CheckpointStore(nan_run.checkpoint_dir).committed()) == ["epoch_1"]
    # The flag is taken back: the user's optimizer steps normally after train().
    assert not hasattr(nan_run.optimizer.optimizer, "found_inf")


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
